"""Models kept loaded on a runner, evicted under a memory budget.

A model is loaded on first use and stays loaded between runs.  Its memory is
measured when it loads: bytes allocated by the CUDA allocator on a GPU;
parameter and buffer bytes on the CPU (with the process's RSS growth kept for
information).  When loading a model would push the total over the budget,
the eviction policy picks models to unload first; a model whose size is not
known yet is measured on load and the budget enforced right after.
"""

import gc
import itertools
import logging
import threading
import time
import uuid
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import torch

from runner.eviction import (
    DEFAULT_KEEP_ALIVE_S,
    POLICIES,
    EvictionPolicy,
    LeastFrequentlyUsed,
    LeastRecentlyUsed,
    make_policy,
    next_victim,
    policy_keep_alive_s,
)
from runner.registry import KIND_PLACES, ModelSource, describe_place
from runner.weights_check import check_format, describe_unusable_checkpoint
from workflows.detections import Detections
from workflows.errors import ModelLoadError, WeightsFileMissingError
from workflows.images import WorkflowImage
from workflows.timing import ModelUse, RunTimer, us_added

logger = logging.getLogger(__name__)

# The policies are defined in runner/eviction.py and imported from here too.
__all__ = [
    "POLICIES",
    "EvictionPolicy",
    "LeastFrequentlyUsed",
    "LeastRecentlyUsed",
    "LoadedModel",
    "ModelCache",
]

# Built from ultralytics' YAML, with random weights: no file is read.
WARM_UP_ARCHITECTURE = "yolov8n.yaml"


def open_weights(path: str, task: str | None = None) -> Any:
    """Build an ultralytics model from ``path``, unpickling only model layers.

    A ``.pt`` checkpoint is a pickle, and a pickle can call any function it
    names. With ULTRALYTICS_SAFE_LOAD, which the settings module sets and
    ultralytics reads once at import, checkpoints load through torch's
    weights_only unpickler and ultralytics' allow-list of layer classes, so
    a file that names anything else is rejected before any of it runs.
    """
    from ultralytics import YOLO
    from ultralytics.nn import tasks

    if not tasks.SAFE_LOAD:
        raise RuntimeError(
            "ultralytics was imported before ULTRALYTICS_SAFE_LOAD was set, so "
            "it would unpickle weights without its allow-list"
        )
    # ultralytics falls back to the full unpickler, without a warning, when
    # torch lacks what its restricted loader needs (torch older than 2.6).
    if not tasks._SafeLoad.SUPPORTED:
        raise RuntimeError(
            f"torch {torch.__version__} does not support ultralytics' restricted "
            "unpickler, so weights would load without its allow-list; install "
            "torch 2.6 or later"
        )
    model = YOLO(path, task=task)
    # ultralytics wraps any module of its allow-list that a checkpoint holds,
    # a bare torch.nn.Linear included, and guesses the task "detect" for it,
    # so such a file would pass as a detector and fail only when it runs.
    held = type(model.model).__name__
    if not isinstance(model.model, tasks.BaseModel):
        raise NotADetector(
            f"it holds a {held}, not an ultralytics model; only weights saved "
            "by ultralytics load here"
        )
    # A task given here overrides the checkpoint's own, so a classifier
    # would pass as a detector too.
    if task == "detect" and not isinstance(model.model, tasks.DetectionModel):
        raise NotADetector(f"it holds an ultralytics {held}, not a detection model")
    return model


class NotADetector(ValueError):
    """A checkpoint that loads, but whose model is no ultralytics detector."""


@dataclass
class LoadedModel:
    source: ModelSource
    model: Any  # ultralytics.YOLO
    memory_bytes: int
    rss_growth_bytes: int
    loaded_at: float
    last_used: float
    uses: int = 0
    # Whether the checkpoint records a training run (ultralytics' train_args).
    trained: bool = True
    # Seconds the load took, from reading the file to the end of the
    # warm-up: the cost that GDSF weighs.
    load_seconds: float = 0.0

    @property
    def key(self) -> str:
        return self.source.cache_key

    def class_names(self) -> dict[int, str]:
        return dict(self.model.names)


def pick_device(requested: str | None = None) -> str:
    """Return ``requested``, or cuda:0 when CUDA is available, else cpu.

    Raises ValueError for a string torch does not parse as a device, or for
    a CUDA device this machine lacks.
    """
    if not requested:
        return "cuda:0" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(requested)
    except RuntimeError:
        raise ValueError(
            f"--device {requested!r} is not a torch device; use e.g. cpu or cuda:0"
        ) from None
    # NOTE: only CUDA devices are checked here. Another type that torch
    # parses but this machine lacks (mps, xpu) fails in the warm-up.
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"--device {requested!r} needs CUDA, which torch cannot use on "
                "this machine; use --device cpu or leave the option out"
            )
        count = torch.cuda.device_count()
        if (device.index or 0) >= count:
            raise ValueError(
                f"--device {requested!r} names a CUDA device this machine lacks: "
                f"it has {count}, from cuda:0"
            )
    return requested


def _synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(torch.device(device))


LOAD_PHASES = ("read", "to_device", "warmup")


def _add_load_phases(use: ModelUse, marks: list[int]) -> None:
    """Add a load's phases to ``use``: ``marks`` are the load's start and the
    end of each phase it finished, in the order of LOAD_PHASES.

    Added, not set: a model evicted during a run is loaded again.
    """
    spans = [end - start for start, end in itertools.pairwise(marks)]
    spans += [0] * (len(LOAD_PHASES) - len(spans))
    use.cold = True
    use.load_read_ns += spans[0]
    use.load_to_device_ns += spans[1]
    use.load_warmup_ns += spans[2]


def _load_error(
    source: ModelSource, path: str, error: Exception, phase: str, where: str
) -> ModelLoadError:
    """Say which load phase failed, and why, without the server's paths.

    ``where`` is the device for the to-device phase and the image size for
    the warm-up.
    """
    if phase == "read" and Path(path).is_file():
        described = describe_unusable_checkpoint(error, Path(path))
        if described is not None:
            return ModelLoadError(source.model_id, described)
    # ultralytics' messages name the file; the server's paths stay here.
    reason = str(error).replace(path, Path(path).name).removeprefix("ERROR ❌️ ")
    cause = f"{type(error).__name__}: {reason}"
    if phase == "to_device":
        cause = f"moving it to {where} failed: {cause}"
    elif phase == "warmup":
        cause = (
            f"it loaded, but its warm-up prediction on a blank {where} image "
            f"failed, so these weights cannot run: {cause}"
        )
    return ModelLoadError(source.model_id, cause)


def tensor_bytes(module: torch.nn.Module) -> int:
    total = 0
    for tensor in [*module.parameters(), *module.buffers()]:
        total += tensor.numel() * tensor.element_size()
    return total


class ModelCache:
    def __init__(
        self,
        *,
        budget_bytes: int,
        device: str,
        warmup_size: int,
        torch_threads: int,
        policy: EvictionPolicy | None = None,
    ) -> None:
        self.budget_bytes = budget_bytes
        self.device = device
        self.warmup_size = warmup_size
        self.torch_threads = torch_threads
        self.policy = policy or LeastRecentlyUsed()
        self._entries: dict[str, LoadedModel] = {}
        # Sizes measured at earlier loads, so a reload can make room first.
        self._known_sizes: dict[str, int] = {}
        self._lock = threading.Lock()
        self.evictions = 0
        # Called after a model is loaded and after the evictions that follow,
        # and when a weights file is found missing, so the router learns of
        # the change before the next heartbeat.
        self.on_change: Callable[[], None] | None = None
        # Returns the cache keys of the models that runs queued for this
        # runner alone will call. Making room unloads them after any other
        # model outside the current run. Read only when a model must go.
        self.awaited_keys: Callable[[], Collection[str]] | None = None
        # The weights files this runner found missing, by ModelSource.file_key,
        # with the path this machine looked at.
        self._missing: dict[str, str] = {}

    # -- reading state (also from the heartbeat thread) --

    def snapshot(self) -> list[dict[str, Any]]:
        with self._lock:
            return [
                {
                    "model_id": entry.source.model_id,
                    "cache_key": key,
                    "memory_bytes": entry.memory_bytes,
                    "pretrained": entry.source.pretrained,
                    "last_used": entry.last_used,
                    "uses": entry.uses,
                }
                for key, entry in self._entries.items()
            ]

    def used_bytes(self) -> int:
        with self._lock:
            return sum(entry.memory_bytes for entry in self._entries.values())

    def is_loaded(self, source: ModelSource) -> bool:
        return source.cache_key in self._entries

    def missing_files(self) -> list[str]:
        """Return the file keys of the weights files this runner lacks, sorted.

        A file found missing is looked for again here, at each heartbeat, and
        leaves the list once it is in place.
        """
        with self._lock:
            missing = dict(self._missing)
        found = [key for key, path in missing.items() if path and Path(path).is_file()]
        if found:
            with self._lock:
                for key in found:
                    self._missing.pop(key, None)
            logger.info("weights files now in place: %s", ", ".join(found))
        return sorted(key for key in missing if key not in found)

    def lacking(self, sources: list[ModelSource]) -> list[ModelSource]:
        """Return those of ``sources`` that are not loaded and whose file is missing.

        Records them, as ``_local_file`` does, so the heartbeat lists them.
        """
        missing = []
        for source in sources:
            if source.kind == "architecture" or self.is_loaded(source):
                continue
            try:
                path = source.local_path()
            except ValueError:
                path = ""
            if not path or not Path(path).is_file():
                missing.append((source, path))
        self._note_missing(missing)
        return [source for source, _ in missing]

    def _note_missing(self, missing: list[tuple[ModelSource, str]]) -> None:
        with self._lock:
            new = [s for s, _ in missing if s.file_key not in self._missing]
            for source, path in missing:
                self._missing[source.file_key] = path
        if new:
            logger.warning(
                "weights files missing on this runner: %s",
                ", ".join(f"{s.path} ({KIND_PLACES[s.kind]})" for s in new),
            )
            self._notify_change()

    # -- loading and eviction --

    def get(
        self,
        source: ModelSource,
        use: ModelUse,
        run_keys: Collection[str] = (),
        first_in_run: bool = True,
    ) -> LoadedModel:
        """Return the loaded model, loading it (and timing the load) on a miss.

        ``run_keys`` are the cache keys of the current run's models, which
        making room evicts last. The policy learns of a use only when
        ``first_in_run``: the further calls of one run (a batch, crops) are
        no idle times between runs for the histogram policy.
        """
        key = source.cache_key
        entry = self._entries.get(key)
        if entry is None:
            # Before making room: a load that cannot start must not evict.
            path = self._local_file(source)
            # Room is made before the load, so the memory in use stays under
            # the budget while the model loads, where evicting after a
            # successful load would hold both at once.
            # NOTE: a load that then fails has evicted models for nothing,
            # and the next runs that need them load them again.
            evictions_before = self.evictions
            self._make_room(self._known_sizes.get(key, 0), keep=key, spare=run_keys)
            try:
                entry = self._load(source, path, use)
            except Exception:
                if self.evictions != evictions_before:
                    # The heartbeat must stop listing the evicted models
                    # now, or routing sends runs here for them.
                    self._notify_change()
                raise
            with self._lock:
                self._entries[key] = entry
            self._known_sizes[key] = entry.memory_bytes
            self._make_room(0, keep=key, spare=run_keys)
            self._notify_change()
        entry.last_used = time.monotonic()
        entry.uses += 1
        if first_in_run:
            self.policy.used(entry, entry.last_used)
        use.memory_bytes = entry.memory_bytes
        return entry

    def configure(
        self,
        budget_bytes: int,
        policy_name: str,
        keep_alive_s: float = DEFAULT_KEEP_ALIVE_S,
    ) -> bool:
        """Set the budget and the policy, evicting down to a lowered budget.

        ``keep_alive_s`` applies to the policies that expire idle models
        (ttl, histogram). A new keep-alive for the same policy keeps its
        state, such as the histogram policy's idle times. Call it only
        between runs: an eviction here would unload a model a run is using.
        Returns whether anything changed.
        """
        old_keep_alive = policy_keep_alive_s(self.policy)
        same_policy = policy_name == self.policy.name
        if (
            budget_bytes == self.budget_bytes
            and same_policy
            and old_keep_alive in (None, keep_alive_s)
        ):
            return False
        new_policy = (
            self.policy if same_policy else make_policy(policy_name, keep_alive_s)
        )
        if same_policy and old_keep_alive is not None:
            new_policy.keep_alive_s = keep_alive_s
        logger.info(
            "memory budget %d -> %d bytes, eviction policy %s -> %s, "
            "keep-alive %s -> %s s",
            self.budget_bytes,
            budget_bytes,
            self.policy.name,
            policy_name,
            old_keep_alive,
            policy_keep_alive_s(new_policy),
        )
        self.budget_bytes = budget_bytes
        self.policy = new_policy
        # As at a load, the model used last stays, alone if it is larger
        # than the whole budget: unloading it would only make the next run
        # cold.
        with self._lock:
            latest = max(
                self._entries.values(), key=lambda e: e.last_used, default=None
            )
        self._make_room(0, keep=latest.source.cache_key if latest else None)
        self._notify_change()
        return True

    def expire_idle(self, keep: Collection[str] = ()) -> int:
        """Unload the models that the policy finds idle too long; return how many.

        Only the ttl and histogram policies expire models. The cache keys in
        ``keep`` stay loaded, idle or not, and so do the models that runs
        queued for this runner alone call (``awaited_keys``). Call it only
        between runs, like ``configure``.
        """
        now = time.monotonic()
        with self._lock:
            expired = self.policy.expired(list(self._entries.values()), now)
        expired = [entry for entry in expired if entry.key not in keep]
        if expired:
            awaited = self._awaited()
            expired = [entry for entry in expired if entry.key not in awaited]
        idle = [(entry.key, now - entry.last_used) for entry in expired]
        for key, idle_s in idle:
            self.evict(key, idle_s=idle_s)
        if idle:
            self._notify_change()
        return len(idle)

    def _notify_change(self) -> None:
        if self.on_change is None:
            return
        try:
            self.on_change()
        except Exception:
            # The periodic heartbeat publishes the change later.
            logger.warning("publishing the model change failed", exc_info=True)

    def _make_room(
        self, incoming_bytes: int, keep: str | None, spare: Collection[str] = ()
    ) -> None:
        awaited: Collection[str] | None = None
        while True:
            if (
                awaited is None
                and self.used_bytes() + incoming_bytes > self.budget_bytes
            ):
                awaited = self._awaited()
            with self._lock:
                victim = next_victim(
                    self.policy,
                    self._entries,
                    incoming_bytes,
                    self.budget_bytes,
                    keep,
                    spare,
                    awaited or (),
                )
                used = sum(e.memory_bytes for e in self._entries.values())
            if victim is None:
                if used + incoming_bytes > self.budget_bytes:
                    logger.warning(
                        "model %s alone needs %d bytes, over the budget of %d bytes",
                        keep,
                        used + incoming_bytes,
                        self.budget_bytes,
                    )
                return
            self.evict(victim.key)

    def _awaited(self) -> Collection[str]:
        """Return ``awaited_keys()``, or nothing when it fails.

        Without the list, the policy alone picks what goes: a failed read
        must not stop a run from loading its model.
        """
        if self.awaited_keys is None:
            return ()
        try:
            return self.awaited_keys()
        except Exception:
            logger.warning(
                "reading the models of the runs queued for this runner failed; "
                "evicting by the policy alone",
                exc_info=True,
            )
            return ()

    def evict(
        self, cache_key: str, reason: str | None = None, idle_s: float | None = None
    ) -> None:
        """Unload a model: the policy's eviction, or for ``reason`` if given.

        ``idle_s``, the seconds the model was idle, marks an expiry: an
        eviction because it was idle past the policy's keep-alive. Only the
        policy's evictions, expiries included, count in ``evictions``.
        """
        with self._lock:
            entry = self._entries.pop(cache_key, None)
        if entry is None:
            return
        if reason is None:
            self.evictions += 1
            self.policy.evicted(entry)
            if idle_s is None:
                logger.info(
                    "evicted model %s (%s, %d bytes, policy %s)",
                    entry.source.model_id,
                    cache_key,
                    entry.memory_bytes,
                    self.policy.name,
                )
            else:
                logger.info(
                    "evicted model %s (%s, %d bytes): idle for %.1f s, past "
                    "the keep-alive of policy %s",
                    entry.source.model_id,
                    cache_key,
                    entry.memory_bytes,
                    idle_s,
                    self.policy.name,
                )
        else:
            self._known_sizes.pop(cache_key, None)
            self.policy.forget(cache_key)
            logger.info(
                "unloaded model %s (%s, %d bytes): %s",
                entry.source.model_id,
                cache_key,
                entry.memory_bytes,
                reason,
            )
        del entry
        gc.collect()
        if self.device.startswith("cuda"):
            torch.cuda.empty_cache()

    def drop_deleted_uploads(self) -> None:
        """Unload uploads whose file was deleted, since no run can use them again.

        A new upload under the same id has a new file and cache key, so
        without this the deleted one would hold its memory until evicted.
        """
        with self._lock:
            deleted = [
                key
                for key, entry in self._entries.items()
                if entry.source.kind == "upload"
                and not Path(entry.source.local_path()).is_file()
            ]
        for key in deleted:
            self.evict(key, reason="its upload was deleted")
        if deleted:
            self._notify_change()

    def warm_up_process(self) -> float:
        """Build and run an untrained model once, then drop it; return seconds taken.

        A process's first model load also pays for work done once per
        process: importing ultralytics' prediction code, setting up torch's
        kernels and, on a GPU, the CUDA context. Measured on a 2-core CPU,
        a first load took about 1.6 s, and the same load later 0.2 s. Done
        before the runner takes jobs, that work is not billed to the first
        run's cold load.
        """
        started = time.perf_counter()
        size = self.warmup_size
        model = open_weights(WARM_UP_ARCHITECTURE, task="detect")
        model.to(self.device)
        blank = np.zeros((size, size, 3), dtype=np.uint8)
        model.predict(blank, device=self.device, imgsz=size, verbose=False)
        _synchronize(self.device)
        torch.set_num_threads(self.torch_threads)
        del model
        gc.collect()
        if self.device.startswith("cuda"):
            torch.cuda.empty_cache()
        return time.perf_counter() - started

    def _local_file(self, source: ModelSource) -> str:
        """Return the weights' path here, or raise WeightsFileMissingError."""
        path = source.local_path()
        if source.kind != "architecture" and not Path(path).is_file():
            # Every machine's runners need the same files in their model and
            # upload directories (docs/operations.md).
            self._note_missing([(source, path)])
            raise WeightsFileMissingError(
                source.model_id,
                f"this runner has no file {source.path} in "
                f"{describe_place(source.kind)}",
            )
        return path

    def _load(self, source: ModelSource, path: str, use: ModelUse) -> LoadedModel:
        process = psutil.Process()
        rss_before = process.memory_info().rss
        cuda_before = (
            torch.cuda.memory_allocated(self.device)
            if self.device.startswith("cuda")
            else 0
        )

        # Each phase's end; a failed load still adds the phases it went
        # through, so its time is cold load, not overhead.
        marks = [time.perf_counter_ns()]
        size = source.image_size or self.warmup_size
        try:
            if source.kind != "architecture":
                check_format(Path(path))
            model = open_weights(path, task="detect")
            marks.append(time.perf_counter_ns())
            model.to(self.device)
            _synchronize(self.device)
            marks.append(time.perf_counter_ns())
            blank = np.zeros((size, size, 3), dtype=np.uint8)
            model.predict(blank, device=self.device, imgsz=size, verbose=False)
            _synchronize(self.device)
            marks.append(time.perf_counter_ns())
        except Exception as error:
            phase = LOAD_PHASES[len(marks) - 1]
            marks.append(time.perf_counter_ns())
            _add_load_phases(use, marks)
            logger.exception("model %s failed to load", source.model_id)
            where = self.device if phase == "to_device" else f"{size}×{size}"
            raise _load_error(source, path, error, phase, where) from None
        finally:
            # ultralytics drops torch to one thread at its first predict.
            torch.set_num_threads(self.torch_threads)
        _add_load_phases(use, marks)
        started, warmed = marks[0], marks[-1]

        use.loads += 1
        if self.device.startswith("cuda"):
            memory = torch.cuda.memory_allocated(self.device) - cuda_before
        else:
            memory = tensor_bytes(model.model)
        rss_growth = process.memory_info().rss - rss_before
        logger.info(
            "loaded model %s from %s on %s in %.1f ms (%d bytes, RSS +%d bytes)",
            source.model_id,
            source.kind,
            self.device,
            (warmed - started) / 1e6,
            memory,
            rss_growth,
        )
        now = time.monotonic()
        checkpoint = getattr(model, "ckpt", None) or {}
        return LoadedModel(
            source=source,
            model=model,
            memory_bytes=memory,
            rss_growth_bytes=rss_growth,
            loaded_at=now,
            last_used=now,
            load_seconds=(warmed - started) / 1e9,
            trained=source.kind != "architecture"
            and bool(checkpoint.get("train_args")),
        )


class ModelProvider:
    """Model runner for object-detection blocks: cached models, each call timed."""

    def __init__(
        self, cache: ModelCache, sources: dict[str, ModelSource], timer: RunTimer
    ) -> None:
        self.cache = cache
        self.sources = sources
        self.timer = timer
        self.run_keys = frozenset(source.cache_key for source in sources.values())
        # The cache keys this run has called so far.
        self._called: set[str] = set()

    def _check_model(self, model_id: str, entry: LoadedModel, use: ModelUse) -> None:
        """Add the run warnings that only the loaded model can show."""
        if use.pretrained and not entry.trained:
            # A file in a weights directory counts as trained until its
            # checkpoint shows that it records no training run.
            use.pretrained = False
            self.timer.warn(
                f"model '{model_id}' is untrained: its checkpoint records no "
                "training run, so timings are real and detections are meaningless"
            )
        if entry.memory_bytes > self.cache.budget_bytes:
            self.timer.warn(
                f"model '{model_id}' alone takes {entry.memory_bytes} bytes, over "
                f"this runner's memory budget of {self.cache.budget_bytes} bytes; "
                "it stays loaded until another model needs the room"
            )

    def _emit_cold_load(
        self,
        model_id: str,
        step: str,
        use: ModelUse,
        before: tuple[int, int, int],
        failed: bool = False,
    ) -> None:
        """Send the phases of the load that followed ``before``, this load's only:
        a model evicted during the run loads again. A failed load's event
        carries ``failed: true``."""
        phases = {
            "read": us_added(before[0], use.load_read_ns),
            "to_device": us_added(before[1], use.load_to_device_ns),
            "warmup": us_added(before[2], use.load_warmup_ns),
        }
        extra = {"failed": True} if failed else {}
        self.timer.emit(
            "cold_load",
            model_id=model_id,
            step=step,
            **phases,
            total=sum(phases.values()),
            **extra,
        )

    def detect(
        self, model_id: str, image: WorkflowImage, options: Any, step: str
    ) -> Detections:
        source = self.sources[model_id]
        use = self.timer.model(model_id)
        use.source, use.pretrained, use.device = (
            source.kind,
            source.pretrained,
            self.cache.device,
        )
        if step not in use.steps:
            use.steps.append(step)
        was_loaded = self.cache.is_loaded(source)
        before = (use.load_read_ns, use.load_to_device_ns, use.load_warmup_ns)
        try:
            entry = self.cache.get(
                source,
                use,
                self.run_keys,
                first_in_run=source.cache_key not in self._called,
            )
        except ModelLoadError:
            if use.cold_load_ns > sum(before):
                self._emit_cold_load(model_id, step, use, before, failed=True)
            raise
        self._called.add(source.cache_key)
        self._check_model(model_id, entry, use)
        if not was_loaded:
            self._emit_cold_load(model_id, step, use, before)

        decode_started = time.perf_counter_ns()
        pixels = image.pixels
        decode_ns = time.perf_counter_ns() - decode_started

        names = entry.class_names()
        classes = None
        if options.class_filter:
            wanted = set(options.class_filter)
            classes = [i for i, name in names.items() if name in wanted] or [-1]
            unknown = sorted(wanted - set(names.values()))
            if unknown:
                self.timer.warn(
                    f"step '{step}': class_filter names classes that model "
                    f"'{model_id}' does not have: {', '.join(unknown)[:500]}; "
                    f"its classes are {', '.join(names.values())[:500]}"
                )
        results = entry.model.predict(
            pixels,
            conf=options.confidence,
            iou=options.iou_threshold,
            max_det=options.max_detections,
            classes=classes,
            agnostic_nms=options.class_agnostic_nms,
            imgsz=source.image_size or self.cache.warmup_size,
            device=self.cache.device,
            verbose=False,
        )
        result = results[0]
        before = (use.preprocess_ns, use.inference_ns, use.postprocess_ns)
        # ultralytics times these three stages itself, synchronising CUDA.
        use.preprocess_ns += decode_ns + int(result.speed["preprocess"] * 1e6)
        use.inference_ns += int(result.speed["inference"] * 1e6)
        use.postprocess_ns += int(result.speed["postprocess"] * 1e6)
        use.calls += 1
        self.timer.emit(
            "model",
            model_id=model_id,
            step=step,
            cold=not was_loaded,
            preprocess=us_added(before[0], use.preprocess_ns),
            inference=us_added(before[1], use.inference_ns),
            postprocess=us_added(before[2], use.postprocess_ns),
        )

        boxes = result.boxes
        class_ids = boxes.cls.cpu().numpy().astype(np.int64)
        return Detections(
            xyxy=boxes.xyxy.cpu().numpy().astype(np.float32),
            confidence=boxes.conf.cpu().numpy().astype(np.float32),
            class_id=class_ids,
            class_names=[names[int(i)] for i in class_ids],
            image_size=(image.width, image.height),
            parent_id=image.parent_id,
            root_id=image.root,
            origin=image.origin,
            parent_size=image.root_size,
            inference_id=str(uuid.uuid4()),
            parent_origin=image.parent_origin,
        )
