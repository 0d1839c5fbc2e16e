"""The reference test-time transform: keep-ratio resize, RGB normalization, CHW tensor.

Every number here is docs/reference.md's ("Test pipeline", "Multi-scale + flip"): mmcv's
``rescale_size`` rounding (``int(x + 0.5)``, not banker's rounding), ``cv2.INTER_LINEAR`` on the
uint8 image, upscaling allowed, no padding. Labels are never resized.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import cv2
import numpy as np
import torch

__all__ = [
    "IMG_MEAN", "IMG_STD", "MS_FLIP_RATIOS", "rescale_size", "resize_image", "normalize", "to_tensor",
    "ms_flip_scales", "target_scales", "resized_inputs", "normalize_batch",
]

IMG_MEAN = (123.675, 116.28, 103.53)  # RGB order
IMG_STD = (58.395, 57.12, 57.375)
#: v0.x ``MultiScaleFlipAug`` ratios, applied to the dataset's img_scale (not to the image).
MS_FLIP_RATIOS = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)

# mmcv normalizes with (img - mean) * (1 / std), the reciprocal taken in float64.
_MEAN32 = np.asarray(IMG_MEAN, dtype=np.float32)
_STDINV32 = (1.0 / np.asarray(IMG_STD, dtype=np.float64)).astype(np.float32)


def rescale_size(h: int, w: int, img_scale: Sequence[int]) -> Tuple[int, int]:
    """(new_h, new_w) of the keep-ratio resize of an h x w image to ``img_scale`` (long, short)."""
    long_edge, short_edge = max(img_scale), min(img_scale)
    scale = min(long_edge / max(h, w), short_edge / min(h, w))
    return int(h * scale + 0.5), int(w * scale + 0.5)


def resize_image(image: np.ndarray, img_scale: Sequence[int]) -> np.ndarray:
    """Keep-ratio bilinear resize of an H x W x 3 uint8 image (cv2.INTER_LINEAR, as mmcv)."""
    h, w = image.shape[:2]
    new_h, new_w = rescale_size(h, w, img_scale)
    if (new_h, new_w) == (h, w):
        return image  # cv2.resize to the same size is a copy; skip it
    return cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_LINEAR)


def normalize(image_rgb: np.ndarray) -> np.ndarray:
    """float32 (image - mean) / std with the RGB mean and std of every published config."""
    return (image_rgb.astype(np.float32) - _MEAN32) * _STDINV32


def to_tensor(image: np.ndarray) -> torch.Tensor:
    """H x W x C array -> contiguous C x H x W tensor."""
    return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))


def ms_flip_scales(img_scale: Sequence[int], ratios: Sequence[float] = MS_FLIP_RATIOS) -> List[Tuple[int, int]]:
    """The v0.x multi-scale targets: ``(int(long * r), int(short * r))`` for each ratio r."""
    return [(int(img_scale[0] * ratio), int(img_scale[1] * ratio)) for ratio in ratios]


def target_scales(img_scale: Sequence[int], ms_flip: bool) -> List[Tuple[int, int]]:
    """The resize targets of one test run: the img_scale alone, or the six ms+flip scales."""
    return ms_flip_scales(img_scale) if ms_flip else [tuple(img_scale)]


def resized_inputs(image_rgb: np.ndarray, img_scales: Sequence[Optional[Sequence[int]]]) -> List[torch.Tensor]:
    """One resized 3 x h x w uint8 tensor per target scale, from an H x W x 3 uint8 RGB image; a
    target of None is the image as it is (a protocol that scales the image itself).

    Normalization is left to ``normalize_batch`` on the model's device: uint8 is a quarter of
    the bytes to pass from loader workers and to copy to a GPU, and the float32 result is the same.
    """
    if image_rgb.ndim != 3 or image_rgb.shape[2] != 3 or image_rgb.dtype != np.uint8:
        raise ValueError(f"expected an H x W x 3 uint8 RGB image, got {image_rgb.dtype} {image_rgb.shape}")
    return [to_tensor(image_rgb if scale is None else resize_image(image_rgb, scale)) for scale in img_scales]


def normalize_batch(images: torch.Tensor) -> torch.Tensor:
    """N x 3 x H x W (uint8 or float) RGB -> float32 (x - mean) * (1 / std), as ``normalize``.

    Channel by channel with the float32 constants as scalars: the same float32 arithmetic as a
    broadcast mean / std tensor, without copying those tensors to a GPU (a synchronising copy)
    on every call.
    """
    out = torch.empty(images.shape, dtype=torch.float32, device=images.device)
    for channel, (mean, stdinv) in enumerate(zip(_MEAN32.tolist(), _STDINV32.tolist())):
        torch.sub(images[:, channel].float(), mean, out=out[:, channel]).mul_(stdinv)
    return out
