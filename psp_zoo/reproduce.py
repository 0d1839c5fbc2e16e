"""``psp-zoo reproduce``: re-measure every published checkpoint of a dataset and record the results.

For each selected checkpoint: fetch and verify it, load it, score the validation set single-scale
and ms+flip, measure speed, inference memory and training memory as published (REFERENCE.md),
and write one results file per checkpoint, device and precision (``results.py``). A checkpoint
that fails is recorded as failed and the rest still run.

Resumable at two levels: a checkpoint with a finished results file is skipped (unless ``force``),
and each evaluation pass keeps its confusion matrix and next image index in a ``PartialState``
file every ``save_every`` images, so a killed run continues where it stopped and ends with the
same counts as an uninterrupted one.

Distributed: under ``torchrun`` (RANK / WORLD_SIZE in the environment) each process scores every
WORLD_SIZE-th image, the confusion matrices are summed with all_reduce, and rank 0 alone measures
speed and memory and writes the results file. Integer counts make the sum exact, so the numbers
equal a one-process run.
"""
from __future__ import annotations

import dataclasses
import datetime
import hashlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
import torch.distributed as dist
from tqdm import tqdm

from .datasets import Item, SegmentationDataset, class_names, list_items, make_loader
from .errors import PspZooError, ResultsError
from .evaluate import predictions
from .factory import create_model, usable_device
from .inference import default_slide_batch, mode_logits
from .manifest import Checkpoint, TestSettings, get_manifest
from .measure import inference_peak_memory, measure_fps, training_memory
from .metrics import ConfusionMatrix
from .optimize import check_options, optimize
from .results import (DEFAULT_RESULTS_DIR, ImageCount, Metrics, PartialState, ResultRecord,
                      environment_info, read_result, result_path, write_result)
from .tables import build_tables, render
from .transforms import MS_FLIP_RATIOS, normalize_batch, target_scales

__all__ = ["reproduce", "ReproduceOptions", "ReproduceReport", "Distributed", "select_checkpoints",
           "prepare_model", "evaluate_split", "summary", "CRASH_EXIT_CODE"]

log = logging.getLogger(__name__)

#: Exit status of the simulated kill (``crash_after``), used by the resume tests.
CRASH_EXIT_CODE = 75
PASSES = ("single_scale", "ms_flip")


@dataclass(frozen=True)
class ReproduceOptions:
    """How ``reproduce`` runs; every field has the CLI option of the same name."""

    ms_flip: bool = True
    limit: Optional[int] = None               # score the first N images (sorted), speed too
    results_dir: Union[str, Path] = DEFAULT_RESULTS_DIR
    force: bool = False                       # redo finished checkpoints, drop partial states
    manifest: Any = None
    mirror: Optional[str] = None
    offline: Optional[bool] = None
    cache_dir: Union[None, str, Path] = None
    num_workers: Optional[int] = None
    precision: str = "fp32"                   # psp_zoo.optimize; the default is the exact fp32 fast path
    compile: bool = False
    fuse_bn: bool = True
    channels_last: bool = True
    speed_images: Optional[int] = None        # None: the published 200 on CUDA, 20 on CPU
    speed_warmup: int = 5
    train_memory: bool = True
    save_every: int = 50                      # images between partial-state saves
    progress: Optional[bool] = None           # None: bars only on a terminal
    crash_after: Optional[int] = None         # tests: exit hard after N scored images, like a kill


@dataclass
class ReproduceReport:
    """What a run did: the records of this run (skipped ones as read from disk)."""

    records: List[ResultRecord] = field(default_factory=list)
    skipped: List[str] = field(default_factory=list)
    rank: int = 0

    @property
    def failed(self) -> List[str]:
        return [r.checkpoint for r in self.records if r.status == "failed"]


# --------------------------------------------------------------------------------------------
# selection and model preparation


def select_checkpoints(dataset: str, pattern: Optional[str] = None, manifest: Any = None) -> List[Checkpoint]:
    """The dataset's checkpoints whose name or alias matches the shell wildcard ``pattern``."""
    found = get_manifest(manifest)
    names = found.list(dataset=dataset)
    if not names:
        raise PspZooError(f"the manifest has no checkpoints for dataset {dataset!r}")
    chosen = found.list(dataset=dataset, pattern=pattern) if pattern else names
    if not chosen:
        raise PspZooError(f"no {dataset} checkpoint matches {pattern!r}; the {dataset} checkpoints "
                          f"are: {', '.join(names)}")
    return [found.get(name) for name in chosen]


def _speed_options(options: "ReproduceOptions") -> Dict[str, Any]:
    return dict(precision=options.precision, compile=options.compile, fuse_bn=options.fuse_bn,
                channels_last=options.channels_last)


def prepare_model(model: torch.nn.Module, **speed: Any) -> Tuple[torch.nn.Module, Tuple[str, ...]]:
    """The model as evaluated and timed (``psp_zoo.optimize``), and the names of the switches on.

    The one place where a loaded model is changed before scoring; the precision is recorded
    separately in the results file.
    """
    prepared = optimize(model, **speed)
    applied = prepared.optimizations
    return prepared, tuple(name for name in ("fuse_bn", "channels_last", "compile") if applied[name])


# --------------------------------------------------------------------------------------------
# distributed


@dataclass
class Distributed:
    """This process's place in a torchrun job (rank 0 of 1 when run alone)."""

    rank: int = 0
    world_size: int = 1
    started_here: bool = False

    @classmethod
    def from_env(cls, device: torch.device) -> Tuple["Distributed", torch.device]:
        """Join the job described by RANK / WORLD_SIZE (gloo on CPU, nccl on CUDA), if any."""
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        if world_size <= 1:
            return cls(), device
        rank = int(os.environ["RANK"])
        if device.type == "cuda":
            local_rank = int(os.environ.get("LOCAL_RANK", rank % torch.cuda.device_count()))
            device = torch.device("cuda", local_rank)
            torch.cuda.set_device(device)
        started = False
        if not dist.is_initialized():
            # rank 0 measures speed and memory while the others wait at a barrier: allow hours
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                    timeout=datetime.timedelta(hours=6))
            started = True
        return cls(rank, world_size, started), device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def errors(self, error: Optional[str]) -> List[str]:
        """Every process's error (so all of them agree whether a checkpoint failed)."""
        if self.world_size == 1:
            return [error] if error else []
        gathered: List[Optional[str]] = [None] * self.world_size
        dist.all_gather_object(gathered, error)
        return [f"rank {rank}: {e}" for rank, e in enumerate(gathered) if e]

    def from_main(self, value: Any) -> Any:
        """Rank 0's ``value`` on every process."""
        if self.world_size == 1:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def close(self) -> None:
        if self.started_here and dist.is_initialized():
            dist.destroy_process_group()


# --------------------------------------------------------------------------------------------
# one evaluation pass, resumable


def evaluate_split(model, data: SegmentationDataset, settings: TestSettings, num_classes: int, *,
                   ms_flip: bool, device: torch.device, partial: Optional[PartialState] = None,
                   num_workers: Optional[int] = None, progress: Optional[bool] = None, desc: str = "",
                   after_image: Optional[Callable[[], None]] = None) -> ConfusionMatrix:
    """The confusion matrix of every image of ``data`` (one process's shard, not reduced).

    With ``partial``, counting starts from its saved state and is saved every ``partial.every``
    images and once at the end, so a killed run resumes at the last save.
    """
    metric = ConfusionMatrix(num_classes, device=device)
    start = 0
    saved = partial.load() if partial is not None else None
    if saved is not None:
        start, arrays = saved
        metric.matrix.copy_(torch.from_numpy(arrays["matrix"]))
        log.info("%s: resuming at image %d of %d (%s)", desc, start, len(data), partial.path.name)
    if start < len(data):
        loader = make_loader(data.subset(range(start, len(data))), num_workers=num_workers,
                             pin_memory=device.type == "cuda")
        with tqdm(total=len(data), initial=start, desc=desc, unit="img", dynamic_ncols=True,
                  disable=None if progress is None else not progress) as bar:
            for done, (sample, pred) in enumerate(predictions(model, loader, settings, ms_flip=ms_flip,
                                                              device=device), start=start + 1):
                metric.update(pred, sample.label.to(pred.device, non_blocking=True))
                if partial is not None:
                    partial.maybe_save(done, {"matrix": metric.matrix})
                bar.update()
                if after_image is not None:
                    after_image()
        if partial is not None:  # marks the pass finished, so a later kill does not redo it
            partial.save(len(data), {"matrix": metric.matrix})
    return metric


# --------------------------------------------------------------------------------------------
# one checkpoint


def _to_metrics(metric: ConfusionMatrix, names: Sequence[str]) -> Metrics:
    scores = metric.compute()
    return Metrics.from_fractions(names, aacc=scores["aAcc"], miou=scores["mIoU"], macc=scores["mAcc"],
                                  iou=scores["IoU"], acc=scores["Acc"])


def _is_finished(path: Path, options: ReproduceOptions) -> Optional[ResultRecord]:
    """The complete record at ``path`` made with the same image limit and passes, if any."""
    if not path.is_file():
        return None
    try:
        record = read_result(path)
    except ResultsError as exc:
        log.warning("redoing: %s", exc)
        return None
    if record.status != "complete" or record.images.limit != options.limit:
        return None
    return record if record.ms_flip is not None or not options.ms_flip else None


class _CheckpointRun:
    """Everything about reproducing one checkpoint in this process."""

    def __init__(self, entry: Checkpoint, job: "_Job"):
        self.entry, self.job, self.options = entry, job, job.options
        self.path = result_path(self.options.results_dir, entry.name, job.environment, self.options.precision)
        self.settings = entry.test

    # ---- bookkeeping

    def record(self, **fields: Any) -> ResultRecord:
        job = self.job
        scored = len(job.items) if fields.get("status", "complete") == "complete" else 0
        return ResultRecord(checkpoint=self.entry.name, dataset=self.entry.dataset,
                            environment=job.environment, precision=self.options.precision,
                            images=ImageCount(count=scored, available=job.available, limit=self.options.limit),
                            settings=self.recorded_settings(), **fields)

    def recorded_settings(self) -> Dict[str, Any]:
        entry, options = self.entry, self.options
        return {"test": dataclasses.asdict(entry.test), "num_classes": entry.num_classes,
                "reduce_zero_label": entry.reduce_zero_label,
                "ms_flip_ratios": list(MS_FLIP_RATIOS) if options.ms_flip else None,
                "slide_batch_size": default_slide_batch(self.job.device), "checkpoint_file": entry.filename,
                "sha256": entry.sha256, "data_root": str(self.job.data_root),
                "world_size": self.job.dist.world_size}

    def partial(self, pass_name: str) -> PartialState:
        job = self.job
        rank = f".rank{job.dist.rank}of{job.dist.world_size}" if job.dist.world_size > 1 else ""
        fingerprint = {
            "checkpoint": self.entry.name, "file": self.entry.filename,
            "settings": dataclasses.asdict(self.settings),
            "pass": pass_name, "num_classes": self.entry.num_classes,
            "reduce_zero_label": self.entry.reduce_zero_label, "limit": self.options.limit,
            "images": hashlib.sha256("\n".join(i.name for i in job.items).encode()).hexdigest(),
            "image_count": len(job.items), "rank": job.dist.rank, "world_size": job.dist.world_size,
            **_speed_options(self.options),
        }
        path = self.path.with_name(f"{self.path.name}.{pass_name}{rank}.partial.npz")
        return PartialState(path, fingerprint, every=self.options.save_every)

    def clear_partials(self) -> None:
        for pass_name in PASSES:
            self.partial(pass_name).clear()

    # ---- the work

    def load_model(self) -> torch.nn.Module:
        options = self.options
        return create_model(self.entry.name, manifest=options.manifest, device=self.job.device,
                            cache_dir=options.cache_dir, mirror=options.mirror, offline=options.offline,
                            quiet=not self.job.show_progress)

    def evaluate(self, model, ms_flip: bool) -> ConfusionMatrix:
        job = self.job
        pass_name = PASSES[ms_flip]
        data = SegmentationDataset(self.entry.dataset, job.data_root, items=job.items,
                                   img_scales=target_scales(self.settings.img_scale, ms_flip),
                                   reduce_zero_label=self.entry.reduce_zero_label)
        shard = data.shard(job.dist.rank, job.dist.world_size)
        return evaluate_split(model, shard, self.settings, self.entry.num_classes, ms_flip=ms_flip,
                              device=job.device, partial=self.partial(pass_name),
                              num_workers=self.options.num_workers, progress=job.progress,
                              desc=f"{job.position(self.entry)} {self.entry.name} "
                                   f"{pass_name.replace('_', '-')}",
                              after_image=job.count_image)

    def measure(self, model) -> Dict[str, Any]:
        """Speed, inference memory and training memory as published (rank 0 only)."""
        job, options, entry = self.job, self.options, self.entry
        default_count = 200 if job.device.type == "cuda" else 20
        count = min(options.speed_images or default_count, len(job.items))
        warmup = min(options.speed_warmup, count - 1)  # few images: still time at least one
        data = SegmentationDataset(entry.dataset, job.data_root, items=job.items[:count],
                                   img_scales=[self.settings.img_scale],
                                   reduce_zero_label=entry.reduce_zero_label)
        # on CPU, loader workers would compete with the timed model for the cores
        workers = 0 if job.device.type == "cpu" else options.num_workers

        def call(item: Tuple[torch.Tensor, Tuple[int, int]]) -> torch.Tensor:
            image, ori_size = item
            return mode_logits(model, image, ori_size, self.settings, batch_size=default_slide_batch(image.device))

        def inputs() -> Iterator[Tuple[torch.Tensor, Tuple[int, int]]]:
            for sample in make_loader(data, num_workers=workers, pin_memory=job.device.type == "cuda"):
                yield normalize_batch(sample.inputs[0].to(job.device).unsqueeze(0)), sample.ori_size

        measured = {"inference_memory": inference_peak_memory(call, inputs(), device=job.device),
                    "speed": measure_fps(call, inputs(), warmup=warmup, total=count, device=job.device)}
        if options.train_memory:
            measured["training_memory"] = training_memory(entry.model_kwargs(), entry.crop_size,
                                                          entry.train_images_per_gpu, job.device)
        return measured

    def run(self) -> ResultRecord:
        """Evaluate (every rank), measure (rank 0), and return the record to write."""
        error, matrices = None, {}
        try:
            model, optimizations = prepare_model(self.load_model(), **_speed_options(self.options))
            for ms_flip in (False, True)[: 1 + self.options.ms_flip]:
                matrices[PASSES[ms_flip]] = self.evaluate(model, ms_flip)
        except Exception as exc:  # noqa: BLE001 - recorded, and the other checkpoints still run
            error = _describe(exc)
        errors = self.job.dist.errors(error)  # every rank must agree before all_reduce
        if errors:
            return self.record(status="failed", error="; ".join(errors))
        names = class_names(self.entry.dataset, self.entry.num_classes)
        metrics = {key: _to_metrics(metric.all_reduce(), names) for key, metric in matrices.items()}
        fields: Dict[str, Any] = {"optimizations": optimizations, **metrics}
        if self.job.dist.is_main:
            try:
                fields.update(self.measure(model))
            except Exception as exc:  # noqa: BLE001
                return self.record(status="failed", error=f"measuring speed and memory: {_describe(exc)}")
        return self.record(**fields)


def _describe(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return text if isinstance(exc, PspZooError) else f"{type(exc).__name__}: {text}"


# --------------------------------------------------------------------------------------------
# the whole job


@dataclass
class _Job:
    options: ReproduceOptions
    entries: List[Checkpoint]
    data_root: Path
    items: List[Item]
    available: int
    device: torch.device
    dist: Distributed
    environment: Dict[str, Any]
    images_scored: int = 0

    @property
    def show_progress(self) -> bool:
        return self.dist.is_main and self.options.progress is not False

    @property
    def progress(self) -> Optional[bool]:
        return self.options.progress if self.dist.is_main else False

    def position(self, entry: Checkpoint) -> str:
        return f"[{self.entries.index(entry) + 1}/{len(self.entries)}]"

    def count_image(self) -> None:
        self.images_scored += 1
        if self.options.crash_after is not None and self.images_scored >= self.options.crash_after:
            os._exit(CRASH_EXIT_CODE)  # a hard kill: no cleanup, no flush, nothing written after

    def say(self, level: int, message: str, *args: Any) -> None:
        """Log on rank 0 only: one line per event, not one per process."""
        if self.dist.is_main:
            log.log(level, message, *args)

    def reproduce(self, entry: Checkpoint) -> Tuple[ResultRecord, bool]:
        """(record, skipped) for one checkpoint; rank 0 writes it."""
        run = _CheckpointRun(entry, self)
        if self.options.force:
            run.clear_partials()
        finished = None
        if self.dist.is_main and not self.options.force:
            finished = _is_finished(run.path, self.options)
        finished = self.dist.from_main(finished)
        if finished is not None:
            self.say(logging.INFO, "%s %s: skipped, finished results in %s (--force redoes it)",
                     self.position(entry), entry.name, run.path)
            return finished, True
        self.say(logging.INFO, "%s %s: reproducing on %s", self.position(entry), entry.name,
                 self.environment["device_name"])
        record = run.run()
        if self.dist.is_main:
            write_result(run.path, record)
        self.dist.barrier()  # the results file exists before any rank forgets its partial state
        if record.status == "complete":
            run.clear_partials()
            self.say(logging.INFO, "%s %s: wrote %s", self.position(entry), entry.name, run.path)
        else:
            self.say(logging.ERROR, "%s %s: failed: %s", self.position(entry), entry.name, record.error)
        return record, False


def _check_options(opts: ReproduceOptions, device: torch.device) -> None:
    check_options(device=device, **_speed_options(opts))
    for name, value, minimum in (("limit", opts.limit, 1), ("speed_images", opts.speed_images, 1),
                                 ("speed_warmup", opts.speed_warmup, 0), ("save_every", opts.save_every, 1),
                                 ("num_workers", opts.num_workers, 0)):
        if value is not None and value < minimum:
            raise PspZooError(f"--{name.replace('_', '-')} must be a whole number >= {minimum}, got {value}")


def reproduce(dataset: str, data_root: Union[str, Path], *, models: Optional[str] = None,
              device: Union[None, str, torch.device] = None, **options: Any) -> ReproduceReport:
    """Reproduce every checkpoint of ``dataset`` matching ``models`` (a shell wildcard).

    ``options`` are :class:`ReproduceOptions` fields. Bad input (an unknown dataset, no match, a
    missing data folder) raises PspZooError before any work; a checkpoint that fails later is
    recorded with status "failed" and the others still run.
    """
    opts = ReproduceOptions(**options)
    device = usable_device(device)
    _check_options(opts, device)
    entries = select_checkpoints(dataset, models, opts.manifest)
    everything = list_items(dataset, data_root)  # checks the data folder before any download
    parallel, resolved = Distributed.from_env(device)
    try:
        job = _Job(opts, entries, Path(data_root), everything[: opts.limit], len(everything), resolved,
                   parallel, environment_info(resolved))
        report = ReproduceReport(rank=parallel.rank)
        for entry in entries:
            record, skipped = job.reproduce(entry)
            report.records.append(record)
            if skipped:
                report.skipped.append(entry.name)
        return report
    finally:
        parallel.close()


def summary(report: ReproduceReport, manifest: Any = None) -> str:
    """Published beside reproduced numbers for the checkpoints of ``report`` (Markdown)."""
    names = {record.checkpoint for record in report.records}
    tables = build_tables(manifest, report.records)
    shown = []
    for table in tables:
        rows = table.frame[table.frame["Checkpoint"].isin(names)] if not table.frame.empty else table.frame
        if len(rows):
            shown.append(dataclasses.replace(table, frame=rows.reset_index(drop=True)))
    return render(shown, "md")
