"""The training transform of the published recipes, step for step as mmseg 0.30.0 and mmcv 1.x ran it.

``Resize(img_scale, ratio_range)`` -> ``RandomCrop(crop_size, cat_max_ratio=0.75)`` -> ``RandomFlip(0.5)``
-> ``PhotoMetricDistortion`` -> ``Normalize`` -> ``Pad(crop_size, 0, 255)`` (docs/reference.md, "Training as
published"). Images stay BGR uint8 until normalization, as mmcv reads them; every
photometric step clips to 0..255 and truncates to uint8 (``astype``) before the next one; HSV is
OpenCV's (H in 0..179); the image is resized bilinearly and the label with nearest neighbour, both by
``cv2.resize`` to mmcv's ``rescale_size``; normalization is mmcv's ``imnormalize`` (BGR -> RGB, then
``(x - mean) * (1 / std)`` computed by OpenCV in double precision).

Random draws happen in mmseg's order and with its distributions: the resize ratio, the crop's top then
left offset (again for each rejected box), the flip, then brightness, mode, contrast-first, saturation,
hue and contrast-last. They come from the ``rng`` given to the transform, a numpy ``Generator`` or
``RandomState``. mmseg draws from one global numpy RNG per loader worker, so a crop there depends on
the worker count and on every image the worker transformed before; psp-zoo deliberately gives every
sample its own generator, ``sample_rng(seed, iteration, sample)``, so a run's crops are the same
whatever the numbers of processes and workers, and a resumed run sees exactly the crops an
uninterrupted one would. The distributions are unchanged.
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple, Union

import cv2
import numpy as np

from ..datasets.transforms import IMG_MEAN, IMG_STD, rescale_size
from ..errors import PspZooError
from ..manifest.entries import IGNORE_INDEX  # the default; a dataset may declare its own

__all__ = ["check_pair", 
    "TrainTransform", "Draws", "sample_rng", "random_scale", "resize", "crop_box", "crop_is_acceptable",
    "random_crop", "random_flip", "photometric_distortion", "normalize", "pad",
]

Rng = Union[np.random.Generator, np.random.RandomState]
Box = Tuple[int, int, int, int]  # y1, y2, x1, x2
#: mmseg's RandomCrop: 10 boxes are checked; after 10 rejections the 11th is used unchecked.
CROP_TRIES = 10


def sample_rng(seed: int, iteration: int, sample: int) -> np.random.Generator:
    """The generator of one sample's draws: keyed by the run's seed, the iteration and the sample's
    position in the global batch, and by nothing else (not the process, worker or loading order)."""
    for name, value in (("seed", seed), ("iteration", iteration), ("sample", sample)):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 0:
            raise PspZooError(f"{name} must be a non-negative integer, got {value!r}")
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(seed), int(iteration), int(sample)])))


class Draws:
    """numpy's legacy calls (``random_sample``, ``randint``, ``uniform``) on a Generator or RandomState,
    so the transform draws exactly what mmseg's ``np.random`` calls draw, in the same order."""

    def __init__(self, rng: Rng):
        if isinstance(rng, np.random.Generator):
            self._random, self._randint = rng.random, rng.integers
        elif isinstance(rng, np.random.RandomState):
            self._random, self._randint = rng.random_sample, rng.randint
        else:
            raise TypeError(f"rng must be a numpy Generator or RandomState, got {type(rng).__name__}")
        self._uniform = rng.uniform

    def random(self) -> float:
        """U[0, 1) (``np.random.random_sample`` / ``np.random.rand``)."""
        return float(self._random())

    def randint(self, low: int, high: int) -> int:
        """An integer in [low, high), ``high`` excluded as numpy's ``randint``."""
        return int(self._randint(low, high))

    def uniform(self, low: float, high: float) -> float:
        return float(self._uniform(low, high))


# ---------------------------------------------------------------------------------------------
# geometric steps (image and label together)


def random_scale(draws: Draws, img_scale: Optional[Sequence[int]], ratio_range: Sequence[float],
                 size_hw: Tuple[int, int]) -> Tuple[int, int]:
    """mmseg's ``Resize.random_sample_ratio``: r = U[0, 1) * (max - min) + min, then the target
    ``(int(long * r), int(short * r))`` of ``img_scale`` (or of the image's (w, h) without one)."""
    low, high = ratio_range
    ratio = draws.random() * (high - low) + low
    base = tuple(img_scale) if img_scale is not None else (size_hw[1], size_hw[0])
    return int(base[0] * ratio), int(base[1] * ratio)


def resize(image: np.ndarray, label: np.ndarray, scale: Sequence[int]) -> Tuple[np.ndarray, np.ndarray]:
    """Keep-ratio resize to ``scale`` (long, short) as mmcv's ``imrescale``: bilinear image, nearest label."""
    h, w = image.shape[:2]
    new_h, new_w = rescale_size(h, w, scale)
    if (new_h, new_w) == (h, w):
        return image, label
    return (cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_LINEAR),
            cv2.resize(label, (new_w, new_h), interpolation=cv2.INTER_NEAREST))


def crop_box(draws: Draws, size_hw: Tuple[int, int], crop_size: Sequence[int]) -> Box:
    """mmseg's ``get_crop_bbox``: the top offset, then the left one, each uniform over the margin;
    a crop larger than the image is clipped to it when sliced."""
    margin_h = max(size_hw[0] - crop_size[0], 0)
    margin_w = max(size_hw[1] - crop_size[1], 0)
    top = draws.randint(0, margin_h + 1)
    left = draws.randint(0, margin_w + 1)
    return top, top + crop_size[0], left, left + crop_size[1]


def crop_is_acceptable(label: np.ndarray, cat_max_ratio: float, ignore_index: int = IGNORE_INDEX) -> bool:
    """The 75% rule: at least two classes besides ``ignore_index``, the most frequent under
    ``cat_max_ratio`` of the labelled pixels."""
    if label.dtype == np.uint8:  # the same counts as mmseg's np.unique, without its sort (docs/performance.md)
        counts = np.bincount(label.ravel(), minlength=256)
        if 0 <= ignore_index < 256:
            counts[ignore_index] = 0
        counts = counts[counts > 0]
    else:
        values, counts = np.unique(label, return_counts=True)
        counts = counts[values != ignore_index]
    return len(counts) > 1 and np.max(counts) / np.sum(counts) < cat_max_ratio


def random_crop(draws: Draws, image: np.ndarray, label: np.ndarray, crop_size: Sequence[int],
                cat_max_ratio: float = 0.75, ignore_index: int = IGNORE_INDEX) -> Tuple[np.ndarray, np.ndarray]:
    """mmseg's ``RandomCrop``: a box is drawn; while it fails the rule, another, at most 10 checks;
    the box drawn after the 10th failure is used unchecked. ``cat_max_ratio >= 1`` checks nothing."""
    box = crop_box(draws, label.shape[:2], crop_size)
    if cat_max_ratio < 1.0:
        for _ in range(CROP_TRIES):
            if crop_is_acceptable(label[box[0]:box[1], box[2]:box[3]], cat_max_ratio, ignore_index):
                break
            box = crop_box(draws, label.shape[:2], crop_size)
    y1, y2, x1, x2 = box
    return image[y1:y2, x1:x2], label[y1:y2, x1:x2]


def random_flip(draws: Draws, image: np.ndarray, label: np.ndarray, prob: float) -> Tuple[np.ndarray, np.ndarray]:
    """mmseg's ``RandomFlip``: horizontal when U[0, 1) < prob (the draw happens even for prob 0)."""
    if draws.random() < prob:
        return image[:, ::-1], label[:, ::-1]
    return image, label


# ---------------------------------------------------------------------------------------------
# photometric distortion (BGR uint8 in, BGR uint8 out)


def _convert(values: np.ndarray, alpha: float = 1, beta: float = 0) -> np.ndarray:
    """float32 ``x * alpha + beta``, clipped to 0..255, truncated to uint8 (mmseg's ``convert``)."""
    return np.clip(values.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)


def _brightness(draws: Draws, image: np.ndarray, delta: float) -> np.ndarray:
    if draws.randint(0, 2):
        return _convert(image, beta=draws.uniform(-delta, delta))
    return image


def _contrast(draws: Draws, image: np.ndarray, low: float, high: float) -> np.ndarray:
    if draws.randint(0, 2):
        return _convert(image, alpha=draws.uniform(low, high))
    return image


def _saturation(draws: Draws, image: np.ndarray, low: float, high: float) -> np.ndarray:
    if draws.randint(0, 2):
        hsv = cv2.cvtColor(image, cv2.COLOR_BGR2HSV)
        hsv[:, :, 1] = _convert(hsv[:, :, 1], alpha=draws.uniform(low, high))
        return cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)
    return image


def _hue(draws: Draws, image: np.ndarray, delta: int) -> np.ndarray:
    if draws.randint(0, 2):
        hsv = cv2.cvtColor(image, cv2.COLOR_BGR2HSV)
        hsv[:, :, 0] = (hsv[:, :, 0].astype(int) + draws.randint(-delta, delta)) % 180
        return cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)
    return image


def photometric_distortion(draws: Draws, image: np.ndarray, brightness_delta: float = 32,
                           contrast_range: Sequence[float] = (0.5, 1.5),
                           saturation_range: Sequence[float] = (0.5, 1.5), hue_delta: int = 18) -> np.ndarray:
    """mmseg's ``PhotoMetricDistortion`` on a BGR uint8 image: brightness, the mode draw, contrast
    (mode 1), saturation, hue (integer shift in [-delta, delta), mod 180), contrast (mode 0); each
    step applied with probability 1/2."""
    image = _brightness(draws, image, brightness_delta)
    mode = draws.randint(0, 2)
    if mode == 1:
        image = _contrast(draws, image, *contrast_range)
    image = _saturation(draws, image, *saturation_range)
    image = _hue(draws, image, hue_delta)
    if mode == 0:
        image = _contrast(draws, image, *contrast_range)
    return image


# ---------------------------------------------------------------------------------------------
# normalization and padding


def normalize(image_bgr: np.ndarray, mean: Sequence[float] = IMG_MEAN, std: Sequence[float] = IMG_STD) -> np.ndarray:
    """mmcv's ``imnormalize(to_rgb=True)``: float32 RGB ``(x - mean) * (1 / std)``, with the config's
    float32 mean and std, OpenCV doing the arithmetic (in double, rounded once to float32)."""
    image = np.ascontiguousarray(image_bgr).astype(np.float32)
    mean64 = np.float64(np.asarray(mean, dtype=np.float32).reshape(1, -1))
    stdinv = 1 / np.float64(np.asarray(std, dtype=np.float32).reshape(1, -1))
    cv2.cvtColor(image, cv2.COLOR_BGR2RGB, image)
    cv2.subtract(image, mean64, image)
    cv2.multiply(image, stdinv, image)
    return image


def pad(image: np.ndarray, label: np.ndarray, size: Sequence[int], pad_val: float = 0,
        seg_pad_val: int = IGNORE_INDEX) -> Tuple[np.ndarray, np.ndarray]:
    """mmcv's ``impad(shape=size)``: constant padding at the bottom and right up to ``size`` (h, w)."""
    h, w = image.shape[:2]
    bottom, right = max(size[0] - h, 0), max(size[1] - w, 0)
    if not (bottom or right):
        return image, label
    return (cv2.copyMakeBorder(image, 0, bottom, 0, right, cv2.BORDER_CONSTANT, value=pad_val),
            cv2.copyMakeBorder(label, 0, bottom, 0, right, cv2.BORDER_CONSTANT, value=seg_pad_val))


# ---------------------------------------------------------------------------------------------
# the whole transform


def _check_pair(value: Sequence, name: str, kind: type) -> Tuple:
    allowed = (numbers.Real,) if kind is float else (numbers.Integral,)
    if (not isinstance(value, (list, tuple)) or len(value) != 2
            or not all(isinstance(v, allowed) and not isinstance(v, (bool, np.bool_)) and v > 0 for v in value)):
        example = "(0.5, 2.0)" if kind is float else "(512, 1024)"
        raise PspZooError(f"{name} must be two positive {kind.__name__}s like {example}, got {value!r}")
    return tuple(kind(v) for v in value)


def check_pair(image: np.ndarray, label: np.ndarray) -> None:
    """Refuse what a training transform cannot take: an H x W x 3 uint8 BGR image, its H x W uint8 label."""
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise PspZooError(f"expected an H x W x 3 uint8 BGR image, got {image.dtype} {image.shape}")
    if label.shape != image.shape[:2] or label.dtype != np.uint8:
        raise PspZooError(f"expected an H x W uint8 label of the image's size {image.shape[:2]}, "
                          f"got {label.dtype} {label.shape}")


@dataclass(frozen=True)
class TrainTransform:
    """One training sample as the published recipes made it.

    ``crop_size`` is (h, w); ``img_scale`` is (long, short), the dataset's training scale, or None to
    scale the image's own size; ``ratio_range`` None resizes to ``img_scale`` exactly (no draw).
    Called with a BGR uint8 H x W x 3 image, its uint8 H x W label (``reduce_zero_label`` already
    applied by the reader) and a numpy generator; returns a float32 3 x h x w normalized RGB image and
    an int64 h x w label, both padded to ``crop_size`` (image 0, label ``seg_pad_val``).
    ``ignore_index`` is the dataset's (its declaration's ``ignore_index``, 255 by default): the 75%
    rule does not count it, and the label is padded with it unless ``seg_pad_val`` says otherwise.
    """

    crop_size: Tuple[int, int]
    img_scale: Optional[Tuple[int, int]]
    ratio_range: Optional[Tuple[float, float]] = (0.5, 2.0)
    cat_max_ratio: float = 0.75
    flip_prob: float = 0.5
    photometric: bool = True
    mean: Tuple[float, float, float] = IMG_MEAN
    std: Tuple[float, float, float] = IMG_STD
    pad_val: float = 0
    seg_pad_val: Optional[int] = None  # None: the ignore index
    ignore_index: int = IGNORE_INDEX

    def __post_init__(self):
        set_ = object.__setattr__  # frozen: normalize the fields once, here
        if self.seg_pad_val is None:
            set_(self, "seg_pad_val", self.ignore_index)
        set_(self, "crop_size", _check_pair(self.crop_size, "crop_size", int))
        if self.img_scale is not None:
            set_(self, "img_scale", _check_pair(self.img_scale, "img_scale", int))
        if self.ratio_range is not None:
            set_(self, "ratio_range", _check_pair(self.ratio_range, "ratio_range", float))
            if self.ratio_range[0] > self.ratio_range[1]:
                raise PspZooError(f"ratio_range must be (min, max) with min <= max, got {self.ratio_range}")
        elif self.img_scale is None:
            raise PspZooError("a fixed resize (ratio_range None) needs an img_scale (long, short)")
        if not 0 < self.cat_max_ratio <= 1:
            raise PspZooError(f"cat_max_ratio must be in (0, 1] (1 = no check), got {self.cat_max_ratio!r}")
        if not 0 <= self.flip_prob <= 1:
            raise PspZooError(f"flip_prob must be a probability in [0, 1], got {self.flip_prob!r}")

    def geometric(self, image: np.ndarray, label: np.ndarray, draws: Draws) -> Tuple[np.ndarray, np.ndarray]:
        """Resize, crop and flip (uint8 in, uint8 out, still BGR and unpadded)."""
        if self.ratio_range is None:
            scale = self.img_scale
        else:
            scale = random_scale(draws, self.img_scale, self.ratio_range, image.shape[:2])
        image, label = resize(image, label, scale)
        image, label = random_crop(draws, image, label, self.crop_size, self.cat_max_ratio, self.ignore_index)
        return random_flip(draws, image, label, self.flip_prob)

    def __call__(self, image: np.ndarray, label: np.ndarray, rng: Rng) -> Tuple[np.ndarray, np.ndarray]:
        check_pair(image, label)
        draws = Draws(rng)
        image, label = self.geometric(image, label, draws)
        if self.photometric:
            image = photometric_distortion(draws, np.ascontiguousarray(image))
        image, label = pad(normalize(image, self.mean, self.std), np.ascontiguousarray(label), self.crop_size,
                           self.pad_val, self.seg_pad_val)
        return np.ascontiguousarray(image.transpose(2, 0, 1)), label.astype(np.int64)
