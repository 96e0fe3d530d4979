"""The simulate_eviction command on a tiny synthetic trace, with counts by hand.

tests/fixtures/eviction-trace.csv, in seconds from its first row: A at 0,
1, ..., 10, then B 11, C 12, B 13, C 14, A 40, B 41, A 90, a row without a
model at 150, and C 200. A's 11 calls give the histogram policy 10 idle
times of 1 s, so it keeps A for 10 s. Every model is 10 MiB and the budget 20 MiB,
so two fit. Cold loads: A 3 s, B 40 s, C 1 s. Keep-alive 60 s.

LRU: evicts A at 12, B at 40, C at 41, B at 200.
LFU: evicts B at 12, C at 13, B at 14, C at 41, B at 200.
GDSF (priorities in s per 10 MiB): A reaches 33 by 10 and B enters at 40,
so A goes at 12 (clock 33). B's second call makes it 113, C's 35, so C
goes at 40 (clock 35) and B stays to hit at 41. A goes at 200.
TTL: as LRU to 90; at 200 A (idle 110 s) and B (idle 159 s) expire.
Histogram: as LRU to 41, when A's idle times (ten of 1 s, one of 30 s)
give a keep-alive of 40 s. A expires at 90 (idle 50 s) and reloads, and at
200 A (keep-alive now 60 s, idle 110 s) and B (fallback 60 s) expire.
"""

import io

import pytest
from django.conf import settings
from django.core.management import CommandError, call_command

from runner.eviction import make_policy
from runner.simulation import MIB, read_trace
from runner.simulation import simulate as replay
from tests.conftest import ROOT

TRACE = str(ROOT / "tests" / "fixtures" / "eviction-trace.csv")
FIXED = [
    "--budget-mb",
    "20",
    "--size-mb",
    "10",
    "--model-cold-load",
    "A=3",
    "--model-cold-load",
    "B=40",
    "--model-cold-load",
    "C=1",
    "--keep-alive-s",
    "60",
    "--time-factor",
    "1",
]
# policy: (hits, misses, cold-load s, evictions, of which expired)
EXPECTED = {
    "lru": (13, 6, 88.0, 4, 0),
    "lfu": (12, 7, 126.0, 5, 0),
    "gdsf": (14, 5, 48.0, 3, 0),
    "ttl": (13, 6, 88.0, 5, 2),
    "histogram": (12, 7, 91.0, 6, 3),
}


def simulate(*arguments: str) -> str:
    output = io.StringIO()
    call_command("simulate_eviction", TRACE, *arguments, stdout=output)
    return output.getvalue()


def rows(output: str) -> dict[str, list[str]]:
    """Return the result table's rows by policy name."""
    table = {}
    for line in output.splitlines():
        cells = line.split()
        if cells and cells[0] in EXPECTED:
            table[cells[0]] = cells[1:]
    return table


def test_simulation_counts_every_policy():
    output = simulate(*FIXED)
    table = rows(output)
    assert list(table) == list(EXPECTED)
    rate = settings.BILLING["RATE_MICROCREDITS_PER_SECOND"]
    for policy, (hits, misses, cold_s, evictions, expired) in EXPECTED.items():
        cells = table[policy]
        assert int(cells[0]) == hits, policy
        assert int(cells[1]) == misses, policy
        assert float(cells[2]) == pytest.approx(hits / (hits + misses), abs=1e-4)
        assert float(cells[3]) == cold_s, policy
        assert int(cells[4]) == evictions, policy
        assert int(cells[5]) == expired, policy
        cost = cold_s * rate / 1e6
        assert float(cells[7]) == pytest.approx(cost, abs=0.005), policy


@pytest.mark.parametrize(
    ("policy", "held_mib_s"),
    [
        # Two models from 12 s on: 11 × 10 + 1 × 20 + 188 × 20.
        ("lru", 3890),
        # From 11 s on: 11 × 10 + 189 × 20.
        ("lfu", 3890),
        # B expires at 101 s, A at 150 s: 11 × 10 + 90 × 20 + 49 × 10.
        ("ttl", 2400),
        # A expires at 80 s (keep-alive 40 s) and at 150 s (60 s), B at 101 s:
        # 11 × 10 + 30 × 20 + 39 × 20 + 10 × 10 + 11 × 20 + 49 × 10.
        ("histogram", 2300),
    ],
)
def test_simulation_integrates_loaded_memory(policy, held_mib_s):
    trace = read_trace(ROOT / "tests" / "fixtures" / "eviction-trace.csv")
    result = replay(
        trace,
        make_policy(policy, 60),
        budget_bytes=20 * MIB,
        sizes={model_id: 10 * MIB for model_id in "ABC"},
        load_seconds={"A": 3.0, "B": 40.0, "C": 1.0},
    )
    assert result.duration_s == 200
    assert result.byte_seconds == held_mib_s * MIB
    assert result.mean_loaded_bytes == held_mib_s * MIB / 200


def test_simulation_reports_its_parameters():
    output = simulate(*FIXED)
    assert "trace: eviction-trace.csv, 19 requests, 3 models" in output
    assert "rows without a model left out: 1" in output
    assert "overrides: 0 sizes, 3 cold loads" in output
    assert "time factor: 1 " in output
    assert "seed: 0" in output
    assert "budget: 20 MiB" in output
    assert "estimate" in output


def test_time_factor_changes_expiry():
    # Halved, the last request comes at 100 s: A (last used at 45 s) is
    # idle 55 s and stays, B (20.5 s) is idle 79.5 s and expires.
    factor = [*FIXED[:-1], "2"]
    output = simulate(*factor, "--policy", "ttl")
    assert list(rows(output)) == ["ttl"]
    assert rows(output)["ttl"][:2] == ["13", "6"]
    assert rows(output)["ttl"][4:6] == ["4", "1"]
    assert "time factor: 2 " in output


def test_seeded_sizes_repeat():
    drawn = ["--budget-mb", "20", "--size-range-mb", "5", "15", "--seed", "7"]
    first = simulate(*drawn)
    second = simulate(*drawn)
    assert first == second
    assert "seed: 7" in first
    assert "uniform 5 to 15 MiB per model" in first
    assert "cold loads: 20 s each" in first


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--model-size", "Z=10"], "model 'Z', which no request"),
        (["--model-size", "A"], "MODEL_ID=NUMBER"),
        (["--time-factor", "0"], "positive, finite"),
        (["--keep-alive-s", "-1"], "positive, finite"),
        (["--budget-mb", "1e308"], "'1e308' is not a positive number of MiB"),
        (["--size-mb", "0"], "'0' is not a positive number of MiB"),
        (["--model-size", "A=1e300"], "'1e300' is not a positive number of MiB"),
    ],
)
def test_simulation_rejects_bad_options(arguments, message):
    with pytest.raises(CommandError, match=message):
        call_command("simulate_eviction", TRACE, *arguments, stdout=io.StringIO())


def test_simulation_rejects_unsorted_trace(tmp_path):
    trace = tmp_path / "unsorted.csv"
    trace.write_text(
        "gmt_create,checkpoint_model_version_id\n"
        "2024-11-15 16:00:05,A\n"
        "2024-11-15 16:00:01,B\n"
    )
    with pytest.raises(CommandError, match="line 3: .* earlier than the row before"):
        call_command("simulate_eviction", str(trace), stdout=io.StringIO())


def run_on(trace, *arguments: str) -> None:
    call_command("simulate_eviction", str(trace), *arguments, stdout=io.StringIO())


def test_simulation_rejects_non_utf8_trace(tmp_path):
    trace = tmp_path / "latin1.csv"
    trace.write_bytes(
        b"gmt_create,checkpoint_model_version_id\n2024-11-15 16:00:05,\xe9\n"
    )
    with pytest.raises(CommandError, match=r"latin1.csv is not UTF-8 text"):
        run_on(trace)


def test_simulation_rejects_binary_trace(tmp_path):
    # One line longer than the csv module's field limit, as a binary file
    # without newlines gives.
    trace = tmp_path / "blob.csv"
    trace.write_bytes(b"a" * 200_000)
    with pytest.raises(CommandError, match=r"blob.csv line 1: not a CSV row"):
        run_on(trace)


def test_simulation_rejects_directory(tmp_path):
    with pytest.raises(CommandError, match="is a directory; give the path"):
        run_on(tmp_path)


def test_simulation_names_missing_file(tmp_path):
    with pytest.raises(CommandError, match="cannot read trace .*missing.csv"):
        run_on(tmp_path / "missing.csv")


@pytest.mark.parametrize("value", ["abc", "inf", "nan", "-5"])
def test_simulation_rejects_bad_load_latency(tmp_path, value):
    latencies = tmp_path / "latency.csv"
    latencies.write_text(f"value\n1000\n{value}\n")
    with pytest.raises(
        CommandError, match=f"latency.csv line 3: value '{value}' is not a load"
    ):
        run_on(TRACE, "--load-latency", str(latencies))


def test_simulation_rejects_tiny_time_factor():
    with pytest.raises(CommandError, match="--time-factor 1e-310 stretches"):
        run_on(TRACE, "--time-factor", "1e-310")
