"""One model on one validation set -> a :class:`~psp_zoo.results.records.ResultRecord`, as the reference scores it.

``evaluate`` is a short composition of the pipeline: resolve the model and its test settings
(``factory.resolve``), list the images (before anything is downloaded), load and prepare the
model (``optimize``), score every image (``scoring.score``) and turn the counts into the same
record that ``reproduce`` writes and ``tables`` reads.
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any, Optional, Union

import torch

from ..datasets.readers import SegmentationDataset, list_items
from ..datasets.transforms import MS_FLIP_RATIOS
from ..deploy.runtime import OnnxModel, onnx_backend_info
from ..environment import environment_info, exact_float32_flags
from ..errors import PspZooError
from ..hub.options import FetchOptions, SpeedOptions, split_options
from ..model.factory import Resolved, resolve
from ..model.optimization import optimize
from ..results.records import ImageCount, Metrics, ResultRecord
from .scoring import score
from .semseg_inference import SEMSEG_MODE, loader_scales, semseg_scales

__all__ = ["evaluate", "recorded_settings"]

log = logging.getLogger("psp_zoo")


def evaluate(name_or_model, data_root: Union[str, Path], *, dataset: Optional[str] = None,
             ms_flip: bool = False, limit: Optional[int] = None, device: Union[None, str, torch.device] = None,
             checkpoint: Union[None, str, Path] = None, num_workers: Optional[int] = None,
             progress: Optional[bool] = None, batch_size: Optional[int] = None,
             speed: Optional[SpeedOptions] = None, fetch: Optional[FetchOptions] = None,
             onnx: Union[None, str, Path] = None, threads: Optional[int] = None, **keywords: Any) -> ResultRecord:
    """Score a checkpoint (manifest name) or a model object on a validation set, as the reference.

    With a name, its manifest test settings apply (``checkpoint=PATH`` loads a local file; the
    weights are fetched as ``fetch`` says). With a model object, ``dataset`` is required and that
    dataset's default settings apply, with the model's ``align_corners``. Test settings
    (``mode``, ``img_scale``, ``crop_size``, ``stride``, ``align_corners``) may be overridden by
    keyword; so may the fields of ``speed`` (``precision``, ``compile``, ``fuse_bn``,
    ``channels_last``; default: the exact fp32 fast path) and of ``fetch`` (``manifest``,
    ``cache_dir``, ``mirror``, ``offline``). ``limit`` scores the first N images in sorted order;
    ``progress``: True/False, or None for automatic; ``batch_size``: sliding-window crops per call.
    ``onnx=FILE`` scores an exported model (``psp-zoo export``) through onnxruntime with the same
    pipeline instead of the PyTorch weights; the record names the backend, with the session's
    ``threads`` (default: torch's intra-op thread count, what the PyTorch path uses).

    Returns the :class:`~psp_zoo.ResultRecord` that a results file holds: ``record.miou``,
    ``record.iou["road"]``, ``record.images.count``...
    """
    fetch, speed, overrides = split_options(keywords, fetch, speed)
    target = resolve(name_or_model, dataset=dataset, checkpoint=checkpoint, fetch=fetch, device=device,
                     overrides=overrides)
    speed.check(target.device)  # before anything is downloaded or built
    items = list_items(target.dataset.key, data_root, limit=limit, manifest=fetch.manifest)
    model, backend = _runner(target, speed, onnx, threads)
    scales = loader_scales(target.settings, ms_flip)
    data = SegmentationDataset(target.dataset.key, data_root, img_scales=scales, items=items,
                               reduce_zero_label=target.dataset.reduce_zero_label, manifest=fetch.manifest)
    matrix = score(model, data, target.settings, target.num_classes, ms_flip=ms_flip, device=target.device,
                   num_workers=num_workers, show=progress, batch_size=batch_size,
                   desc=f"{target.name} {'ms+flip' if ms_flip else 'single-scale'}")
    metrics = Metrics.from_matrix(matrix, target.class_names)
    return ResultRecord(
        checkpoint=target.name, dataset=target.dataset.key, environment=environment_info(target.device),
        images=ImageCount(count=len(items), limit=limit), precision=speed.precision if backend is None else "fp32",
        optimizations=speed.applied(target.device) if backend is None else (), backend=backend,
        settings=recorded_settings(target, ms_flip, data_root),
        single_scale=None if ms_flip else metrics, ms_flip=metrics if ms_flip else None)


def _runner(target: Resolved, speed: SpeedOptions, onnx: Union[None, str, Path], threads: Optional[int]):
    """(what runs the images, the backend record): the prepared PyTorch model, or an ONNX session."""
    if onnx is None:
        return optimize(target.load(), speed), None
    threads = torch.get_num_threads() if threads is None else threads
    session = OnnxModel(onnx, device=str(target.device), threads=threads)
    if session.num_classes not in (None, target.num_classes):
        raise PspZooError(f"{onnx} predicts {session.num_classes} classes, {target.name} has "
                          f"{target.num_classes}; export the same checkpoint again")
    log.info(f"onnxruntime runs {onnx} on {threads} intra-op thread(s), idle threads not spinning")
    return session, {**onnx_backend_info(session), "threads": threads, "spinning": session.spinning}


def _ms_flip_ratios(settings, ms_flip: bool) -> Optional[list]:
    """The scales of an ms+flip pass: mmseg's ratios of the img_scale, or the authors' scales of the
    base size (for mode 'semseg', whose single scale is flipped too)."""
    if not ms_flip:
        return None
    return list(semseg_scales(True) if settings.mode == SEMSEG_MODE else MS_FLIP_RATIOS)


def recorded_settings(target: Resolved, ms_flip: bool, data_root: Union[str, Path]) -> dict:
    """The test settings a record states: how the images were run, on which data and files."""
    entry = target.entry
    return {"test": dataclasses.asdict(target.settings), "num_classes": target.num_classes,
            "reduce_zero_label": target.dataset.reduce_zero_label,
            "ms_flip_ratios": _ms_flip_ratios(target.settings, ms_flip),
            "checkpoint_file": str(target.checkpoint) if target.checkpoint else (entry.filename if entry else None),
            "sha256": entry.sha256 if entry and not target.checkpoint else None, "data_root": str(data_root),
            "float32": exact_float32_flags()}  # scoring.score runs under exact_float32
