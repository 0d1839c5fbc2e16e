"""A checkpoint's published training log beside its row of the results table.

Each published checkpoint came with the JSON log of the run that trained it (the manifest's
``log`` URL). psp-zoo fetches it into the checkpoint cache, reads it, and puts the validation
mIoU it recorded (last and best) and its peak training memory next to the table's mIoU and
"Mem (GB)". Two layouts are read, one JSON object per line:

- mmseg 0.x ``*.log.json``: an optional first line of run metadata, then ``{"mode": "train",
  "iter": ..., "loss": ..., "memory": MB, ...}`` and ``{"mode": "val", "mIoU": ..., ...}`` lines,
  metrics as fractions of 1. A val line's ``iter`` is the number of validation steps (mmcv's
  quirk), not the training iteration: psp-zoo's own logs add ``train_iter``, which places it
  exactly; in mmseg's own logs the iteration is inferred from the training line logged before it
  and the evaluation interval (from the log's config, or given by the caller), and a validation
  that cannot be placed so is marked as approximate (``Validation.exact``);
- mmseg 1.x ``scalars.json``: ``{"step": ..., "loss": ..., "memory": MB, ...}`` training lines and
  ``{"step": ..., "mIoU": ..., ...}`` validation lines, metrics in percent.

Everything is placed on the training ITERATION: the "epoch" of an iteration-based run means
nothing, and curves drawn against it come out wrong. A resumed run's log is split over several
files (one per launch): :func:`read_logs` reads them as one run, in time order, the lines a
resumed launch logged again replacing the killed launch's.
"""
from __future__ import annotations

import io
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union
from urllib.parse import unquote, urlparse

from ..errors import PspZooError
from ..files import atomic_write
from ..hub.cache import cache_dir as checkpoint_cache_dir
from ..hub.cache import fetch_file
from ..hub.options import FetchOptions
from ..manifest.loading import Checkpoint, get_checkpoint
from ..optional import require

__all__ = ["TrainStep", "Validation", "TrainingLog", "LogError", "parse_log", "read_log", "read_logs",
           "log_files", "log_path",
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
    """One validation during training, at a training iteration; metrics in percent.

    ``exact`` is False where the log did not record the iteration and it could not be inferred
    (an mmseg 0.x log without its evaluation interval): it is then the training line's before it."""

    iteration: int
    miou: float
    macc: Optional[float]
    aacc: Optional[float]
    exact: bool = True


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


_EVAL_INTERVAL_RE = re.compile(r"evaluation\s*=\s*dict\([^)]*?\binterval\s*=\s*(\d+)")
_MAX_ITERS_RE = re.compile(r"\b(?:max_iters|total_iters)\s*=\s*(\d+)")


def _schedule_of(meta: Mapping) -> Dict[str, int]:
    """``eval_interval`` and ``max_iters`` from a 0.x log's first line, where its config gives them:
    psp-zoo writes the recipe as JSON, mmseg the Python config's text."""
    config = meta.get("config")
    if not isinstance(config, str):
        return {}
    try:
        recipe = json.loads(config)
    except ValueError:
        recipe = None
    if isinstance(recipe, dict):
        return {key: recipe[key] for key in ("eval_interval", "max_iters")
                if isinstance(recipe.get(key), int) and not isinstance(recipe[key], bool) and recipe[key] > 0}
    found = {}
    for key, pattern in (("eval_interval", _EVAL_INTERVAL_RE), ("max_iters", _MAX_ITERS_RE)):
        match = pattern.search(config)
        if match and int(match.group(1)) > 0:
            found[key] = int(match.group(1))
    return found


class _Reader:
    """Turns the lines of one run's log files into train and val points, naming file and line on any fault.

    ``eval_interval`` and ``max_iters`` (the run's, where the caller knows them) place the validations of
    an mmseg 0.x log that records neither their iteration nor its config."""

    def __init__(self, source: str, eval_interval: Optional[int] = None, max_iters: Optional[int] = None):
        self.source, self.layout, self.line = source, None, 0
        self.given = {key: value for key, value in (("eval_interval", eval_interval), ("max_iters", max_iters))
                      if value}
        self.schedule = dict(self.given)
        self.train: List[TrainStep] = []
        self.val: List[Validation] = []
        self.earlier = (0, 0)  # how many train and val points came from earlier files
        self.file_started = True  # no point of the current file read yet

    def start_file(self, source: str) -> None:
        """The next file of the same run (a resumed launch writes a new log)."""
        self.source, self.line = source, 0
        self.earlier, self.file_started = (len(self.train), len(self.val)), False

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
                # mmseg 0.x opens its log with the run's environment and config
                self.schedule = {**self.given, **_schedule_of(record)}
                return
            raise self.fail("a line with neither 'mode' (mmseg 0.x) nor 'step' (mmseg 1.x)")
        if self.layout not in (None, layout):
            raise self.fail(f"a {layout} line in a {self.layout} file")
        self.layout = layout
        (self.feed_0x if layout == LAYOUT_0X else self.feed_1x)(record)

    def resumed_at(self, iteration: int) -> None:
        """The first point of a later file: what earlier files logged from there on was done again."""
        if self.file_started:
            return
        self.file_started = True
        trains, vals = self.earlier
        self.train = [s for s in self.train[:trains] if s.iteration < iteration] + self.train[trains:]
        self.val = [v for v in self.val[:vals] if v.iteration < iteration] + self.val[vals:]

    def add_train(self, iteration: int, record: Mapping) -> None:
        self.resumed_at(iteration)
        if self.train and iteration < self.train[-1].iteration:
            raise self.fail(f"training iteration {iteration} comes after {self.train[-1].iteration}: an "
                            f"epoch-based log or two runs in one file; psp-zoo reads one iteration-based run")
        self.train.append(TrainStep(iteration, self.number(record, "loss"), self.number(record, "memory")))

    def add_val(self, iteration: int, record: Mapping, exact: bool = True) -> None:
        self.resumed_at(iteration)
        self.val.append(Validation(iteration, self.metric(record, "mIoU", required=True),
                                   self.metric(record, "mAcc"), self.metric(record, "aAcc"), exact))

    def placed_0x(self) -> Tuple[int, bool]:
        """Where an mmseg 0.x validation without ``train_iter`` belongs, and whether that is exact.

        mmcv validates every ``eval_interval`` iterations (psp-zoo also at the last) and logs no
        train line at a validation: the validation is the first of the run's evaluation iterations
        from the training line before it on, after the previous validation."""
        before = self.train[-1].iteration if self.train else None
        previous = self.val[-1].iteration if self.val else None
        interval, last = self.schedule.get("eval_interval"), self.schedule.get("max_iters")
        if interval is None or (before is None and previous is None):
            return (before if before is not None else previous if previous is not None else 0), False
        lowest = max(before or 0, previous + 1 if previous is not None else 1)
        at = -(-lowest // interval) * interval
        return (min(at, last) if last is not None and lowest <= last else at), True

    def feed_0x(self, record: Mapping) -> None:
        mode = record["mode"]
        if mode == "train":
            self.add_train(self.iteration(record, "iter"), record)
        elif mode == "val":
            self.iteration(record, "iter")  # mmcv >= 1.3: the number of evaluation steps, not the iteration
            if "train_iter" in record:  # psp-zoo's own logs say where the validation was
                self.add_val(self.iteration(record, "train_iter"), record)
            else:
                iteration, exact = self.placed_0x()
                self.add_val(iteration, record, exact)
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

    def result(self, source: str) -> TrainingLog:
        if not self.train and not self.val:
            raise LogError(f"{source}: no training or validation line; expected an mmseg 0.x "
                           f".log.json or 1.x scalars.json with one JSON object per line")
        return TrainingLog(source, self.layout, tuple(self.train), tuple(self.val))


def parse_log(text: str, source: str = "<log>", *, eval_interval: Optional[int] = None,
              max_iters: Optional[int] = None) -> TrainingLog:
    """Read the text of an mmseg 0.x ``.log.json`` or 1.x ``scalars.json`` training log.

    Blank lines are skipped; anything else that is not a log line raises LogError naming
    ``source`` and the line number. ``eval_interval`` and ``max_iters`` (the run's) place the
    validations of an mmseg 0.x log whose first line does not give its config.
    """
    return _parse([(source, text)], source, eval_interval, max_iters)


def _parse(texts: Iterable[Tuple[str, str]], source: str, eval_interval: Optional[int],
           max_iters: Optional[int]) -> TrainingLog:
    reader = _Reader(source, eval_interval, max_iters)
    for index, (name, text) in enumerate(texts):
        if index:
            reader.start_file(name)
        for line in text.splitlines():
            reader.feed(line)
    return reader.result(source)


def _read_text(path: Path) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise LogError(f"cannot read training log {path}: {getattr(exc, 'strerror', None) or exc}") from None


def read_log(path: PathLike, *, eval_interval: Optional[int] = None, max_iters: Optional[int] = None) -> TrainingLog:
    """Read a training log file (see :func:`parse_log`)."""
    return parse_log(_read_text(Path(path)), str(path), eval_interval=eval_interval, max_iters=max_iters)


def _first_iteration(text: str) -> float:
    """The first training iteration a log file names (its place in a resumed run), inf if none."""
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if not isinstance(record, dict):
            continue
        key = {"train": "iter", "val": "train_iter"}.get(record.get("mode"), "step")
        value = record.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:  # step 0: 1.x's final test
            return value
    return math.inf


def log_files(paths: Sequence[PathLike]) -> List[Path]:
    """The log files one run's ``paths`` name: a file as it is, a folder (a work dir) for every
    ``*.log.json`` in it; none twice. A missing path or a folder without logs raises LogError."""
    found: List[Path] = []
    for given in paths:
        path = Path(given)
        if path.is_dir():
            inside = sorted(p for p in path.glob("*.log.json") if p.is_file())
            if not inside:
                raise LogError(f"{path} holds no *.log.json file; give the work dir of a psp-zoo train run, or "
                               f"the log files themselves")
            found.extend(inside)
        elif path.is_file():
            found.append(path)
        else:
            raise LogError(f"no such training log: {path}; give a .log.json file or the run's work dir")
    unique = {p.resolve(): p for p in found}
    return list(unique.values())


def read_logs(paths: Sequence[PathLike], *, eval_interval: Optional[int] = None,
              max_iters: Optional[int] = None) -> TrainingLog:
    """One run's log from several files (and work dirs, see :func:`log_files`), read as one run.

    A run resumed after a stop writes a new log at each launch: the files are put in time order (by
    the first training iteration each logs, then by name, which mmcv and psp-zoo stamp with the start
    time) and read in turn; what a resumed launch logs again replaces what the stopped one had
    logged from that iteration on. One file is read as :func:`read_log` reads it.
    """
    files = log_files(paths)
    if not files:
        raise LogError("no training log given")
    texts = [(str(path), _read_text(path)) for path in files]
    texts.sort(key=lambda item: (_first_iteration(item[1]), Path(item[0]).name))
    source = texts[0][0] if len(texts) == 1 else ", ".join(name for name, _ in texts)
    return _parse(texts, source, eval_interval, max_iters)


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
        "last_val": None if last is None else {"iter": last.iteration, "mIoU": last.miou, "exact": last.exact},
        "best_val": None if best is None else {"iter": best.iteration, "mIoU": best.miou, "exact": best.exact},
        "approximate_val_lines": sum(not v.exact for v in log.val),
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
        for label, val in (("last", last), ("best", best)):
            where = f"iteration {val['iter']}" if val["exact"] else f"about iteration {val['iter']}"
            lines.append(f"  {label} val mIoU  {_versus(val['mIoU'], published['mIoU'], 2)} at {where}")
    if report.get("approximate_val_lines"):
        lines.append(f"  {report['approximate_val_lines']} validation(s) placed approximately, at the training line "
                     f"before each: the log records neither their iteration nor the evaluation interval")
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
