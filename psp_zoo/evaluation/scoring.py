"""The one scoring loop: a model x a validation set -> a confusion matrix.

``evaluate``, ``reproduce`` and the selftest all score through :func:`score`: each image goes
through the checkpoint's test protocol (``semseg_inference.labels_of_inputs``: mmseg's whole /
slide / ms+flip with logits resized to the original size, or the PSPNet authors' protocol), its
label map is compared with the ground truth, and the counts are summed in a
:class:`~psp_zoo.evaluation.metrics.ConfusionMatrix`. With a :class:`~psp_zoo.evaluation.resume.PartialState` the
counts are saved every N images, so a killed run resumes at its last save with equal counts.

Progress is a tqdm bar on a terminal; elsewhere (nohup, CI, a log file) one plain line every
``every`` images or minute with the images done, the rate and the time left.
"""
from __future__ import annotations

import logging
import sys
import time
from typing import Callable, Iterable, Iterator, Optional, Tuple, TypeVar

import torch
from tqdm import tqdm

from ..datasets.readers import Sample, SegmentationDataset, make_loader
from ..environment import exact_float32
from ..manifest.loading import EvalSettings
from .metrics import ConfusionMatrix
from .resume import PartialState
from .semseg_inference import labels_of_inputs

__all__ = ["score", "label_maps", "progress"]

log = logging.getLogger("psp_zoo")
T = TypeVar("T")


def label_maps(model, samples: Iterable[Sample], settings: EvalSettings, *, ms_flip: bool = False,
               device: torch.device, batch_size: Optional[int] = None) -> Iterator[Tuple[Sample, torch.Tensor]]:
    """(sample, H x W predicted class indices on ``device``) for each sample, in order."""
    for sample in samples:
        labels = labels_of_inputs(model, sample.inputs, sample.ori_size, settings, ms_flip, device=device,
                                  batch_size=batch_size)
        yield sample, labels


def score(model, data: SegmentationDataset, settings: EvalSettings, num_classes: int, *,
          ms_flip: bool, device: torch.device, partial: Optional[PartialState] = None,
          num_workers: Optional[int] = None, show: Optional[bool] = None, desc: str = "",
          batch_size: Optional[int] = None,
          on_image: Optional[Callable[[int], None]] = None) -> ConfusionMatrix:
    """The confusion matrix of every image of ``data`` (this process's shard; not all-reduced).

    With ``partial``, counting starts from its saved state, is saved every ``partial.every``
    images and once at the end. ``show``: progress on (True), off (False) or automatic (None).
    ``on_image(images_done)`` is called after each image.
    """
    metric = ConfusionMatrix(num_classes, ignore_index=data.ignore_index, device=device)
    start = _resume(metric, partial, len(data), desc)
    if start < len(data):
        loader = make_loader(data.subset(range(start, len(data))), num_workers=num_workers, device=device)
        pairs = label_maps(model, loader, settings, ms_flip=ms_flip, device=device, batch_size=batch_size)
        with exact_float32():  # fp32 means fp32: no TF32 on Ampere and later GPUs, restored afterwards
            for done, (sample, labels) in enumerate(progress(pairs, len(data), desc, show, start), start=start + 1):
                metric.update(labels, sample.label.to(labels.device, non_blocking=True))
                if partial is not None:
                    partial.maybe_save(done, {"matrix": metric.matrix})
                if on_image is not None:
                    on_image(done)
        if partial is not None:  # marks the pass finished, so a later kill does not redo it
            partial.save(len(data), {"matrix": metric.matrix})
    return metric


def _resume(metric: ConfusionMatrix, partial: Optional[PartialState], total: int, desc: str) -> int:
    saved = partial.load() if partial is not None else None
    if saved is None:
        return 0
    start, arrays = saved
    metric.matrix.copy_(torch.from_numpy(arrays["matrix"]))
    log.info("%s: resuming at image %d of %d (%s)", desc, start, total, partial.path.name)
    return start


def progress(items: Iterable[T], total: int, desc: str, show: Optional[bool] = None, initial: int = 0,
             every: int = 10, seconds: float = 60.0) -> Iterator[T]:
    """``items``, reporting progress: a tqdm bar on a terminal, else a log line every ``every``
    items or ``seconds`` (and at the end) with the count, the rate and the time left."""
    if show is False:
        yield from items
        return
    if show or sys.stderr.isatty():
        with tqdm(total=total, initial=initial, desc=desc, unit="img", dynamic_ncols=True) as bar:
            for item in items:
                yield item
                bar.update()
        return
    yield from _logged(items, total, desc, initial, every, seconds)


def _logged(items: Iterable[T], total: int, desc: str, initial: int, every: int, seconds: float) -> Iterator[T]:
    began = last = time.monotonic()
    done = initial
    for item in items:
        yield item
        done += 1
        now = time.monotonic()
        if done == total or (done - initial) % every == 0 or now - last >= seconds:
            last = now
            rate = (done - initial) / max(now - began, 1e-9)
            left = (total - done) / rate if rate > 0 else float("inf")
            log.info("%s: %d/%d images, %.2f img/s, %s left", desc, done, total, rate, _duration(left))


def _duration(seconds: float) -> str:
    if seconds == float("inf"):
        return "unknown time"
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"
