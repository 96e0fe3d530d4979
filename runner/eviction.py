"""Eviction decisions for a model cache under a memory budget, free of torch.

The runner's ModelCache (runner/model_cache.py) and the what-if simulator
(runner/simulation.py) drive the same policy objects through the same two
calls: ``next_victim`` to make room for a load, and ``EvictionPolicy.expired``
to unload idle models between jobs. Times are seconds on any clock that
does not go back (the runner uses time.monotonic(), the simulator the
trace's arrival times).

A policy reads each loaded model as an ``Entry``, and learns of loads, uses
and evictions through its hooks, so that it can keep state of its own
(GDSF's priorities, the keep-alive histograms).
"""

import math
from collections.abc import Collection, Iterable
from typing import Protocol


class Entry(Protocol):
    """The fields of a loaded model that a policy reads."""

    @property
    def key(self) -> str: ...

    memory_bytes: int
    last_used: float
    # Uses since this load: a model evicted and loaded again starts at one.
    uses: int
    # Seconds its latest cold load took.
    load_seconds: float


class EvictionPolicy:
    """Chooses which loaded model to unload next, and which idle ones expire."""

    name = "base"

    def victim(self, entries: list[Entry]) -> Entry:
        """Return the entry to unload next from ``entries`` (never empty)."""
        raise NotImplementedError

    def expires_at(self, entry: Entry) -> float:
        """Return when ``entry`` may be unloaded without memory pressure.

        Infinity, unless the policy has a keep-alive.
        """
        return math.inf

    def expired(self, entries: Iterable[Entry], now: float) -> list[Entry]:
        """Return the entries idle past their keep-alive at ``now``."""
        return [entry for entry in entries if now > self.expires_at(entry)]

    def used(self, entry: Entry, now: float) -> None:
        """Note a run's first use of ``entry``, once its ``last_used`` is set.

        Further calls of the model in the same run (a batch, crops) are not noted.
        """

    def evicted(self, entry: Entry) -> None:
        """Note that ``entry`` was unloaded to make room or because it expired."""

    def forget(self, key: str) -> None:
        """Drop any state kept for ``key``: it was unloaded for another reason."""


class LeastRecentlyUsed(EvictionPolicy):
    name = "lru"

    def victim(self, entries: list[Entry]) -> Entry:
        return min(entries, key=lambda entry: entry.last_used)


class LeastFrequentlyUsed(EvictionPolicy):
    """Unload the model called fewest times since it loaded.

    Counts start again at each load, so a model evicted and loaded again
    starts at one call. Ties go to the least recently used.
    """

    name = "lfu"

    def victim(self, entries: list[Entry]) -> Entry:
        return min(entries, key=lambda entry: (entry.uses, entry.last_used))


class GreedyDualSizeFrequency(EvictionPolicy):
    """Greedy-Dual-Size-Frequency (Cherkasova, HP Labs HPL-98-69, 1998).

    Each model's priority is ``clock + uses × cost / size``, set at the first
    use in each run, where cost is its measured cold-load seconds and size
    its bytes. The model with the lowest priority goes first, and the clock
    becomes that priority, so models not used for a while fall behind newer uses. A
    model that is slow to load, small or often used stays longer than LRU
    would keep it. Ties go to the least recently used.
    """

    name = "gdsf"

    def __init__(self) -> None:
        self.clock = 0.0
        self._priority: dict[str, float] = {}

    def priority(self, entry: Entry) -> float:
        stored = self._priority.get(entry.key)
        if stored is not None:
            return stored
        # A model loaded before this policy was chosen: priced at the current clock.
        return self._price(entry)

    def _price(self, entry: Entry) -> float:
        # A model measured at 0 bytes (an architecture without weights on
        # a device that allocates nothing) counts as 1 byte.
        return self.clock + entry.uses * entry.load_seconds / max(entry.memory_bytes, 1)

    def victim(self, entries: list[Entry]) -> Entry:
        return min(entries, key=lambda entry: (self.priority(entry), entry.last_used))

    def used(self, entry: Entry, now: float) -> None:
        self._priority[entry.key] = self._price(entry)

    def evicted(self, entry: Entry) -> None:
        self.clock = max(self.clock, self.priority(entry))
        self._priority.pop(entry.key, None)

    def forget(self, key: str) -> None:
        self._priority.pop(key, None)


class TimeToLive(LeastRecentlyUsed):
    """Unload a model idle longer than ``keep_alive_s``; LRU under memory pressure."""

    name = "ttl"

    def __init__(self, keep_alive_s: float) -> None:
        if not keep_alive_s > 0:
            raise ValueError(
                f"keep-alive of {keep_alive_s!r} s is invalid for policy ttl; "
                "give a number of seconds above 0"
            )
        self.keep_alive_s = keep_alive_s

    def expires_at(self, entry: Entry) -> float:
        return entry.last_used + self.keep_alive_s


class IdleTimeHistogram:
    """Counts of one model's idle times between uses, in fixed-width bins.

    Times at or past the last bin's end go to an overflow count.
    """

    def __init__(self, bin_s: float, bins: int) -> None:
        self.bin_s = bin_s
        self.counts = [0] * bins
        self.overflow = 0
        self.total = 0
        # Percentiles computed since the last add. The runner reads one
        # per loaded model before every job, and a scan walks up to all bins.
        self._percentiles: dict[float, float] = {}

    def add(self, idle_s: float) -> None:
        index = int(idle_s // self.bin_s)
        if index < len(self.counts):
            self.counts[index] += 1
        else:
            self.overflow += 1
        self.total += 1
        self._percentiles.clear()

    def percentile_s(self, percentile: float) -> float:
        """Return the end of the bin that contains the ``percentile`` % point.

        Returns infinity when that point lies in the overflow, and rounds up
        to a bin's end, so the keep-alive covers the whole bin.
        """
        cached = self._percentiles.get(percentile)
        if cached is None:
            cached = self._scan(percentile)
            self._percentiles[percentile] = cached
        return cached

    def _scan(self, percentile: float) -> float:
        needed = math.ceil(self.total * percentile / 100)
        seen = 0
        for index, count in enumerate(self.counts):
            seen += count
            if seen >= needed:
                return (index + 1) * self.bin_s
        return math.inf


class HistogramKeepAlive(LeastRecentlyUsed):
    """Keep each model loaded for the 99th percentile of its own idle times.

    The keep-alive policy of Shahrad et al., "Serverless in the Wild"
    (USENIX ATC 2020), without its pre-warming: the runner never loads a
    model before a run requests it, so only the keep-alive side applies.
    Under memory pressure it falls back to LRU.

    Idle times are counted per model id (they outlive evictions, for the
    MAX_MODELS models used last) in bins of BIN_S seconds up to BINS × BIN_S
    (one hour). A model with fewer than
    MIN_SAMPLES idle times, or whose 99th percentile is over an hour, has
    too little data for a histogram to say when it returns. The first
    falls back to the fixed keep-alive, and the second is never expired by
    time, only evicted under pressure.
    """

    name = "histogram"

    # 10 s bins: the runner checks for expiry about once a second between
    # jobs, and runs of the same model a few seconds apart fall in one bin.
    BIN_S = 10.0
    # One hour of bins: a model idle for longer is expected to go under
    # memory pressure before its keep-alive matters.
    BINS = 360
    # The 99th percentile, as in Shahrad et al. A model stays loaded over
    # all but 1 % of its observed gaps, so an early eviction turns few of its
    # runs cold. A model used in rare bursts still goes soon after each.
    PERCENTILE = 99.0
    MIN_SAMPLES = 10
    # Models whose idle times are kept, the most recently used. A histogram
    # takes about 3 KB, so the state stays near 3 MB however many model ids
    # a runner runs. A model dropped here starts again from the fixed
    # keep-alive.
    MAX_MODELS = 1000

    def __init__(self, keep_alive_s: float) -> None:
        if not keep_alive_s > 0:
            raise ValueError(
                f"fallback keep-alive of {keep_alive_s!r} s is invalid for "
                "policy histogram; give a number of seconds above 0"
            )
        # The keep-alive of a model with too few idle times for a histogram.
        self.keep_alive_s = keep_alive_s
        self.histograms: dict[str, IdleTimeHistogram] = {}
        self._last_use: dict[str, float] = {}

    def keep_alive_for(self, key: str) -> float:
        """Return the seconds that the model ``key`` stays loaded while idle."""
        histogram = self.histograms.get(key)
        if histogram is None or histogram.total < self.MIN_SAMPLES:
            return self.keep_alive_s
        return histogram.percentile_s(self.PERCENTILE)

    def used(self, entry: Entry, now: float) -> None:
        previous = self._last_use.get(entry.key)
        if previous is not None:
            histogram = self.histograms.get(entry.key)
            if histogram is None:
                histogram = IdleTimeHistogram(self.BIN_S, self.BINS)
                self.histograms[entry.key] = histogram
            histogram.add(now - previous)
        # Re-inserted, so the dict's order is the order of last use.
        self._last_use.pop(entry.key, None)
        self._last_use[entry.key] = now
        if len(self._last_use) > self.MAX_MODELS:
            self.forget(next(iter(self._last_use)))

    def expires_at(self, entry: Entry) -> float:
        return entry.last_used + self.keep_alive_for(entry.key)

    def forget(self, key: str) -> None:
        self.histograms.pop(key, None)
        self._last_use.pop(key, None)


# The policies the fleet settings can name, by name.
POLICIES: dict[str, type[EvictionPolicy]] = {
    policy.name: policy
    for policy in (
        LeastRecentlyUsed,
        LeastFrequentlyUsed,
        GreedyDualSizeFrequency,
        TimeToLive,
        HistogramKeepAlive,
    )
}
# The policies whose constructor takes the keep-alive in seconds.
KEEP_ALIVE_POLICIES = frozenset({TimeToLive.name, HistogramKeepAlive.name})
# Seconds an idle model stays loaded when no keep-alive is set.
DEFAULT_KEEP_ALIVE_S = 300.0


def make_policy(
    name: str, keep_alive_s: float = DEFAULT_KEEP_ALIVE_S
) -> EvictionPolicy:
    """Build the policy called ``name``; raise KeyError for an unknown name."""
    policy_class = POLICIES[name]
    if name in KEEP_ALIVE_POLICIES:
        return policy_class(keep_alive_s)
    return policy_class()


def policy_keep_alive_s(policy: EvictionPolicy) -> float | None:
    """Return the keep-alive that ``policy`` was built with, or None if it has none."""
    return getattr(policy, "keep_alive_s", None)


def next_victim(
    policy: EvictionPolicy,
    entries: dict[str, Entry],
    incoming_bytes: int,
    budget_bytes: int,
    keep: str | None,
    spare: Collection[str] = (),
    awaited: Collection[str] = (),
) -> Entry | None:
    """Return the next entry to unload so that ``incoming_bytes`` more fit.

    Returns None when they fit already, or when only ``keep`` is left: the
    model being loaded or used last stays, alone over the budget if it must.
    The policy picks among the entries outside ``spare`` (the other models
    of the run that needs the room) and ``awaited`` (the models of runs
    routed to this runner and queued for it) while there are any. Next it
    picks among the awaited ones, and only then among the run's own. So a
    run whose models fit the budget together never evicts one of them to
    load another, and a run that routing sent here because its models were
    loaded finds them loaded unless nothing else could go.
    """
    used = sum(entry.memory_bytes for entry in entries.values())
    if used + incoming_bytes <= budget_bytes:
        return None
    candidates = [entry for key, entry in entries.items() if key != keep]
    if not candidates:
        return None
    outside_run = [entry for entry in candidates if entry.key not in spare]
    others = [entry for entry in outside_run if entry.key not in awaited]
    return policy.victim(others or outside_run or candidates)
