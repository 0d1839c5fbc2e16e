"""The reference test transform: resize rounding and interpolation, normalization, ms+flip scales."""
from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from psp_zoo.datasets.transforms import (
    ms_flip_scales,
    normalize,
    normalize_batch,
    rescale_size,
    resize_image,
    resized_inputs,
    target_scales,
    to_tensor,
)

from helpers import assert_close_to_scale

# (h, w, img_scale) -> (new_h, new_w), worked out by hand from docs/reference.md's rule
# s = min(long / max(h, w), short / min(h, w)); new = int(x * s + 0.5).
RESIZE_CASES = [
    (1024, 2048, (2048, 1024), (1024, 2048)),  # Cityscapes: unchanged
    (1024, 2048, (2049, 1025), (1025, 2049)),  # Cityscapes 769 slide: 1024 * 2049/2048 = 1024.5 -> 1025
    (1024, 2048, (1536, 768), (768, 1536)),  # ms+flip 0.75
    (512, 683, (2048, 512), (512, 683)),  # ADE: short side already 512
    (375, 500, (2048, 512), (512, 683)),  # VOC: upscaled, 682.67 -> 683
    (333, 500, (520, 520), (346, 520)),  # Pascal Context: long side bound, 346.32 -> 346
    (101, 37, (2048, 512), (1398, 512)),  # odd, portrait, upscaled 13.8x: 1397.62 -> 1398
    (5, 10, (5, 5), (3, 5)),  # 2.5 rounds up (int(x + 0.5)), not to even
    (3, 5, (4, 4), (2, 4)),  # 2.4 -> 2
    (30, 50, (64, 32), (32, 53)),  # 53.33 -> 53
]


@pytest.mark.parametrize("h, w, img_scale, expected", RESIZE_CASES)
def test_rescale_size(h, w, img_scale, expected):
    assert rescale_size(h, w, img_scale) == expected
    # The scale is (long, short) whichever order it is given in, as mmcv's rescale_size.
    assert rescale_size(h, w, img_scale[::-1]) == expected


@pytest.mark.parametrize("h, w, img_scale", [(31, 23, (80, 40)), (24, 40, (30, 15)), (20, 20, (33, 33))])
def test_resize_image_is_cv2_inter_linear(h, w, img_scale):
    image = np.random.default_rng(h).integers(0, 256, (h, w, 3), dtype=np.uint8)
    new_h, new_w = rescale_size(h, w, img_scale)
    expected = cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
    resized = resize_image(image, img_scale)
    assert resized.dtype == np.uint8 and resized.shape == (new_h, new_w, 3)
    np.testing.assert_array_equal(resized, expected)
    assert not np.array_equal(resized, cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_NEAREST))


def test_normalize_uses_rgb_mean_and_std():
    image = np.array([[[123, 116, 103], [255, 0, 10]]], dtype=np.uint8)
    mean, std = np.array([123.675, 116.28, 103.53]), np.array([58.395, 57.12, 57.375])
    out = normalize(image)
    assert out.dtype == np.float32
    assert_close_to_scale(out, (image - mean) / std, 1e-6)
    batch = to_tensor(image).unsqueeze(0)
    assert torch.equal(normalize_batch(batch)[0], to_tensor(out))


def test_resized_inputs_are_uint8_chw_per_scale():
    image = np.random.default_rng(0).integers(0, 256, (30, 50, 3), dtype=np.uint8)
    inputs = resized_inputs(image, [(64, 32), (32, 16)])
    assert [tuple(t.shape) for t in inputs] == [(3, 32, 53), (3, 16, 27)]
    assert all(t.dtype == torch.uint8 for t in inputs)
    assert torch.equal(inputs[0], to_tensor(resize_image(image, (64, 32))))
    with pytest.raises(ValueError, match="uint8"):
        resized_inputs(image.astype(np.float32), [(64, 32)])


def test_ms_flip_scales_are_ratios_of_img_scale():
    assert ms_flip_scales((2048, 1024)) == [(1024, 512), (1536, 768), (2048, 1024), (2560, 1280),
                                            (3072, 1536), (3584, 1792)]
    # int() truncates: 2049 * 0.75 = 1536.75 -> 1536, 1025 * 1.75 = 1793.75 -> 1793
    assert ms_flip_scales((2049, 1025)) == [(1024, 512), (1536, 768), (2049, 1025), (2561, 1281),
                                            (3073, 1537), (3585, 1793)]
    assert ms_flip_scales((520, 520)) == [(260, 260), (390, 390), (520, 520), (650, 650), (780, 780),
                                          (910, 910)]
    assert target_scales((2048, 512), ms_flip=False) == [(2048, 512)]
    assert target_scales((2048, 512), ms_flip=True) == ms_flip_scales((2048, 512))
