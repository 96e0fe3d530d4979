"""python manage.py simulate_eviction TRACE.csv [--policy NAME] [options]."""

import argparse
import math
from pathlib import Path

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from runner.eviction import DEFAULT_KEEP_ALIVE_S, POLICIES, make_policy
from runner.simulation import (
    MIB,
    draw_per_model,
    read_load_latencies,
    read_trace,
    simulate,
)
from webapp.management.arguments import (
    MAX_MIB,
    count,
    positive_mib,
    positive_seconds,
)

# An estimate of a Stable Diffusion checkpoint's size, the model kind of the
# Alibaba GenAI trace: about 2 GB for SD 1.5 in fp16, 7 GB for SDXL in fp32.
DEFAULT_SIZE_RANGE_MB = (2000.0, 7000.0)
DEFAULT_BUDGET_MB = 24576
# Near the median (22.7 s) of genai-base-model-load-latency.csv.
DEFAULT_COLD_LOAD_S = 20.0
# An upper bound of the bytes loaded at once: the budget plus the one model
# that may exceed it, each at most MAX_MIB. Times the trace's span in
# seconds, it must stay a finite float to give the mean memory.
MAX_LOADED_BYTES = 2 * MAX_MIB * MIB


def _model_value(text: str, parse_value) -> tuple[str, float]:
    model_id, sep, value = text.partition("=")
    if not sep or not model_id:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not MODEL_ID=NUMBER, e.g. M0002=4000"
        )
    return model_id, parse_value(value)


def model_mib(text: str) -> tuple[str, float]:
    return _model_value(text, positive_mib)


def model_seconds(text: str) -> tuple[str, float]:
    return _model_value(text, positive_seconds)


class Command(BaseCommand):
    help = (
        "Replay a request trace through the runners' eviction policies and "
        "print, per policy, hits, misses (cold loads), hit ratio, cold-load "
        "seconds, evictions, the mean memory held by loaded models and an "
        "estimate of what the cold loads cost."
    )

    def add_arguments(self, parser):
        parser.add_argument(
            "trace",
            type=Path,
            help="Request CSV with columns gmt_create (YYYY-MM-DD HH:MM:SS, "
            "sorted) and checkpoint_model_version_id, such as "
            "genai-requests-2024-11.csv of the Alibaba GenAI serving trace.",
        )
        parser.add_argument(
            "--policy",
            choices=["all", *POLICIES],
            default="all",
            help="Policy to replay (default: all of them).",
        )
        parser.add_argument(
            "--budget-mb",
            type=positive_mib,
            default=DEFAULT_BUDGET_MB,
            help="Memory budget of the simulated runner in MiB (default: %(default)s).",
        )
        parser.add_argument(
            "--time-factor",
            type=positive_seconds,
            default=60.0,
            help="Time compression: trace seconds are divided by this, so 60 "
            "replays an hour of trace as a minute (default: %(default)s).",
        )
        parser.add_argument(
            "--seed",
            type=count,
            default=0,
            help="Seed of the per-model draws of sizes and cold-load times "
            "(default: %(default)s).",
        )
        parser.add_argument(
            "--keep-alive-s",
            type=positive_seconds,
            default=DEFAULT_KEEP_ALIVE_S,
            help="Keep-alive of the ttl policy and fallback of the histogram "
            "policy, in seconds of compressed time (default: %(default)s).",
        )
        sizes = parser.add_mutually_exclusive_group()
        sizes.add_argument(
            "--size-mb",
            type=positive_mib,
            help="Size of every model in MiB, in place of the seeded draw.",
        )
        sizes.add_argument(
            "--size-range-mb",
            type=positive_mib,
            nargs=2,
            metavar=("MIN", "MAX"),
            default=DEFAULT_SIZE_RANGE_MB,
            help="Range in MiB of the models' sizes, drawn uniformly per model "
            "(default: %(default)s).",
        )
        parser.add_argument(
            "--model-size",
            type=model_mib,
            action="append",
            default=[],
            metavar="MODEL_ID=MB",
            help="Size of one model in MiB, over the others. Repeatable.",
        )
        loads = parser.add_mutually_exclusive_group()
        loads.add_argument(
            "--load-latency",
            type=Path,
            help="CSV with column value (load latency in ms), such as "
            "genai-base-model-load-latency.csv of the same trace; each model "
            "draws its cold-load time from it.",
        )
        loads.add_argument(
            "--cold-load-s",
            type=positive_seconds,
            help="Cold-load seconds of every model, in place of --load-latency "
            f"(default without either: {DEFAULT_COLD_LOAD_S}).",
        )
        parser.add_argument(
            "--model-cold-load",
            type=model_seconds,
            action="append",
            default=[],
            metavar="MODEL_ID=SECONDS",
            help="Cold-load seconds of one model, over the others. Repeatable.",
        )

    def handle(self, *args, **options):
        trace = self._read(read_trace, options["trace"], "trace")
        latencies = (
            self._read(read_load_latencies, options["load_latency"], "--load-latency")
            if options["load_latency"]
            else None
        )
        if not trace.requests:
            raise CommandError(f"{options['trace'].name} has no request with a model")
        factor = options["time_factor"]
        span_s = trace.requests[-1].at_s
        if not math.isfinite(span_s / factor * MAX_LOADED_BYTES):
            raise CommandError(
                f"--time-factor {factor:g} stretches the trace's {span_s:g} s "
                "past what the memory totals can hold; use a larger factor"
            )
        model_ids = trace.model_ids
        seed = options["seed"]

        if options["size_mb"]:
            size_mb = {model_id: options["size_mb"] for model_id in model_ids}
            size_source = f"{options['size_mb']:g} MiB each"
        else:
            low, high = sorted(options["size_range_mb"])
            size_mb = draw_per_model(
                model_ids, seed, "size", lambda rng: rng.uniform(low, high)
            )
            size_source = f"uniform {low:g} to {high:g} MiB per model"
        size_mb.update(self._overrides(options["model_size"], model_ids, "size"))
        sizes = {model_id: int(mb * MIB) for model_id, mb in size_mb.items()}

        if latencies is not None:
            load_seconds = draw_per_model(
                model_ids, seed, "load", lambda rng: rng.choice(latencies)
            )
            load_source = (
                f"one draw per model from {options['load_latency'].name} "
                f"({len(latencies)} loads)"
            )
        else:
            fixed = options["cold_load_s"] or DEFAULT_COLD_LOAD_S
            load_seconds = {model_id: fixed for model_id in model_ids}
            load_source = f"{fixed:g} s each"
        load_seconds.update(
            self._overrides(options["model_cold_load"], model_ids, "cold load")
        )

        rate = settings.BILLING["RATE_MICROCREDITS_PER_SECOND"]
        budget_mb = options["budget_mb"]
        lines = [
            f"trace: {options['trace'].name}, {len(trace.requests)} requests, "
            f"{len(model_ids)} models, rows without a model left out: "
            f"{trace.skipped}",
            f"time factor: {factor:g} (trace seconds / {factor:g}), seed: {seed}, "
            f"budget: {budget_mb:g} MiB, keep-alive: {options['keep_alive_s']:g} s",
            f"model sizes: {size_source}; cold loads: {load_source}; overrides: "
            f"{len(options['model_size'])} sizes, "
            f"{len(options['model_cold_load'])} cold loads",
            f"cost: estimate at the billing rate of {rate} micro-credits per "
            "second of cold load (runner-time-v1, without rounding or minimum)",
            "",
            f"{'policy':<10} {'hits':>7} {'misses':>7} {'hit ratio':>9} "
            f"{'cold-load s':>12} {'evictions':>9} {'expired':>8} "
            f"{'mean MiB':>9} {'est. credits':>12}",
        ]
        self.stdout.write("\n".join(lines))
        names = list(POLICIES) if options["policy"] == "all" else [options["policy"]]
        for name in names:
            result = simulate(
                trace,
                make_policy(name, options["keep_alive_s"]),
                budget_bytes=int(budget_mb * MIB),
                sizes=sizes,
                load_seconds=load_seconds,
                time_factor=factor,
            )
            self.stdout.write(
                f"{name:<10} {result.hits:>7} {result.misses:>7} "
                f"{result.hit_ratio:>9.4f} {result.cold_load_s:>12.1f} "
                f"{result.evictions:>9} {result.expired:>8} "
                f"{result.mean_loaded_bytes / MIB:>9.0f} "
                f"{result.cost_credits(rate):>12.2f}"
            )

    def _read(self, reader, path: Path, what: str):
        """Return ``reader(path)``, with an unreadable file as a CommandError."""
        try:
            return reader(path)
        except IsADirectoryError:
            raise CommandError(
                f"{what} {path} is a directory; give the path of a CSV file"
            ) from None
        except OSError as error:
            raise CommandError(
                f"cannot read {what} {path}: {error.strerror or error}; "
                "check the path and its permissions"
            ) from None
        except ValueError as error:
            raise CommandError(str(error)) from None

    def _overrides(
        self, pairs: list[tuple[str, float]], model_ids: list[str], what: str
    ) -> dict[str, float]:
        known = set(model_ids)
        for model_id, _ in pairs:
            if model_id not in known:
                raise CommandError(
                    f"--model-{what.replace(' ', '-')} names model {model_id!r}, "
                    "which no request of the trace uses"
                )
        return dict(pairs)
