"""The training transform against docs/reference.md, "Training as published" (mmseg 0.30.0 / mmcv 1.x), step by step.

Random draws are checked through numpy RandomState subclasses that record (or script) every call,
so the order and the arguments of mmseg's ``np.random`` calls are asserted, not just their effect.
"""
from __future__ import annotations

import cv2
import numpy as np
import pytest

from psp_zoo.errors import PspZooError
from psp_zoo.training.pipeline import (
    Draws,
    TrainTransform,
    crop_is_acceptable,
    normalize,
    pad,
    photometric_distortion,
    random_crop,
    random_flip,
    random_scale,
    resize,
    sample_rng,
)

MEAN_BGR = np.array([103.53, 116.28, 123.675])
STD_BGR = np.array([57.375, 57.12, 58.395])


class Recorder(np.random.RandomState):
    """A real RandomState that logs each legacy call as (name, args, value)."""

    def __init__(self, seed):
        super().__init__(seed)
        self.calls = []

    def _log(self, name, args, value):
        self.calls.append((name, args, value))
        return value

    def random_sample(self, *args):
        return self._log("random", args, super().random_sample(*args))

    def randint(self, *args):
        return self._log("randint", args, super().randint(*args))

    def uniform(self, *args):
        return self._log("uniform", args, super().uniform(*args))


class Scripted(Recorder):
    """Returns scripted values per call kind (in order) and logs the calls."""

    def __init__(self, random=(), randint=(), uniform=()):
        super().__init__(0)
        self.script = {"random": list(random), "randint": list(randint), "uniform": list(uniform)}

    def random_sample(self, *args):
        return self._log("random", args, self.script["random"].pop(0))

    def randint(self, *args):
        return self._log("randint", args, self.script["randint"].pop(0))

    def uniform(self, *args):
        return self._log("uniform", args, self.script["uniform"].pop(0))


def _blocks(h, w, block, classes, seed=0):
    """A label of ``block`` x ``block`` squares of random classes and the BGR image painting each class
    in its own colour: the image's colour says which label it must sit on."""
    rng = np.random.default_rng(seed)
    grid = rng.integers(0, classes, (-(-h // block), -(-w // block)))
    label = np.kron(grid, np.ones((block, block), dtype=np.int64))[:h, :w].astype(np.uint8)
    colours = np.array([[40 + 30 * c, 200 - 25 * c, 90 + 50 * (c % 3)] for c in range(classes)], dtype=np.uint8)
    return colours[label], label, colours


# ---------------------------------------------------------------------------------------------
# resize


def test_resize_ratio_and_size_follow_the_documented_formula():
    draws = Draws(Scripted(random=[0.5]))
    # r = 0.5 * 1.5 + 0.5 = 1.25: target (2560, 640); 100 x 150 image: sf = min(2560/150, 640/100) = 6.4
    assert random_scale(draws, (2048, 512), (0.5, 2.0), (100, 150)) == (2560, 640)
    image, label = resize(np.zeros((100, 150, 3), np.uint8), np.zeros((100, 150), np.uint8), (2560, 640))
    assert image.shape == (640, 960, 3) and label.shape == (640, 960)
    # truncation of the target, int(x + 0.5) of the size: r = 0.7 * 1.5 + 0.5 = 1.55
    assert random_scale(Draws(Scripted(random=[0.7])), (2048, 1024), (0.5, 2.0), (0, 0)) == (3174, 1587)
    for u, (h, w) in [(0.0, (1024, 2048)), (0.123, (375, 500)), (0.999, (500, 333)), (0.41, (7, 9))]:
        long_, short = random_scale(Draws(Scripted(random=[u])), (2048, 512), (0.5, 2.0), (h, w))
        ratio = u * 1.5 + 0.5
        assert (long_, short) == (int(2048 * ratio), int(512 * ratio))
        sf = min(long_ / max(h, w), short / min(h, w))
        image, label = resize(np.zeros((h, w, 3), np.uint8), np.zeros((h, w), np.uint8), (long_, short))
        assert image.shape[:2] == label.shape == (int(h * sf + 0.5), int(w * sf + 0.5))


def test_resize_is_bilinear_for_the_image_and_nearest_for_the_label():
    image = np.random.default_rng(1).integers(0, 256, (30, 40, 3), dtype=np.uint8)
    label = np.random.default_rng(2).integers(0, 5, (30, 40), dtype=np.uint8)
    out_image, out_label = resize(image, label, (100, 45))  # sf = min(100/40, 45/30) = 1.5 -> 45 x 60
    assert np.array_equal(out_image, cv2.resize(image, (60, 45), interpolation=cv2.INTER_LINEAR))
    assert np.array_equal(out_label, cv2.resize(label, (60, 45), interpolation=cv2.INTER_NEAREST))
    assert set(np.unique(out_label)) <= set(np.unique(label))  # nearest never invents a class


def test_without_img_scale_the_ratio_scales_the_image_itself():
    assert random_scale(Draws(Scripted(random=[0.0])), None, (0.5, 2.0), (100, 60)) == (30, 50)


# ---------------------------------------------------------------------------------------------
# crop: the 75% rule


def test_the_75_percent_rule_on_labels():
    def lab(*counts):
        return np.concatenate([np.full(n, v, np.uint8) for v, n in counts])

    assert not crop_is_acceptable(lab((3, 100)), 0.75)  # one class
    assert not crop_is_acceptable(lab((1, 75), (2, 25)), 0.75)  # exactly 75%: not below
    assert crop_is_acceptable(lab((1, 74), (2, 26)), 0.75)
    assert not crop_is_acceptable(lab((0, 3), (1, 1), (255, 500)), 0.75)  # 255 is not counted
    assert crop_is_acceptable(lab((0, 2), (1, 1), (255, 500)), 0.75)
    assert not crop_is_acceptable(lab((255, 50)), 0.75)
    assert not crop_is_acceptable(lab((0, 2), (255, 900)), 0.75)  # one class besides 255
    rng = np.random.default_rng(8)
    for _ in range(300):  # uint8 labels are counted without np.unique: the same verdicts as mmseg's code
        label = rng.choice([0, 3, 7, 255], size=rng.integers(1, 60), p=rng.dirichlet([1, 1, 1, 1])).astype(np.uint8)
        values, counts = np.unique(label, return_counts=True)
        counts = counts[values != 255]
        mmseg = len(counts) > 1 and np.max(counts) / np.sum(counts) < 0.75
        assert crop_is_acceptable(label, 0.75) == mmseg == crop_is_acceptable(label.astype(np.int64), 0.75)


def test_a_rejected_box_is_redrawn_top_then_left():
    label = np.zeros((40, 60), np.uint8)
    label[:, 30:] = 1  # a 20 x 20 box is mixed only when it straddles column 30
    image = np.dstack([label * 100] * 3).astype(np.uint8)
    rng = Scripted(randint=[5, 0, 12, 21])  # box 1 (5, 0): all class 0; box 2 (12, 21): 9 + 11 columns
    out_image, out_label = random_crop(Draws(rng), image, label, (20, 20), 0.75)
    assert [c[1] for c in rng.calls] == [(0, 21), (0, 41), (0, 21), (0, 41)]
    assert np.array_equal(out_label, label[12:32, 21:41]) and np.array_equal(out_image, image[12:32, 21:41])


def test_after_ten_rejections_the_eleventh_box_is_used_unchecked():
    label = np.zeros((40, 60), np.uint8)  # no box can pass
    offsets = [(i, 2 * i) for i in range(11)]
    rng = Scripted(randint=[v for box in offsets for v in box])
    _, out_label = random_crop(Draws(rng), np.zeros((40, 60, 3), np.uint8), label, (20, 20), 0.75)
    assert len(rng.calls) == 22 and rng.script["randint"] == []
    recorded = Recorder(3)
    label[:, 30:] = 1
    label[np.arange(40), 30] = 255
    random_crop(Draws(recorded), np.zeros((40, 60, 3), np.uint8), np.zeros((40, 60), np.uint8), (20, 20), 0.75)
    assert len(recorded.calls) == 22
    top, left = recorded.calls[-2][2], recorded.calls[-1][2]  # the 11th box
    assert np.array_equal(random_crop(Draws(Scripted(randint=[v for _ in range(11) for v in (top, left)])),
                                      label, label, (20, 20), 0.75)[1], label[top:top + 20, left:left + 20])


def test_cat_max_ratio_one_checks_nothing_and_a_small_image_is_clipped():
    rng = Scripted(randint=[0, 0])
    image, label = random_crop(Draws(rng), np.ones((10, 12, 3), np.uint8), np.zeros((10, 12), np.uint8),
                               (20, 30), 1.0)
    assert rng.calls == [("randint", (0, 1), 0), ("randint", (0, 1), 0)]  # margins 0: one value each
    assert image.shape == (10, 12, 3) and label.shape == (10, 12)


# ---------------------------------------------------------------------------------------------
# flip, photometric distortion


def test_flip_mirrors_image_and_label_together():
    image, label, _ = _blocks(12, 20, 3, 4)
    flipped_image, flipped_label = random_flip(Draws(Scripted(random=[0.49])), image, label, 0.5)
    assert np.array_equal(flipped_image, image[:, ::-1]) and np.array_equal(flipped_label, label[:, ::-1])
    same_image, same_label = random_flip(Draws(Scripted(random=[0.5])), image, label, 0.5)
    assert same_image is image and same_label is label
    rng = Scripted(random=[0.0])
    random_flip(Draws(rng), image, label, 0.0)  # prob 0 never flips but still draws, as mmseg
    assert len(rng.calls) == 1


def test_brightness_and_contrast_clip_and_truncate_to_uint8():
    image = np.array([[[0, 101, 250]]], np.uint8)
    # brightness on (+20.7), mode 1, contrast on (x 1.5), saturation off, hue off
    rng = Scripted(randint=[1, 1, 1, 0, 0], uniform=[20.7, 1.5])
    out = photometric_distortion(Draws(rng), image)
    # 20.7 -> 20 and 121.7 -> 121 (truncated, not rounded), 270.7 -> 255; then 30, 181.5 -> 181, 255
    assert out.tolist() == [[[30, 181, 255]]]
    assert [c[:2] for c in rng.calls] == [("randint", (0, 2)), ("uniform", (-32, 32)), ("randint", (0, 2)),
                                          ("randint", (0, 2)), ("uniform", (0.5, 1.5)), ("randint", (0, 2)),
                                          ("randint", (0, 2))]
    darker = photometric_distortion(Draws(Scripted(randint=[1, 0, 0, 0, 0], uniform=[-20.7])), image)
    assert darker.tolist() == [[[0, 80, 229]]]  # 0 - 20.7 clipped to 0, 80.3 -> 80, 229.3 -> 229


def test_contrast_comes_last_in_mode_zero():
    image = np.array([[[10, 100, 200]]], np.uint8)
    # brightness off, mode 0, saturation off, hue off, contrast on (x 0.5)
    rng = Scripted(randint=[0, 0, 0, 0, 1], uniform=[0.5])
    assert photometric_distortion(Draws(rng), image).tolist() == [[[5, 50, 100]]]
    assert [c[:2] for c in rng.calls][-2:] == [("randint", (0, 2)), ("uniform", (0.5, 1.5))]


def test_saturation_scales_opencv_hsv_s_with_truncation():
    image = np.random.default_rng(4).integers(0, 256, (8, 9, 3), dtype=np.uint8)
    out = photometric_distortion(Draws(Scripted(randint=[0, 0, 1, 0, 0], uniform=[1.37])), image)
    hsv = cv2.cvtColor(image, cv2.COLOR_BGR2HSV)
    hsv[:, :, 1] = np.clip(hsv[:, :, 1].astype(np.float32) * np.float32(1.37), 0, 255).astype(np.uint8)
    assert np.array_equal(out, cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR))
    grey = np.full((2, 2, 3), 128, np.uint8)  # S = 0 stays 0: grey stays grey
    assert np.array_equal(photometric_distortion(Draws(Scripted(randint=[0, 0, 1, 0, 0], uniform=[1.5])), grey), grey)


def test_hue_shifts_opencv_h_modulo_180():
    red, blue = np.array([[[0, 0, 255]]], np.uint8), np.array([[[255, 0, 0]]], np.uint8)
    assert cv2.cvtColor(blue, cv2.COLOR_BGR2HSV)[0, 0, 0] == 120  # OpenCV's H: degrees / 2, 0..179
    rng = Scripted(randint=[0, 0, 0, 1, -18, 0])  # hue on, shift -18: H 0 -> 162
    shifted = photometric_distortion(Draws(rng), red)
    assert ("randint", (-18, 18), -18) in rng.calls  # numpy's randint: -18..17
    assert cv2.cvtColor(shifted, cv2.COLOR_BGR2HSV)[0, 0, 0] == 162
    expected = cv2.cvtColor(np.array([[[162, 255, 255]]], np.uint8), cv2.COLOR_HSV2BGR)
    assert np.array_equal(shifted, expected)


def test_photometric_draws_stay_in_their_ranges():
    rng = Recorder(11)
    image = np.random.default_rng(5).integers(0, 256, (4, 4, 3), dtype=np.uint8)
    for _ in range(300):
        photometric_distortion(Draws(rng), image)
    values = {args: [v for name, a, v in rng.calls if a == args] for _, args, _ in rng.calls}
    assert set(values) == {(0, 2), (-32, 32), (0.5, 1.5), (-18, 18)}
    assert set(values[(0, 2)]) == {0, 1}
    assert -32 <= min(values[(-32, 32)]) < -25 and 25 < max(values[(-32, 32)]) < 32
    assert 0.5 <= min(values[(0.5, 1.5)]) and max(values[(0.5, 1.5)]) < 1.5
    assert min(values[(-18, 18)]) == -18 and max(values[(-18, 18)]) == 17


# ---------------------------------------------------------------------------------------------
# normalize, pad, the whole transform


def test_normalize_is_mmcv_imnormalize_and_pad_fills_bottom_right():
    image = np.random.default_rng(6).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    out = normalize(image)
    expected = ((image.astype(np.float64) - MEAN_BGR) / STD_BGR)[:, :, ::-1]
    assert out.dtype == np.float32 and np.abs(out - expected).max() <= 1e-6 * np.abs(expected).max()
    padded, label = pad(out, np.ones((5, 7), np.uint8), (8, 10))
    assert padded.shape == (8, 10, 3) and label.shape == (8, 10)
    assert np.array_equal(padded[:5, :7], out) and not padded[5:].any() and not padded[:, 7:].any()
    assert (label[5:] == 255).all() and (label[:, 7:] == 255).all() and (label[:5, :7] == 1).all()


def test_output_crop_and_padding_are_exact():
    image, label, _ = _blocks(40, 50, 5, 3)
    transform = TrainTransform(crop_size=(64, 96), img_scale=(50, 40), ratio_range=(1.0, 1.0),
                               flip_prob=0.0, photometric=False)
    out_image, out_label = transform(image, label, sample_rng(0, 0, 0))
    assert out_image.shape == (3, 64, 96) and out_image.dtype == np.float32
    assert out_label.shape == (64, 96) and out_label.dtype == np.int64
    assert not out_image[:, 40:].any() and not out_image[:, :, 50:].any()  # 0 after normalization
    assert (out_label[40:] == 255).all() and (out_label[:, 50:] == 255).all()
    assert np.array_equal(out_label[:40, :50], label)
    assert np.array_equal(out_image[:, :40, :50], normalize(image).transpose(2, 0, 1))


def _expected_photometric_calls(values):
    """The calls mmseg's PhotoMetricDistortion makes, given what its draws returned (in order)."""
    expected, returned = [], iter(values)

    def maybe(args, kind="uniform"):
        expected.append(("randint", (0, 2)))
        if next(returned) == 1:
            expected.append((kind, args))
            next(returned)

    maybe((-32, 32))  # brightness
    expected.append(("randint", (0, 2)))
    mode = next(returned)
    if mode == 1:
        maybe((0.5, 1.5))  # contrast first
    maybe((0.5, 1.5))  # saturation
    maybe((-18, 18), "randint")  # hue
    if mode == 0:
        maybe((0.5, 1.5))  # contrast last
    return expected


def test_the_transform_draws_in_mmseg_order():
    image, label, _ = _blocks(60, 80, 10, 4, seed=3)
    label[:, :50] = 0  # many boxes fail the rule, some pass
    retried = 0
    for seed in range(40):
        rng = Recorder(seed)
        TrainTransform(crop_size=(32, 48), img_scale=(80, 60))(image, label, rng)
        calls = [(name, args) for name, args, _ in rng.calls]
        values = [value for _, _, value in rng.calls]
        assert calls[0] == ("random", ())  # the resize ratio
        scale = (int(80 * (values[0] * 1.5 + 0.5)), int(60 * (values[0] * 1.5 + 0.5)))
        resized = resize(image, label, scale)[1]
        flip = calls.index(("random", ()), 1)
        boxes = [(values[i], values[i + 1]) for i in range(1, flip, 2)]
        margins = (max(resized.shape[0] - 32, 0) + 1, max(resized.shape[1] - 48, 0) + 1)
        assert calls[1:flip] == [("randint", (0, margins[0])), ("randint", (0, margins[1]))] * len(boxes)
        checks = [crop_is_acceptable(resized[t:t + 32, left:left + 48], 0.75) for t, left in boxes]
        assert 1 <= len(boxes) <= 11 and not any(checks[:-1])
        assert checks[-1] or len(boxes) == 11
        retried += len(boxes) > 1
        assert calls[flip + 1:] == _expected_photometric_calls(values[flip + 1:])
    assert retried >= 5


def test_label_and_image_stay_aligned_through_every_step():
    image, label, colours = _blocks(90, 120, 16, 5, seed=7)
    label[:3] = 255  # an ignored band travels with the image too
    image[:3] = (7, 7, 7)
    for sample in range(40):
        transform = TrainTransform(crop_size=(48, 64), img_scale=(120, 90))
        draws = Draws(sample_rng(5, 1, sample))
        geo_image, geo_label = transform.geometric(image, label, draws)
        # interior pixels (constant label around them) carry exactly their class's colour
        pad_label = np.pad(geo_label.astype(np.int64), 2, constant_values=-1)
        windows = np.lib.stride_tricks.sliding_window_view(pad_label, (5, 5))
        interior = (windows == geo_label[:, :, None, None]).all(axis=(2, 3))
        assert interior.sum() > 0.3 * interior.size
        lut = np.vstack([colours, np.zeros((250, 3), np.uint8), [[7, 7, 7]]])  # 255 -> the band's colour
        assert np.array_equal(geo_image[interior], lut[geo_label[interior]])
        out_image, out_label = transform(image, label, sample_rng(5, 1, sample))
        h, w = geo_label.shape
        assert np.array_equal(out_label[:h, :w], geo_label)
        # then only per-pixel steps, in place: the rest of the output is photometric + normalize of that crop
        expected = normalize(photometric_distortion(draws, np.ascontiguousarray(geo_image))).transpose(2, 0, 1)
        assert np.array_equal(out_image[:, :h, :w], expected)
        for c in np.unique(geo_label[interior]):
            # one colour per class still (OpenCV's vectorized HSV conversion and its scalar tail may
            # differ by one level, so a class's colour may spread by a level or two)
            pixels = out_image[:, :h, :w].transpose(1, 2, 0)[interior & (geo_label == c)]
            assert np.ptp(pixels, axis=0).max() <= 3 / 57.12 + 1e-6


def test_flipped_samples_mirror_the_unflipped_ones():
    image, label, _ = _blocks(50, 70, 7, 4, seed=9)
    transform = TrainTransform(crop_size=(50, 70), img_scale=(70, 50), ratio_range=(1.0, 1.0), cat_max_ratio=1.0,
                               photometric=False)
    outputs = [transform(image, label, sample_rng(0, 0, s)) for s in range(16)]
    flipped = [o for o in outputs if np.array_equal(o[1], label[:, ::-1])]
    kept = [o for o in outputs if np.array_equal(o[1], label)]
    assert flipped and kept and len(flipped) + len(kept) == 16
    assert np.array_equal(flipped[0][0], kept[0][0][:, :, ::-1])


def test_the_same_key_gives_the_same_sample_and_keys_differ():
    image, label, _ = _blocks(80, 100, 8, 4, seed=2)
    transform = TrainTransform(crop_size=(40, 40), img_scale=(100, 80))
    first = transform(image, label, sample_rng(3, 10, 2))
    again = transform(image, label, sample_rng(3, 10, 2))
    assert np.array_equal(first[0], again[0]) and np.array_equal(first[1], again[1])
    others = [transform(image, label, sample_rng(*key)) for key in ((4, 10, 2), (3, 11, 2), (3, 10, 3))]
    assert all(not np.array_equal(first[0], other[0]) for other in others)


def test_bad_parameters_and_inputs_are_refused():
    with pytest.raises(PspZooError, match="crop_size"):
        TrainTransform(crop_size=(0, 10), img_scale=(10, 10))
    with pytest.raises(PspZooError, match="crop_size"):
        TrainTransform(crop_size=(8.5, 10), img_scale=(10, 10))
    numpy_fields = TrainTransform(crop_size=np.array([8, 9]).tolist(), img_scale=tuple(np.array([10, 12])),
                                  ratio_range=(np.float32(0.5), 2))
    assert numpy_fields.crop_size == (8, 9) and numpy_fields.img_scale == (10, 12)
    assert numpy_fields.ratio_range == (0.5, 2.0) and type(numpy_fields.img_scale[0]) is int
    with pytest.raises(PspZooError, match="ratio_range"):
        TrainTransform(crop_size=(8, 8), img_scale=(10, 10), ratio_range=(2.0, 0.5))
    with pytest.raises(PspZooError, match="cat_max_ratio"):
        TrainTransform(crop_size=(8, 8), img_scale=(10, 10), cat_max_ratio=0)
    with pytest.raises(PspZooError, match="img_scale"):
        TrainTransform(crop_size=(8, 8), img_scale=None, ratio_range=None)
    transform = TrainTransform(crop_size=(8, 8), img_scale=(10, 10))
    with pytest.raises(PspZooError, match="uint8 BGR image"):
        transform(np.zeros((10, 10), np.uint8), np.zeros((10, 10), np.uint8), sample_rng(0, 0, 0))
    with pytest.raises(PspZooError, match="label"):
        transform(np.zeros((10, 10, 3), np.uint8), np.zeros((10, 9), np.uint8), sample_rng(0, 0, 0))
    with pytest.raises(PspZooError, match="iteration"):
        sample_rng(0, -1, 0)
    with pytest.raises(TypeError, match="Generator or RandomState"):
        Draws(np.random)
