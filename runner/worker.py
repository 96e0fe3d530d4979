"""The long-lived runner: an RQ worker that executes jobs in its own process.

RQ's default worker forks a child per job, which would throw away every
loaded model after each run; SimpleWorker runs the job in-process instead.
A background thread publishes the heartbeat and reaps dead runners.
"""

import logging
import threading

from django.conf import settings
from rq import Queue, SimpleWorker

from runner import fleet, keys
from runner.runtime import RunnerRuntime

logger = logging.getLogger(__name__)

# How often (in heartbeats) a runner looks for queued runs whose job is gone.
RECONCILE_EVERY_BEATS = 20


class RunnerWorker(SimpleWorker):
    """SimpleWorker listening on the runner's own queue first, then the shared one."""


class Heartbeat(threading.Thread):
    def __init__(self, runtime: RunnerRuntime, own_queue: Queue) -> None:
        super().__init__(name=f"heartbeat-{runtime.name}", daemon=True)
        self.runtime = runtime
        self.own_queue = own_queue
        self.stopped = threading.Event()

    def run(self) -> None:
        interval = settings.GLASSBOX["RUNNER_HEARTBEAT_S"]
        beats = 0
        failures = 0
        while not self.stopped.is_set():
            try:
                self.beat()
                if beats % 3 == 0:
                    fleet.reap_dead_runners()
                if beats % RECONCILE_EVERY_BEATS == 0:
                    fleet.recover_lost_jobs()
                if failures:
                    logger.info(
                        "runner %s: heartbeat back after %d failures",
                        self.runtime.name,
                        failures,
                    )
                failures = 0
            except Exception:
                failures += 1
                # One traceback, then one line a minute while Redis is away.
                if failures == 1:
                    logger.exception("runner %s: heartbeat failed", self.runtime.name)
                elif failures % max(1, int(60 / interval)) == 0:
                    logger.warning(
                        "runner %s: heartbeat still failing (%d times)",
                        self.runtime.name,
                        failures,
                    )
            beats += 1
            self.stopped.wait(interval)

    def beat(self) -> None:
        state = self.runtime.state(queue_length=self.own_queue.count)
        fleet.publish_heartbeat(self.runtime.name, state)

    def stop(self) -> None:
        self.stopped.set()


def run_worker(runtime: RunnerRuntime, connection, *, burst: bool = False) -> None:
    own_queue = Queue(keys.runner_queue(runtime.name), connection=connection)
    shared_queue = Queue(keys.SHARED_QUEUE, connection=connection)
    heartbeat = Heartbeat(runtime, own_queue)
    heartbeat.beat()
    heartbeat.start()
    worker = RunnerWorker(
        [own_queue, shared_queue],
        connection=connection,
        name=f"{runtime.name}.{runtime.pid}",
    )
    logger.info(
        "runner %s started on %s (budget %d bytes), queues %s and %s",
        runtime.name,
        runtime.device,
        runtime.cache.budget_bytes,
        own_queue.name,
        shared_queue.name,
    )
    try:
        worker.work(burst=burst, logging_level="WARNING", with_scheduler=False)
    finally:
        heartbeat.stop()
        heartbeat.join(timeout=5)
        fleet.remove_heartbeat(runtime.name)
        moved = fleet.move_queued_jobs(runtime.name)
        logger.info(
            "runner %s stopped; %d queued jobs moved to the shared queue",
            runtime.name,
            moved,
        )
