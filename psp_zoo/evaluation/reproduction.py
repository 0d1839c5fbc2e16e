"""``psp-zoo reproduce``: re-measure every published checkpoint of a dataset and record the results.

For each selected checkpoint: fetch and verify it, load it, score the validation set single-scale
and ms+flip (``scoring.score``), measure speed and inference memory in one pass over the same
images and training memory as published (docs/reference.md), and write one results file per
checkpoint, device, precision and speed options (``records.py``). A checkpoint that fails is
recorded as failed and the rest still run.

Safe to rerun and to run twice: the results folder is checked before any model is built; a lock
per results file keeps a second run on the same folder from measuring beside the first (it skips
that checkpoint and says so); a finished record is reused only if it was made with the same
options (precision, switches, image limit, speed images), and a record without ms+flip gains just
that pass. Each evaluation pass keeps its confusion matrix in a ``PartialState`` file every
``save_every`` images, so a killed run continues where it stopped with the same counts.

Distributed: under ``torchrun`` (RANK / WORLD_SIZE in the environment) each process scores every
WORLD_SIZE-th image, the confusion matrices are summed with all_reduce, and rank 0 alone measures
speed and memory and writes the results file. Integer counts make the sum exact.
"""
from __future__ import annotations

import dataclasses
import gc
import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import filelock
import torch

from ..constants import MIN_SPEED_IMAGES
from ..datasets.readers import Item, SegmentationDataset, list_items, make_loader
from ..datasets.transforms import normalize_batch
from ..distributed import Distributed
from ..environment import environment_info, exact_float32_flags, on_device, usable_device
from ..errors import PspZooError, ResultsError
from ..files import check_writable_folder
from ..hub.options import FetchOptions, SpeedOptions
from ..manifest.loading import Checkpoint, get_manifest
from ..model.factory import Resolved, resolve
from ..model.optimization import optimize
from ..results.records import (
    DEFAULT_RESULTS_DIR,
    ImageCount,
    Metrics,
    ResultRecord,
    read_result,
    result_path,
    write_result,
)
from .evaluator import recorded_settings
from .inference import default_slide_batch
from .measure import PublishedRun, protocol_call, speed_and_memory, timed_call, training_memory
from .resume import PartialState
from .scoring import score
from .semseg_inference import SEMSEG_MODE, loader_scales

__all__ = ["reproduce", "ReproduceOptions", "ReproduceReport", "select_checkpoints", "run_options"]

log = logging.getLogger("psp_zoo")
PASSES = ("single_scale", "ms_flip")
#: measuring steps, in the order they run: the prepared model first (it is loaded for scoring),
#: then, with it freed, the plain model as the reference runs it, then training memory
STEPS = ("fast_speed", "speed", "training_memory")
#: what a record that gains a pass or a figure keeps from the finished record
KEPT = ("single_scale", "ms_flip", "speed", "inference_memory", "training_memory", "fast_speed",
        "fast_inference_memory")


@dataclass(frozen=True)
class ReproduceOptions:
    """How ``reproduce`` runs, besides the fetch and speed options."""

    ms_flip: bool = True
    limit: Optional[int] = None               # score the first N images (sorted), speed too
    results_dir: Union[str, Path] = DEFAULT_RESULTS_DIR
    force: bool = False                       # redo finished checkpoints, drop partial states
    num_workers: Optional[int] = None
    speed_images: Optional[int] = None        # None: the published 200 on CUDA, 20 on CPU
    speed_warmup: int = 5
    train_memory: bool = True
    save_every: int = 50                      # images between partial-state saves
    progress: Optional[bool] = None           # None: a bar on a terminal, log lines elsewhere

    def check(self) -> None:
        for name, value, minimum in (("limit", self.limit, 1), ("speed_images", self.speed_images, MIN_SPEED_IMAGES),
                                     ("speed_warmup", self.speed_warmup, 0), ("save_every", self.save_every, 1),
                                     ("num_workers", self.num_workers, 0)):
            if value is not None and value < minimum:
                raise PspZooError(f"{name} must be a whole number >= {minimum}, got {value}")
        if self.speed_images is not None and self.speed_images <= self.speed_warmup:
            raise PspZooError(f"speed_images ({self.speed_images}) must exceed speed_warmup "
                              f"({self.speed_warmup}): at least one image must be timed")


@dataclass
class ReproduceReport:
    """What a run did: the records of this run (skipped ones as read from disk)."""

    records: List[ResultRecord] = field(default_factory=list)
    skipped: List[str] = field(default_factory=list)
    busy: List[str] = field(default_factory=list)  # locked by another run on the same folder
    rank: int = 0

    @property
    def failed(self) -> List[str]:
        return [r.checkpoint for r in self.records if r.status == "failed"]


def select_checkpoints(dataset: str, pattern: Optional[str] = None, manifest: Any = None) -> List[Checkpoint]:
    """The checkpoints published on ``dataset`` whose name or alias matches the wildcard ``pattern``."""
    found = get_manifest(manifest)
    names = found.list(dataset=dataset)
    if not names:
        raise PspZooError(f"the manifest has no checkpoints for dataset {dataset!r}")
    chosen = found.list(dataset=dataset, pattern=pattern) if pattern else names
    if not chosen:
        raise PspZooError(f"no {dataset} checkpoint matches {pattern!r}; the {dataset} checkpoints "
                          f"are: {', '.join(names)}")
    return [found.get(name) for name in chosen]


def run_options(options: ReproduceOptions, speed: SpeedOptions, device: torch.device) -> Dict[str, Any]:
    """What a finished record must have been made with to be reused (recorded in its settings)."""
    return {"precision": speed.precision, "optimizations": list(speed.applied(device)), "limit": options.limit,
            "speed_images": _speed_count(options, device), "speed_warmup": options.speed_warmup,
            "train_memory": options.train_memory}


def _speed_count(options: ReproduceOptions, device: torch.device) -> int:
    return options.speed_images or (200 if device.type == "cuda" else 20)


# --------------------------------------------------------------------------------------------
# one checkpoint


class _CheckpointRun:
    """Everything about reproducing one checkpoint in this process."""

    def __init__(self, entry: Checkpoint, job: "_Job"):
        self.entry, self.job, self.options = entry, job, job.options
        self.target: Resolved = resolve(entry.name, dataset=job.dataset, fetch=job.fetch, device=job.device)
        self.settings = self.target.settings
        self.published = PublishedRun.of(entry)
        self.model = None  # the prepared model, while scoring and its timing need it
        # a checkpoint scored on another dataset it is published on (Dark Zurich...) keeps its own folder
        folder = entry.name if job.dataset == entry.dataset else f"{entry.name}/{job.dataset}"
        self.path = result_path(self.options.results_dir, folder, job.environment, _file_tag(job.speed))

    def record(self, previous: Optional[ResultRecord] = None, **fields: Any) -> ResultRecord:
        job = self.job
        scored = len(job.items) if fields.get("status", "complete") == "complete" else 0
        settings = {**recorded_settings(self.target, self.options.ms_flip, job.data_root),
                    "slide_batch_size": default_slide_batch(job.device), "world_size": job.dist.world_size,
                    "run": run_options(self.options, job.speed, job.device)}
        settings["measure"] = self.measure_settings()
        kept = {} if previous is None else {k: getattr(previous, k) for k in KEPT}
        return ResultRecord(checkpoint=self.entry.name, dataset=job.dataset, environment=job.environment,
                            precision=job.speed.precision, optimizations=job.speed.applied(job.device),
                            images=ImageCount(count=scored, available=job.available, limit=self.options.limit),
                            settings=settings, **{**kept, **fields})

    def measure_settings(self) -> Dict[str, Any]:
        """How speed and memory were measured, beside the figures."""
        device = self.job.device
        return {"published_precision": self.published.precision, "loss_scale": self.published.loss_scale,
                "plain_precision": self.published.precision_on(device), "plain_windows_per_call": 1,
                "prepared_windows_per_call": default_slide_batch(device), "timed_call": timed_call(self.settings),
                "float32": exact_float32_flags(),
                "training": "cudnn.benchmark on, one extra gradient-sized buffer for DDP's gradient buckets, "
                            "BN in place of SyncBN"}

    def partial(self, pass_name: str) -> PartialState:
        job = self.job
        rank = f".rank{job.dist.rank}of{job.dist.world_size}" if job.dist.world_size > 1 else ""
        fingerprint = {
            "checkpoint": self.entry.name, "file": self.entry.filename, "pass": pass_name,
            "settings": dataclasses.asdict(self.settings), "num_classes": self.entry.num_classes,
            "images": hashlib.sha256("\n".join(i.name for i in job.items).encode()).hexdigest(),
            "image_count": len(job.items), "rank": job.dist.rank, "world_size": job.dist.world_size,
            "limit": self.options.limit, **dataclasses.asdict(job.speed),
        }
        path = self.path.with_name(f"{self.path.name}.{pass_name}{rank}.partial.npz")
        return PartialState(path, fingerprint, every=self.options.save_every)

    def clear_partials(self) -> None:
        for pass_name in PASSES:
            self.partial(pass_name).clear()

    def score_pass(self, model, ms_flip: bool) -> Metrics:
        job = self.job
        pass_name = PASSES[ms_flip]
        data = SegmentationDataset(job.dataset, job.data_root, items=job.items, manifest=job.fetch.manifest,
                                   img_scales=loader_scales(self.settings, ms_flip),
                                   reduce_zero_label=self.target.dataset.reduce_zero_label)
        matrix = score(model, data.shard(job.dist.rank, job.dist.world_size), self.settings,
                       self.entry.num_classes, ms_flip=ms_flip, device=job.device,
                       partial=self.partial(pass_name), num_workers=self.options.num_workers,
                       show=job.progress, on_image=job.on_image,
                       desc=f"{job.position(self.entry)} {self.entry.name} {pass_name.replace('_', '-')}")
        return Metrics.from_matrix(matrix.all_reduce(), self.target.class_names)

    def wanted_steps(self) -> Tuple[str, ...]:
        return STEPS if self.options.train_memory else STEPS[:2]

    def missing_steps(self, record: ResultRecord) -> Tuple[str, ...]:
        """The measuring steps this run wants whose figure ``record`` lacks (failed ones included)."""
        return tuple(step for step in self.wanted_steps() if getattr(record, step) is None)

    def speed_inputs(self) -> Tuple[Callable[[], Iterator[Tuple[torch.Tensor, Tuple[int, int]]]], int, int]:
        """(a fresh pass over the speed images as the reference's loader hands them over: normalized
        float images in host memory, pinned for a GPU, or for the authors' protocol the images as
        read; the image count; the warm-up count)."""
        job, options, entry = self.job, self.options, self.entry
        count = min(_speed_count(options, job.device), len(job.items))
        warmup = min(options.speed_warmup, count - 1)  # few images: still time one; the record says so
        if warmup < options.speed_warmup:
            log.warning("%s: only %d image(s) for speed: %d warm-up, %d timed (published: 5 and 195); "
                        "the record and the table say so", entry.name, count, warmup, count - warmup)
        data = SegmentationDataset(job.dataset, job.data_root, items=job.items[:count], manifest=job.fetch.manifest,
                                   img_scales=loader_scales(self.settings, False),
                                   reduce_zero_label=self.target.dataset.reduce_zero_label)
        raw = self.settings.mode == SEMSEG_MODE  # their protocol prepares the image inside the timed call
        # on CPU, loader workers would compete with the timed model for the cores
        workers = 0 if job.device.type == "cpu" else options.num_workers

        def inputs() -> Iterator[Tuple[torch.Tensor, Tuple[int, int]]]:
            for sample in make_loader(data, num_workers=workers, device=job.device):
                image = sample.inputs[0].unsqueeze(0)
                image = image if raw else normalize_batch(image)  # mmseg's preprocessing: not timed
                yield (image.pin_memory() if job.device.type == "cuda" else image), sample.ori_size
        return inputs, count, warmup

    def timed(self, model, step: str) -> Dict[str, Any]:
        """fps and inference peak in one pass: the plain model as the reference runs it ("speed"),
        or the run's prepared model as psp-zoo runs it ("fast_speed")."""
        job = self.job
        inputs, count, warmup = self.speed_inputs()
        protocol = step == "speed"
        windows = 1 if protocol else default_slide_batch(job.device)
        precision = self.published.precision_on(job.device) if protocol else job.speed.precision
        log.info("%s %s: timing the %s model, %d image(s) after %d warm-up, peak memory on the same pass",
                 job.position(self.entry), self.entry.name, "plain" if protocol else "prepared", count - warmup, warmup)
        detail = (f"{timed_call(self.settings)}; {windows} window(s) per model call"
                  + (f"; {self.published.describe(job.device)}" if protocol else ""))
        speed, memory = speed_and_memory(protocol_call(model, self.settings, job.device, windows_per_call=windows),
                                         inputs(), warmup=warmup, total=count, device=job.device,
                                         model="plain" if protocol else "optimized", precision=precision,
                                         detail=detail)
        return {step: speed, "inference_memory" if protocol else "fast_inference_memory": memory}

    def plain_model(self):
        """The model as loaded, in the published precision where the device runs it (fp16: autocast)."""
        precision = self.published.precision_on(self.job.device)
        if precision == "fp32":
            return self.target.load()
        return optimize(self.target.load(), SpeedOptions(precision=precision, fuse_bn=False, channels_last=False,
                                                         factorize_head=False, winograd=False))

    def measure_step(self, step: str) -> Dict[str, Any]:
        entry = self.entry
        if step == "fast_speed":
            return self.timed(self.model, step)
        self.model = None  # the prepared model's weights must not count in the plain model's memory
        if step == "speed":
            return self.timed(self.plain_model(), step)
        return {step: training_memory(entry.model_kwargs(), entry.crop_size, entry.train_images_per_gpu,
                                      self.job.device, published=self.published)}

    def measure(self, steps: Sequence[str]) -> Tuple[Dict[str, Any], Dict[str, str]]:
        """(the figures, the failed steps and their errors): a step that fails (say out of memory)
        is recorded and the others still run; the scores are kept either way (rank 0 only)."""
        measured: Dict[str, Any] = {}
        failed: Dict[str, str] = {}
        with on_device(self.job.device):
            for step in sorted(steps, key=STEPS.index):
                try:
                    measured.update(self.measure_step(step))
                    continue
                except Exception as exc:  # noqa: BLE001 - recorded; the scores and other figures are kept
                    failed[step] = _describe(exc)
                log.error("%s: measuring %s failed: %s", self.entry.name, step, failed[step])
                if self.job.device.type == "cuda":  # outside the except: its traceback held the tensors
                    gc.collect()
                    torch.cuda.empty_cache()
        return measured, failed

    def run(self, previous: Optional[ResultRecord]) -> ResultRecord:
        """Evaluate the passes still missing (every rank), measure what is missing (rank 0), return the record."""
        wanted = [False, True][: 1 + self.options.ms_flip]
        passes = [p for p in wanted if previous is None or getattr(previous, PASSES[p]) is None]
        error, metrics = None, {}
        try:
            self.model = optimize(self.target.load(), self.job.speed)
            for ms_flip in passes:
                metrics[PASSES[ms_flip]] = self.score_pass(self.model, ms_flip)
        except Exception as exc:  # noqa: BLE001 - recorded, and the other checkpoints still run
            error = _describe(exc)
        errors = self.job.dist.errors(error)  # every rank must agree before all_reduce
        if errors:
            return self.record(status="failed", error="; ".join(errors))
        failed: Dict[str, str] = {} if previous is None else dict(previous.failed_steps)
        if self.job.dist.is_main:
            steps = self.wanted_steps() if previous is None else self.missing_steps(previous)
            measured, failed_now = self.measure(steps)
            failed = {**{k: v for k, v in failed.items() if k not in steps}, **failed_now}
            metrics.update(measured)
        self.model = None
        return self.record(previous, failed_steps=failed, **metrics)


def _file_tag(speed: SpeedOptions) -> str:
    """The results-file suffix of non-default speed options: ``bf16``, ``fp32-compile``, ``fp32-no_fuse_bn``..."""
    default = SpeedOptions()
    parts = [f"no_{name}" if not getattr(speed, name) else name for name in SpeedOptions.switches()
             if getattr(speed, name) != getattr(default, name)]
    return "-".join([speed.precision, *parts]) if parts else speed.precision


def _describe(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return text if isinstance(exc, PspZooError) else f"{type(exc).__name__}: {text}"


# --------------------------------------------------------------------------------------------
# the whole job


@dataclass
class _Job:
    options: ReproduceOptions
    fetch: FetchOptions
    speed: SpeedOptions
    dataset: str
    entries: List[Checkpoint]
    data_root: Path
    items: List[Item]
    available: int
    device: torch.device
    dist: Distributed
    environment: Dict[str, Any]
    on_image: Optional[Callable[[int], None]] = None

    @property
    def progress(self) -> Optional[bool]:
        return self.options.progress if self.dist.is_main else False

    def position(self, entry: Checkpoint) -> str:
        return f"[{self.entries.index(entry) + 1}/{len(self.entries)}]"

    def say(self, level: int, message: str, *args: Any) -> None:
        """Log on rank 0 only: one line per event, not one per process."""
        if self.dist.is_main:
            log.log(level, message, *args)

    def finished(self, run: _CheckpointRun) -> Tuple[Optional[ResultRecord], bool]:
        """(the finished record at the run's path, whether it is complete for this run)."""
        if self.options.force or not run.path.is_file():
            return None, False
        try:
            record = read_result(run.path)
        except ResultsError as exc:
            log.warning("redoing: %s", exc)
            return None, False
        wanted = run_options(self.options, self.speed, self.device)
        if record.status != "complete" or record.settings.get("run") != wanted or record.single_scale is None:
            if record.status == "complete":
                log.info("%s: redoing, the results in %s were made with other options", run.entry.name, run.path)
            return None, False
        return record, (record.ms_flip is not None or not self.options.ms_flip) and not run.missing_steps(record)

    def reproduce(self, entry: Checkpoint, report: ReproduceReport) -> None:
        run = _CheckpointRun(entry, self)
        lock = filelock.FileLock(str(run.path.with_name(f".{run.path.name}.lock")), timeout=0)
        busy = False
        if self.dist.is_main:  # rank 0 holds the lock for the whole job; every rank learns the outcome
            try:
                lock.acquire()
            except filelock.Timeout:
                busy = True
        if self.dist.from_main(busy):
            self.say(logging.WARNING, "%s %s: skipped, another run is reproducing it into %s now",
                     self.position(entry), entry.name, run.path.parent)
            report.busy.append(entry.name)
            return
        try:
            self._reproduce_locked(run, report)
        finally:
            if self.dist.is_main:
                lock.release()

    def _reproduce_locked(self, run: _CheckpointRun, report: ReproduceReport) -> None:
        entry = run.entry
        if self.options.force:
            run.clear_partials()
        previous, complete = self.dist.from_main(self.finished(run) if self.dist.is_main else (None, False))
        if complete:
            self.say(logging.INFO, "%s %s: skipped, finished results in %s (force redoes it)",
                     self.position(entry), entry.name, run.path)
            report.records.append(previous)
            report.skipped.append(entry.name)
            return
        what = "reproducing" if previous is None else (
            "adding ms+flip" if previous.ms_flip is None and self.options.ms_flip else
            f"measuring {', '.join(run.missing_steps(previous))} (the scores are kept)")
        self.say(logging.INFO, "%s %s: %s on %s", self.position(entry), entry.name, what,
                 self.environment["device_name"])
        record = run.run(previous)
        if self.dist.is_main:
            write_result(record, run.path)
        self.dist.barrier()  # the results file exists before any rank forgets its partial state
        if record.status == "complete":
            run.clear_partials()
            self.say(logging.INFO, "%s %s: wrote %s", self.position(entry), entry.name, run.path)
        else:
            self.say(logging.ERROR, "%s %s: failed: %s", self.position(entry), entry.name, record.error)
        report.records.append(record)


def reproduce(dataset: str, data_root: Union[str, Path], *, models: Optional[str] = None,
              device: Union[None, str, torch.device] = None, fetch: Optional[FetchOptions] = None,
              speed: Optional[SpeedOptions] = None, on_image: Optional[Callable[[int], None]] = None,
              **options: Any) -> ReproduceReport:
    """Reproduce every checkpoint published on ``dataset`` matching ``models`` (a shell wildcard).

    ``options`` are :class:`ReproduceOptions` fields; ``fetch`` and ``speed`` the option records
    (default: the published files, the exact fp32 fast path). ``on_image(n)`` is called after
    each scored image. Bad input (an unknown dataset, no match, a missing data folder, a results
    folder that cannot be written) raises PspZooError before any model is built; a checkpoint
    that fails later is recorded with status "failed" and the others still run.
    """
    opts, fetch, speed = ReproduceOptions(**options), fetch or FetchOptions(), speed or SpeedOptions()
    opts.check()
    device = usable_device(device)
    speed.check(device)
    entries = select_checkpoints(dataset, models, fetch.manifest)
    everything = list_items(dataset, data_root, manifest=fetch.manifest)  # before any download
    check_writable_folder(opts.results_dir, "results folder")
    parallel, resolved = Distributed.from_env(device)
    try:
        job = _Job(opts, fetch, speed, dataset, entries, Path(data_root), everything[: opts.limit],
                   len(everything), resolved, parallel, environment_info(resolved), on_image)
        report = ReproduceReport(rank=parallel.rank)
        for entry in entries:
            job.reproduce(entry, report)
        return report
    finally:
        parallel.close()
