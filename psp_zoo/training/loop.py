"""``train(recipe, data_root=..., work_dir=..., options=RunOptions(...))``: one published recipe, resumable.

``train`` reads top to bottom: the recipe (a :class:`Recipe`, or a manifest name and overrides)
and the run options (:class:`RunOptions`: device, seed, resume, workers, precision, speed,
progress, fetching) are settled first; then every check runs before anything is written (the
training split listed, the total batch against the processes and the images, the work dir's
checkpoint against the recipe); then the network is built (mmcv's initialization, then the
ImageNet backbone, ``init_from``'s weights, or the resumed state) and each iteration takes, in
order: the batch, the step (the lr set first), the train line every ``log_interval``, the
validation every ``eval_interval`` (through the one scoring loop, ``scoring.score``, with the
dataset's test settings), the checkpoint every ``checkpoint_interval`` and at every validation
that improves the best mIoU (as mmseg's save_best does), ``best.pth`` pointing at the latter.

Under ``torchrun`` every process runs this function: each reads its slice of every global batch,
BatchNorm is synchronized and gradients averaged (``Trainer``), validation images are sharded and
the confusion matrices summed; process 0 alone writes checkpoints and the log, and alone speaks.
The total batch is the published one (``batch_size`` images x ``gpus``) whatever the number of
processes: with fewer processes than the recipe's GPUs each accumulates ``gpus / processes``
chunks per step. Crops and dropout are drawn per sample, keyed by (seed, iteration, the sample's
slot in the global batch), so 1 process and N processes train alike.

A run killed at any point loses at most the iterations since its last checkpoint: rerunning it
into the same ``work_dir`` continues from ``latest.pth`` with the optimizer, the iteration and the
seed, and so the same batches and dropout draws as an uninterrupted run (bit-identical on the same
machine). Rerunning a finished run says so and leaves its files as they are. A resume with a new
``max_iters`` (more than the iterations done; the intervals follow it unless given) continues from
``latest.pth`` on the new schedule (the poly lr recomputed over the new max_iters, as mmseg resumes a
config whose max_iters was raised), said in the log's meta line; any other recipe change is refused. Ctrl-C (or SIGTERM)
finishes the current iteration, saves, and raises KeyboardInterrupt (the command line exits 130).
"""
from __future__ import annotations

import json
import logging
import math
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Dict, Mapping, NamedTuple, Optional, Tuple, Union

import torch
from tqdm import tqdm

from .._version import __version__
from ..datasets.check import scan_for_training
from ..datasets.readers import SegmentationDataset, list_items
from ..distributed import Distributed
from ..environment import environment_info, usable_device
from ..errors import DatasetError, PspZooError
from ..evaluation.scoring import score
from ..evaluation.semseg_inference import loader_scales
from ..files import check_writable_folder
from ..hub.options import FetchOptions
from ..manifest.loading import Checkpoint, DatasetSpec, get_manifest
from ..model import PSPNet
from ..model.checkpoint import load_checkpoint
from .checkpoints import BEST, LATEST, point, pointed, read_training_state, save_checkpoint
from .data import TrainingSet, train_loader, training_items
from .log import IntervalMeans, TrainLog, log_file_name
from .pretrained import init_weights, load_pretrained_backbone
from .recipe import Recipe, recipe_for, recipe_from_entry
from .semseg_pipeline import transform_for
from .trainer import Trainer

__all__ = ["train", "TrainResult", "RunOptions", "RUN_OPTIONS", "run_options", "check_batch", "listed_training_items"]

log = logging.getLogger("psp_zoo")
PathLike = Union[str, Path]


@dataclass(frozen=True)
class RunOptions:
    """How to run a recipe, as opposed to what it trains: built once (from the command line, or from
    the keywords of :func:`train` / :func:`psp_zoo.training.finetune.finetune`) and read by the loop.

    ``resume``: None continues from ``work_dir/latest.pth`` when there is one, True requires it,
    False starts afresh. ``init_from``: a checkpoint whose weights start the run instead of the
    ImageNet backbone; ``no_pretrained``: start from mmcv's initialization alone. ``amp``: mixed
    precision on CUDA (default: the fp16 row's recipe). ``float64``: train in double precision
    (slow; for exact comparisons, e.g. of process counts). ``progress``: a bar (True), plain lines
    (False) or automatic.
    """

    device: Union[None, str, torch.device] = None
    seed: int = 0
    resume: Optional[bool] = None
    init_from: Optional[PathLike] = None
    no_pretrained: bool = False
    num_workers: Optional[int] = None
    amp: Optional[bool] = None
    channels_last: bool = False
    compile: bool = False
    float64: bool = False
    progress: Optional[bool] = None
    fetch: FetchOptions = field(default_factory=FetchOptions)


RUN_OPTIONS = tuple(f.name for f in fields(RunOptions))


def run_options(options: Optional[RunOptions], settings: Mapping[str, Any]) -> Tuple[RunOptions, Dict[str, Any]]:
    """``settings`` split once: the run options (applied over ``options``) and the recipe overrides."""
    own = {key: value for key, value in settings.items() if key in RUN_OPTIONS}
    overrides = {key: value for key, value in settings.items() if key not in RUN_OPTIONS}
    return replace(options or RunOptions(), **own), overrides


@dataclass(frozen=True)
class TrainResult:
    """What a run left in its work dir."""

    work_dir: Path
    checkpoint: Path  # the last one written (``latest.pth`` points at it)
    log: Optional[Path]  # this launch's .log.json (None on processes other than 0, or for a finished run)
    iterations: int
    recipe: Recipe
    best: Optional[Path] = None
    best_miou: Optional[float] = None  # percent
    already_finished: bool = False  # the work dir held the finished run: nothing was trained or written


def check_batch(recipe: Recipe, world_size: int, images: int) -> int:
    """The accumulation chunks per step for ``world_size`` processes to train with the recipe's total
    batch, after checking that the total batch splits over them and that the training set holds it."""
    if recipe.gpus % world_size:
        raise PspZooError(f"the recipe's {recipe.gpus} GPUs x {recipe.batch_size} images cannot be split over "
                          f"{world_size} processes; run {recipe.gpus} processes or a divisor of it, or set "
                          f"gpus={world_size} (a total batch of {world_size * recipe.batch_size})",
                          cli_hint="--gpus")
    if images < recipe.total_batch:
        raise DatasetError(f"the training set holds {images} images, fewer than one total batch of "
                           f"{recipe.total_batch} ({recipe.batch_size} images x {recipe.gpus} GPUs): every batch "
                           f"would be dropped; use a smaller batch size or gpus, or more images")
    return recipe.gpus // world_size


def listed_training_items(dataset: str, data_root: PathLike, work_dir: Path, manifest) -> list:
    """The training split as the run lists it; a problem the listing meets (a missing label, ...) is
    said as ``scan_for_training`` says it (the file, and the ``dataset check`` command)."""
    try:
        return training_items(dataset, data_root, manifest=manifest)
    except DatasetError:
        scan_for_training(dataset, data_root, work_dir, manifest=manifest)
        raise


def train(recipe: Union[Recipe, str], *, data_root: PathLike, work_dir: PathLike,
          options: Optional[RunOptions] = None, **settings: Any) -> TrainResult:
    """Train ``recipe`` (a :class:`psp_zoo.Recipe`, or the name of a manifest entry for its published
    recipe) on the images under ``data_root``, into ``work_dir``.

    ``settings`` are :class:`RunOptions` fields (``device``, ``seed``, ``resume``, ``num_workers``,
    ``float64``, ...) and recipe overrides (``max_iters``, ``lr``, ``batch_size``, ``crop_size``,
    ``gpus``, ``pretrained``, ...; see :class:`psp_zoo.Recipe`), checked before anything is read.
    """
    options, overrides = run_options(options, settings)
    manifest = options.fetch.manifest
    recipe = recipe_for(recipe, manifest=manifest, **overrides) if isinstance(recipe, str) \
        else recipe.with_overrides(overrides)
    entry = get_manifest(manifest).get(recipe.name)
    work_dir = check_writable_folder(work_dir, "work dir")
    dist, device = Distributed.from_env(usable_device(options.device))
    try:
        return _run(recipe, entry, data_root, work_dir, options, dist, device)
    finally:
        dist.close()


def _run(recipe: Recipe, entry: Checkpoint, data_root: PathLike, work_dir: Path, options: RunOptions,
         dist: Distributed, device: torch.device) -> TrainResult:
    """The run itself, in order: every check (nothing written before), the network, then the iterations."""
    manifest = options.fetch.manifest
    items = listed_training_items(recipe.dataset, data_root, work_dir, manifest)
    recipe = recipe.for_training_set(len(items))
    accumulation = check_batch(recipe, dist.world_size, len(items))
    resumed = _resumable(work_dir, options.resume, recipe)
    scan_for_training(recipe.dataset, data_root, work_dir, manifest=manifest)  # every image and label, read
    if resumed is not None and resumed.iteration >= recipe.max_iters:
        return _finished(work_dir, recipe, resumed, dist)
    seed = resumed.seed if resumed else options.seed
    data, val = _datasets(recipe, entry, data_root, items, seed, manifest)
    model = PSPNet(**entry.model_kwargs()) if resumed else _start_weights(entry, recipe, seed, options)
    trainer = Trainer(model, recipe, device=device, distributed=dist, amp=options.amp, seed=seed,
                      accumulation=accumulation, channels_last=options.channels_last, compile=options.compile,
                      dtype=torch.float64 if options.float64 else None, ignore_index=data.transform.ignore_index)
    best, saved = (dict(resumed.best), resumed.path) if resumed else ({}, None)
    change = _schedule_change(resumed, recipe)
    if resumed:
        trainer.load_state_dict(resumed.trainer_state)
        _say(dist, "resumed at iteration %d of %d%s", trainer.iteration, recipe.max_iters,
             "".join(f"; {how} {text}" for how, text in change.items()))
    spec = get_manifest(manifest).datasets[recipe.dataset]
    train_log = TrainLog(work_dir / log_file_name() if dist.is_main else None)
    batch_line = _batch_line(recipe, recipe_from_entry(entry, manifest), dist.world_size, accumulation)
    train_log.meta(env_info=json.dumps(environment_info(device)), config=json.dumps(recipe.as_dict()), seed=seed,
                   exp_name=recipe.name, batch=batch_line, **change)
    _say(dist, "%s", batch_line)
    means = IntervalMeans()
    progress = _Progress(recipe, trainer.iteration, options.progress if dist.is_main else False)
    with _StopOnSignal(dist) as stop, progress:
        tick = time.perf_counter()
        for batch in train_loader(data, start_iteration=trainer.iteration, stop=recipe.max_iters,
                                  world_size=dist.world_size, rank=dist.rank, num_workers=options.num_workers,
                                  pin_memory=device.type == "cuda"):
            data_time = time.perf_counter() - tick
            step = trainer.step(batch.images, batch.labels, batch.samples)
            means.add({**step.as_log(), "data_time": data_time, "time": time.perf_counter() - tick})
            progress.update(step)
            done, epoch = trainer.iteration, batch.epoch + 1  # mmcv logs 1-based epochs
            validating = done % recipe.eval_interval == 0 or done == recipe.max_iters
            interval_means = means.take() if validating or done % recipe.log_interval == 0 else None
            if interval_means is not None and not validating:  # mmcv writes no train line at a validation
                train_log.train(epoch=epoch, iteration=done, lr=step.lr, means=interval_means,
                                memory_mb=_memory_mb(trainer))
            improved = False
            if validating:
                miou = _validate(trainer, val, entry, spec, train_log, epoch, step.lr, options.num_workers)
                improved = not math.isnan(miou) and (not best or miou > best["miou"])
                best = {"miou": float(miou), "iteration": done} if improved else best
            stopping = stop.requested()
            if improved or stopping or done % recipe.checkpoint_interval == 0 or done == recipe.max_iters:
                saved = _save(work_dir, trainer, dist, _meta(trainer, recipe, spec, epoch, best, dist), improved)
            if stopping:
                raise KeyboardInterrupt(f"stopped at iteration {done}; rerun to resume")
            tick = time.perf_counter()
    best_path = pointed(work_dir, BEST)
    return TrainResult(work_dir, saved or pointed(work_dir, LATEST), train_log.path, trainer.iteration, recipe,
                       best_path, 100.0 * best["miou"] if best else None)


class _Resumed(NamedTuple):
    """What a work dir's latest checkpoint holds for the run that continues it."""

    path: Path
    iteration: int
    seed: int
    best: dict  # {"miou": fraction, "iteration": N} or empty
    trainer_state: dict
    max_iters: int  # the saved run's; a resume with a new one follows the new schedule from here


#: The recipe fields a resume may change: a new ``max_iters`` (more than the iterations done) and the
#: intervals, which follow it (max_iters / 10) unless given.
_SCHEDULE_LENGTH = ("max_iters", "eval_interval", "checkpoint_interval")


def _resumable(work_dir: Path, resume: Optional[bool], recipe: Recipe) -> Optional[_Resumed]:
    latest = pointed(work_dir, LATEST) if resume is not False else None
    if latest is None:
        if resume:
            raise PspZooError(f"nothing to resume in {work_dir}: it has no {LATEST}; start a new run without resume")
        return None
    log.info("resuming from %s", latest)
    state_dict, optimizer, own = read_training_state(latest)
    saved, done = own.get("recipe", {}), int(own["iteration"])
    max_iters = saved.get("max_iters", recipe.max_iters)
    differs = sorted(key for key, value in recipe.as_dict().items() if saved.get(key) != value)
    if recipe.max_iters != max_iters:  # a new schedule length: its intervals may follow it, nothing else changes
        if recipe.max_iters <= done:
            raise PspZooError(f"{work_dir} holds a run {done} iterations in (of {max_iters}); max_iters "
                              f"{recipe.max_iters} would not continue it: give more than {done}, or train into "
                              f"a new work dir", cli_hint="--max-iters")
        differs = [key for key in differs if key not in _SCHEDULE_LENGTH]
    if differs:
        raise PspZooError(f"{work_dir} holds a run with other settings ({', '.join(differs)}); resume it with "
                          f"the same settings (a larger max_iters alone continues it), or train into a new "
                          f"work dir")
    state = {"model": state_dict, "optimizer": optimizer, "iteration": done, "seed": own["seed"],
             "scaler": own.get("scaler")}
    return _Resumed(latest, done, int(own["seed"]), dict(own.get("best") or {}), state, int(max_iters))


def _schedule_change(resumed: Optional[_Resumed], recipe: Recipe) -> Dict[str, str]:
    """How the resumed run's length changed, under "extended" or "shortened" (empty when it did not), for the
    log's meta line and the resumed message."""
    if resumed is None or resumed.max_iters == recipe.max_iters:
        return {}
    how = "extended" if recipe.max_iters > resumed.max_iters else "shortened"
    return {how: f"from {resumed.max_iters} to {recipe.max_iters} iterations at iteration {resumed.iteration} "
                 f"(the lr schedule recomputed over {recipe.max_iters})"}


def _finished(work_dir: Path, recipe: Recipe, resumed: _Resumed, dist: Distributed) -> TrainResult:
    """A rerun of a finished run: said, and nothing written."""
    _say(dist, "%s already holds the finished run (%d of %d iterations, %s); nothing to do", work_dir,
         resumed.iteration, recipe.max_iters, resumed.path.name)
    miou = resumed.best.get("miou")
    return TrainResult(work_dir, resumed.path, None, resumed.iteration, recipe, pointed(work_dir, BEST),
                       None if miou is None else 100.0 * miou, already_finished=True)


def _say(dist: Distributed, message: str, *args: Any) -> None:
    """A progress message from process 0 alone."""
    if dist.is_main:
        log.info(message, *args)


def _datasets(recipe: Recipe, entry: Checkpoint, data_root: PathLike, items: list, seed: int,
              manifest) -> Tuple[TrainingSet, SegmentationDataset]:
    """The training split (every global batch planned) and the validation set."""
    spec = get_manifest(manifest).datasets[recipe.dataset]
    transform = transform_for(recipe, spec.ignore_index)
    data = TrainingSet(recipe.dataset, data_root, transform, seed=seed, global_batch=recipe.total_batch,
                       items=items, manifest=manifest)
    val = SegmentationDataset(recipe.dataset, data_root, img_scales=loader_scales(entry.test, False),
                              items=list_items(recipe.dataset, data_root, manifest=manifest),
                              reduce_zero_label=spec.reduce_zero_label, manifest=manifest)
    return data, val


def _start_weights(entry: Checkpoint, recipe: Recipe, seed: int, options: RunOptions) -> PSPNet:
    """mmcv's initialization (seeded), then ``init_from``'s weights or the recipe's ImageNet backbone."""
    torch.manual_seed(seed)
    model = init_weights(PSPNet(**entry.model_kwargs()))
    if options.init_from is not None:
        load_checkpoint(model, options.init_from)
    elif recipe.pretrained and not options.no_pretrained:
        load_pretrained_backbone(model, recipe.pretrained, options.fetch)
    return model


def _memory_mb(trainer: Trainer) -> Optional[int]:
    """floor MiB of torch.cuda.max_memory_allocated, the max over processes (mmcv's "memory"); CUDA only."""
    if trainer.device.type != "cuda":
        return None
    peak = torch.tensor([torch.cuda.max_memory_allocated(trainer.device) / 2 ** 20], device=trainer.device)
    if trainer.distributed.world_size > 1:
        torch.distributed.all_reduce(peak, op=torch.distributed.ReduceOp.MAX)
    return int(peak.item())


def _validate(trainer: Trainer, val: SegmentationDataset, entry: Checkpoint, spec: DatasetSpec, train_log: TrainLog,
              epoch: int, lr: float, num_workers: Optional[int]) -> float:
    """The validation pass (this process's shard, matrices summed), its val line; returns the mIoU (fraction)."""
    model, dist, num_classes = trainer.model, trainer.distributed, trainer.recipe.num_classes
    model.eval()
    try:
        matrix = score(model if trainer.dtype == torch.float32 else _InDtype(model, trainer.dtype),
                       val.shard(dist.rank, dist.world_size), entry.test, num_classes, ms_flip=False,
                       device=trainer.device, num_workers=num_workers, show=False,
                       desc=f"validation at iteration {trainer.iteration}")
    finally:
        model.train()
    scores = matrix.all_reduce().compute()
    train_log.val(epoch=epoch, steps=math.ceil(len(val) / dist.world_size), iteration=trainer.iteration, lr=lr,
                  aacc=scores["aAcc"],
                  miou=scores["mIoU"], macc=scores["mAcc"], class_names=spec.class_names(num_classes),
                  iou=scores["IoU"], acc=scores["Acc"])
    _say(dist, "iteration %d: mIoU %.2f, mAcc %.2f, aAcc %.2f", trainer.iteration, 100 * scores["mIoU"],
         100 * scores["mAcc"], 100 * scores["aAcc"])
    return scores["mIoU"]


def _batch_line(recipe: Recipe, published: Recipe, world_size: int, accumulation: int) -> str:
    """What the total batch is made of, against the published run (the recipe's GPUs)."""
    return (f"total batch {recipe.total_batch} = {recipe.batch_size} images x {world_size} process(es) x "
            f"{accumulation} accumulation step(s) (published: {published.batch_size} images x "
            f"{published.gpus} GPUs = {published.total_batch})")


def _save(work_dir: Path, trainer: Trainer, dist: Distributed, meta: dict, best: bool) -> Optional[Path]:
    """Process 0 writes ``iter_<N>.pth`` and points ``latest.pth`` (and ``best.pth`` when ``best``) at it;
    the others wait for it."""
    path = None
    if dist.is_main:
        state = trainer.state_dict()
        meta["psp_zoo"]["scaler"] = state["scaler"]
        path = save_checkpoint(work_dir, trainer.iteration, state["model"], state["optimizer"], meta)
        if best:
            point(path, BEST)
    dist.barrier()
    return path


def _meta(trainer: Trainer, recipe: Recipe, spec: DatasetSpec, epoch: int, best: dict, dist: Distributed) -> dict:
    """The checkpoint's ``meta``: mmcv's fields, and what a resumed run needs under ``psp_zoo``."""
    classes = spec.class_names(recipe.num_classes)
    palette = [list(c) for c in spec.palette] if len(spec.palette) == recipe.num_classes else None
    config, env = json.dumps(recipe.as_dict()), json.dumps(environment_info(trainer.device))
    return {
        "mmcv_version": None, "mmseg_version": None, "psp_zoo_version": __version__,
        "time": time.asctime(), "iter": trainer.iteration, "epoch": epoch, "CLASSES": list(classes),
        "PALETTE": palette, "config": config, "env_info": env, "seed": trainer.seed, "exp_name": recipe.name,
        "psp_zoo": {"iteration": trainer.iteration, "seed": trainer.seed, "scaler": None,
                    "recipe": recipe.as_dict(), "best": dict(best), "world_size": dist.world_size},
    }


class _InDtype(torch.nn.Module):
    """The model seen by the scoring loop when it trains in another dtype than the images' float32."""

    def __init__(self, model: torch.nn.Module, dtype: torch.dtype):
        super().__init__()
        self.model, self.dtype = model, dtype
        self.align_corners = getattr(model, "align_corners", False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images.to(self.dtype)).float()


class _StopOnSignal:
    """Ctrl-C / SIGTERM ask the loop to stop after the current iteration (a second Ctrl-C stops at once).

    Under torchrun every process learns whether any process was asked, so all save and stop together.
    A terminal's Ctrl-C also reaches the loader's worker processes, which inherit the handler: they
    leave the stopping (and saying so) to this process.
    """

    def __init__(self, dist: Distributed):
        self.dist, self.asked, self.previous, self.pid = dist, False, {}, os.getpid()

    def __enter__(self) -> "_StopOnSignal":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if os.getpid() != self.pid:  # a loader worker forked from this process
            return
        if self.asked:
            raise KeyboardInterrupt
        self.asked = True
        if self.dist.is_main:
            log.warning("stopping after this iteration and saving a checkpoint (again to stop at once)")

    def requested(self) -> bool:
        if self.dist.world_size == 1:
            return self.asked
        flag = torch.tensor([float(self.asked)])
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag.item())

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


class _Progress:
    """A bar with loss, lr and time left on a terminal; a plain line every log interval elsewhere."""

    def __init__(self, recipe: Recipe, start: int, show: Optional[bool]):
        self.recipe, self.start, self.done, self.began = recipe, start, start, time.monotonic()
        self.show = sys.stderr.isatty() if show is None else show
        self.bar = tqdm(total=recipe.max_iters, initial=start, unit="it", dynamic_ncols=True) \
            if self.show is True and sys.stderr.isatty() else None

    def update(self, result) -> None:
        self.done += 1
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{result.loss:.4f}", lr=f"{result.lr:.2e}", refresh=False)
            self.bar.update()
        elif self.show is not False and self.done % self.recipe.log_interval == 0:
            rate = (self.done - self.start) / max(time.monotonic() - self.began, 1e-9)
            left = (self.recipe.max_iters - self.done) / rate
            log.info("iteration %d/%d: loss %.4f, lr %.3g, %.2f it/s, %dm%02ds left", self.done,
                     self.recipe.max_iters, result.loss, result.lr, rate, left // 60, left % 60)

    def __enter__(self) -> "_Progress":
        return self

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.close()
