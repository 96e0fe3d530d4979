"""Wall time on the Redis server's clock, which every process in the pool shares.

Some run times span two processes, and with runners on other machines, two
clocks. The queue time is a runner's start minus the web server's enqueue. A
run's end, written by a runner, is compared with a web server's time when the
result is read from the database. Each process estimates how far its clock is from
Redis's, from the replies to TIME commands it sends with its other commands,
and states such times on Redis's clock. A difference of two of them is then
off by at most half of each sample's round trip, however far apart the
machines' clocks are.
"""

import logging
import threading
import time
from collections import deque
from datetime import UTC, datetime

from webapp.redis import get_redis

logger = logging.getLogger(__name__)

# Offsets from the last samples, of which the one with the shortest round
# trip is used. A sample older than MAX_SAMPLE_AGE_S is not used, so a drift
# of the local clock is corrected within that time.
SAMPLES_KEPT = 8
MAX_SAMPLE_AGE_S = 30.0
# A sample is not used either once the local clock minus the monotonic
# clock has changed by more than this (ns) since it was taken. The local
# clock was stepped then (an NTP step, a VM resumed), so the sample's offset
# is off by the step.
MAX_STEP_NS = 10_000_000


def _wall_minus_monotonic_ns() -> int:
    return time.time_ns() - time.monotonic_ns()


class RedisClock:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        # (round trip ns, offset ns, monotonic time the sample was taken,
        # local clock minus monotonic clock then in ns)
        self._samples: deque[tuple[int, int, float, int]] = deque(maxlen=SAMPLES_KEPT)

    def observe(self, sent_ns: int, reply: tuple[int, int], received_ns: int) -> None:
        """Record a TIME ``reply`` sent and received at these local times."""
        seconds, microseconds = reply
        redis_ns = seconds * 1_000_000_000 + microseconds * 1_000
        offset = redis_ns - (sent_ns + received_ns) // 2
        sample = (
            received_ns - sent_ns,
            offset,
            time.monotonic(),
            _wall_minus_monotonic_ns(),
        )
        with self._lock:
            self._samples.append(sample)

    def sync(self) -> None:
        """Take a sample with a TIME round trip of its own."""
        sent = time.time_ns()
        reply = get_redis().time()
        self.observe(sent, reply, time.time_ns())

    def sync_if_older(self, max_age_s: float) -> None:
        """Take a sample unless the newest one is younger than ``max_age_s``.

        A thread that waits for the GIL between sending a TIME and reading
        its reply stretches the round trip, and one such sample can put the
        offset tens of milliseconds off. Samples taken at least this often
        leave ``offset_ns`` several to choose the shortest round trip from.
        """
        with self._lock:
            newest = self._samples[-1][2] if self._samples else None
        if newest is not None and time.monotonic() - newest < max_age_s:
            return
        try:
            self.sync()
        except Exception as error:
            logger.warning("clock: TIME failed, keeping older samples: %s", error)

    def offset_ns(self) -> int:
        """Return Redis's clock minus this process's, taking a sample if none is recent.

        Returns 0, this process's own clock, when Redis cannot be reached.
        """
        offset = self._best_offset()
        if offset is None:
            try:
                self.sync()
            except Exception as error:
                logger.warning("clock: TIME failed, using the local clock: %s", error)
                return 0
            offset = self._best_offset()
        return offset or 0

    def now_ns(self) -> int:
        return time.time_ns() + self.offset_ns()

    def now(self) -> datetime:
        return datetime.fromtimestamp(self.now_ns() / 1e9, tz=UTC)

    def _best_offset(self) -> int | None:
        oldest = time.monotonic() - MAX_SAMPLE_AGE_S
        difference_now = _wall_minus_monotonic_ns()
        with self._lock:
            recent = [
                sample
                for sample in self._samples
                if sample[2] >= oldest
                and abs(sample[3] - difference_now) <= MAX_STEP_NS
            ]
        if not recent:
            return None
        return min(recent)[1]


clock = RedisClock()


def redis_now() -> datetime:
    """Return the time on the Redis server's clock, as a model field default.

    Migrations record a default by its import path, which a bound method
    such as ``clock.now`` does not have.
    """
    return clock.now()
