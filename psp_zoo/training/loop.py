"""``train(name, data_root=..., work_dir=...)``: the whole published recipe of one checkpoint, resumable.

Read top to bottom: resolve the recipe (overrides checked before anything is read or fetched),
find the run's place (a fresh start, or the last checkpoint of ``work_dir``), list the training
and validation images, build the network (mmcv's initialization, then the ImageNet backbone, or
the resumed weights), then iterate: a step, a train line every ``log_interval`` iterations, a
checkpoint every ``checkpoint_interval`` and a validation every ``eval_interval`` through the one
scoring loop (``scoring.score``, the dataset's test settings, whole or slide), with the
``best.pth`` pointer following the best mIoU.

Under ``torchrun`` every process runs this function: each reads its slice of every global batch,
BatchNorm is synchronized and gradients averaged (``Trainer``), validation images are sharded and
the confusion matrices summed; process 0 alone writes checkpoints and the log. The total batch is
the published one (``batch_size`` images x ``gpus``) whatever the number of processes: with fewer
processes than the recipe's GPUs each accumulates ``gpus / processes`` chunks per step.

A run killed at any point loses at most the iterations since its last checkpoint: rerunning it
into the same ``work_dir`` continues from ``latest.pth`` with the optimizer, the iteration, the
seed, and so the same batches and dropout draws as an uninterrupted run (bit-identical on the
same machine). Ctrl-C (or SIGTERM) finishes the current iteration, saves, and raises
KeyboardInterrupt (the command line exits 130).
"""
from __future__ import annotations

import json
import logging
import math
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, Optional, Tuple, Union

import torch
from tqdm import tqdm

from .._version import __version__
from ..checkpoint import load_checkpoint
from ..datasets import SegmentationDataset, list_items
from ..distributed import Distributed
from ..environment import environment_info, usable_device
from ..errors import PspZooError
from ..files import check_writable_folder
from ..manifest import Checkpoint, DatasetSpec, get_manifest
from ..model import PSPNet
from ..options import FetchOptions
from ..scoring import score
from ..semseg_inference import loader_scales
from .checkpoints import BEST, LATEST, point, pointed, read_training_state, save_checkpoint
from .data import TrainingSet, train_loader
from .log import IntervalMeans, TrainLog, log_file_name
from .pipeline import TrainTransform
from .pretrained import init_weights, load_pretrained_backbone
from .recipe import Recipe, recipe_for
from .trainer import Trainer

__all__ = ["train", "TrainResult", "accumulation_for"]

log = logging.getLogger("psp_zoo")
PathLike = Union[str, Path]


@dataclass(frozen=True)
class TrainResult:
    """What a finished run left in its work dir."""

    work_dir: Path
    checkpoint: Path  # the last one written (``latest.pth`` points at it)
    log: Optional[Path]  # this launch's .log.json (None on processes other than 0)
    iterations: int
    recipe: Recipe
    best: Optional[Path] = None
    best_miou: Optional[float] = None  # percent


def accumulation_for(recipe: Recipe, world_size: int) -> int:
    """Chunks per step so that ``world_size`` processes train with the recipe's total batch."""
    if recipe.gpus % world_size:
        raise PspZooError(f"the recipe's {recipe.gpus} GPUs x {recipe.batch_size} images cannot be split over "
                          f"{world_size} processes; run {recipe.gpus} processes or a divisor of it, or set "
                          f"gpus={world_size} (a total batch of {world_size * recipe.batch_size})",
                          cli_hint="--gpus")
    return recipe.gpus // world_size


@dataclass
class _Run:
    """Everything one launch holds; the loop below reads and updates it."""

    recipe: Recipe
    entry: Checkpoint
    spec: DatasetSpec
    work_dir: Path
    dist: Distributed
    trainer: Trainer
    data: TrainingSet
    val: SegmentationDataset
    seed: int
    num_workers: Optional[int]
    log: TrainLog
    best: Dict[str, Any] = field(default_factory=dict)  # {"miou": fraction, "iteration": N}
    last_saved: int = -1
    last_path: Optional[Path] = None
    published: Optional[Recipe] = None  # the entry's recipe without overrides


def train(name: str, *, data_root: PathLike, work_dir: PathLike, device: Union[None, str, torch.device] = None,
          seed: int = 0, resume: Optional[bool] = None, init_from: Optional[PathLike] = None,
          pretrained: bool = True, num_workers: Optional[int] = None, amp: Optional[bool] = None,
          channels_last: bool = False, compile: bool = False, progress: Optional[bool] = None,
          float64: bool = False, fetch: Optional[FetchOptions] = None, **overrides: Any) -> TrainResult:
    """Train manifest entry ``name`` as it was published, on the images under ``data_root``.

    ``overrides`` are recipe fields (``max_iters``, ``lr``, ``batch_size``, ``crop_size``, ``gpus``,
    ...; see :class:`psp_zoo.Recipe`), checked before anything is read. ``resume``: None continues
    from ``work_dir/latest.pth`` when there is one, True requires it, False starts afresh.
    ``init_from``: a checkpoint whose weights start the run instead of the ImageNet backbone;
    ``pretrained=False`` starts from mmcv's initialization alone. ``amp``: mixed precision on CUDA
    (default: the fp16 row's recipe). ``progress``: a bar (True), plain lines (False) or automatic.
    ``float64``: train in double precision (slow; for exact comparisons, e.g. of process counts).
    """
    fetch = fetch or FetchOptions()
    recipe = recipe_for(name, manifest=fetch.manifest, **overrides)
    entry = get_manifest(fetch.manifest).get(name)
    work_dir = check_writable_folder(work_dir, "work dir")
    dist, device = Distributed.from_env(usable_device(device))
    try:
        resumed = _resumable(work_dir, resume)
        seed = int(resumed[2]["seed"]) if resumed else int(seed)
        data, val = _datasets(recipe, data_root, seed, fetch)
        model = PSPNet(**entry.model_kwargs()) if resumed else _start_weights(
            entry, recipe, seed, init_from, pretrained, fetch)
        trainer = Trainer(model, recipe, device=device, distributed=dist, amp=amp, seed=seed,
                          accumulation=accumulation_for(recipe, dist.world_size), channels_last=channels_last,
                          compile=compile, dtype=torch.float64 if float64 else None)
        spec = get_manifest(fetch.manifest).datasets[recipe.dataset]
        run = _Run(recipe, entry, spec, work_dir, dist, trainer, data, val, seed, num_workers,
                   TrainLog(work_dir / log_file_name() if dist.is_main else None))
        run.published = recipe_for(name, manifest=fetch.manifest)
        if resumed:
            _restore(run, *resumed)
        return _loop(run, progress)
    finally:
        dist.close()


def _resumable(work_dir: Path, resume: Optional[bool]) -> Optional[Tuple[Dict[str, torch.Tensor], dict, dict]]:
    latest = pointed(work_dir, LATEST) if resume is not False else None
    if latest is None:
        if resume:
            raise PspZooError(f"nothing to resume in {work_dir}: it has no {LATEST}; start a new run without resume")
        return None
    log.info("resuming from %s", latest)
    return read_training_state(latest)


def _restore(run: _Run, state_dict: Dict[str, torch.Tensor], optimizer: dict, own: dict) -> None:
    saved = own.get("recipe", {})
    differs = sorted(key for key, value in run.recipe.as_dict().items() if saved.get(key) != value)
    if differs:
        raise PspZooError(f"{run.work_dir} holds a run with other settings ({', '.join(differs)}); resume it with "
                          f"the same settings, or train into a new work dir")
    run.trainer.load_state_dict({"model": state_dict, "optimizer": optimizer, "iteration": own["iteration"],
                                 "seed": own["seed"], "scaler": own.get("scaler")})
    run.best = dict(own.get("best") or {})
    run.last_saved = run.trainer.iteration
    run.last_path = pointed(run.work_dir, LATEST)
    log.info("resumed at iteration %d of %d", run.trainer.iteration, run.recipe.max_iters)


def _datasets(recipe: Recipe, data_root: PathLike, seed: int,
              fetch: FetchOptions) -> Tuple[TrainingSet, SegmentationDataset]:
    """The training split (every global batch planned) and the validation set, listed up front."""
    transform = TrainTransform(crop_size=recipe.crop_size, img_scale=recipe.img_scale, ratio_range=recipe.ratio_range,
                               cat_max_ratio=recipe.cat_max_ratio, flip_prob=recipe.flip_prob)
    data = TrainingSet(recipe.dataset, data_root, transform, seed=seed, global_batch=recipe.total_batch,
                       manifest=fetch.manifest)
    spec = get_manifest(fetch.manifest).datasets[recipe.dataset]
    entry = get_manifest(fetch.manifest).get(recipe.name)
    items = list_items(recipe.dataset, data_root, manifest=fetch.manifest)
    val = SegmentationDataset(recipe.dataset, data_root, img_scales=loader_scales(entry.test, False), items=items,
                              reduce_zero_label=spec.reduce_zero_label, manifest=fetch.manifest)
    return data, val


def _start_weights(entry: Checkpoint, recipe: Recipe, seed: int, init_from: Optional[PathLike],
                   pretrained: bool, fetch: FetchOptions) -> PSPNet:
    """mmcv's initialization (seeded), then ``init_from``'s weights or the ImageNet backbone."""
    torch.manual_seed(seed)
    model = init_weights(PSPNet(**entry.model_kwargs()))
    if init_from is not None:
        load_checkpoint(model, init_from)
    elif pretrained and recipe.pretrained:
        load_pretrained_backbone(model, recipe.pretrained, fetch)
    return model


def _loop(run: _Run, progress: Optional[bool]) -> TrainResult:
    recipe, trainer = run.recipe, run.trainer
    _write_meta(run)
    means = IntervalMeans()
    bar = _Progress(recipe, trainer.iteration, progress if run.dist.is_main else False)
    with _StopOnSignal(run.dist) as stop, bar:
        tick = time.perf_counter()
        for images, labels, epoch in _iteration_batches(run):
            data_time = time.perf_counter() - tick
            result = trainer.step(images, labels)
            means.add({**result.as_log(), "data_time": data_time, "time": time.perf_counter() - tick})
            bar.update(result)
            _after_iteration(run, epoch, result.lr, means)
            if stop.requested():
                _save(run, epoch)
                raise KeyboardInterrupt(f"stopped at iteration {trainer.iteration}; rerun to resume")
            tick = time.perf_counter()
    if run.last_saved != trainer.iteration:  # a run resumed at its end, or max_iters off the interval
        _save(run, run.data.plan.epoch(max(trainer.iteration - 1, 0)))
    run.dist.barrier()
    best = pointed(run.work_dir, BEST)
    return TrainResult(run.work_dir, run.last_path or pointed(run.work_dir, LATEST), run.log.path,
                       trainer.iteration, recipe, best, 100.0 * run.best["miou"] if run.best else None)


def _iteration_batches(run: _Run) -> Iterator[Tuple[torch.Tensor, torch.Tensor, int]]:
    """(images, labels, epoch) of each remaining iteration: this process's micro-batches joined."""
    trainer = run.trainer
    loader = train_loader(run.data, start_iteration=trainer.iteration, stop=run.recipe.max_iters,
                          world_size=run.dist.world_size, rank=run.dist.rank, batch_per_rank=run.recipe.batch_size,
                          accumulation=trainer.accumulation, num_workers=run.num_workers,
                          pin_memory=trainer.device.type == "cuda")
    pending = []
    for batch in loader:
        pending.append(batch)
        if len(pending) == trainer.accumulation:
            yield (torch.cat([b.images for b in pending]), torch.cat([b.labels for b in pending]),
                   pending[0].epoch)
            pending = []


def _after_iteration(run: _Run, epoch: int, lr: float, means: IntervalMeans) -> None:
    """mmcv's hooks in their order: the train line, the checkpoint, the validation."""
    recipe, done = run.recipe, run.trainer.iteration
    validating = done % recipe.eval_interval == 0 or done == recipe.max_iters
    if done % recipe.log_interval == 0 and not validating:
        run.log.train(epoch=epoch + 1, iteration=done, lr=lr, means=means.take(), memory_mb=_memory_mb(run))
    elif validating:
        means.take()  # mmcv writes no train line at a validation; the next one covers what follows
    if done % recipe.checkpoint_interval == 0 or done == recipe.max_iters:
        _save(run, epoch)
    if validating:
        _validate(run, epoch, lr)


def _memory_mb(run: _Run) -> Optional[int]:
    """floor MiB of torch.cuda.max_memory_allocated, the max over processes (mmcv's "memory"); CUDA only."""
    if run.trainer.device.type != "cuda":
        return None
    peak = torch.tensor([torch.cuda.max_memory_allocated(run.trainer.device) / 2 ** 20], device=run.trainer.device)
    if run.dist.world_size > 1:
        torch.distributed.all_reduce(peak, op=torch.distributed.ReduceOp.MAX)
    return int(peak.item())


def _validate(run: _Run, epoch: int, lr: float) -> None:
    model, device = run.trainer.model, run.trainer.device
    settings = run.entry.test
    model.eval()
    try:
        matrix = score(model if run.trainer.dtype == torch.float32 else _InDtype(model, run.trainer.dtype), run.val.shard(run.dist.rank, run.dist.world_size), settings, run.recipe.num_classes,
                       ms_flip=False, device=device, num_workers=run.num_workers, show=False,
                       desc=f"validation at iteration {run.trainer.iteration}")
    finally:
        model.train()
    scores = matrix.all_reduce().compute()
    names = run.spec.class_names(run.recipe.num_classes)
    run.log.val(epoch=epoch + 1, steps=math.ceil(len(run.val) / run.dist.world_size), lr=lr, aacc=scores["aAcc"],
                miou=scores["mIoU"], macc=scores["mAcc"], class_names=names, iou=scores["IoU"], acc=scores["Acc"])
    if run.dist.is_main:
        log.info("iteration %d: mIoU %.2f, mAcc %.2f, aAcc %.2f", run.trainer.iteration, 100 * scores["mIoU"],
                 100 * scores["mAcc"], 100 * scores["aAcc"])
    miou = scores["mIoU"]
    if not math.isnan(miou) and (not run.best or miou > run.best["miou"]):
        run.best = {"miou": float(miou), "iteration": run.trainer.iteration}
        if run.last_saved == run.trainer.iteration:
            _save(run, epoch, force=True)  # the best score goes into the file's resume state too
            if run.dist.is_main:
                point(run.last_path, BEST)


def _write_meta(run: _Run) -> None:
    run.log.meta(env_info=json.dumps(environment_info(run.trainer.device)), config=json.dumps(run.recipe.as_dict()),
                 seed=run.seed, exp_name=run.recipe.name, batch=_batch_line(run))
    if run.dist.is_main:
        log.info("%s", _batch_line(run))


def _batch_line(run: _Run) -> str:
    """What the total batch is made of, against the published run (the recipe's GPUs)."""
    recipe, published = run.recipe, run.published or run.recipe
    return (f"total batch {recipe.total_batch} = {recipe.batch_size} images x {run.dist.world_size} process(es) x "
            f"{run.trainer.accumulation} accumulation step(s) (published: {published.batch_size} images x "
            f"{published.gpus} GPUs = {published.total_batch})")


def _save(run: _Run, epoch: int, force: bool = False) -> None:
    """Process 0 writes ``iter_<N>.pth`` (the others wait for it)."""
    trainer = run.trainer
    if run.last_saved == trainer.iteration and not force:
        return
    if run.dist.is_main:
        state = trainer.state_dict()
        run.last_path = save_checkpoint(run.work_dir, trainer.iteration, state["model"], state["optimizer"],
                                        _meta(run, epoch, state))
    run.last_saved = trainer.iteration
    run.dist.barrier()


def _meta(run: _Run, epoch: int, state: dict) -> dict:
    classes = run.spec.class_names(run.recipe.num_classes)
    palette = [list(c) for c in run.spec.palette] if len(run.spec.palette) == run.recipe.num_classes else None
    return {
        "mmcv_version": None, "mmseg_version": None, "psp_zoo_version": __version__,
        "time": time.asctime(), "iter": run.trainer.iteration, "epoch": epoch + 1,
        "CLASSES": list(classes), "PALETTE": palette, "config": json.dumps(run.recipe.as_dict()),
        "env_info": json.dumps(environment_info(run.trainer.device)), "seed": run.seed, "exp_name": run.recipe.name,
        "psp_zoo": {"iteration": run.trainer.iteration, "seed": run.seed, "scaler": state["scaler"],
                    "recipe": run.recipe.as_dict(), "best": dict(run.best), "world_size": run.dist.world_size},
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
    """

    def __init__(self, dist: Distributed):
        self.dist, self.asked, self.previous = dist, False, {}

    def __enter__(self) -> "_StopOnSignal":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.asked:
            raise KeyboardInterrupt
        self.asked = True
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
