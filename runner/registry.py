"""Resolve a model id to weights on disk, or to an untrained architecture.

Lookup order for an id:

1. the requesting user's uploads, by exact id;
2. ``<MODEL_DIR>/<id>.pt`` (or ``<MODEL_DIR>/<id>`` when it already ends in .pt);
3. ultralytics' weights directory, for names such as ``yolov8n`` whose
   ``.pt`` file is present;
4. an ultralytics model YAML (``yolov8n.yaml``): the architecture with random
   weights, labelled untrained wherever it appears.

Roboflow-style ids with an input size suffix (``yolov8n-640``) that match
nothing as they are resolve like the name without the suffix, in the same
order, and run at that size. A suffix outside the sizes a model can run at
is reported only when the id matches nothing as it is.

Error messages name the places searched in plain words, with the setting in
brackets ("the server's model directory (MODEL_DIR/x.pt)"), not by path: they
reach API users and the browser pages, and the server's layout is not theirs
to see.
"""

import dataclasses
import functools
import importlib.util
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import yaml
from django.conf import settings

from workflows.errors import ModelNotFoundError

SIZE_SUFFIX = re.compile(r"^(?P<name>.+)-(?P<size>\d{2,4})$")
# Matched with fullmatch: 1 to 200 characters, starting with a letter or digit.
SAFE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._\-/]{0,199}")
# Input sizes a size suffix may ask for, in pixels.
MIN_IMAGE_SIZE, MAX_IMAGE_SIZE = 32, 1920
# ultralytics rounds an input size up to a multiple of the model's largest
# stride, 32 for the detection models here, so -641 and -672 run alike.
SIZE_STEP = 32

UNTRAINED_LABEL = "untrained architecture: random weights, detections are meaningless"


@dataclass(frozen=True)
class ModelSource:
    model_id: str
    # "upload", "model_dir", "ultralytics_weights" or "architecture"
    kind: str
    # Relative to the directory of its kind (an architecture's YAML name), so
    # that a runner on another machine, whose directories may be elsewhere,
    # finds the same file under its own, and the cache key is the same
    # everywhere. Uploads stored with an absolute path keep it.
    path: str
    pretrained: bool
    image_size: int | None = None

    @property
    def cache_key(self) -> str:
        """What a runner's model cache keys the loaded model by.

        The weights file and input size, not the id: two users' uploads may
        share an id, and aliases of one file share one loaded model.
        """
        return f"{self.kind}:{self.path}:{self.image_size or 0}"

    @property
    def file_key(self) -> str:
        """The weights file, as the same string on every machine: kind and path.

        Unlike ``cache_key`` it leaves out the input size, because every size
        of a model reads one file.
        """
        return f"{self.kind}:{self.path}"

    def local_path(self) -> str:
        """Return where this process finds the weights: the path under its own root."""
        if self.kind == "architecture" or Path(self.path).is_absolute():
            return self.path
        root = kind_root(self.kind)
        if root is None:
            raise ValueError(f"no directory is set for {self.kind} models here")
        return str(root / self.path)

    @property
    def label(self) -> str:
        return "pretrained weights" if self.pretrained else UNTRAINED_LABEL

    def to_dict(self) -> dict:
        return {
            "model_id": self.model_id,
            "kind": self.kind,
            "path": self.path,
            "pretrained": self.pretrained,
            "image_size": self.image_size,
            "label": self.label,
        }

    @classmethod
    def from_dict(cls, data: dict) -> "ModelSource":
        return cls(
            model_id=data["model_id"],
            kind=data["kind"],
            path=data["path"],
            pretrained=data["pretrained"],
            image_size=data.get("image_size"),
        )


def model_dir() -> Path:
    return Path(settings.GLASSBOX["MODEL_DIR"])


def resolve_model(
    model_id: object, owner_id: int | None = None, step: str | None = None
) -> ModelSource:
    """Return where ``model_id``'s weights are, or raise ModelNotFoundError.

    An id without a size suffix runs at WARMUP_IMAGE_SIZE, so that
    ``people-detector`` and ``people-detector-640`` name one loaded model
    when that size is 640, not two copies of the same weights.
    """
    source = _resolve(model_id, owner_id, step)
    if source.image_size is None:
        default_size = settings.GLASSBOX["WARMUP_IMAGE_SIZE"]
        source = dataclasses.replace(source, image_size=default_size)
    return source


def _resolve(model_id: object, owner_id: int | None, step: str | None) -> ModelSource:
    if not isinstance(model_id, str) or not model_id.strip():
        shown = model_id if isinstance(model_id, str) else repr(model_id)[:200]
        raise ModelNotFoundError(
            shown,
            [],
            step=step,
            reason="a model id is a non-empty string",
            invalid_id=True,
        )
    searched: list[str] = []
    if owner_id is not None:
        found = _from_uploads(model_id, owner_id, searched)
        if found:
            return found
    # Uploads take only ids that pass both checks, so an id that fails one
    # matched no upload above and can never resolve.
    if not SAFE_ID.fullmatch(model_id):
        length = f"; got {len(model_id)} characters" if len(model_id) > 200 else ""
        raise ModelNotFoundError(
            model_id[:200],
            [],
            step=step,
            reason="ids are 1 to 200 letters, digits, '.', '_', '-' and '/', "
            f"starting with a letter or digit{length}",
            invalid_id=True,
        )
    if ".." in model_id.split("/"):
        raise ModelNotFoundError(
            model_id,
            [],
            step=step,
            reason="an id may not contain a '..' segment",
            invalid_id=True,
        )
    if model_id.endswith((".yaml", ".yml")):
        return _architecture(model_id, model_id, None, searched, step)
    size = None
    names = [model_id]
    size_problem = None
    match = size_suffix(model_id)
    if match and not MIN_IMAGE_SIZE <= int(match["size"]) <= MAX_IMAGE_SIZE:
        # Maybe no size but part of the name ("detector-2024"), so the
        # exact id is still looked up.
        size_problem = (
            f"a size suffix must be from {MIN_IMAGE_SIZE} to {MAX_IMAGE_SIZE} "
            f"pixels, got {match['size']}"
        )
    elif match:
        # The size the model runs at, so that sizes that run alike share
        # one loaded model.
        size = -(-int(match["size"]) // SIZE_STEP) * SIZE_STEP
        if match["name"].endswith((".yaml", ".yml")):
            return _architecture(model_id, match["name"], size, searched, step)
        names.append(match["name"])
    for name in names:
        found = None
        if owner_id is not None and name != model_id:
            found = _from_uploads(model_id, owner_id, searched, name=name)
        found = found or _from_files(model_id, name, searched)
        if found:
            if name != model_id:
                return ModelSource(
                    found.model_id, found.kind, found.path, found.pretrained, size
                )
            return found
    if size_problem:
        raise ModelNotFoundError(model_id, searched, step=step, reason=size_problem)
    raise ModelNotFoundError(model_id, searched, step=step)


def largest_image_size() -> int:
    """Return the largest input size, in pixels, that a run can give a model.

    A size suffix sets at most MAX_IMAGE_SIZE, and an id without one
    runs at WARMUP_IMAGE_SIZE, which has no maximum of its own.
    """
    largest = max(MAX_IMAGE_SIZE, settings.GLASSBOX["WARMUP_IMAGE_SIZE"])
    return -(-largest // SIZE_STEP) * SIZE_STEP


def size_suffix(model_id: str) -> re.Match | None:
    """Return the match of ``model_id``'s size suffix, None if it has none.

    Two digits below MIN_IMAGE_SIZE are no size but part of a name, such
    as "detector-v2-10".
    """
    match = SIZE_SUFFIX.match(model_id)
    if match and len(match["size"]) == 2 and int(match["size"]) < MIN_IMAGE_SIZE:
        return None
    return match


def check_model_path(source: ModelSource) -> None:
    """Raise ValueError unless ``source`` points where its kind of weights live.

    Runners read model sources from the job in Redis, and loading a ``.pt``
    file unpickles it, which can run code. This keeps a job edited in Redis
    from making a runner load a file from anywhere else. The path is checked
    as written, so a symlink that an operator put in the model directory
    may point at weights elsewhere. A ``..`` segment is rejected, because
    after a symlinked directory it leads to the parent of the link's target.
    """
    if source.kind == "architecture":
        if "/" in source.path or not source.path.endswith(".yaml"):
            raise ValueError(f"invalid architecture name {source.path!r}")
        return
    if source.kind not in _ROOTS:
        raise ValueError(f"unknown model source kind {source.kind!r}")
    if ".." in Path(source.path).parts:
        raise ValueError(f"model path {source.path!r} contains '..'")
    root = kind_root(source.kind)
    local = Path(os.path.abspath(source.local_path()))
    if root is None or not local.is_relative_to(os.path.abspath(root)):
        raise ValueError(f"model path {source.path!r} is outside {root}")


def kind_root(kind: str) -> Path | None:
    """Return this process's directory for weights of ``kind``, None if it has none."""
    return _ROOTS[kind]()


def _relative_to_root(kind: str, path: Path) -> str:
    """Return ``path`` relative to the directory of ``kind``, if it is inside it."""
    root = kind_root(kind)
    if root is not None and path.is_relative_to(root):
        return str(path.relative_to(root))
    return str(path)


def upload_source_path(path: str) -> str:
    """Return an uploaded file's path as model sources give it (upload-relative)."""
    return _relative_to_root("upload", Path(path))


def _from_uploads(
    model_id: str, owner_id: int, searched: list[str], name: str | None = None
) -> ModelSource | None:
    """Return the owner's upload named ``name`` (default: ``model_id``)."""
    from runner import sql
    from runner.models import ModelUpload

    name = name or model_id
    searched.append(f"your uploaded models ({name})")
    # Runs on every request with a model step, so one plain SELECT.
    row = sql.select_row(
        ModelUpload, ("path", "trained"), {"owner_id": owner_id, "model_id": name}
    )
    if row is None:
        return None
    path, trained = row
    return ModelSource(
        model_id,
        "upload",
        upload_source_path(path),
        pretrained=bool(trained),
    )


def _ultralytics_weights_dir() -> Path | None:
    """Read ultralytics' weights directory from its settings file.

    Read directly, because importing ultralytics would pull torch into the
    web server.
    """
    config_dir = (
        os.environ.get("YOLO_CONFIG_DIR") or Path.home() / ".config" / "Ultralytics"
    )
    try:
        settings_file = json.loads((Path(config_dir) / "settings.json").read_text())
    except (OSError, ValueError):
        return None
    weights = settings_file.get("weights_dir")
    return Path(weights) if weights else None


# Names of each kind's directory in runner errors and logs, for operators:
# the setting, not the path.
KIND_PLACES = {
    "model_dir": "MODEL_DIR",
    "upload": "upload directory",
    "ultralytics_weights": "ultralytics' weights_dir",
}

# Each kind's directory in messages to users: a plain name, and the setting
# that sets it (None where no setting does).
USER_PLACES = {
    "model_dir": ("the server's model directory", "MODEL_DIR"),
    "upload": ("the server's upload directory", None),
    "ultralytics_weights": ("ultralytics' weights directory", "weights_dir"),
}


def describe_place(kind: str, filename: str | None = None) -> str:
    """Name a kind's directory for users, with its setting and ``filename``.

    For example "the server's model directory (MODEL_DIR/x.pt)".
    """
    name, setting = USER_PLACES[kind]
    detail = "/".join(part for part in (setting, filename) if part)
    return f"{name} ({detail})" if detail else name


def _from_files(model_id: str, name: str, searched: list[str]) -> ModelSource | None:
    filename = name if name.endswith(".pt") else f"{name}.pt"
    candidates = [("model_dir", model_dir() / filename)]
    weights_dir = _ultralytics_weights_dir()
    if weights_dir is not None:
        candidates.append(("ultralytics_weights", weights_dir / filename))
    for kind, path in candidates:
        searched.append(describe_place(kind, filename))
        if path.is_file():
            return ModelSource(
                model_id, kind, _relative_to_root(kind, path), pretrained=True
            )
    return None


_ROOTS = {
    "model_dir": model_dir,
    "ultralytics_weights": _ultralytics_weights_dir,
    "upload": lambda: Path(settings.GLASSBOX["UPLOAD_DIR"]),
}


# ultralytics names a scaled model by its family file plus a scale letter:
# yolov8n.yaml is cfg/models/v8/yolov8.yaml at scale "n".
SCALED_NAME = re.compile(r"^(?P<family>.+\d+)(?P<scale>[nslmx])(?P<rest>.*)\.ya?ml$")


@functools.cache
def _config_root() -> Path | None:
    # find_spec searches sys.path, and every request with a model step calls this.
    spec = importlib.util.find_spec("ultralytics")
    return Path(spec.origin).parent / "cfg" / "models" if spec else None


@functools.lru_cache(maxsize=256)
def _architecture_head(name: str) -> str | None:
    """Return the last head layer of an ultralytics model YAML, None if absent."""
    config_root = _config_root()
    if config_root is None:
        return None
    wanted = [Path(name).name]
    match = SCALED_NAME.match(Path(name).name)
    if match:
        wanted.append(f"{match['family']}{match['rest']}.yaml")
    for candidate in wanted:
        found = next(config_root.rglob(candidate), None)
        if found is not None:
            head = yaml.safe_load(found.read_text()).get("head") or [[None, None, ""]]
            return str(head[-1][2])
    return None


def _architecture(model_id, name, size, searched, step) -> ModelSource:
    if "/" in name:
        # ultralytics finds a configuration by its bare file name only.
        raise ModelNotFoundError(
            model_id,
            [],
            step=step,
            reason="an architecture id is the file name of an ultralytics model "
            "YAML, such as yolov8n.yaml, without a directory",
        )
    if not name.endswith(".yaml"):
        raise ModelNotFoundError(
            model_id,
            [],
            step=step,
            reason="ultralytics' model YAML files end in .yaml, not .yml: "
            f"try {name.removesuffix('.yml')}.yaml",
        )
    searched.append(f"ultralytics' model configurations (cfg/models/**/{name})")
    head = _architecture_head(name)
    if head is None:
        raise ModelNotFoundError(model_id, searched, step=step)
    if head != "Detect":
        raise ModelNotFoundError(
            model_id,
            [],
            step=step,
            reason=f"the architecture ends in a {head} head; only object detection "
            "(a Detect head) runs here",
        )
    return ModelSource(
        model_id, "architecture", name, pretrained=False, image_size=size
    )
