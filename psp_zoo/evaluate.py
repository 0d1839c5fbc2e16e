"""One model on one validation set -> the reference's aAcc, mIoU, mAcc and per-class scores.

``evaluate`` is the whole job; its parts are reusable: ``predictions`` yields each image's
prediction in dataset order, ``accumulate`` feeds them into a ``ConfusionMatrix`` (so a caller
can shard the dataset, keep partial state and all-reduce), ``summarize`` turns a matrix into the
result dict.
"""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Dict, Iterable, Iterator, Optional, Sequence, Tuple, Union

import torch
from tqdm import tqdm

from .datasets import Sample, SegmentationDataset, class_names, list_items, make_loader
from .errors import PspZooError
from .factory import create_model, usable_device
from .inference import infer_labels
from .manifest import DATASETS, TestSettings, get_checkpoint, get_manifest
from .metrics import ConfusionMatrix
from .optimize import check_options, optimize
from .results import atomic_write
from .transforms import target_scales

__all__ = ["evaluate", "predictions", "accumulate", "summarize", "resolve_settings",
           "write_result", "TEST_OVERRIDES"]

#: Test settings a caller may override by keyword (e.g. ``mode='slide', crop_size=(512, 512)``).
TEST_OVERRIDES = ("mode", "img_scale", "crop_size", "stride", "align_corners")


def resolve_settings(base: TestSettings, overrides: Dict[str, object]) -> TestSettings:
    """``base`` with keyword overrides applied and checked (slide needs crop_size and stride)."""
    unknown = sorted(set(overrides) - set(TEST_OVERRIDES))
    if unknown:
        raise PspZooError(f"unknown test setting {unknown[0]!r}; settable: {', '.join(TEST_OVERRIDES)}")
    fields = {key: tuple(value) if isinstance(value, (list, tuple)) else value
              for key, value in overrides.items()}
    settings = dataclasses.replace(base, **fields)
    if settings.mode not in ("whole", "slide"):
        raise PspZooError(f"test mode must be 'whole' or 'slide', got {settings.mode!r}")
    if settings.mode == "slide" and (settings.crop_size is None or settings.stride is None):
        raise PspZooError("slide inference needs crop_size=(h, w) and stride=(h, w)")
    return settings


def predictions(model, samples: Iterable[Sample], settings: TestSettings, *, ms_flip: bool = False,
                device: Union[None, str, torch.device] = None,
                batch_size: Optional[int] = None) -> Iterator[Tuple[Sample, torch.Tensor]]:
    """(sample, H x W predicted class indices on ``device``) for each sample, in order."""
    device = usable_device(device)
    for sample in samples:
        yield sample, infer_labels(model, sample.inputs, sample.ori_size, settings, ms_flip, device=device,
                                   batch_size=batch_size)


def accumulate(model, samples: Iterable[Sample], settings: TestSettings, metric: ConfusionMatrix, *,
               ms_flip: bool = False, device: Union[None, str, torch.device] = None,
               batch_size: Optional[int] = None) -> int:
    """Add every sample's prediction to ``metric``; returns the number of images seen."""
    seen = 0
    for sample, pred in predictions(model, samples, settings, ms_flip=ms_flip, device=device,
                                    batch_size=batch_size):
        metric.update(pred, sample.label.to(pred.device, non_blocking=True))
        seen += 1
    return seen


def _percent_by_class(values, names: Sequence[str]) -> Dict[str, float]:
    return {name: float(value) * 100.0 for name, value in zip(names, values)}


def summarize(metric: ConfusionMatrix, class_names: Sequence[str]) -> Dict[str, object]:
    """aAcc, mIoU, mAcc and per-class IoU / Acc keyed by class name, all in percent (NaN kept)."""
    scores = metric.compute()
    return {
        "aAcc": scores["aAcc"] * 100.0,
        "mIoU": scores["mIoU"] * 100.0,
        "mAcc": scores["mAcc"] * 100.0,
        "IoU": _percent_by_class(scores["IoU"], class_names),
        "Acc": _percent_by_class(scores["Acc"], class_names),
    }


@dataclasses.dataclass
class _Target:
    model: torch.nn.Module
    name: str
    dataset: str
    settings: TestSettings  # before keyword overrides
    num_classes: int
    reduce_zero_label: bool


def _resolve_target(name_or_model, dataset: Optional[str], manifest, checkpoint, device: torch.device) -> _Target:
    if isinstance(name_or_model, str):
        entry = get_checkpoint(name_or_model, manifest=manifest)
        if dataset is not None and dataset != entry.dataset:
            raise PspZooError(f"{entry.name} is a {entry.dataset} checkpoint; it cannot be scored on {dataset}")
        model = create_model(entry.name, checkpoint=checkpoint, manifest=manifest, device=device)
        return _Target(model, entry.name, entry.dataset, entry.test, entry.num_classes, entry.reduce_zero_label)
    if checkpoint is not None:
        raise PspZooError("checkpoint= selects the weights of a named model; load them into the model "
                          "object yourself (psp_zoo.load_checkpoint) or pass a manifest name")
    model = name_or_model
    settings, num_classes, reduce_zero_label = model_object_settings(model, dataset, manifest, "evaluating")
    return _Target(model.eval().to(device), type(model).__name__, dataset, settings, num_classes,
                   reduce_zero_label)


def model_object_settings(model, dataset: Optional[str], manifest, doing: str) -> Tuple[TestSettings, int, bool]:
    """Test settings, class count and reduce_zero_label for a model object on ``dataset``.

    The dataset's default settings with the model's own ``align_corners`` and ``num_classes``;
    ``doing`` ("evaluating", "predicting") words the error when ``dataset`` is missing.
    """
    if dataset not in DATASETS:
        raise PspZooError(f"{doing} with a model object needs dataset=, one of: {', '.join(DATASETS)}")
    spec = get_manifest(manifest).datasets[dataset]
    settings = dataclasses.replace(spec.test, align_corners=bool(getattr(model, "align_corners",
                                                                         spec.test.align_corners)))
    return settings, int(getattr(model, "num_classes", spec.num_classes)), spec.reduce_zero_label


def evaluate(name_or_model, data_root: Union[str, Path], *, dataset: Optional[str] = None,
             ms_flip: bool = False, limit: Optional[int] = None, device: Union[None, str, torch.device] = None,
             manifest=None, checkpoint: Union[None, str, Path] = None, num_workers: Optional[int] = None,
             progress: Optional[bool] = None, batch_size: Optional[int] = None,
             precision: str = "fp32", compile: bool = False, fuse_bn: bool = True, channels_last: bool = True,
             **test_overrides) -> Dict[str, object]:
    """Score a checkpoint (manifest name) or a model object on a validation set, as the reference.

    With a name, its manifest test settings apply (``checkpoint=PATH`` loads a local file). With a
    model (put in eval mode and moved to ``device``), ``dataset`` is required and that dataset's
    default settings apply, with the model's ``align_corners``. Keywords in ``TEST_OVERRIDES``
    override either. ``limit`` scores the first N images in sorted order. ``progress``: True/False,
    or None for a bar only on a terminal. ``batch_size``: sliding-window crops per model call
    (default: 8 on CUDA, 1 on the CPU, where stacking windows was slower). ``precision``, ``compile``, ``fuse_bn`` and
    ``channels_last`` go to :func:`psp_zoo.optimize`; the default is the exact fp32 fast path.
    Returns percentages, per-class scores keyed by class name, the image count, the settings and
    the optimizations used.
    """
    device = usable_device(device)
    speed = dict(precision=precision, compile=compile, fuse_bn=fuse_bn, channels_last=channels_last)
    check_options(device=device, **speed)  # before anything is downloaded or built
    items = None
    if isinstance(name_or_model, str):  # read the image list before a checkpoint is fetched
        items = list_items(get_checkpoint(name_or_model, manifest=manifest).dataset, data_root, limit=limit)
    target = _resolve_target(name_or_model, dataset, manifest, checkpoint, device)
    model = optimize(target.model, **speed)
    settings = resolve_settings(target.settings, test_overrides)
    scales = target_scales(settings.img_scale, ms_flip)
    data = SegmentationDataset(target.dataset, data_root, img_scales=scales, limit=limit,
                               reduce_zero_label=target.reduce_zero_label, items=items)
    samples = make_loader(data, num_workers=num_workers, pin_memory=device.type == "cuda")
    metric = ConfusionMatrix(target.num_classes, device=device)
    bar = tqdm(samples, total=len(data), desc=f"{target.name} {'ms+flip' if ms_flip else 'single-scale'}",
               unit="img", disable=None if progress is None else not progress)
    count = accumulate(model, bar, settings, metric, ms_flip=ms_flip, device=device,
                       batch_size=batch_size)
    result = {"model": target.name, "dataset": target.dataset, "data_root": str(data_root),
              "num_images": count, "ms_flip": ms_flip, "device": str(device),
              "optimizations": model.optimizations}
    result.update(summarize(metric, class_names(target.dataset, target.num_classes)))
    result["settings"] = {**dataclasses.asdict(settings), "scales": scales,
                          "num_classes": target.num_classes, "reduce_zero_label": target.reduce_zero_label}
    return result


def write_result(result: Dict[str, object], path: Union[str, Path]) -> Path:
    """Write an ``evaluate`` result as standard JSON, atomically; NaN (an absent class) becomes null."""
    def clean(value):
        if isinstance(value, float) and math.isnan(value):
            return None
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [clean(v) for v in value]
        return value
    atomic_write(path, json.dumps(clean(result), indent=1, allow_nan=False) + "\n")
    return Path(path)
