"""Results files: one JSON record per (checkpoint, device, precision), written atomically.

Layout: ``<results_dir>/<checkpoint>/<device_tag>[_<precision>].json``, e.g.
``results/pspnet_r50-d8_512x1024_40k_cityscapes/cuda-nvidia-h100-80gb-hbm3.json``; fp32 has no
suffix. Metrics are percentages (0-100) like the published tables; memory is in GB of 2**30
bytes like the published "Mem (GB)" column. ``null`` stands for "not measured" (and for a
per-class value that is NaN because the class never occurs).

A results file is evidence, so reading is strict: :func:`read_results` raises ``ResultsError``
naming the first malformed file and field instead of silently leaving a checkpoint out of a
table (``strict=False`` skips such files with a warning instead). Writes go to a temporary file
in the same folder followed by ``os.replace``, so a reader never sees a truncated file.
"""
from __future__ import annotations

import datetime
import io
import json
import math
import os
import platform
import re
import subprocess
import tempfile
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from .errors import ResultsError

__all__ = [
    "SCHEMA_VERSION", "DEFAULT_RESULTS_DIR", "Metrics", "Speed", "MemoryUse", "ImageCount",
    "ResultRecord", "environment_info", "device_tag", "result_path", "atomic_write",
    "write_result", "read_result", "read_results", "PartialState",
]

SCHEMA_VERSION = 1
DEFAULT_RESULTS_DIR = "results"
RUN_STATUSES = ("complete", "failed")
DEVICE_KINDS = ("cuda", "cpu")
MEMORY_KINDS = ("cuda max_memory_allocated", "cpu peak RSS")
PathLike = Union[str, Path]


def none_if_nan(value: Optional[float]) -> Optional[float]:
    """JSON has no NaN: a NaN (a class that never occurs) is stored as null."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return float(value)


@dataclass(frozen=True)
class Metrics:
    """Dataset-level metrics in percent; ``per_class`` maps class name -> {"IoU", "Acc"}."""

    aacc: float
    miou: float
    macc: float
    per_class: Dict[str, Dict[str, Optional[float]]]

    @classmethod
    def from_fractions(cls, class_names: Sequence[str], *, aacc: float, miou: float, macc: float,
                       iou: Sequence[float], acc: Sequence[float]) -> "Metrics":
        """From the evaluator's fractions (0-1, NaN for an absent class) to the stored percentages."""
        if not len(class_names) == len(iou) == len(acc):
            raise ResultsError(f"{len(class_names)} class names for {len(iou)} IoU and {len(acc)} Acc values")
        pct = lambda v: none_if_nan(100.0 * float(v))  # noqa: E731
        per_class = {name: {"IoU": pct(i), "Acc": pct(a)} for name, i, a in zip(class_names, iou, acc)}
        return cls(aacc=pct(aacc), miou=pct(miou), macc=pct(macc), per_class=per_class)

    def to_dict(self) -> dict:
        return {"aAcc": self.aacc, "mIoU": self.miou, "mAcc": self.macc, "per_class": self.per_class}


@dataclass(frozen=True)
class Speed:
    """Inference speed as published: batch 1, ``images_timed`` after ``warmup`` untimed calls."""

    fps: float
    images_timed: int
    warmup: int
    device_kind: str  # "cuda" or "cpu"; a CPU number is not comparable with the V100 column


@dataclass(frozen=True)
class MemoryUse:
    """A peak memory figure, with what was measured (``kind``) and how (``detail``)."""

    gb: float
    kind: str    # "cuda max_memory_allocated" or "cpu peak RSS"
    detail: str  # e.g. "training step at 512x1024, 2 images, plain BN"


@dataclass(frozen=True)
class ImageCount:
    """How many images the metrics cover; ``limit`` is set when a run used ``--limit``."""

    count: int
    available: Optional[int] = None
    limit: Optional[int] = None

    @property
    def limited(self) -> bool:
        return self.limit is not None and self.available is not None and self.count < self.available


@dataclass(frozen=True)
class ResultRecord:
    """Everything one reproduction run of one checkpoint on one device produced."""

    checkpoint: str
    dataset: str
    environment: Dict[str, Any]
    images: ImageCount
    settings: Dict[str, Any] = field(default_factory=dict)
    precision: str = "fp32"
    optimizations: Tuple[str, ...] = ()
    single_scale: Optional[Metrics] = None
    ms_flip: Optional[Metrics] = None
    speed: Optional[Speed] = None
    inference_memory: Optional[MemoryUse] = None
    training_memory: Optional[MemoryUse] = None
    status: str = "complete"
    error: Optional[str] = None
    date: str = field(default_factory=lambda: datetime.datetime.now(datetime.timezone.utc)
                      .isoformat(timespec="seconds"))
    schema_version: int = SCHEMA_VERSION
    source: Optional[str] = field(default=None, compare=False)  # the file it was read from

    @property
    def device_kind(self) -> str:
        return self.environment["device_kind"]

    def to_dict(self) -> dict:
        opt = lambda obj: None if obj is None else asdict(obj)  # noqa: E731
        return {
            "schema_version": self.schema_version,
            "checkpoint": self.checkpoint,
            "dataset": self.dataset,
            "status": self.status,
            "error": self.error,
            "date": self.date,
            "images": asdict(self.images),
            "settings": dict(self.settings),
            "precision": self.precision,
            "optimizations": list(self.optimizations),
            "metrics": {
                "single_scale": None if self.single_scale is None else self.single_scale.to_dict(),
                "ms_flip": None if self.ms_flip is None else self.ms_flip.to_dict(),
            },
            "speed": opt(self.speed),
            "memory": {"inference": opt(self.inference_memory), "training": opt(self.training_memory)},
            "environment": dict(self.environment),
        }

    @classmethod
    def from_dict(cls, data: Any, source: str = "<record>") -> "ResultRecord":
        return _Parser(source).record(data)


# --------------------------------------------------------------------------------------------
# validation: every failure names the file and the field


class _Parser:
    def __init__(self, source: str):
        self.source = source

    def fail(self, fld: str, msg: str) -> None:
        raise ResultsError(f"{self.source}: field '{fld}': {msg}; rerun the checkpoint with "
                           f"`psp-zoo reproduce --force` or remove the file")

    def get(self, data: Mapping, key: str, types: tuple, fld: str, optional: bool = False) -> Any:
        if key not in data:
            self.fail(fld, "missing")
        value = data[key]
        if value is None and optional:
            return None
        if isinstance(value, bool) and bool not in types or not isinstance(value, types):
            self.fail(fld, f"expected {' or '.join(t.__name__ for t in types)}, got {value!r}")
        return value

    def number(self, data: Mapping, key: str, fld: str, optional: bool = False) -> Optional[float]:
        value = self.get(data, key, (int, float), fld, optional)
        return None if value is None else float(value)

    def names(self, data: Mapping, key: str) -> Tuple[str, ...]:
        values = self.get(data, key, (list,), key)
        if not all(isinstance(v, str) for v in values):
            self.fail(key, f"expected a list of names, got {values!r}")
        return tuple(values)

    def metrics(self, data: Any, fld: str) -> Optional[Metrics]:
        if data is None:
            return None
        if not isinstance(data, Mapping):
            self.fail(fld, "expected a mapping or null")
        per_class = self.get(data, "per_class", (dict,), f"{fld}.per_class")
        for name, values in per_class.items():
            if not isinstance(values, Mapping):
                self.fail(f"{fld}.per_class.{name}", "expected {\"IoU\": .., \"Acc\": ..}")
            for key in ("IoU", "Acc"):
                self.number(values, key, f"{fld}.per_class.{name}.{key}", optional=True)
        return Metrics(aacc=self.number(data, "aAcc", f"{fld}.aAcc", True),
                       miou=self.number(data, "mIoU", f"{fld}.mIoU", True),
                       macc=self.number(data, "mAcc", f"{fld}.mAcc", True), per_class=per_class)

    def speed(self, data: Any) -> Optional[Speed]:
        if data is None:
            return None
        self.get({"speed": data}, "speed", (dict,), "speed")
        kind = self.get(data, "device_kind", (str,), "speed.device_kind")
        if kind not in DEVICE_KINDS:
            self.fail("speed.device_kind", f"expected one of {DEVICE_KINDS}, got {kind!r}")
        return Speed(fps=self.number(data, "fps", "speed.fps"),
                     images_timed=self.get(data, "images_timed", (int,), "speed.images_timed"),
                     warmup=self.get(data, "warmup", (int,), "speed.warmup"), device_kind=kind)

    def memory(self, data: Any, fld: str) -> Optional[MemoryUse]:
        if data is None:
            return None
        self.get({fld: data}, fld, (dict,), fld)
        kind = self.get(data, "kind", (str,), f"{fld}.kind")
        if kind not in MEMORY_KINDS:
            self.fail(f"{fld}.kind", f"expected one of {MEMORY_KINDS}, got {kind!r}")
        return MemoryUse(gb=self.number(data, "gb", f"{fld}.gb"), kind=kind,
                         detail=self.get(data, "detail", (str,), f"{fld}.detail"))

    def environment(self, data: Mapping) -> dict:
        env = self.get(data, "environment", (dict,), "environment")
        for key in ("device_name", "torch", "python", "psp_zoo"):
            self.get(env, key, (str,), f"environment.{key}")
        if env.get("device_kind") not in DEVICE_KINDS:
            self.fail("environment.device_kind", f"expected one of {DEVICE_KINDS}, got {env.get('device_kind')!r}")
        return dict(env)

    def record(self, data: Any) -> ResultRecord:
        if not isinstance(data, Mapping):
            self.fail("(top level)", "expected a JSON object")
        version = data.get("schema_version")
        if version != SCHEMA_VERSION:
            self.fail("schema_version", f"this psp-zoo reads version {SCHEMA_VERSION}, got {version!r}")
        status = self.get(data, "status", (str,), "status")
        if status not in RUN_STATUSES:
            self.fail("status", f"expected one of {RUN_STATUSES}, got {status!r}")
        images = self.get(data, "images", (dict,), "images")
        metrics = self.get(data, "metrics", (dict,), "metrics")
        memory = self.get(data, "memory", (dict,), "memory")
        return ResultRecord(
            schema_version=version,
            checkpoint=self.get(data, "checkpoint", (str,), "checkpoint"),
            dataset=self.get(data, "dataset", (str,), "dataset"),
            status=status,
            error=self.get(data, "error", (str,), "error", optional=True),
            date=self.get(data, "date", (str,), "date"),
            images=ImageCount(count=self.get(images, "count", (int,), "images.count"),
                              available=self.get(images, "available", (int,), "images.available", True),
                              limit=self.get(images, "limit", (int,), "images.limit", True)),
            settings=self.get(data, "settings", (dict,), "settings"),
            precision=self.get(data, "precision", (str,), "precision"),
            optimizations=self.names(data, "optimizations"),
            single_scale=self.metrics(metrics.get("single_scale"), "metrics.single_scale"),
            ms_flip=self.metrics(metrics.get("ms_flip"), "metrics.ms_flip"),
            speed=self.speed(data.get("speed")),
            inference_memory=self.memory(memory.get("inference"), "memory.inference"),
            training_memory=self.memory(memory.get("training"), "memory.training"),
            environment=self.environment(data),
            source=self.source,
        )


# --------------------------------------------------------------------------------------------
# environment


def cpu_name() -> str:
    """The processor's model name (from /proc/cpuinfo on Linux)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def _git_revision() -> Optional[str]:
    """The checkout's commit (``+dirty`` with local edits), or None for an installed package."""
    root = Path(__file__).resolve().parents[1]
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
    try:
        # only psp-zoo's own repository counts, not one that happens to contain site-packages
        if Path(git("rev-parse", "--show-toplevel")).resolve() != root:
            return None
        dirty = git("status", "--porcelain", "--untracked-files=no")
        return git("rev-parse", "--short=12", "HEAD") + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def environment_info(device: Union[str, torch.device] = "cpu") -> Dict[str, Any]:
    """Device and software versions that produced a number; nothing identifying the host."""
    from . import __version__

    device = torch.device(device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    elif device.type == "cpu":
        name, cudnn = cpu_name(), None
    else:
        raise ResultsError(f"unsupported device {str(device)!r}; use 'cpu' or 'cuda[:N]'")
    return {
        "device_kind": device.type,
        "device_name": name,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": None if cudnn is None else str(cudnn),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "psp_zoo": __version__,
        "git_revision": _git_revision(),
        "platform": platform.platform(),
    }


def device_tag(environment: Mapping[str, Any]) -> str:
    """File-name tag of a device: ``cpu`` or ``cuda-<device name slug>``."""
    if environment["device_kind"] == "cpu":
        return "cpu"
    slug = re.sub(r"[^a-z0-9]+", "-", environment["device_name"].lower()).strip("-")
    return f"cuda-{slug}"


def result_path(results_dir: PathLike, checkpoint: str, environment: Mapping[str, Any],
                precision: str = "fp32") -> Path:
    """Where the record of ``checkpoint`` on this device and precision lives."""
    suffix = "" if precision == "fp32" else f"_{precision}"
    return Path(results_dir) / checkpoint / f"{device_tag(environment)}{suffix}.json"


# --------------------------------------------------------------------------------------------
# atomic I/O


def _final_mode(path: Path) -> int:
    """The permissions the written file should have: the replaced file's, else the umask's default."""
    try:
        return path.stat().st_mode & 0o7777
    except OSError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def atomic_write(path: PathLike, data: Union[bytes, str]) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the new one, never a part.

    The file keeps the permissions of the one it replaces (a README stays readable to all), not
    the private 0600 of the temporary file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = data.encode("utf-8") if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, _final_mode(path))
        with os.fdopen(fd, "wb") as handle:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_result(path: PathLike, record: ResultRecord) -> Path:
    """Atomically write ``record`` as JSON (validated first, so a bad record never lands)."""
    data = record.to_dict()
    ResultRecord.from_dict(data, source=str(path))
    atomic_write(path, json.dumps(data, indent=1, allow_nan=False) + "\n")
    return Path(path)


def read_result(path: PathLike) -> ResultRecord:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise ResultsError(f"cannot read results file {path}: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise ResultsError(f"{path}: not valid JSON ({exc}); rerun the checkpoint with "
                           f"`psp-zoo reproduce --force` or remove the file") from None
    return ResultRecord.from_dict(data, source=str(path))


def read_results(results_dir: PathLike, *, strict: bool = True) -> List[ResultRecord]:
    """Every record under ``results_dir`` (sorted by path).

    ``strict`` (the default) raises ``ResultsError`` for the first malformed file, because a
    table missing a checkpoint without saying so would misreport; ``strict=False`` warns and skips.
    """
    root = Path(results_dir)
    if not root.is_dir():
        raise ResultsError(f"results folder {root} does not exist; run `psp-zoo reproduce` first "
                           f"or pass --results DIR")
    records = []
    for path in sorted(root.rglob("*.json")):
        if path.name.startswith("."):
            continue
        try:
            records.append(read_result(path))
        except ResultsError as exc:
            if strict:
                raise
            warnings.warn(f"skipping {exc}", stacklevel=2)
    return records


# --------------------------------------------------------------------------------------------
# resumable evaluation


class PartialState:
    """Accumulated arrays + the next image index of an unfinished evaluation, kept on disk.

    ``fingerprint`` describes the run (checkpoint, settings, image list...); a saved state made
    with a different fingerprint is ignored with a warning instead of being mixed into new counts.
    """

    def __init__(self, path: PathLike, fingerprint: Mapping[str, Any], every: int = 50):
        if every < 1:
            raise ValueError("every must be >= 1")
        self.path = Path(path)
        self.fingerprint = json.loads(json.dumps(dict(fingerprint), sort_keys=True, default=str))
        self.every = every

    @classmethod
    def for_result(cls, result_file: PathLike, fingerprint: Mapping[str, Any], every: int = 50) -> "PartialState":
        """The state file kept beside a results file: ``<results file>.partial.npz``."""
        return cls(Path(f"{result_file}.partial.npz"), fingerprint, every)

    def load(self) -> Optional[Tuple[int, Dict[str, np.ndarray]]]:
        """``(next_index, arrays)`` of a saved state of this run, or None to start from zero."""
        if not self.path.exists():
            return None
        try:
            with np.load(self.path, allow_pickle=False) as saved:
                meta = json.loads(str(saved["__meta__"]))
                arrays = {key: saved[key] for key in saved.files if key != "__meta__"}
        except (OSError, ValueError, KeyError) as exc:
            warnings.warn(f"ignoring unreadable partial state {self.path} ({exc}); starting over", stacklevel=2)
            return None
        if meta.get("fingerprint") != self.fingerprint:
            warnings.warn(f"ignoring partial state {self.path}: it belongs to a run with other "
                          f"settings; starting over", stacklevel=2)
            return None
        return int(meta["next_index"]), arrays

    def save(self, next_index: int, arrays: Mapping[str, Any]) -> None:
        """Atomically record that images ``[0, next_index)`` are counted in ``arrays``."""
        meta = json.dumps({"fingerprint": self.fingerprint, "next_index": int(next_index)})
        buffer = io.BytesIO()
        np.savez(buffer, __meta__=np.array(meta), **{k: _to_numpy(v) for k, v in arrays.items()})
        atomic_write(self.path, buffer.getvalue())

    def maybe_save(self, next_index: int, arrays: Mapping[str, Any]) -> bool:
        """Save every ``every`` images; the caller calls this after each image."""
        if next_index % self.every:
            return False
        self.save(next_index, arrays)
        return True

    def clear(self) -> None:
        """Forget the state once the results file is written."""
        self.path.unlink(missing_ok=True)


def _to_numpy(value: Any) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    return np.asarray(value)
