"""What-if replay of a request trace through the runner's eviction policies.

One simulated runner cache takes the trace's requests in arrival order and
drives the policy objects of runner/eviction.py as ModelCache does. Before
each request it unloads the models that the policy finds idle too long, as
a runner does between jobs. Then it uses the request's model, and on a
miss evicts by ``next_victim`` until the model fits and loads it.

Simplifications, so the counts are estimates of a real runner's:
- Requests take no time and never queue: each uses its model at its
  arrival, and a cold load does not delay later requests.
- Model sizes are known before the first load. ModelCache measures a
  model at its first load and evicts right after, which picks the same
  victims.
- The trace's ``exec_time_seconds`` is not used: a runner marks a model
  used when a run requests it, before inference.
"""

import csv
import math
import random
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from runner.eviction import EvictionPolicy, next_victim

MIB = 1024 * 1024

# Columns of the Alibaba GenAI serving trace (alibaba/clusterdata, folder
# cluster-trace-v2026-GenAI; Lin et al., SoCC 2025), genai-requests-*.csv.
ARRIVAL_COLUMN = "gmt_create"
MODEL_COLUMN = "checkpoint_model_version_id"
ARRIVAL_FORMAT = "%Y-%m-%d %H:%M:%S"
# genai-base-model-load-latency.csv of the same trace: load latency in ms.
LOAD_LATENCY_COLUMN = "value"


@dataclass(frozen=True)
class Request:
    # Seconds since the trace's first request, before time compression.
    at_s: float
    model_id: str


@dataclass
class Trace:
    requests: list[Request]
    # Rows without a model id, left out of ``requests``.
    skipped: int = 0

    @property
    def model_ids(self) -> list[str]:
        return sorted({request.model_id for request in self.requests})


@dataclass
class SimulatedModel:
    """A loaded model as the policies see it (runner.eviction.Entry)."""

    key: str
    memory_bytes: int
    load_seconds: float
    last_used: float = 0.0
    uses: int = 0


@dataclass
class SimulationResult:
    policy: str
    hits: int = 0
    misses: int = 0
    cold_load_s: float = 0.0
    # Evictions to make room plus ``expired``, as a runner counts them.
    evictions: int = 0
    expired: int = 0
    # Integral of the loaded models' bytes over simulated time: a model
    # counts from its use until its eviction, or until its keep-alive ran
    # out when it expired.
    byte_seconds: float = 0.0
    duration_s: float = 0.0

    @property
    def mean_loaded_bytes(self) -> float:
        return self.byte_seconds / self.duration_s if self.duration_s else 0.0

    @property
    def hit_ratio(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0

    def cost_credits(self, rate_microcredits_per_second: int) -> float:
        """Estimate what the cold loads add to the bills, in credits.

        Cold-load time is part of a run's billable runner total, so each
        second of it costs the rate. Rounding to whole milliseconds and the
        minimum billed time per run are left out.
        """
        return self.cold_load_s * rate_microcredits_per_second / 1e6


@contextmanager
def _csv_rows(path: Path) -> Iterator[csv.DictReader]:
    """Open ``path`` as a UTF-8 CSV file with a header row.

    Raises ValueError naming the file when it is not UTF-8 text, and the
    line when it is not CSV (a field over the csv module's limit, as in a
    binary file). The file is decoded in blocks, so a decoding error has no
    line number.
    """
    with path.open(newline="", encoding="utf-8") as file:
        reader = csv.DictReader(file)
        try:
            yield reader
        except UnicodeDecodeError as error:
            byte = error.object[error.start : error.start + 1]
            raise ValueError(
                f"{path.name} is not UTF-8 text (it contains byte {byte!r}); "
                "give a CSV file in UTF-8"
            ) from None
        except csv.Error as error:
            raise ValueError(
                f"{path.name} line {max(reader.line_num, 1)}: not a CSV row "
                f"({error}); give a CSV file with a header row"
            ) from None


def read_trace(path: Path) -> Trace:
    """Read a request trace CSV with gmt_create and checkpoint_model_version_id.

    Raises ValueError naming the file, row and value when the file is not
    UTF-8 CSV, a column is missing, a time does not parse, or the rows are
    not sorted by time.
    """
    requests: list[Request] = []
    skipped = 0
    first: datetime | None = None
    with _csv_rows(path) as reader:
        missing = {ARRIVAL_COLUMN, MODEL_COLUMN} - set(reader.fieldnames or [])
        if missing:
            raise ValueError(
                f"{path.name} has no column {', '.join(sorted(missing))}; a "
                f"trace needs {ARRIVAL_COLUMN} and {MODEL_COLUMN}"
            )
        for line, row in enumerate(reader, start=2):
            model_id = (row[MODEL_COLUMN] or "").strip()
            if not model_id:
                skipped += 1
                continue
            try:
                arrival = datetime.strptime(row[ARRIVAL_COLUMN], ARRIVAL_FORMAT)
            except (TypeError, ValueError):
                raise ValueError(
                    f"{path.name} line {line}: {ARRIVAL_COLUMN} "
                    f"{row[ARRIVAL_COLUMN]!r} is not a time like 2024-11-15 16:57:50"
                ) from None
            if first is None:
                first = arrival
            at_s = (arrival - first).total_seconds()
            if requests and at_s < requests[-1].at_s:
                raise ValueError(
                    f"{path.name} line {line}: {ARRIVAL_COLUMN} "
                    f"{row[ARRIVAL_COLUMN]} is earlier than the row before; "
                    "sort the trace by arrival"
                )
            requests.append(Request(at_s=at_s, model_id=model_id))
    return Trace(requests=requests, skipped=skipped)


def read_load_latencies(path: Path) -> list[float]:
    """Read the load latencies of a load-latency CSV, in seconds.

    Raises ValueError naming the file, line and value when a latency is not
    a finite number of ms of zero or more.
    """
    latencies: list[float] = []
    with _csv_rows(path) as reader:
        if LOAD_LATENCY_COLUMN not in (reader.fieldnames or []):
            raise ValueError(
                f"{path.name} has no column {LOAD_LATENCY_COLUMN} (load latency in ms)"
            )
        for line, row in enumerate(reader, start=2):
            text = (row[LOAD_LATENCY_COLUMN] or "").strip()
            if not text:
                continue
            try:
                value = float(text)
            except ValueError:
                value = math.nan
            if not math.isfinite(value) or value < 0:
                raise ValueError(
                    f"{path.name} line {line}: {LOAD_LATENCY_COLUMN} {text!r} is "
                    "not a load latency in ms (a finite number, zero or more)"
                )
            latencies.append(value / 1000)
    if not latencies:
        raise ValueError(f"{path.name} has no load latency in {LOAD_LATENCY_COLUMN}")
    return latencies


def draw_per_model(model_ids: Iterable[str], seed: int, purpose: str, draw) -> dict:
    """Return ``draw(rng)`` for each model, with one generator per model.

    Each generator is seeded from the seed, the purpose and the model id, so
    a model's value depends on none of the other models in the trace.
    """
    return {
        model_id: draw(random.Random(f"{seed}:{purpose}:{model_id}"))
        for model_id in model_ids
    }


def simulate(
    trace: Trace,
    policy: EvictionPolicy,
    *,
    budget_bytes: int,
    sizes: dict[str, int],
    load_seconds: dict[str, float],
    time_factor: float = 1.0,
) -> SimulationResult:
    """Replay ``trace`` through ``policy``; trace time is divided by ``time_factor``.

    ``policy`` keeps state, so give each replay a new one.
    """
    result = SimulationResult(policy=policy.name)
    entries: dict[str, SimulatedModel] = {}

    def unload(entry: SimulatedModel) -> None:
        del entries[entry.key]
        policy.evicted(entry)
        result.evictions += 1

    previous = 0.0
    for request in trace.requests:
        now = request.at_s / time_factor
        loaded_bytes = sum(entry.memory_bytes for entry in entries.values())
        result.byte_seconds += loaded_bytes * (now - previous)
        previous = now
        for entry in policy.expired(list(entries.values()), now):
            # A runner unloads it within about a second of its expiry.
            result.byte_seconds -= entry.memory_bytes * (now - policy.expires_at(entry))
            unload(entry)
            result.expired += 1

        key = request.model_id
        entry = entries.get(key)
        if entry is None:
            result.misses += 1
            result.cold_load_s += load_seconds[key]
            while True:
                victim = next_victim(
                    policy, entries, sizes[key], budget_bytes, keep=key
                )
                if victim is None:
                    break
                unload(victim)
            entry = SimulatedModel(
                key=key, memory_bytes=sizes[key], load_seconds=load_seconds[key]
            )
            entries[key] = entry
        else:
            result.hits += 1
        entry.last_used = now
        entry.uses += 1
        policy.used(entry, now)

    result.duration_s = previous
    return result
