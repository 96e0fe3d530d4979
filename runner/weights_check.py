"""Check an uploaded weights file in a child process before it is stored.

The check loads the file with ultralytics, which the web server must not do
itself: importing ultralytics adds about 900 MB of torch to each worker and
replaces ``PIL.Image.open`` with a version that tries to install packages,
and a file crafted to inflate or crash would take the worker with it. The
child loads with ultralytics' restricted unpickler, offline, predicts on a
small blank image, then on one of the largest input size that a run can ask
for, and prints one line of JSON.

Run as ``python -m runner.weights_check PATH MEMORY_MB ACTIVATION_MB SIZE``;
it reads no Django settings and does not set Django up. The child limits its
own data segment (``RLIMIT_DATA``: heap and private writable mappings, where
torch allocates tensors) to MEMORY_MB before it imports torch. The limit
keeps a checkpoint whose layers inflate a blank image, such as an
``nn.Upsample`` with a large ``scale_factor``, from taking as much of the web
server host's memory as its uploader chooses.

The prediction at SIZE pixels runs under a lower limit: the data segment
as it is after the small prediction, plus ACTIVATION_MB. A runner predicts
at up to that size, and nothing on a runner bounds the memory that a
prediction allocates. Without this limit, a checkpoint that passes the
small prediction but needs gigabytes at full size, such as one whose
stride-2 convolutions were set to stride 1, would take down the runner and
every run on it.
"""

import json
import os
import re
import resource
import subprocess
import sys
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

# yolov8x's prediction at 1920 px alone took 177 s on one thread, on a
# 2-core x86-64 machine that ran other work at the time.
CHILD_TIMEOUT_S = 300
# The size of the blank image the check predicts on: small, since it only
# shows that the model runs at all.
CHECK_IMAGE_SIZE = 160
# A torch checkpoint stores its tensors uncompressed, so its members add up
# to about the archive's size. Anything far above that is a compressed
# payload built to inflate.
MAX_INFLATION = 2
INFLATION_ALLOWANCE_BYTES = 64 * 1024 * 1024

CHILD_ENV = {
    # Read once, when ultralytics is imported.
    "ULTRALYTICS_SAFE_LOAD": "1",
    "YOLO_OFFLINE": "1",
    "YOLO_AUTOINSTALL": "false",
    # RLIMIT_DATA counts every thread's stack, so on a host with many cores
    # the default thread pools alone would take much of the memory limit.
    # The check predicts one small image.
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
}
# The variables that the child takes from the web server's environment.
# Everything else, such as SECRET_KEY and the passwords in DATABASE_URL and
# REDIS_URL, stays out of the process that unpickles an uploaded file.
# NOTE: the child runs as the web server's user, so code that escaped the
# unpickler could still read the files in GLASSBOX_DATA_DIR, secret_key
# and the SQLite database among them.
INHERITED_VARIABLES = frozenset(
    {
        "PATH",
        "HOME",
        "USER",
        "LOGNAME",
        "LANG",
        "LANGUAGE",
        "TZ",
        "TMPDIR",
        "PYTHONPATH",
        # Where a torch build installed outside the system's paths finds its
        # shared libraries.
        "LD_LIBRARY_PATH",
        "CUDA_VISIBLE_DEVICES",
        "TORCH_HOME",
        # ultralytics 8.4 writes its settings.json under YOLO_CONFIG_DIR,
        # else, on Linux, under XDG_CONFIG_HOME or ~/.config.
        "YOLO_CONFIG_DIR",
        "XDG_CONFIG_HOME",
        "XDG_CACHE_HOME",
    }
)
# Locale and the thread settings of OpenMP (libgomp, Intel's), MKL and
# OpenBLAS.
INHERITED_PREFIXES = ("LC_", "OMP_", "GOMP_", "KMP_", "MKL_", "OPENBLAS_")


class WeightsRejected(Exception):
    """The file is not a usable ultralytics detector; the message gives the reason."""


class ActivationMemoryExceeded(WeightsRejected):
    """The detector runs, but one prediction at full size needs too much memory."""


@dataclass(frozen=True)
class CheckedWeights:
    names: list[str]
    task: str
    # Whether the checkpoint records a training run (ultralytics' train_args).
    trained: bool
    # The side of the blank image of the full-size prediction, in pixels.
    image_size: int
    # How far that prediction raised the check process's peak resident
    # memory, in MiB: an estimate of what it needs on a runner's CPU.
    activation_mb: int


def check_weights(
    path: Path, shown_name: str, memory_mb: int, activation_mb: int, image_size: int
) -> CheckedWeights:
    """Load the detector in ``path`` in a child process and predict with it.

    The child process may allocate at most ``memory_mb`` MiB of data, and
    its prediction on a blank ``image_size`` square at most ``activation_mb``
    MiB more than the loaded model. Raises WeightsRejected, or its subclass
    ActivationMemoryExceeded, with a message that names the file as
    ``shown_name``, never by its path on the server.
    """
    command = [
        sys.executable,
        "-m",
        "runner.weights_check",
        str(path),
        str(memory_mb),
        str(activation_mb),
        str(image_size),
    ]
    try:
        finished = subprocess.run(
            command,
            env=child_environment(os.environ),
            cwd=Path(__file__).resolve().parent.parent,
            capture_output=True,
            text=True,
            timeout=CHILD_TIMEOUT_S,
        )
    except subprocess.TimeoutExpired:
        raise WeightsRejected(
            f"checking it took over {CHILD_TIMEOUT_S} s, so it was stopped"
        ) from None
    lines = finished.stdout.strip().splitlines()
    try:
        result = json.loads(lines[-1])
    except (IndexError, ValueError):
        # An allocation that fails inside a C++ library can abort the process
        # instead of raising.
        raise WeightsRejected(
            f"the check process exited with code {finished.returncode} "
            "before it gave a result; it may have needed more than the "
            f"{memory_mb} MiB of memory that a check may use"
        ) from None
    if "activation_limit_mb" in result:
        # The last line announced the full-size prediction, and the process
        # ended during it, most likely at an allocation over the limit.
        size = result["image_size"]
        raise ActivationMemoryExceeded(
            f"the check process exited with code {finished.returncode} during "
            f"a prediction on a {size}×{size} image, the largest input size "
            "that a run can ask for; the prediction may have needed more than "
            f"{result['activation_limit_mb']} MiB of memory beyond the loaded "
            f"model, the limit set by {result['setting']}"
        )
    if not result["ok"]:
        error = (
            ActivationMemoryExceeded if result.get("activation") else WeightsRejected
        )
        raise error(result["error"].replace(str(path), shown_name))
    return CheckedWeights(
        names=result["names"],
        task=result["task"],
        trained=result["trained"],
        image_size=result["image_size"],
        activation_mb=result["activation_mb"],
    )


def _activation_failure(image_size: int, limit_mb: int, setting: str) -> str:
    return (
        f"one prediction on a {image_size}×{image_size} image, the largest "
        f"input size that a run can ask for, needs more than {limit_mb} MiB of "
        f"memory beyond the loaded model, the limit set by {setting}; "
        "ultralytics' detectors of the same size need far less"
    )


def child_environment(parent: Mapping[str, str]) -> dict[str, str]:
    """Return the allowed variables of ``parent`` with CHILD_ENV set over them."""
    inherited = {
        name: value
        for name, value in parent.items()
        if name in INHERITED_VARIABLES or name.startswith(INHERITED_PREFIXES)
    }
    return {**inherited, **CHILD_ENV}


def _check_archive(path: Path) -> None:
    if not zipfile.is_zipfile(path):
        return
    size = path.stat().st_size
    with zipfile.ZipFile(path) as archive:
        inflated = sum(member.file_size for member in archive.infolist())
    if inflated > MAX_INFLATION * size + INFLATION_ALLOWANCE_BYTES:
        raise ValueError(
            f"its archive inflates from {size} to {inflated} bytes, which no "
            "torch checkpoint does"
        )


def check_format(path: Path) -> None:
    """Raise ValueError unless ``path`` starts like a torch checkpoint.

    torch saves a zip archive, and before version 1.6 a bare pickle. Any
    other file would only fail deeper in the loader, with a message about
    unsupported types.
    """
    with open(path, "rb") as file:
        head = file.read(16)
    if not head:
        raise ValueError("the file is empty (0 bytes)")
    if zipfile.is_zipfile(path) or head.startswith(b"\x80"):
        return
    if head.startswith(ZIP_MAGIC):
        raise ValueError(
            "it is not a whole torch checkpoint (a zip archive without its "
            "end); the file may be truncated"
        )
    found = _known_format(head)
    if found is not None:
        raise ValueError(
            f"it is not a PyTorch checkpoint: it contains {found}, not the zip "
            "archive or pickle that torch saves"
        )
    raise ValueError(
        "it is not a PyTorch checkpoint: it starts as neither a zip archive "
        "nor a pickle, which torch saves"
    )


# The first bytes of file formats that users upload by mistake, with their
# names as the file(1) command gives them.
ZIP_MAGIC = b"PK\x03\x04"
FILE_SIGNATURES = (
    (b"\xff\xd8\xff", "JPEG image data"),
    (b"\x89PNG\r\n\x1a\n", "PNG image data"),
    (b"GIF87a", "GIF image data"),
    (b"GIF89a", "GIF image data"),
    (b"II*\x00", "TIFF image data"),
    (b"MM\x00*", "TIFF image data"),
    (b"%PDF-", "PDF document"),
    (b"\x1f\x8b", "gzip compressed data"),
    (b"\x7fELF", "ELF executable"),
)


def _known_format(head: bytes) -> str | None:
    """Return the format whose signature ``head`` (a file's first bytes) begins
    with, or None."""
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WebP image data"
    for signature, name in FILE_SIGNATURES:
        if head.startswith(signature):
            return name
    return None


def _load(path: Path, activation_mb: int, image_size: int) -> dict:
    check_format(path)
    _check_archive(path)
    # The runners' loader, with its check that the restricted mode is on.
    from runner.model_cache import NotADetector, open_weights

    try:
        model = open_weights(str(path))
    except NotADetector:
        raise
    except Exception as error:
        raise ValueError(_load_failure(error, path)) from error
    if model.task != "detect":
        raise ValueError(f"the model's task is '{model.task}', only 'detect' runs here")
    _check_prediction(model)
    measured_mb = _check_activation_memory(model, activation_mb, image_size)
    return {
        "ok": True,
        "task": model.task,
        "names": [model.names[i] for i in sorted(model.names)],
        "trained": bool((getattr(model, "ckpt", None) or {}).get("train_args")),
        "image_size": image_size,
        "activation_mb": measured_mb,
    }


def _check_prediction(model) -> None:
    """Raise ValueError unless the model predicts on a blank image.

    A checkpoint can load and still fail at every prediction, for example
    when its first layer takes another number of channels than an image has.
    """
    import numpy as np

    blank = np.zeros((CHECK_IMAGE_SIZE, CHECK_IMAGE_SIZE, 3), dtype=np.uint8)
    try:
        model.predict(blank, imgsz=CHECK_IMAGE_SIZE, device="cpu", verbose=False)
    except Exception as error:
        if _out_of_memory(error):
            raise ValueError(
                f"a prediction on a blank {CHECK_IMAGE_SIZE}×{CHECK_IMAGE_SIZE} "
                f"image needed more than the {_memory_limit_mb} MiB of memory "
                "that a weights check may use (WEIGHTS_CHECK_MEMORY_MB); a "
                "detector of ultralytics' sizes needs far less"
            ) from error
        raise ValueError(
            f"it loads, but a prediction on a blank {CHECK_IMAGE_SIZE}×"
            f"{CHECK_IMAGE_SIZE} image failed, so it cannot run "
            f"({type(error).__name__}: {error})"[:500]
        ) from error


class _ActivationTooLarge(ValueError):
    """A prediction at full size that needed more memory than its limit."""


def _check_activation_memory(model, activation_mb: int, image_size: int) -> int:
    """Predict on a blank ``image_size`` square with at most ``activation_mb``
    MiB of data more than now; return how far the peak RSS rose, in MiB.

    Raises _ActivationTooLarge when the prediction needs more. Only the soft
    limit is lowered, so the process's own limit still bounds the whole
    check when it is the lower of the two.
    """
    import numpy as np

    data_bytes = _status_kib("VmData") * 1024
    _, hard = resource.getrlimit(resource.RLIMIT_DATA)
    allowed = activation_mb * 1024 * 1024
    setting = "MODEL_ACTIVATION_MEMORY_MB"
    if hard != resource.RLIM_INFINITY and hard - data_bytes < allowed:
        allowed = max(hard - data_bytes, 0)
        setting = "WEIGHTS_CHECK_MEMORY_MB, less the memory of the loaded model"
    limit_mb = allowed // (1024 * 1024)
    # If an allocation aborts the process instead of raising, this is the
    # last line that the parent reads.
    announcement = {
        "image_size": image_size,
        "activation_limit_mb": limit_mb,
        "setting": setting,
    }
    print(json.dumps(announcement), flush=True)
    resource.setrlimit(resource.RLIMIT_DATA, (data_bytes + allowed, hard))
    rss_before_kib = _status_kib("VmRSS")
    blank = np.zeros((image_size, image_size, 3), dtype=np.uint8)
    try:
        model.predict(blank, imgsz=image_size, device="cpu", verbose=False)
    except Exception as error:
        if _out_of_memory(error):
            raise _ActivationTooLarge(
                _activation_failure(image_size, limit_mb, setting)
            ) from error
        raise ValueError(
            f"it predicts on a small image, but a prediction on a blank "
            f"{image_size}×{image_size} image, the largest input size that a "
            f"run can ask for, failed ({type(error).__name__}: {error})"[:500]
        ) from error
    finally:
        resource.setrlimit(resource.RLIMIT_DATA, (hard, hard))
    # ru_maxrss is in KiB on Linux.
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return max(peak_kib - rss_before_kib, 0) // 1024


def _status_kib(field: str) -> int:
    """Return a KiB field of /proc/self/status, such as VmData or VmRSS."""
    with open("/proc/self/status") as status:
        for line in status:
            name, _, value = line.partition(":")
            if name == field:
                return int(value.split()[0])
    raise RuntimeError(f"/proc/self/status has no {field} line")


def _describe_content(path: Path) -> str | None:
    """Describe the content of a torch file that is no ultralytics checkpoint.

    Returns None when the file does not load with torch's weights-only
    unpickler, or contains a dict whose "ema" or "model" entry is a module,
    as a checkpoint's is. ultralytics builds its network from that entry and
    reports any other content as holding unsupported types, or fails with an
    AttributeError on content that is not a dict, such as a bare tensor.
    """
    import torch

    try:
        content = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        return None
    if not isinstance(content, dict):
        return (
            "it is a torch file, but not an ultralytics checkpoint: it contains "
            f"{_with_article(type(content).__name__)}, not the dict that "
            "ultralytics saves"
        )
    if not {"model", "ema"} & content.keys():
        entries = [str(key) for key in content]
        shown = ", ".join(entries[:10]) + (", ..." if len(entries) > 10 else "")
        return (
            "it is a torch file, but not an ultralytics checkpoint: it contains "
            f"a dict without a 'model' entry (its keys: {shown or 'none'}); "
            "upload the .pt file that ultralytics saved, not a state_dict"
        )[:500]
    # ultralytics 8.4 takes the network from ckpt.get("ema") or ckpt.get("model").
    entry = "ema" if content.get("ema") else "model"
    network = content.get(entry)
    if isinstance(network, torch.nn.Module):
        return None
    held = "None" if network is None else _with_article(type(network).__name__)
    return (
        "it is a torch file, but not an ultralytics checkpoint: its "
        f"'{entry}' entry is {held}, not a network"
    )


def describe_unusable_checkpoint(error: Exception, path: Path) -> str | None:
    """Describe a torch file that loaded without error but is no checkpoint.

    ``error`` is what ultralytics raised on loading ``path``. Returns None
    when the file is not of such a kind, such as a damaged file.
    """
    text = str(error)
    if "inline_container" in text or 'hasRecord("version")' in text:
        # torch's zip reader: the archive lacks the layout torch.save writes,
        # such as its "version" record.
        return "it is a zip archive, but not one that torch saved"
    return _describe_content(path)


def _with_article(name: str) -> str:
    return f"an {name}" if name[:1].lower() in "aeiou" else f"a {name}"


# The MiB of data that this check process may allocate; main() sets it.
_memory_limit_mb: int | None = None


def _limit_memory(memory_mb: int) -> None:
    """Limit this process's data segment, so an allocation above it fails."""
    global _memory_limit_mb
    limit = memory_mb * 1024 * 1024
    resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))
    _memory_limit_mb = memory_mb


def _out_of_memory(error: BaseException) -> bool:
    """Return whether ``error`` is an allocation that the memory limit refused.

    torch's CPU allocator raises a RuntimeError whose message contains
    "can't allocate memory"; Python's own allocations raise MemoryError.
    """
    return isinstance(error, MemoryError) or "can't allocate memory" in str(error)


def _load_failure(error: Exception, path: Path) -> str:
    """Say why the loader failed, in terms of the file rather than the loader.

    The loader's own messages range from "Invalid magic number" to a bare
    IndexError, and none of them states that the file is at fault. The
    common ones are put in plain words; the rest are quoted.
    """
    if _out_of_memory(error):
        return (
            f"loading it needed more than the {_memory_limit_mb} MiB of memory "
            "that a weights check may use (WEIGHTS_CHECK_MEMORY_MB)"
        )
    text = str(error)
    cause = str(error.__cause__ or "")
    if "references types outside the supported" in text:
        # ultralytics' wording for any pickle that torch's safe loader
        # refused: a class or function outside its allow-list, which torch
        # names as "GLOBAL module.name", or bytes that are no pickle.
        rejected = re.search(r"GLOBAL ([\w.]+)", cause)
        if rejected:
            return (
                f"it holds a Python object ({rejected.group(1)}) that an "
                "ultralytics checkpoint does not, so it was not loaded; only "
                "weights saved by ultralytics load here"
            )
        described = _describe_content(path)
        if described is not None:
            return described
        return (
            "its pickled data could not be read safely: it is damaged, or it "
            "holds objects that an ultralytics checkpoint does not"
        )
    if "empty, truncated or corrupted" in text:
        return f"it is damaged (empty, truncated or corrupted): {cause}"[:500]
    described = describe_unusable_checkpoint(error, path)
    if described is not None:
        return described
    return f"it could not be read as a checkpoint ({type(error).__name__}: {text})"


def main(path: str, memory_mb: int, activation_mb: int, image_size: int) -> None:
    # Before torch is imported, so that its allocations are limited too.
    _limit_memory(memory_mb)
    # ultralytics logs to stdout, so the result goes on the last line.
    try:
        result = _load(Path(path), activation_mb, image_size)
    except Exception as error:
        message = str(error).replace("ERROR ❌️ ", "").strip()
        # A ValueError comes from the checks above, and its message is the reason.
        if not isinstance(error, ValueError):
            message = f"{type(error).__name__}: {message}"
        result = {"ok": False, "error": message}
        if isinstance(error, _ActivationTooLarge):
            result["activation"] = True
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
