"""The PSPNet authors' training transform (hszhao/semseg util/transform.py, as tool/train.py composes it).

``RandScale(0.5, 2.0)`` -> ``RandRotate(-10, 10, padding=mean, ignore_label)`` -> ``RandomGaussianBlur``
-> ``RandomHorizontalFlip`` -> ``Crop(crop_size, 'rand', padding=mean, ignore_label)`` -> ``ToTensor`` ->
``Normalize(mean, std)``. Their dataset reads the image with OpenCV, converts it to RGB and to float32
before any step, so every step works on float32 RGB values 0..255; the label is uint8 throughout.

- scale: one factor ``s`` uniform in ``ratio_range`` for both axes; ``cv2.resize(fx=s, fy=s)``, the
  image bilinear, the label nearest (the image's own size, no img_scale);
- rotate, with probability 0.5: an angle uniform in ``rotate_range`` about the centre (w/2, h/2), the
  same size kept, the image bilinear with the mean (RGB x 255) outside, the label nearest with the
  ignore label outside;
- blur, with probability 0.5: ``cv2.GaussianBlur`` 5x5, sigma from the kernel size;
- flip, with probability ``flip_prob``: horizontal;
- crop: a side shorter than the crop is padded to it, half before (``int(pad / 2)``) and the rest
  after, the image with the mean and the label with the ignore label; then a box at a top and a left
  offset each uniform over every whole position (both ends included);
- normalize: ``(x - mean) / std`` per channel in float32 (mean and std the ImageNet ones x 255), so
  padding becomes 0.

Random draws come in their order (scale; rotate's coin then angle; blur's coin; flip's coin; crop's
top then left) and with their distributions, from the generator given: psp-zoo keys it by (seed,
iteration, sample) (``pipeline.sample_rng``) where they draw from Python's global ``random``, so a
run's samples do not depend on the numbers of processes and workers, and a resumed run sees what an
uninterrupted one would.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

import cv2
import numpy as np

from ..datasets.transforms import IMG_MEAN, IMG_STD
from ..errors import PspZooError
from ..manifest.entries import IGNORE_INDEX
from .pipeline import Draws, Rng, TrainTransform, check_pair

__all__ = ["SemsegTransform", "BLUR_KERNEL", "ROTATE_PROB", "BLUR_PROB", "transform_for"]

#: their RandomGaussianBlur's radius (the kernel's side) and probability; RandRotate's probability
BLUR_KERNEL = 5
BLUR_PROB = 0.5
ROTATE_PROB = 0.5


@dataclass(frozen=True)
class SemsegTransform:
    """One training sample as the PSPNet authors' train.py made it.

    Called as :class:`~psp_zoo.training.pipeline.TrainTransform` is: a BGR uint8 H x W x 3 image, its
    uint8 H x W label (ignore label already in place) and a numpy generator; returns a float32 3 x h x w
    normalized RGB image and an int64 h x w label, h x w the ``crop_size``. ``mean`` and ``std`` are
    RGB on the 0..255 scale.
    """

    crop_size: Tuple[int, int]
    ratio_range: Tuple[float, float] = (0.5, 2.0)
    rotate_range: Tuple[float, float] = (-10.0, 10.0)
    flip_prob: float = 0.5
    mean: Tuple[float, float, float] = IMG_MEAN
    std: Tuple[float, float, float] = IMG_STD
    ignore_index: int = IGNORE_INDEX

    def __post_init__(self):
        if not (len(self.crop_size) == 2 and all(int(v) == v and v > 0 for v in self.crop_size)):
            raise PspZooError(f"crop_size must be two positive whole numbers (h, w), got {self.crop_size!r}")
        if not 0 < self.ratio_range[0] <= self.ratio_range[1]:
            raise PspZooError(f"ratio_range must be (min, max) with 0 < min <= max, got {self.ratio_range!r}")
        if not self.rotate_range[0] <= self.rotate_range[1]:
            raise PspZooError(f"rotate_range must be (min, max) in degrees with min <= max, got {self.rotate_range!r}")
        if not 0 <= self.flip_prob <= 1:
            raise PspZooError(f"flip_prob must be a probability in [0, 1], got {self.flip_prob!r}")

    def geometric(self, image: np.ndarray, label: np.ndarray, draws: Draws) -> Tuple[np.ndarray, np.ndarray]:
        """Scale, rotate, blur, flip and crop: float32 RGB 0..255 in and out, label uint8, not normalized."""
        low, high = self.ratio_range
        scale = low + (high - low) * draws.random()
        image = cv2.resize(image, None, fx=scale, fy=scale, interpolation=cv2.INTER_LINEAR)
        label = cv2.resize(label, None, fx=scale, fy=scale, interpolation=cv2.INTER_NEAREST)
        if draws.random() < ROTATE_PROB:
            low, high = self.rotate_range
            angle = low + (high - low) * draws.random()
            h, w = label.shape
            matrix = cv2.getRotationMatrix2D((w / 2, h / 2), angle, 1)
            image = cv2.warpAffine(image, matrix, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT,
                                   borderValue=tuple(float(m) for m in self.mean))
            label = cv2.warpAffine(label, matrix, (w, h), flags=cv2.INTER_NEAREST, borderMode=cv2.BORDER_CONSTANT,
                                   borderValue=self.ignore_index)
        if draws.random() < BLUR_PROB:
            image = cv2.GaussianBlur(image, (BLUR_KERNEL, BLUR_KERNEL), 0)
        if draws.random() < self.flip_prob:
            image, label = cv2.flip(image, 1), cv2.flip(label, 1)
        return self._crop(image, label, draws)

    def _crop(self, image: np.ndarray, label: np.ndarray, draws: Draws) -> Tuple[np.ndarray, np.ndarray]:
        crop_h, crop_w = self.crop_size
        h, w = label.shape
        pad_h, pad_w = max(crop_h - h, 0), max(crop_w - w, 0)
        if pad_h or pad_w:
            top, left = pad_h // 2, pad_w // 2
            image = cv2.copyMakeBorder(image, top, pad_h - top, left, pad_w - left, cv2.BORDER_CONSTANT,
                                       value=tuple(float(m) for m in self.mean))
            label = cv2.copyMakeBorder(label, top, pad_h - top, left, pad_w - left, cv2.BORDER_CONSTANT,
                                       value=self.ignore_index)
            h, w = label.shape
        top = draws.randint(0, h - crop_h + 1)
        left = draws.randint(0, w - crop_w + 1)
        return image[top:top + crop_h, left:left + crop_w], label[top:top + crop_h, left:left + crop_w]

    def __call__(self, image: np.ndarray, label: np.ndarray, rng: Rng) -> Tuple[np.ndarray, np.ndarray]:
        check_pair(image, label)
        rgb = np.ascontiguousarray(image[:, :, ::-1]).astype(np.float32)
        rgb, label = self.geometric(rgb, np.ascontiguousarray(label), Draws(rng))
        mean, std = np.asarray(self.mean, np.float32), np.asarray(self.std, np.float32)
        normalized = (rgb - mean) / std
        return np.ascontiguousarray(normalized.transpose(2, 0, 1)), label.astype(np.int64)


def transform_for(recipe, ignore_index: int):
    """The training transform ``recipe`` (a :class:`~psp_zoo.training.recipe.Recipe`) selects, for a
    dataset whose ignore label is ``ignore_index``."""
    if recipe.pipeline == "semseg":
        return SemsegTransform(crop_size=recipe.crop_size, ratio_range=recipe.ratio_range,
                               rotate_range=recipe.rotate_range, flip_prob=recipe.flip_prob,
                               ignore_index=ignore_index)
    return TrainTransform(crop_size=recipe.crop_size, img_scale=recipe.img_scale, ratio_range=recipe.ratio_range,
                          cat_max_ratio=recipe.cat_max_ratio, flip_prob=recipe.flip_prob, ignore_index=ignore_index)
