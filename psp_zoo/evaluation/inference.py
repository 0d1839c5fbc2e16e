"""Test-time inference exactly as mmseg v0.x runs it: whole, sliding window, multi-scale + flip.

Pure functions of a model (``model(x)`` = mmseg's ``encode_decode``: logits resized to x's size)
and normalized NCHW tensors. docs/reference.md ("Sliding windows", "Multi-scale + flip") is the
specification; the only liberty taken is batching (windows, flips), which changes no result.

The resize of the logits to the original image size, the softmax, the ms+flip average and the
argmax run in bands of output rows: a 12-megapixel photo with 150 classes would otherwise need
several 7 GB float maps at once. A band's rows are the rows of the full-size resize (the same
source rows and weights as torch's bilinear kernel), so the labels are the full-size ones.
"""
from __future__ import annotations

import math
from typing import Callable, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from ..datasets.transforms import normalize_batch, resized_inputs, target_scales
from ..model.optimization import model_device

__all__ = ["SLIDE_BATCH_SIZE", "default_slide_batch", "model_device", "slide_windows", "whole_inference",
           "slide_inference", "mode_logits", "single_scale_probs", "ms_flip_inference", "infer_probs",
           "predict_probs", "single_scale_labels", "infer_labels", "predict_labels", "resized_rows", "BAND_BYTES"]

Model = Callable[[torch.Tensor], torch.Tensor]
#: Crops per model call in sliding-window inference on CUDA when the caller does not say: bounds
#: memory (ms+flip at 1.75x on Cityscapes 769 makes 42 crops of 769 x 769) while still batching.
SLIDE_BATCH_SIZE = 8
#: Bytes the buffers of one band of output rows may take (resized logits, softmax, the band's
#: sum of probabilities): the memory of the full-size steps, whatever the classes and image size.
BAND_BYTES = 256 * 2 ** 20


def default_slide_batch(device) -> int:
    """Crops per model call when the caller does not say: batched on CUDA, one at a time on CPU.

    On the CPU, stacking windows makes the model slower, not faster, and multiplies the memory
    (docs/performance.md, "Why the code does what it does").
    """
    return SLIDE_BATCH_SIZE if torch.device(device).type == "cuda" else 1


def _align_corners(model: Model, align_corners: Optional[bool]) -> bool:
    return bool(getattr(model, "align_corners", False) if align_corners is None else align_corners)


def _resize(logits: torch.Tensor, size: Optional[Sequence[int]], align_corners: bool) -> torch.Tensor:
    if size is None or tuple(logits.shape[2:]) == tuple(size):
        return logits
    return F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=align_corners)


@torch.inference_mode()
def whole_inference(model: Model, img: torch.Tensor, ori_size: Optional[Sequence[int]] = None, *,
                    align_corners: Optional[bool] = None) -> torch.Tensor:
    """Logits of the whole image, resized bilinearly to ``ori_size`` (H, W) when given.

    ``align_corners`` defaults to the model's (the head's setting, as the reference uses).
    """
    return _resize(model(img), ori_size, _align_corners(model, align_corners))


def slide_windows(height: int, width: int, crop_size: Sequence[int], stride: Sequence[int]
                  ) -> List[Tuple[int, int, int, int]]:
    """The reference window grid as (y1, y2, x1, x2), row by row.

    Every window has the same size, min(crop, image) per axis: a window that would cross the
    far edge is shifted back inside, and one larger than the image is clipped to it.
    """
    (h_crop, w_crop), (h_stride, w_stride) = crop_size, stride
    rows = max(height - h_crop + h_stride - 1, 0) // h_stride + 1
    cols = max(width - w_crop + w_stride - 1, 0) // w_stride + 1
    windows = []
    for row in range(rows):
        for col in range(cols):
            y2, x2 = min(row * h_stride + h_crop, height), min(col * w_stride + w_crop, width)
            windows.append((max(y2 - h_crop, 0), y2, max(x2 - w_crop, 0), x2))
    return windows


@torch.inference_mode()
def slide_inference(model: Model, img: torch.Tensor, crop_size: Sequence[int], stride: Sequence[int], *,
                    num_classes: Optional[int] = None, batch_size: Optional[int] = None,
                    ori_size: Optional[Sequence[int]] = None,
                    align_corners: Optional[bool] = None) -> torch.Tensor:
    """Sliding-window logits of an N x 3 x H x W batch, averaged where windows overlap.

    Crops (windows x images) go through the model ``batch_size`` at a time (default: all at
    once); ``batch_size=1`` is the reference's one-window-at-a-time loop. Window logits are
    summed in the reference's row-major order and divided by the per-pixel window count; the
    result is resized to ``ori_size`` when given. ``num_classes`` is read from the output if None.
    """
    n, _, height, width = img.shape
    windows = slide_windows(height, width, crop_size, stride)
    # Crop k is image k % n in window k // n. All windows share one size, so crops stack.
    boxes = [(image, box) for box in windows for image in range(n)]
    step = batch_size or len(boxes)
    total = None
    for start in range(0, len(boxes), step):
        chunk = boxes[start:start + step]
        logits = model(torch.stack([img[image, :, y1:y2, x1:x2] for image, (y1, y2, x1, x2) in chunk]))
        if total is None:
            classes = logits.shape[1] if num_classes is None else num_classes
            total = img.new_zeros((n, classes, height, width), dtype=logits.dtype)
        for (image, (y1, y2, x1, x2)), crop_logits in zip(chunk, logits):
            total[image, :, y1:y2, x1:x2] += crop_logits
    count = img.new_zeros((1, 1, height, width), dtype=total.dtype)
    for y1, y2, x1, x2 in windows:
        count[:, :, y1:y2, x1:x2] += 1
    return _resize(total / count, ori_size, _align_corners(model, align_corners))


def mode_logits(model: Model, img: torch.Tensor, ori_size: Sequence[int], settings, *,
                batch_size: Optional[int] = None) -> torch.Tensor:
    """Logits at ``ori_size`` by the settings' mode ('whole' or 'slide', with crop_size/stride)."""
    if settings.mode == "slide":
        return slide_inference(model, img, settings.crop_size, settings.stride, batch_size=batch_size,
                               ori_size=ori_size, align_corners=settings.align_corners)
    if settings.mode == "whole":
        return whole_inference(model, img, ori_size, align_corners=settings.align_corners)
    if settings.mode == "semseg":
        raise ValueError("test mode 'semseg' is the PSPNet authors' protocol, which mmseg's pipeline here does not "
                         "run: use psp_zoo.evaluation.semseg_inference (semseg_probs, labels_of_image)")
    raise ValueError(f"unknown test mode {settings.mode!r}; expected 'whole' or 'slide'")


# --------------------------------------------------------------------------------------------
# full-size steps in bands of output rows


def _source_positions(in_size: int, out_size: int, align_corners: bool, fused: bool, device) -> torch.Tensor:
    """Float32 source coordinate of every output row, by torch's bilinear formula.

    ``fused``: ``scale * (y + 0.5) - 0.5`` rounded once, as builds whose compiler contracts it
    into a fused multiply-add compute it (torch's CPU kernels on AVX2, CUDA); else rounded twice.
    """
    y = torch.arange(out_size, dtype=torch.float32, device=device)
    # The scale is a 0-dim CPU tensor, which torch passes to a GPU kernel as a scalar: the same
    # float32 rounding as a tensor on the device, without a copy to it for every image.
    if align_corners:
        if out_size == 1:
            return torch.zeros_like(y)
        return torch.tensor(in_size - 1, dtype=torch.float32) / (out_size - 1) * y
    scale = torch.tensor(in_size, dtype=torch.float32) / out_size
    if fused:  # the product of two float32 is exact in float64: one rounding, as an FMA
        src = (scale.double() * (y + 0.5).double() - 0.5).float()
    else:
        src = scale * (y + 0.5) - 0.5
    return src.clamp(min=0)


def _weights_from(src: torch.Tensor, in_size: int) -> Tuple[torch.Tensor, ...]:
    i0 = src.floor().long().clamp(max=in_size - 1)
    l1 = (src - i0).clamp(0, 1)
    return i0, i0 + (i0 < in_size - 1).long(), 1 - l1, l1


def _row_weights(in_size: int, out_size: int, align_corners: bool, device) -> Tuple[torch.Tensor, ...]:
    """(i0, i1, w0, w1) per output row: row y of the resize is ``x[i0] * w0 + x[i1] * w1``.

    The formula is checked against torch's own kernel on this device: resizing indicator rows
    (1 on even / odd source rows) gives the weights exactly, so whichever rounding the kernel
    uses (see ``_source_positions``) is the one taken.
    """
    if in_size == out_size:  # torch copies rows when the size does not change
        rows = torch.arange(out_size, device=device)
        return rows, rows, torch.ones(out_size, device=device), torch.zeros(out_size, device=device)
    parity = torch.arange(in_size, device=device) % 2
    probe = torch.stack([parity == 0, parity == 1]).float().view(1, 2, in_size, 1)
    seen = F.interpolate(probe, size=(out_size, 1), mode="bilinear", align_corners=align_corners)[0, :, :, 0]
    fused, unfused = (_weights_from(_source_positions(in_size, out_size, align_corners, rounding, device), in_size)
                      for rounding in (True, False))

    def misses(weights: Tuple[torch.Tensor, ...]) -> torch.Tensor:
        i0, i1, w0, w1 = weights
        even = i0 % 2 == 0
        expected = torch.stack([torch.where(even, w0, w1), torch.where(even, w1, w0)])
        return ((expected != seen).any(dim=0) & (i1 != i0)).sum()  # an edge row sums its weights
    # chosen on the device, never read back: a GPU is not waited for on every image
    take_fused = misses(fused) <= misses(unfused)
    return tuple(torch.where(take_fused, a, b) for a, b in zip(fused, unfused))


def _source_rows(in_size: int, out_size: int, align_corners: bool, rows: Tuple[int, int]) -> Tuple[int, int]:
    """The source rows ``lo:hi`` that output rows ``rows`` sample under either rounding of
    ``_source_positions``, computed on the CPU so that no device tensor is read back. Rows that
    only the other rounding samples get zero weight."""
    r0, r1 = rows
    if in_size == out_size:
        return r0, r1
    bounds = [_weights_from(_source_positions(in_size, out_size, align_corners, fused, "cpu"), in_size)
              for fused in (True, False)]
    return min(int(i0[r0]) for i0, *_ in bounds), max(int(i1[r1 - 1]) for _, i1, *_ in bounds) + 1


def resized_rows(logits: torch.Tensor, size: Sequence[int], align_corners: bool, rows: Tuple[int, int],
                 weights: Optional[Tuple[torch.Tensor, ...]] = None) -> torch.Tensor:
    """Rows ``rows[0]:rows[1]`` of ``F.interpolate(logits, size, mode='bilinear')``, from only the
    source rows they sample; the same values, up to the rounding of the last of two sums.

    ``weights`` (``_row_weights`` for this height) may be passed to reuse them across bands.
    """
    (height, width), (r0, r1) = size, rows
    if (r0, r1) == (0, height):
        return _resize(logits, size, align_corners)
    i0, i1, w0, w1 = (t[r0:r1] for t in (weights or _row_weights(logits.shape[2], height, align_corners,
                                                                  logits.device)))
    lo, hi = _source_rows(logits.shape[2], height, align_corners, (r0, r1))
    source = logits[:, :, lo:hi].contiguous()
    # Width first and then height, as torch's kernel does; an unchanged height is an exact copy.
    wide = F.interpolate(source, size=(hi - lo, width), mode="bilinear", align_corners=align_corners)
    # Height as a (band rows x source rows) matrix with two weights a row: one matmul is several
    # times faster than gathering the rows (index_select along rows copies element by element).
    mix = torch.zeros((r1 - r0, hi - lo), dtype=torch.float32, device=logits.device)
    band_rows = torch.arange(r1 - r0, device=logits.device)
    mix.index_put_((band_rows, i0 - lo), w0, accumulate=True)
    mix.index_put_((band_rows, i1 - lo), w1, accumulate=True)
    return torch.matmul(mix, wide.float()).to(logits.dtype)


class _View:
    """One output of the model (N x C x h x w, at its input size) to be resized to the original
    size, flipped back if its input was flipped, and softmaxed."""

    def __init__(self, logits: torch.Tensor, flipped: bool, size: Sequence[int], align_corners: bool):
        self.logits, self.flipped, self.size, self.align_corners = logits, flipped, tuple(size), align_corners
        self.weights = _row_weights(logits.shape[2], self.size[0], align_corners, logits.device)

    def probs(self, r0: int, r1: int) -> torch.Tensor:
        rows = resized_rows(self.logits, self.size, self.align_corners, (r0, r1), self.weights)
        return (rows.flip(dims=(3,)) if self.flipped else rows).softmax(dim=1)


def _bands(height: int, per_row: int, band_bytes: Optional[int]) -> Iterator[Tuple[int, int]]:
    """Row ranges covering ``height`` rows; ``per_row`` bytes of buffers a row stay under ``band_bytes``."""
    step = max(1, min(height, (BAND_BYTES if band_bytes is None else band_bytes) // max(per_row, 1)))
    for r0 in range(0, height, step):
        yield r0, min(r0 + step, height)


def _view_bands(views: Sequence[_View], size: Sequence[int], band_bytes: Optional[int]) -> Iterator[Tuple[int, int]]:
    """Bands for resizing ``views``: per output row a band holds its source rows widened to the
    output width, the two gathered rows, their sum, its softmax, a flipped copy and the band's sum."""
    n, classes = views[0].logits.shape[:2]
    source_per_row = max(math.ceil(view.logits.shape[2] / size[0]) for view in views)
    per_row = n * classes * size[1] * views[0].logits.element_size() * (6 + source_per_row)
    return _bands(size[0], per_row, band_bytes)


def _add_probs(total: torch.Tensor, views: Sequence[_View], r0: int, r1: int) -> torch.Tensor:
    """``total`` (rows r0:r1) plus every view's probabilities, added in the views' order."""
    for view in views:
        total.add_(view.probs(r0, r1))
    return total


def _accumulate(total: Optional[torch.Tensor], views: Sequence[_View], size: Sequence[int],
                band_bytes: Optional[int]) -> torch.Tensor:
    """The full-size sum of probabilities so far (zeros at first) plus ``views``', band by band."""
    if total is None:
        n, classes = views[0].logits.shape[:2]
        total = views[0].logits.new_zeros((n, classes, *size))
    for r0, r1 in _view_bands(views, size, band_bytes):
        _add_probs(total[:, :, r0:r1], views, r0, r1)
    return total


def _scale_views(model: Model, img: torch.Tensor, ori_size: Sequence[int], settings, flip: bool,
                 batch_size: Optional[int]) -> List[_View]:
    """The unflipped (and flipped) output of one scale, each at its input size."""
    n = img.shape[0]
    batch = torch.cat([img, img.flip(dims=(3,))]) if flip else img
    logits = mode_logits(model, batch, None, settings, batch_size=batch_size)
    align_corners = _align_corners(model, settings.align_corners)
    views = [_View(logits[:n], False, ori_size, align_corners)]
    return views + [_View(logits[n:], True, ori_size, align_corners)] if flip else views


@torch.inference_mode()
def single_scale_probs(model: Model, img: torch.Tensor, ori_size: Sequence[int], settings, *,
                       batch_size: Optional[int] = None) -> torch.Tensor:
    """Softmax probabilities at ``ori_size`` of one already-resized, normalized batch."""
    return _accumulate(None, _scale_views(model, img, ori_size, settings, False, batch_size), ori_size, None)


@torch.inference_mode()
def ms_flip_inference(model: Model, imgs: Sequence[torch.Tensor], ori_size: Sequence[int], settings, *,
                      flip: bool = True, batch_size: Optional[int] = None) -> torch.Tensor:
    """Mean softmax probability over every scale of ``imgs``, each unflipped and flipped.

    ``imgs`` holds the N x 3 x h x w inputs at the ms+flip scales (``ms_flip_scales``). Each
    scale's flip runs in one batch with the unflipped input; its output is flipped back. Outputs
    are resized to ``ori_size`` and softmaxed before averaging, summed in the reference's order.
    """
    total, outputs = None, 0
    for img in imgs:
        views = _scale_views(model, img, ori_size, settings, flip, batch_size)
        total = _accumulate(total, views, ori_size, None)
        outputs += len(views)
    return total / outputs


def _labels_of_views(views: Sequence[_View], size: Sequence[int], band_bytes: Optional[int]) -> torch.Tensor:
    """N x H x W argmax of the mean probability of ``views``, never holding more than a band."""
    labels = torch.empty((views[0].logits.shape[0], *size), dtype=torch.long, device=views[0].logits.device)
    for r0, r1 in _view_bands(views, size, band_bytes):
        total = _add_probs(views[0].probs(r0, r1), views[1:], r0, r1)
        labels[:, r0:r1] = (total / len(views) if len(views) > 1 else total).argmax(dim=1)
    return labels


def _labels_of_total(total: torch.Tensor, outputs: int, band_bytes: Optional[int]) -> torch.Tensor:
    """N x H x W argmax of ``total / outputs``, divided a band at a time."""
    n, classes, height, width = total.shape
    labels = torch.empty((n, height, width), dtype=torch.long, device=total.device)
    for r0, r1 in _bands(height, 2 * n * classes * width * total.element_size(), band_bytes):
        labels[:, r0:r1] = (total[:, :, r0:r1] / outputs).argmax(dim=1)
    return labels


def _ms_flip_labels(model: Model, imgs: Sequence[torch.Tensor], ori_size: Sequence[int], settings,
                    batch_size: Optional[int], band_bytes: Optional[int]) -> torch.Tensor:
    """ms+flip labels, holding the smaller of: all 12 outputs at their input sizes (then banded
    to the end), or one full-size sum of probabilities (each scale's outputs added and dropped)."""
    source_pixels = sum(2 * img.shape[2] * img.shape[3] for img in imgs)
    if source_pixels <= ori_size[0] * ori_size[1]:
        views = [view for img in imgs for view in _scale_views(model, img, ori_size, settings, True, batch_size)]
        return _labels_of_views(views, ori_size, band_bytes)
    total = None
    for img in imgs:
        total = _accumulate(total, _scale_views(model, img, ori_size, settings, True, batch_size), ori_size,
                            band_bytes)
    return _labels_of_total(total, 2 * len(imgs), band_bytes)


def _normalized(inputs: Sequence[torch.Tensor], ms_flip: bool, device) -> List[torch.Tensor]:
    batches = [normalize_batch(inp.to(device, non_blocking=True).unsqueeze(0)) for inp in inputs]
    if not ms_flip and len(batches) != 1:
        raise ValueError(f"single-scale inference takes one input, got {len(batches)}")
    return batches


@torch.inference_mode()
def infer_probs(model: Model, inputs: Sequence[torch.Tensor], ori_size: Sequence[int], settings,
                ms_flip: bool, *, device=None, batch_size: Optional[int] = None) -> torch.Tensor:
    """C x H x W probabilities of one image from its resized 3 x h x w uint8 inputs (one per scale).

    ``batch_size``: sliding-window crops per model call; None = ``default_slide_batch(device)``.
    Where only the labels are needed, :func:`infer_labels` gives them without the C x H x W map.
    """
    if batch_size is None:
        batch_size = default_slide_batch(device if device is not None else "cpu")
    batches = _normalized(inputs, ms_flip, device)
    if ms_flip:
        return ms_flip_inference(model, batches, ori_size, settings, batch_size=batch_size)[0]
    return single_scale_probs(model, batches[0], ori_size, settings, batch_size=batch_size)[0]


@torch.inference_mode()
def single_scale_labels(model: Model, img: torch.Tensor, ori_size: Sequence[int], settings, *,
                        batch_size: Optional[int] = None, band_bytes: Optional[int] = None) -> torch.Tensor:
    """N x H x W class indices of an already normalized N x 3 x h x w batch on the model's device:
    logits by the settings' mode, resized to ``ori_size``, softmax and argmax (in bands of rows)."""
    return _labels_of_views(_scale_views(model, img, ori_size, settings, False, batch_size), ori_size, band_bytes)


@torch.inference_mode()
def infer_labels(model: Model, inputs: Sequence[torch.Tensor], ori_size: Sequence[int], settings,
                 ms_flip: bool, *, device=None, batch_size: Optional[int] = None,
                 band_bytes: Optional[int] = None) -> torch.Tensor:
    """H x W class indices (int64, on ``device``) of one image: the argmax of :func:`infer_probs`.

    The full-size steps run in bands of rows whose buffers stay under ``band_bytes`` (default
    ``BAND_BYTES``), so memory does not grow with classes x pixels of the original image.
    """
    if batch_size is None:
        batch_size = default_slide_batch(device if device is not None else "cpu")
    batches = _normalized(inputs, ms_flip, device)
    if ms_flip:
        return _ms_flip_labels(model, batches, ori_size, settings, batch_size, band_bytes)[0]
    return single_scale_labels(model, batches[0], ori_size, settings, batch_size=batch_size,
                               band_bytes=band_bytes)[0]


def predict_probs(model: Model, image_rgb: np.ndarray, settings, ms_flip: bool = False, *,
                  device=None, batch_size: Optional[int] = None) -> torch.Tensor:
    """The whole reference test pipeline for one H x W x 3 uint8 RGB image -> C x H x W probabilities.

    ``settings`` is a manifest ``EvalSettings`` (mode, img_scale, crop_size, stride,
    align_corners). The argmax over dim 0 is the reference's prediction (:func:`predict_labels`).
    """
    if device is None:
        device = model_device(model)
    inputs = resized_inputs(image_rgb, target_scales(settings.img_scale, ms_flip))
    return infer_probs(model, inputs, image_rgb.shape[:2], settings, ms_flip, device=device,
                       batch_size=batch_size)


def predict_labels(model: Model, image_rgb: np.ndarray, settings, ms_flip: bool = False, *,
                   device=None, batch_size: Optional[int] = None,
                   band_bytes: Optional[int] = None) -> torch.Tensor:
    """H x W class indices of one H x W x 3 uint8 RGB image: ``predict_probs(...).argmax(0)``,
    in memory bounded by ``band_bytes`` (see :func:`infer_labels`) instead of classes x pixels."""
    if device is None:
        device = model_device(model)
    inputs = resized_inputs(image_rgb, target_scales(settings.img_scale, ms_flip))
    return infer_labels(model, inputs, image_rgb.shape[:2], settings, ms_flip, device=device,
                        batch_size=batch_size, band_bytes=band_bytes)
