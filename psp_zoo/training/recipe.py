"""The training recipe of a published checkpoint: one frozen record, declared as data, overridable.

Every manifest entry resolves to a :class:`Recipe`: the mmseg 0.x defaults that every PSPNet config
shares (SGD lr 0.01, momentum 0.9, weight decay 5e-4 on every parameter, poly schedule 0.9 down to
1e-4 by iteration, decode + 0.4 x auxiliary cross-entropy, 4 GPUs, a checkpoint and a validation
every max_iters / 10), then its dataset's ``train:`` block in ``model_index.yml`` (the training
img_scale; Pascal Context's lr 0.004 and weight decay 1e-4), then the entry's own ``train:`` block
(the 769x769 img_scale, the rsb rows' AdamW / step / warm-up / gradient clipping, the fp16 row's
static loss scale 512). The crop size, the schedule length and the images per GPU come from the
entry and its dataset. ``recipe_for(name, **overrides)`` checks overrides field by field before
anything is built, as test settings are checked. Nothing here imports torch: ``psp-zoo info``
shows a recipe without it.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields, replace
from typing import Any, Mapping, Optional, Tuple

from ..errors import PspZooError
from ..manifest.loading import Checkpoint, DatasetSpec, get_manifest
from .schedule import iterations_per_epoch

__all__ = ["Recipe", "recipe_for", "recipe_from_entry", "base_recipe", "default_interval", "checked_settings",
           "check_dataset_train", "dataset_train_where", "RECIPE_FIELDS", "IDENTITY_FIELDS", "DEFAULT_GPUS"]

#: GPUs of the published runs (the results page's "4x2" / "4x4"; not in the configs)
DEFAULT_GPUS = 4
OPTIMIZERS = ("sgd", "adamw")
POLICIES = ("poly", "step")
#: the training transforms a recipe selects: mmseg's (training/pipeline.py) or the PSPNet authors'
#: (training/semseg_pipeline.py, their util/transform.py as their tool/train.py composes it)
PIPELINES = ("mmseg", "semseg")
#: What a recipe is of (the run's name, its dataset and class count), not how it trains: never overridden,
#: not part of an entry's ``train:`` block.
IDENTITY_FIELDS = ("name", "dataset", "num_classes")


def default_interval(max_iters: int) -> int:
    """Iterations between checkpoints and between validations: a tenth of the run, as the published
    schedules have them (at least 1)."""
    return max(1, max_iters // 10)


@dataclass(frozen=True)
class Recipe:
    """How one checkpoint was trained; every field can be overridden (``Recipe.with_overrides``).

    ``batch_size`` is images per GPU (per process) and ``gpus`` the processes of the published run,
    so the total batch is ``batch_size * gpus``. ``lr`` is the base learning rate of the schedule;
    ``loss_scale`` set means mixed precision with that static loss scale (the fp16 row).
    """

    name: str
    dataset: str
    num_classes: int
    # data
    img_scale: Tuple[int, int]
    crop_size: Tuple[int, int]
    batch_size: int
    gpus: int = DEFAULT_GPUS
    ratio_range: Tuple[float, float] = (0.5, 2.0)
    cat_max_ratio: float = 0.75
    flip_prob: float = 0.5
    pipeline: str = "mmseg"  # PIPELINES
    rotate_range: Tuple[float, float] = (-10.0, 10.0)  # degrees; the semseg pipeline's RandRotate
    # model
    pretrained: Optional[str] = None  # a ``backbones:`` name; None trains the backbone from scratch
    aux_weight: float = 0.4
    dropout: float = 0.1
    # optimizer
    optimizer: str = "sgd"
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    head_lr_mult: float = 1.0  # lr of decode_head and auxiliary_head = this x the backbone's (semseg: 10)
    grad_clip: Optional[float] = None  # max L2 norm of all gradients
    loss_scale: Optional[float] = None  # mixed precision with this static loss scale
    # loss: False averages each cross-entropy over all label pixels (mmseg 0.x); True over the non-ignored
    # pixels of each published GPU's ``batch_size`` images, then over the GPUs (nn.CrossEntropyLoss's mean)
    avg_non_ignore: bool = False
    # schedule (by iteration)
    epochs: Optional[int] = None  # set: max_iters = epochs x iterations_per_epoch(training images, ...)
    max_iters: int = 80000
    policy: str = "poly"
    power: float = 0.9
    min_lr: float = 1e-4
    steps: Tuple[int, ...] = ()
    gamma: float = 0.1
    warmup: Optional[str] = None  # None or "linear"
    warmup_iters: int = 0
    warmup_ratio: float = 0.1
    # run
    eval_interval: int = 8000
    checkpoint_interval: int = 8000
    log_interval: int = 50
    # fine-tuning: backbone weights and BN statistics kept as they start (psp_zoo.training.freeze)
    freeze_backbone: bool = False

    @property
    def total_batch(self) -> int:
        return self.batch_size * self.gpus

    def with_overrides(self, overrides: Mapping[str, Any], where: str = "overrides") -> "Recipe":
        """This recipe with ``overrides`` checked and applied.

        A new ``max_iters`` without new intervals moves both intervals to max_iters / 10, as the
        published schedules have them.
        """
        values = checked_settings(overrides, where)
        if "max_iters" in values:
            for key in ("eval_interval", "checkpoint_interval"):
                values.setdefault(key, default_interval(values["max_iters"]))
        recipe = replace(self, **values)
        recipe._check_consistent(where)
        return recipe

    def for_training_set(self, images: int) -> "Recipe":
        """This recipe for a training set of ``images`` files: with ``epochs`` set, ``max_iters`` is
        ``epochs x iterations_per_epoch`` (the authors' ``epochs * len(train_loader)``) and intervals
        left at a tenth of the schedule follow it; without, the recipe unchanged."""
        if self.epochs is None:
            return self
        max_iters = self.epochs * iterations_per_epoch(images, self.gpus, self.batch_size)
        if max_iters < 1:
            raise PspZooError(f"{images} training images make no batch of {self.batch_size} images on each of "
                              f"{self.gpus} GPUs; use more images or a smaller batch")
        moved = {key: default_interval(max_iters) for key in ("eval_interval", "checkpoint_interval")
                 if getattr(self, key) == default_interval(self.max_iters)}
        return replace(self, max_iters=max_iters, **moved)

    def _check_consistent(self, where: str) -> None:
        if self.policy == "step" and not self.steps:
            raise PspZooError(f"{where}: the step schedule needs steps, e.g. steps=(60000, 72000)")
        if self.warmup is not None and self.warmup_iters <= 0:
            raise PspZooError(f"{where}: warmup='linear' needs warmup_iters > 0")
        if self.warmup is not None and not 0 < self.warmup_ratio <= 1:
            raise PspZooError(f"{where}: warmup_ratio must be in (0, 1], got {self.warmup_ratio}")
        if not self.ratio_range[0] <= self.ratio_range[1]:
            raise PspZooError(f"{where}: ratio_range must be (low, high) with low <= high, got {self.ratio_range}")

    def as_dict(self) -> dict:
        """Every field as plain JSON-ready data (tuples as lists)."""
        return {key: list(value) if isinstance(value, tuple) else value
                for key, value in dataclasses.asdict(self).items()}

    def settings(self) -> dict:
        """How it trains: ``as_dict()`` without the identity fields, as an entry's ``train:`` block."""
        return {key: value for key, value in self.as_dict().items() if key not in IDENTITY_FIELDS}

    def describe(self) -> str:
        """A few lines for people: what the recipe does, in the configs' terms."""
        optimizer = (f"{self.optimizer.upper()} lr {self.lr:g}"
                     + (f" momentum {self.momentum:g}" if self.optimizer == "sgd" else "")
                     + f" weight_decay {self.weight_decay:g}"
                     + (f", decode/auxiliary heads at {self.head_lr_mult:g} x lr" if self.head_lr_mult != 1 else "")
                     + (f", grad clip {self.grad_clip:g}" if self.grad_clip else ""))
        schedule = (f"poly {self.power:g} to {self.min_lr:g}" if self.policy == "poly"
                    else f"step x{self.gamma:g} at {', '.join(map(str, self.steps))}")
        if self.warmup:
            schedule += f", {self.warmup} warm-up {self.warmup_iters} iterations from {self.warmup_ratio:g} x lr"
        length = f"{self.max_iters} iterations"
        if self.epochs is not None:
            length = (f"{self.epochs} epochs of floor(ceil(training images / {self.gpus}) / {self.batch_size}) "
                      f"iterations ({self.max_iters} on the published training set)")
        crop = f"crop {self.crop_size[0]}x{self.crop_size[1]}"
        if self.pipeline == "semseg":
            data = (f"data: {self.dataset}, the PSPNet authors' pipeline: scale the image x {self.ratio_range[0]:g}"
                    f"-{self.ratio_range[1]:g}, rotate {self.rotate_range[0]:g}..{self.rotate_range[1]:g} degrees "
                    f"(p 0.5), Gaussian blur 5x5 (p 0.5), flip {self.flip_prob:g}, random {crop} (rotation and "
                    f"crop pad with the mean and the ignore label)")
        else:
            data = (f"data: {self.dataset}, img_scale {self.img_scale[0]}x{self.img_scale[1]} x {self.ratio_range[0]:g}"
                    f"-{self.ratio_range[1]:g}, {crop} (cat_max_ratio {self.cat_max_ratio:g}), flip "
                    f"{self.flip_prob:g}, photometric distortion")
        average = ("the non-ignored pixels of each GPU's images" if self.avg_non_ignore else "all label pixels")
        return "\n".join([
            data,
            f"batch: {self.batch_size} images x {self.gpus} GPUs = {self.total_batch}",
            f"optimizer: {optimizer}" + (f", mixed precision (loss scale {self.loss_scale:g})"
                                         if self.loss_scale else ""),
            f"schedule: {length}, {schedule}",
            f"loss: decode CE + {self.aux_weight:g} x auxiliary CE, each averaged over {average} "
            f"(dropout {self.dropout:g})",
            f"backbone: {self.pretrained or 'from scratch'}",
            f"checkpoint every {self.checkpoint_interval}, validation every {self.eval_interval}, "
            f"log every {self.log_interval} iterations",
        ])


RECIPE_FIELDS: Tuple[str, ...] = tuple(f.name for f in fields(Recipe) if f.name not in IDENTITY_FIELDS)
_NULLABLE = ("pretrained", "grad_clip", "loss_scale", "warmup", "epochs")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value


def _whole(low: int):
    def check(value: Any) -> Optional[int]:
        ok = isinstance(value, int) and not isinstance(value, bool) and value >= low
        return int(value) if ok else None
    return check, f"a whole number >= {low}"


def _pair(value: Any) -> Optional[Tuple[int, int]]:
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value, value)
    if (isinstance(value, (list, tuple)) and len(value) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)):
        return (int(value[0]), int(value[1]))
    return None


def _steps(value: Any) -> Optional[Tuple[int, ...]]:
    if (isinstance(value, (list, tuple)) and all(isinstance(v, int) and not isinstance(v, bool) and v > 0
                                                 for v in value) and list(value) == sorted(set(value))):
        return tuple(int(v) for v in value)
    return None


def _rotate_range(value: Any) -> Optional[Tuple[float, float]]:
    if (isinstance(value, (list, tuple)) and len(value) == 2 and all(_is_number(v) for v in value)
            and -180 <= value[0] <= value[1] <= 180):
        return (float(value[0]), float(value[1]))
    return None


def _ratio_range(value: Any) -> Optional[Tuple[float, float]]:
    if isinstance(value, (list, tuple)) and len(value) == 2 and all(_is_number(v) and v > 0 for v in value):
        return (float(value[0]), float(value[1]))
    return None


def _number(low: float, high: float = float("inf")):
    def check(value: Any) -> Optional[float]:
        return float(value) if _is_number(value) and low <= value <= high else None
    return check, f"a number from {low:g} to {high:g}" if high != float("inf") else f"a number >= {low:g}"


def _choice(*choices: str):
    return (lambda value: value if value in choices else None), " or ".join(map(repr, choices))


# field -> (check returning the value as the field holds it, or None if unacceptable; what it takes)
_CHECKS = {
    **{key: _whole(1) for key in ("batch_size", "gpus", "max_iters", "eval_interval", "checkpoint_interval",
                                   "log_interval")},
    "warmup_iters": _whole(0),
    "epochs": _whole(1),
    **{key: ((lambda value: value if isinstance(value, bool) else None), "true or false")
       for key in ("freeze_backbone", "avg_non_ignore")},
    "img_scale": (_pair, "two positive whole numbers like (2048, 1024)"),
    "crop_size": (_pair, "two positive whole numbers like (512, 1024), or one for a square"),
    "steps": (_steps, "increasing iteration numbers like (60000, 72000)"),
    "ratio_range": (_ratio_range, "two positive numbers like (0.5, 2.0)"),
    "rotate_range": (_rotate_range, "two angles in degrees, low <= high, like (-10, 10)"),
    "optimizer": _choice(*OPTIMIZERS),
    "pipeline": _choice(*PIPELINES),
    "policy": _choice(*POLICIES),
    "warmup": _choice("linear"),
    "pretrained": ((lambda value: value if isinstance(value, str) and value else None),
                   "the name of a backbones: entry, or None"),
    **{key: _number(0, 1) for key in ("cat_max_ratio", "flip_prob", "dropout", "momentum", "power", "gamma",
                                      "warmup_ratio")},
    **{key: _number(0) for key in ("lr", "weight_decay", "min_lr", "aux_weight", "grad_clip", "loss_scale")},
    "head_lr_mult": _number(1e-6),
}


def checked_settings(settings: Mapping[str, Any], where: str) -> dict:
    """``settings`` (recipe field -> value) checked field by field, as the fields hold them (None values
    of non-nullable fields dropped); PspZooError naming ``where`` and the first wrong field."""
    unknown = sorted(set(settings) - set(RECIPE_FIELDS) - set(IDENTITY_FIELDS))
    if unknown:
        raise PspZooError(f"{where}: unknown training setting {unknown[0]!r}; settable: {', '.join(RECIPE_FIELDS)}")
    return {key: _checked(key, value, where) for key, value in settings.items()
            if value is not None or key in _NULLABLE}


def dataset_train_where(spec: DatasetSpec) -> str:
    """How a message names a dataset's ``train:`` block."""
    return f"{spec.source}: datasets.{spec.key}: field 'train'"


def check_dataset_train(spec: DatasetSpec) -> None:
    """A dataset's ``train:`` block checked as a run applies it (the same message for the same mistake),
    for ``psp-zoo dataset check``, which builds no recipe."""
    checked_settings(dict(spec.train), dataset_train_where(spec))


def _checked(key: str, value: Any, where: str) -> Any:
    """``value`` as field ``key`` holds it, or PspZooError naming the field and what it takes."""
    if key in _NULLABLE and value is None:
        return None
    check, expected = _CHECKS[key]
    result = check(value)
    if result is None:
        raise PspZooError(f"{where}: training setting {key!r}: expected {expected}, got {value!r}")
    return result


def _default_pretrained(entry: Checkpoint) -> str:
    """mmseg's ``pretrained``: open-mmlab://resnet{d}_v1c for the V1c rows, torchvision://resnet{d} for "b"."""
    return f"resnet{entry.depth}_v1c" if entry.deep_stem else f"resnet{entry.depth}"


def recipe_from_entry(entry: Checkpoint, manifest=None) -> Recipe:
    """The published recipe of ``entry``: defaults, then its dataset's and its own ``train:`` blocks."""
    spec = get_manifest(manifest).datasets[entry.dataset]
    base = base_recipe(entry.name, spec, num_classes=entry.num_classes, crop_size=entry.crop_size,
                       max_iters=entry.schedule, pretrained=_default_pretrained(entry))
    recipe = base.with_overrides(dict(spec.train), where=dataset_train_where(spec))
    return recipe.with_overrides(dict(entry.train), where=f"{entry.source}: models '{entry.name}': field 'train'")


def base_recipe(name: str, spec: DatasetSpec, *, num_classes: int, crop_size: Tuple[int, int], max_iters: int,
                pretrained: Optional[str]) -> Recipe:
    """The defaults for a run of ``name`` on dataset ``spec``: its identity, the dataset's img_scale and
    images per GPU, the crop and schedule given, intervals by ``default_interval``; before any ``train:``."""
    return Recipe(name=name, dataset=spec.key, num_classes=num_classes, img_scale=spec.img_scale,
                  crop_size=crop_size, batch_size=spec.train_images_per_gpu, pretrained=pretrained,
                  max_iters=max_iters, eval_interval=default_interval(max_iters),
                  checkpoint_interval=default_interval(max_iters))


def recipe_for(name: str, *, manifest=None, **overrides: Any) -> Recipe:
    """The recipe that trained the manifest entry ``name``, with ``overrides`` checked and applied.

    >>> recipe_for("pspnet_r50-d8_512x1024_40k_cityscapes", max_iters=1000).eval_interval
    100
    """
    entry = get_manifest(manifest).get(name)
    return recipe_from_entry(entry, manifest).with_overrides(overrides)
