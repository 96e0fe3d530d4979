"""Names of the Redis keys and RQ queues shared by the web server and runners."""

from rq.serializers import JSONSerializer

PREFIX = "glassbox"
SHARED_QUEUE = "shared"
# The one function runners execute; the job id is the run id.
RUN_JOB = "runner.jobs.execute_run"
# RQ's default serializer is pickle, and unpickling job data that someone
# wrote to Redis could run any code. Run jobs carry only JSON values.
JOB_SERIALIZER = JSONSerializer
RUNNERS_SET = f"{PREFIX}:runners"
# When each runner last published a heartbeat, in ms on the Redis server's
# clock (a sorted set), and why each runner that is gone ended (a hash of
# JSON objects), for the fleet page.
RUNNERS_SEEN = f"{PREFIX}:runners:seen"
RUNNERS_ENDED = f"{PREFIX}:runners:ended"
# The instance id of the process that last published each runner name's
# heartbeat (a hash), so that a reap can identify the process it declares
# dead after the heartbeat has expired.
RUNNERS_INSTANCE = f"{PREFIX}:runners:instance"
# A counter raised whenever a runner joins, leaves, or loads or evicts a
# model: a web server's cached view of the fleet is current while it holds.
FLEET_GENERATION = f"{PREFIX}:fleet:generation"


def runner_queue(runner_name: str) -> str:
    return f"runner.{runner_name}"


def heartbeat_key(runner_name: str) -> str:
    return f"{PREFIX}:runner:{runner_name}"


def instance_key(instance: str) -> str:
    """Return the key that is present while runner process ``instance`` is alive.

    It expires after RUNNER_DEAD_AFTER_S like a heartbeat, but a process
    whose name another process took keeps it alive while it finishes its run.
    """
    return f"{PREFIX}:instance:{instance}"


def current_run_key(runner_name: str) -> str:
    """Return the key naming the run a runner is executing, absent when idle.

    The web server sets it in the transaction that queues a run on the
    runner's own queue, the runner in the round trip that takes a job, and
    the runner deletes it in the one that delivers the result. Routing reads
    it at once, unlike the heartbeat, which can be a second old.
    """
    return f"{PREFIX}:runner:{runner_name}:current"


# A limit on how long a runner that died mid-run still looks busy to routing;
# routing ignores runners without a live heartbeat anyway.
CURRENT_RUN_TTL_S = 3600
# How long routing's mark on an idle runner lasts if the run it was made for
# is never queued (its insert failed). Queueing the run extends the mark to
# CURRENT_RUN_TTL_S; a run is normally queued milliseconds after routing.
ROUTING_CLAIM_TTL_S = 10


def runner_of_queue(queue_name: str) -> str | None:
    """Return the runner whose own queue ``queue_name`` is, None for the shared one."""
    prefix = runner_queue("")
    return queue_name[len(prefix) :] if queue_name.startswith(prefix) else None


def inputs_key(run_id: str) -> str:
    """Return the key of the hash holding a run's input images until it ends."""
    return f"{PREFIX}:run:{run_id}:inputs"


def input_field(input_name: str, index: int) -> str:
    """Return the field of one image (the batch index of an input) in that hash."""
    return f"{input_name}:{index}"


def done_key(run_id: str) -> str:
    """Return the key of the list the run's final payload is pushed to."""
    return f"{PREFIX}:run:{run_id}:done"


def reap_lock_key(runner_name: str) -> str:
    return f"{PREFIX}:reap:{runner_name}"
