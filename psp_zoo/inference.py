"""Test-time inference exactly as mmseg v0.x runs it: whole, sliding window, multi-scale + flip.

Pure functions of a model (``model(x)`` = mmseg's ``encode_decode``: logits resized to x's size)
and normalized NCHW tensors. REFERENCE.md ("Slide inference", "Multi-scale + flip") is the
specification; the only liberty taken is batching (windows, flips), which changes no result.
"""
from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from .transforms import normalize_batch, resized_inputs, target_scales

__all__ = [
    "SLIDE_BATCH_SIZE", "default_slide_batch", "model_device", "slide_windows", "whole_inference", "slide_inference", "mode_logits", "single_scale_probs",
    "ms_flip_inference", "infer_probs", "predict_probs",
]

Model = Callable[[torch.Tensor], torch.Tensor]
#: Crops per model call in sliding-window inference on CUDA when the caller does not say: bounds
#: memory (ms+flip at 1.75x on Cityscapes 769 makes 42 crops of 769 x 769) while still batching.
SLIDE_BATCH_SIZE = 8


def default_slide_batch(device) -> int:
    """Crops per model call when the caller does not say: batched on CUDA, one at a time on CPU.

    On the CPU, stacking windows made the eager model slower, not faster (R-50-D8, 8 windows of
    385 x 385: 6.8 s batched vs 5.1 s one at a time; benchmarks/speed.py) and used 7x the memory.
    """
    return SLIDE_BATCH_SIZE if torch.device(device).type == "cuda" else 1


def _align_corners(model: Model, align_corners: Optional[bool]) -> bool:
    return bool(getattr(model, "align_corners", False) if align_corners is None else align_corners)


def model_device(model: Model) -> torch.device:
    """The device of the model's first parameter (CPU for a model without parameters)."""
    first = next(iter(model.parameters()), None) if hasattr(model, "parameters") else None
    return first.device if first is not None else torch.device("cpu")


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
    raise ValueError(f"unknown test mode {settings.mode!r}; expected 'whole' or 'slide'")


@torch.inference_mode()
def single_scale_probs(model: Model, img: torch.Tensor, ori_size: Sequence[int], settings, *,
                       batch_size: Optional[int] = None) -> torch.Tensor:
    """Softmax probabilities at ``ori_size`` of one already-resized, normalized batch."""
    return mode_logits(model, img, ori_size, settings, batch_size=batch_size).softmax(dim=1)


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
        n = img.shape[0]
        batch = torch.cat([img, img.flip(dims=(3,))]) if flip else img
        probs = single_scale_probs(model, batch, ori_size, settings, batch_size=batch_size)
        views = [probs[:n], probs[n:].flip(dims=(3,))] if flip else [probs]
        for view in views:
            total = view.clone() if total is None else total.add_(view)
            outputs += 1
    return total / outputs


@torch.inference_mode()
def infer_probs(model: Model, inputs: Sequence[torch.Tensor], ori_size: Sequence[int], settings,
                ms_flip: bool, *, device=None, batch_size: Optional[int] = None) -> torch.Tensor:
    """C x H x W probabilities of one image from its resized 3 x h x w uint8 inputs (one per scale).

    ``batch_size``: sliding-window crops per model call; None = ``default_slide_batch(device)``.
    """
    if batch_size is None:
        batch_size = default_slide_batch(device if device is not None else "cpu")
    batches = [normalize_batch(inp.to(device, non_blocking=True).unsqueeze(0)) for inp in inputs]
    if ms_flip:
        return ms_flip_inference(model, batches, ori_size, settings, batch_size=batch_size)[0]
    if len(batches) != 1:
        raise ValueError(f"single-scale inference takes one input, got {len(batches)}")
    return single_scale_probs(model, batches[0], ori_size, settings, batch_size=batch_size)[0]


def predict_probs(model: Model, image_rgb: np.ndarray, settings, ms_flip: bool = False, *,
                  device=None, batch_size: Optional[int] = None) -> torch.Tensor:
    """The whole reference test pipeline for one H x W x 3 uint8 RGB image -> C x H x W probabilities.

    ``settings`` is a manifest ``TestSettings`` (mode, img_scale, crop_size, stride,
    align_corners). The argmax over dim 0 is the reference's prediction.
    """
    if device is None:
        device = model_device(model)
    inputs = resized_inputs(image_rgb, target_scales(settings.img_scale, ms_flip))
    return infer_probs(model, inputs, image_rgb.shape[:2], settings, ms_flip, device=device,
                       batch_size=batch_size)


def infer_labels(model: Model, inputs: Sequence[torch.Tensor], ori_size: Sequence[int], settings,
                 ms_flip: bool, *, device=None, batch_size: Optional[int] = None) -> torch.Tensor:
    """H x W predicted class indices of one image (the argmax of :func:`infer_probs`)."""
    return infer_probs(model, inputs, ori_size, settings, ms_flip, device=device,
                       batch_size=batch_size).argmax(dim=0)
