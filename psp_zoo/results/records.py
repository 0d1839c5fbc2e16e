"""Results records: what ``evaluate`` returns, ``reproduce`` writes and ``tables`` reads.

One ``ResultRecord`` per (checkpoint, device, precision): metrics (percent, per class by name),
image count, test settings, precision and optimizations, speed and memory, and the environment
that produced them. Its JSON form (:meth:`ResultRecord.to_json`) is the results-file format; a
file is read back into an equal record. Metrics are percentages (0-100) like the published
tables; memory is in GB of 2**30 bytes like the published "Mem (GB)" column; ``null`` stands for
"not measured" (and for a per-class value of a class that never occurs).

Layout: ``<results_dir>/<checkpoint>/<device_tag>[_<precision>].json``, e.g.
``results/pspnet_r50-d8_512x1024_40k_cityscapes/cuda-nvidia-h100-80gb-hbm3.json`` or
``.../cpu-amd-epyc-7763-64-core-processor.json``; fp32 has no suffix. A results file is evidence,
so reading is strict: :func:`read_results` raises
``ResultsError`` naming the first malformed file and field instead of silently leaving a
checkpoint out of a table (``strict=False`` skips such files with a warning instead).
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import math
import re
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from ..errors import ResultsError
from ..files import atomic_write

if TYPE_CHECKING:  # only for the annotation: records stay importable without torch
    from ..evaluation.metrics import ConfusionMatrix

__all__ = [
    "SCHEMA_VERSION", "DEFAULT_RESULTS_DIR", "Metrics", "Speed", "MemoryUse", "ImageCount",
    "ResultRecord", "device_tag", "result_path", "write_result", "read_result", "read_results", "none_if_nan",
]

SCHEMA_VERSION = 1
DEFAULT_RESULTS_DIR = "results"
RUN_STATUSES = ("complete", "failed")
DEVICE_KINDS = ("cuda", "cpu")
MEMORY_KINDS = ("cuda max_memory_allocated", "cpu peak RSS")
PathLike = Union[str, Path]
REDO_HINT = "`psp-zoo reproduce --force` redoes it"


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

    @property
    def iou(self) -> Dict[str, Optional[float]]:
        """Per-class IoU in percent, keyed by class name (None: the class never occurs)."""
        return {name: values["IoU"] for name, values in self.per_class.items()}

    @property
    def acc(self) -> Dict[str, Optional[float]]:
        """Per-class accuracy in percent, keyed by class name (None: the class is never labelled)."""
        return {name: values["Acc"] for name, values in self.per_class.items()}

    @classmethod
    def from_matrix(cls, matrix: "ConfusionMatrix", class_names: Sequence[str]) -> "Metrics":
        """The reference's metrics of a (summed, reduced) confusion matrix, in percent."""
        scores = matrix.compute()
        return cls.from_fractions(class_names, aacc=scores["aAcc"], miou=scores["mIoU"],
                                  macc=scores["mAcc"], iou=scores["IoU"], acc=scores["Acc"])

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
    """Inference speed: batch 1, ``images_timed`` after ``warmup`` untimed calls.

    ``model`` says what was timed: "plain" is the published protocol (the model as loaded, as
    the reference runs it: the number beside the published fps), "optimized" psp-zoo's prepared
    model (the run's speed options). ``detail`` says what one timed call covers.
    """

    fps: float
    images_timed: int
    warmup: int
    device_kind: str  # "cuda" or "cpu"; a CPU number is not comparable with the V100 column
    model: Optional[str] = None       # "plain" or "optimized"; None in files older than the field
    precision: Optional[str] = None   # what the timed model computed in
    detail: Optional[str] = None


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
    speed: Optional[Speed] = None                    # the published protocol: the plain model
    inference_memory: Optional[MemoryUse] = None     # ... and its inference peak
    training_memory: Optional[MemoryUse] = None
    fast_speed: Optional[Speed] = None               # psp-zoo's prepared model (the speed options)
    fast_inference_memory: Optional[MemoryUse] = None
    status: str = "complete"
    error: Optional[str] = None
    # measuring steps that failed after the scores were kept: step ("speed", "fast_speed",
    # "training_memory") -> its error; the record is still "complete" for its scores
    failed_steps: Dict[str, str] = field(default_factory=dict)
    backend: Optional[Dict[str, Any]] = None  # None: PyTorch; else e.g. {"backend": "onnxruntime", ...}
    date: str = field(default_factory=lambda: datetime.datetime.now(datetime.timezone.utc)
                      .isoformat(timespec="seconds"))
    schema_version: int = SCHEMA_VERSION
    source: Optional[str] = field(default=None, compare=False)  # the file it was read from

    def __post_init__(self) -> None:
        # settings and environment hold what their JSON holds (lists, not tuples), so a record
        # read back from its results file equals the record that was written
        for name in ("settings", "environment", "failed_steps"):
            object.__setattr__(self, name, json.loads(json.dumps(getattr(self, name))))
        object.__setattr__(self, "optimizations", tuple(self.optimizations))

    @property
    def device_kind(self) -> str:
        return self.environment["device_kind"]

    @property
    def metrics(self) -> Metrics:
        """The single-scale metrics, or the ms+flip ones for a record with only that pass."""
        found = self.single_scale if self.single_scale is not None else self.ms_flip
        if found is None:
            raise ResultsError(f"{self.checkpoint}: this record has no metrics (status {self.status}: "
                               f"{self.error or 'nothing was scored'})")
        return found

    @property
    def miou(self) -> Optional[float]:
        return self.metrics.miou

    @property
    def aacc(self) -> Optional[float]:
        return self.metrics.aacc

    @property
    def macc(self) -> Optional[float]:
        return self.metrics.macc

    @property
    def iou(self) -> Dict[str, Optional[float]]:
        return self.metrics.iou

    @property
    def acc(self) -> Dict[str, Optional[float]]:
        return self.metrics.acc

    def to_json(self) -> str:
        """The results-file text: standard JSON (no NaN), validated before it is returned."""
        data = self.to_dict()
        _Parser("<record>").record(data)
        return json.dumps(data, indent=1, allow_nan=False) + "\n"

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
            "fast_speed": opt(self.fast_speed),
            "memory": {"inference": opt(self.inference_memory), "training": opt(self.training_memory),
                       "fast_inference": opt(self.fast_inference_memory)},
            "failed_steps": dict(self.failed_steps),
            "backend": None if self.backend is None else dict(self.backend),
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
        raise ResultsError(f"{self.source}: field '{fld}': {msg}; reproduce the checkpoint again "
                           f"(force=True) or remove the file", cli_hint=REDO_HINT)

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
        optional = {key: self.get(data, key, (str,), f"speed.{key}", optional=True) if key in data else None
                    for key in ("model", "precision", "detail")}
        return Speed(fps=self.number(data, "fps", "speed.fps"),
                     images_timed=self.get(data, "images_timed", (int,), "speed.images_timed"),
                     warmup=self.get(data, "warmup", (int,), "speed.warmup"), device_kind=kind, **optional)

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
        failed = self.get(data, "failed_steps", (dict,), "failed_steps") if "failed_steps" in data else {}
        if not all(isinstance(v, str) for v in failed.values()):
            self.fail("failed_steps", f"expected step -> error text, got {failed!r}")
        record = ResultRecord(
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
            fast_speed=self.speed(data.get("fast_speed")),
            fast_inference_memory=self.memory(memory.get("fast_inference"), "memory.fast_inference"),
            failed_steps=failed,
            backend=self.get(data, "backend", (dict,), "backend", optional=True) if "backend" in data else None,
            environment=self.environment(data),
            source=self.source,
        )
        return record if "fast_speed" in data else _older(record)


def _older(record: ResultRecord) -> ResultRecord:
    """A file written before the protocol fps was measured apart: its one speed (and inference
    memory) was timed on the model the run prepared, so it is that model's figure, and the
    protocol figure was not measured."""
    if record.speed is None and record.inference_memory is None:
        return record
    return dataclasses.replace(record, speed=None, inference_memory=None,
                               fast_speed=dataclasses.replace(record.speed, model="optimized")
                               if record.speed else None,
                               fast_inference_memory=record.inference_memory)


# --------------------------------------------------------------------------------------------
# files


def device_tag(environment: Mapping[str, Any]) -> str:
    """File-name tag of a device: ``<cpu or cuda>-<device name slug>``, e.g. ``cpu-amd-epyc-7763-64-core-processor``,
    so runs on different machines keep different files in one results folder."""
    slug = re.sub(r"[^a-z0-9]+", "-", str(environment.get("device_name", "")).lower()).strip("-")
    return f"{environment['device_kind']}-{slug}" if slug else environment["device_kind"]


def result_path(results_dir: PathLike, checkpoint: str, environment: Mapping[str, Any],
                precision: str = "fp32") -> Path:
    """Where the record of ``checkpoint`` on this device and precision lives."""
    suffix = "" if precision == "fp32" else f"_{precision}"
    return Path(results_dir) / checkpoint / f"{device_tag(environment)}{suffix}.json"


def write_result(record: ResultRecord, path: PathLike) -> Path:
    """Atomically write ``record`` as JSON (validated first, so a bad record never lands)."""
    text = record.to_json()
    ResultRecord.from_dict(json.loads(text), source=str(path))
    return atomic_write(path, text)


def read_result(path: PathLike) -> ResultRecord:
    """The record in one results file; ResultsError naming the file and field if it is malformed."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise ResultsError(f"cannot read results file {path}: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise ResultsError(f"{path}: not valid JSON ({exc}); reproduce the checkpoint again "
                           f"(force=True) or remove the file", cli_hint=REDO_HINT) from None
    return ResultRecord.from_dict(data, source=str(path))


def read_results(results_dir: PathLike, *, strict: bool = True) -> List[ResultRecord]:
    """Every record under ``results_dir`` (sorted by path).

    ``strict`` (the default) raises ``ResultsError`` for the first malformed file, because a
    table missing a checkpoint without saying so would misreport; ``strict=False`` warns and skips.
    """
    root = Path(results_dir)
    if not root.is_dir():
        raise ResultsError(f"results folder {root} does not exist; reproduce some checkpoints into it "
                           f"first, or read another folder", cli_hint="see `psp-zoo reproduce --help`")
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
