"""The PSPNet authors' test protocol (github hszhao/semseg, ``tool/test.py``), and the choice of
protocol by a checkpoint's test mode.

Pure functions of a model (``model(x)``: logits of an N x 3 x h x w batch) and an H x W x 3 RGB
image; docs/reference.md ("The authors' test protocol (hszhao/semseg)") is the specification:

- the image as float32 RGB 0..255; per scale s the long side ``round(s x base_size)``, the
  other ``round(long / long_side x short_side)`` (Python's ``round``), ``cv2.INTER_LINEAR`` on
  the float image;
- padded to the crop with the mean (RGB 0..255), half of the padding before, half after;
- windows of the crop size with stride ``ceil(crop x 2/3)``; each window normalized
  ``(x - mean) / std`` and run with its horizontal flip, softmax, the two averaged (the flip is
  part of their single scale too); windows summed in float64 and divided by the per-pixel count;
- the padding cropped off, the probabilities resized to the original size with
  ``cv2.INTER_LINEAR``, the scales averaged, argmax.

Their ``model`` returns logits of size (h - 1) / 8 x 8 + 1, which is the window's own size for
the crops they use (473, 713); an output of another size is resized to the window with
``align_corners=True`` before the softmax, as their ``net_process`` does.
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from ..datasets.transforms import target_scales
from .inference import default_slide_batch, infer_labels, model_device, predict_labels, slide_windows

__all__ = [
    "SEMSEG_MODE", "SEMSEG_MEAN", "SEMSEG_STD", "SEMSEG_SCALES", "SEMSEG_MS_SCALES", "STRIDE_RATE",
    "CV_RESIZE_CHANNELS", "semseg_scales", "scaled_size", "resize_image", "pad_to_crop", "window_stride",
    "window_grid", "normalize", "window_probs", "scale_probs", "resize_probs", "semseg_probs",
    "semseg_labels", "loader_scales", "labels_of_inputs", "labels_of_image",
]

#: The test mode of the entries that follow this protocol (``test: {mode: semseg, ...}``).
SEMSEG_MODE = "semseg"
# their tool/test.py: value_scale 255 times the ImageNet mean and std, RGB order
SEMSEG_MEAN = tuple(item * 255 for item in (0.485, 0.456, 0.406))
SEMSEG_STD = tuple(item * 255 for item in (0.229, 0.224, 0.225))
#: Their single scale, and their multi-scale list (config/*/*.yaml, ``scales``).
SEMSEG_SCALES = (1.0,)
SEMSEG_MS_SCALES = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)
STRIDE_RATE = 2 / 3
#: The most channels OpenCV 5's ``cv2.resize`` takes at once (CV_CN_MAX); ADE20K has 150 classes.
CV_RESIZE_CHANNELS = 128


def semseg_scales(multi_scale: bool) -> Tuple[float, ...]:
    """The scales of one test pass: [1.0], or the six multi-scale ones (flip is always on)."""
    return SEMSEG_MS_SCALES if multi_scale else SEMSEG_SCALES


def scaled_size(height: int, width: int, base_size: int, scale: float) -> Tuple[int, int]:
    """(h, w) of an image at ``scale``: the long side ``round(scale x base_size)``, the other side
    in proportion, both with Python's ``round`` (halves to even), as their test.py computes them;
    a square image (h == w) takes the width branch, so both sides are the long one."""
    long_size = round(scale * base_size)
    if height > width:
        return long_size, round(long_size / float(height) * width)
    return round(long_size / float(width) * height), long_size


def resize_image(image: np.ndarray, size: Sequence[int]) -> np.ndarray:
    """The H x W x 3 float32 image resized to ``size`` (h, w) with cv2.INTER_LINEAR."""
    height, width = size
    return cv2.resize(image, (width, height), interpolation=cv2.INTER_LINEAR)


def pad_to_crop(image: np.ndarray, crop_size: Sequence[int], value: Sequence[float] = SEMSEG_MEAN
                ) -> Tuple[np.ndarray, Tuple[int, int]]:
    """(the image padded up to ``crop_size`` (h, w) with ``value``, (top, left) padding).

    Only sides shorter than the crop are padded; ``int(pad / 2)`` goes before (top, left), the rest
    after. An image at least as large as the crop is returned as it is.
    """
    height, width = image.shape[:2]
    pad_h, pad_w = max(crop_size[0] - height, 0), max(crop_size[1] - width, 0)
    top, left = int(pad_h / 2), int(pad_w / 2)
    if pad_h > 0 or pad_w > 0:
        image = cv2.copyMakeBorder(image, top, pad_h - top, left, pad_w - left, cv2.BORDER_CONSTANT,
                                   value=list(value))
    return image, (top, left)


def window_stride(crop_size: Sequence[int]) -> Tuple[int, int]:
    """The window stride: ``ceil(crop x 2/3)`` per axis (315 x 315 for a 473 crop, 476 for 713)."""
    return tuple(int(math.ceil(crop * STRIDE_RATE)) for crop in crop_size)


def window_grid(height: int, width: int, crop_size: Sequence[int]) -> List[Tuple[int, int, int, int]]:
    """Their windows over a padded image (at least the crop size) as (y1, y2, x1, x2), row by row:
    ``ceil((side - crop) / stride) + 1`` per axis, the last one shifted back inside the image. This
    is the grid of mmseg's sliding window (``inference.slide_windows``) at their stride."""
    if height < crop_size[0] or width < crop_size[1]:
        raise ValueError(f"a {height} x {width} image is smaller than the {crop_size[0]} x {crop_size[1]} "
                         f"crop; pad it first (pad_to_crop)")
    return slide_windows(height, width, crop_size, window_stride(crop_size))


def normalize(image: np.ndarray) -> torch.Tensor:
    """H x W x 3 float32 RGB 0..255 -> 3 x H x W float32 ``(x - mean) / std``, subtracted and then
    divided channel by channel in float32 as their ``net_process`` does (the mean padding -> 0)."""
    tensor = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))).float()
    for channel, mean, std in zip(tensor, SEMSEG_MEAN, SEMSEG_STD):
        channel.sub_(mean).div_(std)
    return tensor


@torch.inference_mode()
def window_probs(model, crops: torch.Tensor) -> torch.Tensor:
    """N x C x h x w softmax probabilities of N normalized windows: each window and its horizontal
    flip in one batch, logits resized to the window (align_corners=True) where the model's output
    size differs, softmax, the flipped half flipped back, the two averaged."""
    n = crops.shape[0]
    logits = model(torch.cat([crops, crops.flip(3)]))
    if tuple(logits.shape[2:]) != tuple(crops.shape[2:]):
        logits = F.interpolate(logits, size=tuple(crops.shape[2:]), mode="bilinear", align_corners=True)
    probs = logits.softmax(dim=1)
    return (probs[:n] + probs[n:].flip(3)) / 2


@torch.inference_mode()
def scale_probs(model, image: np.ndarray, crop_size: Sequence[int], *, device=None,
                batch_size: Optional[int] = None) -> torch.Tensor:
    """C x h x w float64 probabilities of one scaled H x W x 3 float32 image (their ``scale_process``
    before its resize): padded, windows averaged by count, the padding cropped off.

    ``batch_size`` windows go through the model per call (each with its flip; default: one on the
    CPU, several on CUDA); window results are summed in row-major order, as theirs.
    """
    device = torch.device(device) if device is not None else model_device(model)
    step = batch_size or default_slide_batch(device)
    height, width = image.shape[:2]
    padded, (top, left) = pad_to_crop(image, crop_size)
    inputs = normalize(padded).to(device)
    windows = window_grid(padded.shape[0], padded.shape[1], crop_size)
    total = None
    count = torch.zeros(padded.shape[:2], dtype=torch.float64, device=device)
    for start in range(0, len(windows), step):
        chunk = windows[start:start + step]
        probs = window_probs(model, torch.stack([inputs[:, y1:y2, x1:x2] for y1, y2, x1, x2 in chunk]))
        if total is None:
            total = torch.zeros((probs.shape[1], *padded.shape[:2]), dtype=torch.float64, device=device)
        for (y1, y2, x1, x2), window in zip(chunk, probs):
            total[:, y1:y2, x1:x2] += window
            count[y1:y2, x1:x2] += 1
    total /= count
    return total[:, top:top + height, left:left + width]


def resize_probs(probs: np.ndarray, size: Sequence[int], max_channels: int = CV_RESIZE_CHANNELS) -> np.ndarray:
    """H x W x C probabilities resized to ``size`` (h, w) with cv2.INTER_LINEAR, in channel groups.

    OpenCV 5 resizes at most 128 channels at once. Its generic path treats channels independently,
    so groups give the one-shot result; the groups are balanced (150 -> 75 + 75) because OpenCV
    has its own code paths for 1, 3 and 4 channels, which round differently from the generic path.
    """
    height, width = size
    channels = probs.shape[2]
    groups = -(-channels // max_channels)
    bounds = [round(i * channels / groups) for i in range(groups + 1)]
    parts = [cv2.resize(np.ascontiguousarray(probs[:, :, lo:hi]), (width, height), interpolation=cv2.INTER_LINEAR)
             .reshape(height, width, hi - lo) for lo, hi in zip(bounds, bounds[1:])]
    return parts[0] if groups == 1 else np.concatenate(parts, axis=2)


def semseg_probs(model, image_rgb: np.ndarray, base_size: int, crop_size: Sequence[int],
                 scales: Sequence[float] = SEMSEG_SCALES, *, device=None,
                 batch_size: Optional[int] = None) -> np.ndarray:
    """H x W x C float64 mean probabilities of an H x W x 3 RGB image (uint8 or float 0..255) over
    ``scales``, each scale by their protocol (flip included), resized back to H x W."""
    if image_rgb.ndim != 3 or image_rgb.shape[2] != 3:
        raise ValueError(f"expected an H x W x 3 RGB image, got an array of shape {image_rgb.shape}")
    if not scales:
        raise ValueError("no test scales given")
    image = np.float32(image_rgb)
    height, width = image.shape[:2]
    prediction = None
    for scale in scales:
        scaled = resize_image(image, scaled_size(height, width, base_size, scale))
        probs = scale_probs(model, scaled, crop_size, device=device, batch_size=batch_size)
        resized = resize_probs(probs.permute(1, 2, 0).cpu().numpy(), (height, width))
        if prediction is None:
            prediction = resized  # a fresh array (cv2's output, or their concatenation)
        else:
            prediction += resized
    prediction /= len(scales)
    return prediction


def semseg_labels(model, image_rgb: np.ndarray, base_size: int, crop_size: Sequence[int],
                  scales: Sequence[float] = SEMSEG_SCALES, *, device=None,
                  batch_size: Optional[int] = None) -> np.ndarray:
    """H x W int64 class indices: the argmax of :func:`semseg_probs`."""
    return np.argmax(semseg_probs(model, image_rgb, base_size, crop_size, scales, device=device,
                                  batch_size=batch_size), axis=2)


# --------------------------------------------------------------------------------------------
# the protocol a checkpoint's test settings name


def loader_scales(settings, ms_flip: bool) -> list:
    """The resize targets the test loader applies (``SegmentationDataset(img_scales=...)``): mmseg's
    img_scale (or its six ms+flip scales); for the authors' protocol ``[None]``, the image as read,
    which the protocol scales itself (on the float image)."""
    return [None] if settings.mode == SEMSEG_MODE else target_scales(settings.img_scale, ms_flip)


def _semseg_of(model, image_rgb: np.ndarray, settings, ms_flip: bool, device, batch_size) -> torch.Tensor:
    device = torch.device(device) if device is not None else model_device(model)
    labels = semseg_labels(model, image_rgb, settings.base_size, settings.crop_size, semseg_scales(ms_flip),
                           device=device, batch_size=batch_size)
    return torch.from_numpy(labels).to(device)


def labels_of_inputs(model, inputs: Sequence[torch.Tensor], ori_size: Sequence[int], settings, ms_flip: bool, *,
                     device=None, batch_size: Optional[int] = None) -> torch.Tensor:
    """H x W int64 labels (on ``device``) of one loader sample (``inputs`` resized by
    :func:`loader_scales`) by the settings' protocol: the authors' for mode 'semseg' (``ms_flip``:
    their six scales), else mmseg's (``inference.infer_labels``)."""
    if settings.mode != SEMSEG_MODE:
        return infer_labels(model, inputs, ori_size, settings, ms_flip, device=device, batch_size=batch_size)
    if len(inputs) != 1 or tuple(inputs[0].shape[1:]) != tuple(ori_size):
        raise ValueError("the semseg protocol takes the image as read (loader_scales), one input of the "
                         f"original {ori_size[0]} x {ori_size[1]} size")
    return _semseg_of(model, inputs[0].permute(1, 2, 0).numpy(), settings, ms_flip, device, batch_size)


def labels_of_image(model, image_rgb: np.ndarray, settings, ms_flip: bool = False, *, device=None,
                    batch_size: Optional[int] = None) -> torch.Tensor:
    """H x W int64 labels of one H x W x 3 uint8 RGB image by the settings' protocol (see
    :func:`labels_of_inputs`); mmseg's through ``inference.predict_labels``."""
    if settings.mode != SEMSEG_MODE:
        return predict_labels(model, image_rgb, settings, ms_flip, device=device, batch_size=batch_size)
    if image_rgb.ndim != 3 or image_rgb.shape[2] != 3 or image_rgb.dtype != np.uint8:
        raise ValueError(f"expected an H x W x 3 uint8 RGB image, got {image_rgb.dtype} {image_rgb.shape}")
    return _semseg_of(model, image_rgb, settings, ms_flip, device, batch_size)
