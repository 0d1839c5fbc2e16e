"""A checkpoint's published training log beside its row of the results table.

Each published checkpoint came with the JSON log of the run that trained it (the manifest's
``log`` URL). psp-zoo fetches it into the checkpoint cache, reads it, and puts the validation
mIoU it recorded (last and best) and its peak training memory next to the table's mIoU and
"Mem (GB)". Two layouts are read, one JSON object per line:

- mmseg 0.x ``*.log.json``: an optional first line of run metadata, then ``{"mode": "train",
  "iter": ..., "loss": ..., "memory": MB, ...}`` and ``{"mode": "val", "mIoU": ..., ...}`` lines,
  metrics as fractions of 1;
- mmseg 1.x ``scalars.json``: ``{"step": ..., "loss": ..., "memory": MB, ...}`` training lines and
  ``{"step": ..., "mIoU": ..., ...}`` validation lines, metrics in percent.

Everything is placed on the training ITERATION: the "epoch" of an iteration-based run means
nothing, and curves drawn against it come out wrong.
"""
from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union
from urllib.parse import unquote, urlparse

from ..errors import PspZooError
from ..files import atomic_write
from ..hub.cache import cache_dir as checkpoint_cache_dir
from ..hub.cache import fetch_file
from ..hub.options import FetchOptions
from ..manifest.loading import Checkpoint, get_checkpoint
from ..optional import require

__all__ = ["TrainStep", "Validation", "TrainingLog", "LogError", "parse_log", "read_log", "log_path",
           "fetch_log", "compare_with_table", "render_comparison", "check_plotting", "log_figure", "plot_log"]

PathLike = Union[str, Path]
LAYOUT_0X = "mmseg 0.x .log.json"
LAYOUT_1X = "mmseg 1.x scalars.json"
MIB_PER_GIB = 1024  # the logged "memory" is torch.cuda.max_memory_allocated() / 2**20


class LogError(PspZooError):
    """A training log is missing, unreachable or not in a layout psp-zoo reads: names file and line."""


@dataclass(frozen=True)
class TrainStep:
    """One logged training line: its iteration, total loss and peak memory so far (MB), where logged."""

    iteration: int
    loss: Optional[float]
    memory_mb: Optional[float]


@dataclass(frozen=True)
class Validation:
    """One validation during training, at a training iteration; metrics in percent."""

    iteration: int
    miou: float
    macc: Optional[float]
    aacc: Optional[float]


@dataclass(frozen=True)
class TrainingLog:
    """What a training log recorded, in its file's order."""

    source: str
    layout: str
    train: Tuple[TrainStep, ...]
    val: Tuple[Validation, ...]

    @property
    def last_val(self) -> Optional[Validation]:
        return self.val[-1] if self.val else None

    @property
    def best_val(self) -> Optional[Validation]:
        return max(self.val, key=lambda v: v.miou) if self.val else None  # the first of equals

    @property
    def peak_memory(self) -> Optional[TrainStep]:
        logged = [step for step in self.train if step.memory_mb is not None]
        return max(logged, key=lambda s: s.memory_mb) if logged else None


# --------------------------------------------------------------------------------------------
# reading


class _Reader:
    """Turns the lines of one log into train and val points, naming file and line on any fault."""

    def __init__(self, source: str):
        self.source, self.layout, self.line = source, None, 0
        self.train: List[TrainStep] = []
        self.val: List[Validation] = []

    def fail(self, what: str) -> LogError:
        return LogError(f"{self.source}:{self.line}: {what}")

    def number(self, record: Mapping, key: str, required: bool = False) -> Optional[float]:
        value = record.get(key)
        if value is None and not required:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise self.fail(f"{key!r} should be a number, got {value!r}")
        return float(value)

    def iteration(self, record: Mapping, key: str) -> int:
        value = record.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise self.fail(f"{key!r} should be a whole number of iterations, got {value!r}")
        return value

    def metric(self, record: Mapping, key: str, required: bool = False) -> Optional[float]:
        """A metric in percent: 0.x logs fractions of 1, 1.x logs percent."""
        value = self.number(record, key, required)
        if value is None:
            return None
        top = 1.0 if self.layout == LAYOUT_0X else 100.0
        if not 0.0 <= value <= top:
            raise self.fail(f"{key} {value} is outside 0..{top:g}, where a {self.layout} keeps it")
        return value * 100.0 / top

    def feed(self, text: str) -> None:
        self.line += 1
        if not text.strip():
            return
        try:
            record = json.loads(text)
        except ValueError:
            raise self.fail(f"not a JSON object: {text.strip()[:60]!r}") from None
        if not isinstance(record, dict):
            raise self.fail(f"not a JSON object: {text.strip()[:60]!r}")
        layout = LAYOUT_0X if "mode" in record else LAYOUT_1X if "step" in record else None
        if layout is None:
            if self.line == 1:
                return  # mmseg 0.x opens its log with the run's environment and config
            raise self.fail("a line with neither 'mode' (mmseg 0.x) nor 'step' (mmseg 1.x)")
        if self.layout not in (None, layout):
            raise self.fail(f"a {layout} line in a {self.layout} file")
        self.layout = layout
        (self.feed_0x if layout == LAYOUT_0X else self.feed_1x)(record)

    def add_train(self, iteration: int, record: Mapping) -> None:
        if self.train and iteration < self.train[-1].iteration:
            raise self.fail(f"training iteration {iteration} comes after {self.train[-1].iteration}: an "
                            f"epoch-based log or two runs in one file; psp-zoo reads one iteration-based run")
        self.train.append(TrainStep(iteration, self.number(record, "loss"), self.number(record, "memory")))

    def add_val(self, iteration: int, record: Mapping) -> None:
        self.val.append(Validation(iteration, self.metric(record, "mIoU", required=True),
                                   self.metric(record, "mAcc"), self.metric(record, "aAcc")))

    def feed_0x(self, record: Mapping) -> None:
        mode = record["mode"]
        if mode == "train":
            self.add_train(self.iteration(record, "iter"), record)
        elif mode == "val":
            # mmcv >= 1.3 logs the number of evaluation steps as a val line's "iter"; the
            # validation belongs to the training iteration logged just before it
            own = self.iteration(record, "iter")
            self.add_val(self.train[-1].iteration if self.train else own, record)
        else:
            raise self.fail(f"unknown mode {mode!r}; expected 'train' or 'val'")

    def feed_1x(self, record: Mapping) -> None:
        step = self.iteration(record, "step")
        if "mIoU" in record:
            # a test run after training is logged at step 0: it scores the last iteration's weights
            self.add_val(step or (self.train[-1].iteration if self.train else 0), record)
        elif "loss" in record:
            self.add_train(step, record)
        # other lines (learning rate alone, timings) carry nothing compared here

    def result(self) -> TrainingLog:
        if not self.train and not self.val:
            raise LogError(f"{self.source}: no training or validation line; expected an mmseg 0.x "
                           f".log.json or 1.x scalars.json with one JSON object per line")
        return TrainingLog(self.source, self.layout, tuple(self.train), tuple(self.val))


def parse_log(text: str, source: str = "<log>") -> TrainingLog:
    """Read the text of an mmseg 0.x ``.log.json`` or 1.x ``scalars.json`` training log.

    Blank lines are skipped; anything else that is not a log line raises LogError naming
    ``source`` and the line number.
    """
    reader = _Reader(source)
    for line in text.splitlines():
        reader.feed(line)
    return reader.result()


def read_log(path: PathLike) -> TrainingLog:
    """Read a training log file (see :func:`parse_log`)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise LogError(f"cannot read training log {path}: {getattr(exc, 'strerror', None) or exc}") from None
    return parse_log(text, str(path))


# --------------------------------------------------------------------------------------------
# fetching


def _entry(name_or_entry: Union[str, Checkpoint], manifest) -> Checkpoint:
    entry = name_or_entry if isinstance(name_or_entry, Checkpoint) else get_checkpoint(name_or_entry,
                                                                                       manifest=manifest)
    if not entry.log_url:
        raise LogError(f"{entry.name} has no training log: its manifest entry gives no 'log' URL")
    return entry


def log_path(name_or_entry: Union[str, Checkpoint], *, cache_dir: Optional[PathLike] = None,
             manifest=None) -> Path:
    """Where a checkpoint's training log lives in the cache: beside the checkpoints, under the
    file name of its URL (logs are published without a hash)."""
    entry = _entry(name_or_entry, manifest)
    filename = unquote(urlparse(entry.log_url).path).rsplit("/", 1)[-1]
    if not filename:
        raise LogError(f"{entry.name}: its log URL {entry.log_url} names no file")
    return checkpoint_cache_dir(cache_dir) / filename


def fetch_log(name_or_entry: Union[str, Checkpoint], *, fetch: Optional[FetchOptions] = None) -> Path:
    """The local path of a checkpoint's training log, downloaded into the cache if not there.

    ``fetch`` says where from (manifest, cache folder, mirror, offline), as for checkpoints. A
    download that is not a readable log is refused and never lands in the cache.
    """
    fetch = fetch or FetchOptions()
    entry = _entry(name_or_entry, fetch.manifest)
    final = log_path(entry, cache_dir=fetch.cache_dir)
    return fetch_file(entry.log_url, final, mirror=fetch.mirror, offline=fetch.offline, quiet=fetch.quiet,
                      check=lambda part: _check_download(part, entry.log_url))


def _check_download(part: Path, url: str) -> None:
    try:
        parse_log(part.read_text(encoding="utf-8"), url)
    except UnicodeDecodeError:
        raise LogError(f"{url} is not a text file; it cannot be a training log") from None


# --------------------------------------------------------------------------------------------
# the comparison


def compare_with_table(entry: Checkpoint, log: TrainingLog) -> Dict[str, Any]:
    """Last and best validation mIoU and peak training memory of ``log`` beside ``entry``'s published
    mIoU and Mem (GB). The log's "memory" is in MiB (``max_memory_allocated() / 2**20``), so GB is MiB / 1024."""
    last, best, peak = log.last_val, log.best_val, log.peak_memory
    return {
        "name": entry.name,
        "log": log.source,
        "layout": log.layout,
        "train_lines": len(log.train),
        "val_lines": len(log.val),
        "last_val": None if last is None else {"iter": last.iteration, "mIoU": last.miou},
        "best_val": None if best is None else {"iter": best.iteration, "mIoU": best.miou},
        "peak_memory": None if peak is None else {"iter": peak.iteration, "MiB": peak.memory_mb,
                                                  "GB": peak.memory_mb / MIB_PER_GIB},
        "published": {"mIoU": entry.published.miou, "Mem (GB)": entry.published.mem_gb},
    }


def _versus(value: Optional[float], published: Optional[float], digits: int, unit: str = "") -> str:
    shown = f"{value:.{digits}f}{unit}"
    if published is None:
        return shown
    difference = round(value - published, digits) or 0.0  # never "-0.00"
    return f"{shown} (table {published:.{digits}f}, {difference:+.{digits}f})"


def render_comparison(report: Mapping[str, Any]) -> str:
    """The comparison as a few lines of text."""
    published, last, best, peak = (report[k] for k in ("published", "last_val", "best_val", "peak_memory"))
    lines = [f"{report['name']}: {report['log']}",
             f"  {report['layout']}, {report['train_lines']} training and {report['val_lines']} validation lines"]
    if last is None:
        lines.append(f"  no validation in the log (table mIoU {published['mIoU'] or '-'})")
    else:
        lines.append(f"  last val mIoU  {_versus(last['mIoU'], published['mIoU'], 2)} at iteration {last['iter']}")
        lines.append(f"  best val mIoU  {_versus(best['mIoU'], published['mIoU'], 2)} at iteration {best['iter']}")
    if peak is None:
        lines.append(f"  no training memory in the log (table Mem (GB) {published['Mem (GB)'] or '-'})")
    else:
        lines.append(f"  peak memory    {_versus(peak['GB'], published['Mem (GB)'], 2, ' GB')} at iteration "
                     f"{peak['iter']}: {peak['MiB']:.0f} MiB / 1024")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------
# the plot


def _matplotlib():
    require("matplotlib", "plot", purpose="plotting")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    return Figure, FigureCanvasAgg


def check_plotting() -> None:
    """Raise PspZooError now if plots cannot be drawn (matplotlib missing), before long work."""
    _matplotlib()


def log_figure(log: TrainingLog, *, title: str = "", published_miou: Optional[float] = None,
               reference: Optional[TrainingLog] = None):
    """A matplotlib Figure: training loss (top) and validation mIoU (bottom) against iteration;
    ``reference`` (the published run's log) is drawn beneath in grey."""
    Figure, FigureCanvasAgg = _matplotlib()
    figure = Figure(figsize=(8, 6), layout="constrained")
    FigureCanvasAgg(figure)
    loss_axes, miou_axes = figure.subplots(2, 1, sharex=True)
    if reference is not None:
        ref_losses = [(s.iteration, s.loss) for s in reference.train if s.loss is not None]
        loss_axes.plot([i for i, _ in ref_losses], [v for _, v in ref_losses], color="grey", linewidth=0.6,
                       label="published run")
        miou_axes.plot([v.iteration for v in reference.val], [v.miou for v in reference.val], color="grey",
                       marker=".", label="published run")
    losses = [(s.iteration, s.loss) for s in log.train if s.loss is not None]
    loss_axes.plot([i for i, _ in losses], [v for _, v in losses], linewidth=0.8, label="training loss")
    loss_axes.set(ylabel="loss", title=title or log.source)
    miou_axes.plot([v.iteration for v in log.val], [v.miou for v in log.val], marker="o", label="validation mIoU")
    if published_miou is not None:
        miou_axes.axhline(published_miou, color="black", linestyle="--", linewidth=0.8,
                          label=f"table mIoU {published_miou:.2f}")
    miou_axes.set(xlabel="iteration", ylabel="mIoU (%)")
    for axes in (loss_axes, miou_axes):
        axes.grid(True, alpha=0.3)
        axes.legend(fontsize="small")
    return figure


def plot_log(log: TrainingLog, path: PathLike, *, title: str = "", published_miou: Optional[float] = None,
             reference: Optional[TrainingLog] = None) -> Path:
    """Draw :func:`log_figure` into ``path`` (format from its suffix, PNG by default), atomically."""
    figure = log_figure(log, title=title, published_miou=published_miou, reference=reference)
    buffer = io.BytesIO()
    try:
        figure.savefig(buffer, format=Path(path).suffix.lstrip(".").lower() or "png")
    except ValueError as exc:
        raise PspZooError(f"cannot write plot {path}: {exc}") from None
    atomic_write(path, buffer.getvalue())
    return Path(path)
