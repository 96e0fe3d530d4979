"""Eviction policies of runner/eviction.py, driven without torch or a runner."""

import math
import subprocess
import sys

import pytest

from runner.eviction import (
    POLICIES,
    GreedyDualSizeFrequency,
    HistogramKeepAlive,
    IdleTimeHistogram,
    LeastRecentlyUsed,
    TimeToLive,
    make_policy,
    next_victim,
)
from runner.simulation import SimulatedModel

MIB = 1024 * 1024


class Cache:
    """A cache as ModelCache drives it: make room, load, then note the use."""

    def __init__(self, policy, budget_mb: int) -> None:
        self.policy = policy
        self.budget_bytes = budget_mb * MIB
        self.entries: dict[str, SimulatedModel] = {}
        self.evicted: list[str] = []

    def use(self, key: str, now: float, size_mb: int = 10, load_s: float = 1.0):
        entry = self.entries.get(key)
        if entry is None:
            while True:
                victim = next_victim(
                    self.policy, self.entries, size_mb * MIB, self.budget_bytes, key
                )
                if victim is None:
                    break
                self.unload(victim)
            entry = SimulatedModel(key, size_mb * MIB, load_s)
            self.entries[key] = entry
        entry.last_used = now
        entry.uses += 1
        self.policy.used(entry, now)

    def unload(self, entry) -> None:
        del self.entries[entry.key]
        self.policy.evicted(entry)
        self.evicted.append(entry.key)

    def expire(self, now: float) -> list[str]:
        expired = self.policy.expired(list(self.entries.values()), now)
        for entry in expired:
            self.unload(entry)
        return [entry.key for entry in expired]


def test_core_imports_without_torch():
    code = (
        "import sys, runner.eviction; "
        "assert 'torch' not in sys.modules, 'torch imported'; "
        "assert 'django' not in sys.modules, 'django imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_next_victim_when_load_fits():
    policy = LeastRecentlyUsed()
    entries = {"a": SimulatedModel("a", 10 * MIB, 1.0, last_used=1.0)}
    assert next_victim(policy, entries, 10 * MIB, 20 * MIB, keep="b") is None


def test_next_victim_keeps_the_model_in_use():
    policy = LeastRecentlyUsed()
    entries = {"a": SimulatedModel("a", 30 * MIB, 1.0, last_used=1.0)}
    # Over the budget alone, it stays: nothing else can go.
    assert next_victim(policy, entries, 0, 20 * MIB, keep="a") is None
    assert next_victim(policy, entries, 0, 20 * MIB, keep="b").key == "a"


def test_next_victim_spares_the_runs_models():
    policy = LeastRecentlyUsed()
    entries = {
        "a": SimulatedModel("a", 10 * MIB, 1.0, last_used=1.0),
        "b": SimulatedModel("b", 10 * MIB, 1.0, last_used=2.0),
    }
    # "a", used least recently, is another model of the run that needs room.
    assert next_victim(policy, entries, 10 * MIB, 20 * MIB, "c", {"a", "c"}).key == "b"
    # When only the run's models are left, one of them goes.
    assert next_victim(policy, entries, 10 * MIB, 20 * MIB, "c", {"a", "b"}).key == "a"


def test_next_victim_spares_awaited_models_after_others():
    policy = LeastRecentlyUsed()
    entries = {
        name: SimulatedModel(name, 10 * MIB, 1.0, last_used=used)
        for name, used in (("awaited", 1.0), ("other", 2.0), ("run", 3.0))
    }

    def victim(entries):
        return next_victim(
            policy, entries, 10 * MIB, 25 * MIB, "new", {"run"}, {"awaited"}
        )

    # "awaited", used least recently, is a model that a queued run will call.
    assert victim(entries).key == "other"
    del entries["other"]
    # Then the awaited model goes before the run's own.
    assert victim(entries).key == "awaited"


def test_gdsf_keeps_slow_loading_model_lru_evicts():
    # "slow" loads in 30 s, "fast" in 1 s; both 10 MiB, room for two.
    results = {}
    for policy in (LeastRecentlyUsed(), GreedyDualSizeFrequency()):
        cache = Cache(policy, budget_mb=20)
        cache.use("slow", 1.0, load_s=30.0)
        cache.use("fast", 2.0, load_s=1.0)
        cache.use("new", 3.0, load_s=1.0)
        results[policy.name] = sorted(cache.entries)
    assert results["lru"] == ["fast", "new"]
    assert results["gdsf"] == ["new", "slow"]


def test_gdsf_prefers_evicting_large_model():
    # Same load time and uses: the 15 MiB model has the lower priority.
    cache = Cache(GreedyDualSizeFrequency(), budget_mb=30)
    cache.use("large", 1.0, size_mb=15)
    cache.use("small", 2.0, size_mb=5)
    cache.use("small", 3.0, size_mb=5)
    cache.use("other", 4.0, size_mb=15)
    assert cache.evicted == ["large"]


def test_gdsf_clock_ages_idle_models():
    policy = GreedyDualSizeFrequency()
    cache = Cache(policy, budget_mb=20)
    # "old" is used 3 times early: priority 3 × 30 / 10 MiB.
    for now in (1.0, 2.0, 3.0):
        cache.use("old", now, load_s=30.0)
    old_priority = 3 * 30.0 / (10 * MIB)
    for step, key in enumerate(["b", "c", "d", "e", "f", "g", "h"]):
        cache.use(key, 10.0 + step, load_s=30.0)
    # Each eviction raises the clock to the victim's priority, so later
    # loads are priced above "old", which finally goes although it was
    # called more often than any of them.
    assert policy.clock >= old_priority
    assert "old" in cache.evicted
    assert cache.evicted[0] == "b"


def test_ttl_expires_idle_model_without_pressure():
    cache = Cache(TimeToLive(keep_alive_s=60), budget_mb=1000)
    cache.use("a", 0.0)
    cache.use("b", 50.0)
    assert cache.expire(60.0) == []
    assert cache.expire(60.5) == ["a"]
    assert sorted(cache.entries) == ["b"]
    # LRU never expires: both stay.
    lru = Cache(LeastRecentlyUsed(), budget_mb=1000)
    lru.use("a", 0.0)
    lru.use("b", 50.0)
    assert lru.expire(1000.0) == []


def test_ttl_falls_back_to_lru_under_pressure():
    cache = Cache(TimeToLive(keep_alive_s=600), budget_mb=20)
    cache.use("a", 0.0)
    cache.use("b", 1.0)
    cache.use("a", 2.0)
    cache.use("c", 3.0)
    assert cache.evicted == ["b"]


def test_histogram_percentile_rounds_up_to_bin_end():
    histogram = IdleTimeHistogram(bin_s=10.0, bins=5)
    for idle_s in [5.0] * 98 + [25.0, 31.0]:
        histogram.add(idle_s)
    # 99 of 100 lie below 30 s: the 99th percentile is in bin [20, 30).
    assert histogram.percentile_s(99) == 30.0
    assert histogram.percentile_s(98) == 10.0
    assert histogram.percentile_s(100) == 40.0
    histogram.add(1000.0)
    histogram.add(1000.0)
    assert histogram.overflow == 2
    assert histogram.percentile_s(99) == math.inf


def test_histogram_learns_a_keep_alive_per_model():
    policy = HistogramKeepAlive(keep_alive_s=600)
    cache = Cache(policy, budget_mb=1000)
    # "steady" is called every 15 s, 11 times: 10 idle times, all in [10, 20).
    for call in range(11):
        cache.use("steady", call * 15.0)
    cache.use("rare", 0.0)
    assert policy.keep_alive_for("steady") == 20.0
    # Fewer than MIN_SAMPLES idle times: the fixed keep-alive applies.
    assert policy.keep_alive_for("rare") == 600.0

    last = 150.0
    assert cache.expire(last + 20.0) == []
    assert cache.expire(last + 21.0) == ["steady"]
    # A TTL of 600 s would keep "steady" until 750 s.
    assert sorted(cache.entries) == ["rare"]
    assert cache.expire(601.0) == ["rare"]


def test_histogram_survives_eviction():
    policy = HistogramKeepAlive(keep_alive_s=600)
    cache = Cache(policy, budget_mb=1000)
    for call in range(6):
        cache.use("m", call * 15.0)
    cache.expire(1000.0)
    assert "m" in cache.evicted
    for call in range(5):
        cache.use("m", 1000.0 + call * 15.0)
    # 5 gaps of 15 s, one of 925 s (with the model unloaded), 4 more of 15 s.
    assert policy.histograms["m"].total == 10
    assert policy.keep_alive_for("m") == 930.0


def test_histogram_falls_back_to_lru_under_pressure():
    cache = Cache(HistogramKeepAlive(keep_alive_s=600), budget_mb=20)
    cache.use("a", 0.0)
    cache.use("b", 1.0)
    cache.use("c", 2.0)
    assert cache.evicted == ["a"]


@pytest.mark.parametrize("name", ["ttl", "histogram"])
@pytest.mark.parametrize("keep_alive_s", [0, -1.0])
def test_keep_alive_must_be_positive(name, keep_alive_s):
    with pytest.raises(ValueError, match="above 0"):
        make_policy(name, keep_alive_s)


def test_policies_by_name():
    assert list(POLICIES) == ["lru", "lfu", "gdsf", "ttl", "histogram"]
    assert make_policy("ttl", 30).keep_alive_s == 30
    with pytest.raises(KeyError):
        make_policy("fifo")


def test_histogram_state_is_bounded():
    policy = HistogramKeepAlive(keep_alive_s=600)
    cache = Cache(policy, budget_mb=20)
    # "kept" is used again after each batch of new ids, so it stays among the
    # MAX_MODELS models used last, and the oldest ids are dropped instead.
    for call in range(11):
        cache.use("kept", call * 1000.0)
        for index in range(policy.MAX_MODELS // 10):
            cache.use(f"once-{call}-{index}", call * 1000.0 + 10.0)
            cache.use(f"once-{call}-{index}", call * 1000.0 + 25.0)
    assert len(policy.histograms) <= policy.MAX_MODELS
    assert len(policy._last_use) == policy.MAX_MODELS
    assert "once-0-0" not in policy.histograms
    assert "once-0-0" not in policy._last_use
    assert policy.histograms["kept"].total == 10
    assert policy.keep_alive_for("kept") == 1010.0


def test_histogram_percentile_follows_new_idle_times():
    # Percentiles are kept between adds, since the runner reads one per
    # loaded model before every job. Each add must replace them.
    histogram = IdleTimeHistogram(bin_s=10.0, bins=360)
    for _ in range(10):
        histogram.add(5.0)
    assert histogram.percentile_s(99.0) == 10.0
    for _ in range(10):
        histogram.add(55.0)
    assert histogram.total == 20
    assert histogram.percentile_s(99.0) == 60.0
    assert histogram.percentile_s(50.0) == 10.0
    histogram.add(4000.0)
    assert histogram.percentile_s(99.0) == math.inf
