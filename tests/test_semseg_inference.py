"""The PSPNet authors' test protocol (hszhao/semseg tool/test.py) against an independent
re-statement of it written here, on odd image sizes with narrow models; then evaluate and predict
of a 'semseg'-mode entry through a user manifest and generated data, and reproduce's two passes."""
from __future__ import annotations

import math

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from psp_zoo import ConfusionMatrix, evaluate, reproduce
from psp_zoo.cli import main
from psp_zoo.evaluation.measure import SEMSEG_CALL
from psp_zoo.evaluation.semseg_inference import (
    SEMSEG_MEAN,
    SEMSEG_MS_SCALES,
    labels_of_image,
    normalize,
    pad_to_crop,
    resize_probs,
    scale_probs,
    scaled_size,
    semseg_labels,
    semseg_probs,
    window_grid,
    window_probs,
    window_stride,
)
from psp_zoo.hub.options import FetchOptions, SpeedOptions
from psp_zoo.manifest import EvalSettings
from psp_zoo.prediction import Predictor
from psp_zoo.testing import TINY_SEMSEG_ARCH, manifest_entry, tiny_semseg_model, write_manifest, write_semseg_checkpoint

import minidata
from helpers import assert_close_to_scale, tiny_checkpoint_path, tiny_info, tiny_model, write_tiny_ade_manifest

pytestmark = pytest.mark.usefixtures("single_thread")

MEAN = np.array([0.485, 0.456, 0.406]) * 255
STD = np.array([0.229, 0.224, 0.225]) * 255
TOL = 1e-6  # of the probabilities' scale (1): float32 softmax, float64 sums


class Probe(nn.Module):
    """A 3x3 convolution plus a horizontal ramp (so a flip that is not undone changes the output),
    remembering every batch it sees. ``eighth``: logits of (h - 1) / 8 + 1 rows and columns, as a
    network before its x8 upsampling, which the protocol resizes to the window."""

    def __init__(self, classes: int = 5, eighth: bool = False, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(3, classes, 3, padding=1)
        self.ramp = nn.Parameter(torch.randn(classes, 1, 1))
        self.eighth, self.calls = eighth, []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append(x.clone())
        columns = torch.linspace(0, 1, x.shape[3]).view(1, 1, 1, -1)
        out = self.conv(x) + self.ramp * columns
        return out[:, :, ::8, ::8] if self.eighth else out


# --------------------------------------------------------------------------------------------
# the re-statement: the authors' steps, one window and one channel group at a time


def _starts(side: int, crop: int, stride: int) -> list:
    """Window starts along one axis: every stride while a full window fits short of the end,
    then one window flush with the end."""
    return list(range(0, side - crop, stride)) + [side - crop]


def _their_window(model, window: np.ndarray, flip: bool = True) -> np.ndarray:
    """h x w x C: normalized window and its mirror through the model, softmax, mean."""
    x = torch.from_numpy(((window - MEAN.astype(np.float32)) / STD.astype(np.float32)).transpose(2, 0, 1).copy())
    batch = torch.stack([x, x.flip(2) if flip else x])
    with torch.no_grad():
        out = model(batch)
        if out.shape[2:] != batch.shape[2:]:
            out = F.interpolate(out, size=batch.shape[2:], mode="bilinear", align_corners=True)
        probs = out.softmax(1)
    return ((probs[0] + probs[1].flip(2)) / 2).numpy().transpose(1, 2, 0)


def their_probs(model, image: np.ndarray, base: int, crop: int, scales, classes: int, flip: bool = True) -> np.ndarray:
    image = image.astype(np.float32)
    h, w = image.shape[:2]
    total = np.zeros((h, w, classes))
    for s in scales:
        long_side = round(s * base)
        size = (long_side, round(long_side * w / float(h))) if h > w else (round(long_side * h / float(w)), long_side)
        scaled = cv2.resize(image, size[::-1], interpolation=cv2.INTER_LINEAR)
        sh, sw = scaled.shape[:2]
        ph, pw = max(crop - sh, 0), max(crop - sw, 0)
        padded = np.empty((sh + ph, sw + pw, 3), np.float32)
        padded[:] = MEAN.astype(np.float32)
        padded[ph // 2:ph // 2 + sh, pw // 2:pw // 2 + sw] = scaled
        stride = math.ceil(crop * 2 / 3)
        sums, count = np.zeros(padded.shape[:2] + (classes,)), np.zeros(padded.shape[:2] + (1,))
        for y in _starts(padded.shape[0], crop, stride):
            for x in _starts(padded.shape[1], crop, stride):
                sums[y:y + crop, x:x + crop] += _their_window(model, padded[y:y + crop, x:x + crop], flip)
                count[y:y + crop, x:x + crop] += 1
        mean = (sums / count)[ph // 2:ph // 2 + sh, pw // 2:pw // 2 + sw]
        for lo in range(0, classes, 100):  # OpenCV 5 takes at most 128 channels at once
            part = np.ascontiguousarray(mean[:, :, lo:lo + 100])
            total[:, :, lo:lo + 100] += cv2.resize(part, (w, h), interpolation=cv2.INTER_LINEAR).reshape(h, w, -1)
    return total / len(scales)


def _image(h: int, w: int, seed: int = 0) -> np.ndarray:
    coarse = np.random.default_rng(seed).integers(0, 256, (3, 4, 3), dtype=np.uint8)
    return cv2.resize(coarse, (w, h), interpolation=cv2.INTER_CUBIC)


# --------------------------------------------------------------------------------------------
# the steps


def test_sizes_per_scale_follow_their_rounding():
    # portrait, odd: the long side is round(s x base), the short one in proportion
    assert [scaled_size(31, 23, 40, s) for s in SEMSEG_MS_SCALES] == \
        [(20, 15), (30, 22), (40, 30), (50, 37), (60, 45), (70, 52)]
    assert scaled_size(23, 31, 40, 1.0) == (30, 40)  # landscape
    assert scaled_size(20, 20, 40, 0.75) == (30, 30)  # square: both sides long
    assert scaled_size(375, 500, 512, 1.0) == (384, 512)  # an ADE20K image
    assert scaled_size(1024, 2048, 2048, 1.75) == (1792, 3584)  # Cityscapes, multi-scale
    # Python's round: halves go to the even neighbour (int(x + 0.5) would give 23 and 13)
    assert scaled_size(31, 23, 45, 0.5)[0] == 22
    assert scaled_size(5, 16, 40, 1.0) == (12, 40)


def test_padding_is_the_mean_centred_half_before():
    assert SEMSEG_MEAN == pytest.approx((123.675, 116.28, 103.53), rel=1e-12)  # RGB, 255 x ImageNet's
    image = np.full((5, 7, 3), 9.0, dtype=np.float32)
    padded, (top, left) = pad_to_crop(image, (9, 12))
    assert padded.shape == (9, 12, 3) and padded.dtype == np.float32 and (top, left) == (2, 2)
    inside = np.zeros((9, 12), bool)
    inside[2:7, 2:9] = True  # 4 rows: 2 before, 2 after; 5 columns: 2 before, 3 after
    assert (padded[inside] == 9.0).all()
    np.testing.assert_array_equal(padded[~inside], np.broadcast_to(MEAN.astype(np.float32), ((~inside).sum(), 3)))
    # only a side shorter than the crop is padded; an image as large as the crop is left alone
    tall, (top, left) = pad_to_crop(np.zeros((20, 4, 3), np.float32), (9, 9))
    assert tall.shape == (20, 9, 3) and (top, left) == (0, 2)
    big = np.zeros((10, 10, 3), np.float32)
    same, offset = pad_to_crop(big, (9, 9))
    assert same is big and offset == (0, 0)
    # normalized, the padding is exactly zero
    assert (normalize(padded)[:, ~torch.from_numpy(inside)] == 0).all()


def test_window_grid_on_odd_sizes():
    assert window_stride((473, 473)) == (316, 316) and window_stride((713, 713)) == (476, 476)
    assert window_stride((17, 25)) == (12, 17)
    windows = window_grid(37, 50, (17, 17))
    rows, cols = [0, 12, 20], [0, 12, 24, 33]  # ceil(20 / 12) + 1 and ceil(33 / 12) + 1, last flush
    assert windows == [(y, y + 17, x, x + 17) for y in rows for x in cols]
    assert window_grid(17, 17, (17, 17)) == [(0, 17, 0, 17)]
    assert window_grid(17, 30, (17, 25)) == [(0, 17, 0, 25), (0, 17, 5, 30)]
    with pytest.raises(ValueError, match="pad it first"):
        window_grid(16, 30, (17, 17))


def test_each_window_runs_with_its_flip_and_at_its_place():
    model = Probe()
    image = _image(29, 40).astype(np.float32)
    probs = scale_probs(model, image, (17, 17), device="cpu", batch_size=1)
    padded, _ = pad_to_crop(image, (17, 17))
    expected = normalize(padded)
    boxes = [(y, y + 17, x, x + 17) for y in (0, 12) for x in (0, 12, 23)]
    assert len(model.calls) == len(boxes)
    for batch, (y1, y2, x1, x2) in zip(model.calls, boxes):
        assert batch.shape == (2, 3, 17, 17)
        torch.testing.assert_close(batch[0], expected[:, y1:y2, x1:x2], rtol=0, atol=0)
        torch.testing.assert_close(batch[1], batch[0].flip(2), rtol=0, atol=0)
    assert probs.shape == (5, 29, 40) and probs.dtype == torch.float64
    # batched windows: each call holds the windows then their flips
    model.calls.clear()
    batched = scale_probs(model, image, (17, 17), device="cpu", batch_size=4)
    assert [len(batch) for batch in model.calls] == [8, 4]
    torch.testing.assert_close(model.calls[0][4:], model.calls[0][:4].flip(3), rtol=0, atol=0)
    assert_close_to_scale(batched, probs, TOL)


def test_windows_are_averaged_by_count():
    class WindowMean(nn.Module):  # logits constant over a window: (mean of the window, 0)
        def forward(self, x):
            return torch.stack([x.mean(dim=(1, 2, 3)), torch.zeros(len(x))], 1)[:, :, None, None].expand(
                -1, -1, *x.shape[2:])

    image = _image(20, 44, seed=3).astype(np.float32)
    probs = scale_probs(WindowMean(), image, (20, 20), device="cpu")
    inputs = normalize(image)
    starts = [0, 14, 24]  # stride 14, last flush at 44 - 20
    p = [torch.sigmoid(inputs[:, :, x:x + 20].mean().double()).item() for x in starts]
    # columns 0-13: window 1 alone; 14-19: windows 1 and 2; 20-23: 2; 24-33: 2 and 3; 34-43: 3
    expected = [p[0]] * 14 + [(p[0] + p[1]) / 2] * 6 + [p[1]] * 4 + [(p[1] + p[2]) / 2] * 10 + [p[2]] * 10
    assert_close_to_scale(probs[0, 7], torch.tensor(expected, dtype=torch.float64), TOL)


def test_window_probs_resizes_an_eighth_size_output_with_aligned_corners():
    model = Probe(eighth=True)
    crops = normalize(_image(25, 33).astype(np.float32))[None]
    probs = window_probs(model, crops)
    assert probs.shape == (1, 5, 25, 33)
    assert model.calls[0].shape == (2, 3, 25, 33)
    np.testing.assert_allclose(probs.sum(1).numpy(), 1, rtol=1e-6)
    expected = _their_window(model, _image(25, 33).astype(np.float32))
    assert_close_to_scale(probs[0].permute(1, 2, 0), torch.from_numpy(expected), TOL)


@pytest.mark.parametrize("size", [(31, 23), (23, 41), (20, 20)])
@pytest.mark.parametrize("scales", [(1.0,), SEMSEG_MS_SCALES], ids=["ss", "ms"])
def test_protocol_equals_the_restatement(size, scales):
    image = _image(*size, seed=sum(size))
    for model, crop in ((Probe(), 19), (Probe(eighth=True, seed=1), 25)):
        probs = semseg_probs(model, image, 40, (crop, crop), scales, device="cpu")
        assert probs.shape == (*size, 5) and probs.dtype == np.float64
        expected = their_probs(model, image, 40, crop, scales, 5)
        assert_close_to_scale(torch.from_numpy(probs), torch.from_numpy(expected), TOL)
        labels = semseg_labels(model, image, 40, (crop, crop), scales, device="cpu")
        agree = (labels == expected.argmax(2)).mean()
        assert agree >= 0.999, agree


def test_single_scale_is_flipped_too():
    """Their single scale averages each window with its flip: a model that is not mirror-symmetric
    gives other probabilities without it."""
    model, image = Probe(), _image(31, 23)
    probs = torch.from_numpy(semseg_probs(model, image, 40, (19, 19), (1.0,), device="cpu"))
    assert model.calls and all(len(batch) == 2 for batch in model.calls)
    assert_close_to_scale(probs, torch.from_numpy(their_probs(model, image, 40, 19, (1.0,), 5)), TOL)
    unflipped = torch.from_numpy(their_probs(model, image, 40, 19, (1.0,), 5, flip=False))
    assert (probs - unflipped).abs().max() > 100 * TOL


def test_channel_groups_equal_one_shot_resizes():
    rng = np.random.default_rng(0)
    probs = rng.random((13, 21, 128))
    one_shot = cv2.resize(probs, (37, 29), interpolation=cv2.INTER_LINEAR)
    np.testing.assert_array_equal(resize_probs(probs, (29, 37)), one_shot)  # one group
    np.testing.assert_array_equal(resize_probs(probs, (29, 37), max_channels=50), one_shot)  # 43 + 43 + 42
    # 150 classes (ADE20K): more than OpenCV 5 takes at once, every channel as resized on its own group
    ade = rng.random((13, 21, 150))
    with pytest.raises(cv2.error):
        cv2.resize(ade, (37, 29), interpolation=cv2.INTER_LINEAR)
    resized = resize_probs(ade, (29, 37))
    assert resized.shape == (29, 37, 150)
    for lo, hi in ((0, 100), (100, 150), (40, 128)):
        np.testing.assert_array_equal(resized[:, :, lo:hi],
                                      cv2.resize(np.ascontiguousarray(ade[:, :, lo:hi]), (37, 29),
                                                 interpolation=cv2.INTER_LINEAR))
    # shrinking as well as enlarging, and 19 / 21 classes (Cityscapes, VOC) in one go
    city = rng.random((40, 80, 19))
    np.testing.assert_array_equal(resize_probs(city, (17, 33)), cv2.resize(city, (33, 17)))


def test_labels_of_image_uses_the_settings_protocol():
    model = Probe()
    image = _image(31, 23)
    settings = EvalSettings(mode="semseg", img_scale=(2048, 512), align_corners=True, crop_size=(19, 19),
                            base_size=40)
    for ms in (False, True):
        labels = labels_of_image(model, image, settings, ms, device="cpu")
        assert labels.dtype == torch.int64 and labels.shape == (31, 23)
        np.testing.assert_array_equal(labels.numpy(), semseg_labels(model, image, 40, (19, 19),
                                                                    SEMSEG_MS_SCALES if ms else (1.0,)))
    with pytest.raises(ValueError, match="uint8"):
        labels_of_image(model, image.astype(np.float32), settings)


# --------------------------------------------------------------------------------------------
# wiring: a 'semseg'-mode entry of a user manifest, on generated ADE20K data

SEMSEG_TEST = "{mode: semseg, base_size: 48, crop_size: [33, 33], align_corners: true}"
NAME = "tiny_pspnet_r50-d8_ade20k"


@pytest.fixture(scope="module")
def ade(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data") / "ADEChallengeData2016"
    return folder, sorted(minidata.write_ade20k(folder))


@pytest.fixture
def manifest(tmp_path):
    return write_tiny_ade_manifest(tmp_path / "tiny.yml", SEMSEG_TEST)


def _rgb(path) -> np.ndarray:
    return cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)


@pytest.mark.parametrize("ms_flip", [False, True], ids=["ss", "ms"])
def test_evaluate_scores_a_semseg_entry_by_their_protocol(ade, manifest, ms_flip):
    folder, names = ade
    limit = 2 if ms_flip else None
    result = evaluate(NAME, folder, manifest=str(manifest), checkpoint=tiny_checkpoint_path("r50"), device="cpu",
                      num_workers=0, progress=False, ms_flip=ms_flip, limit=limit)
    # ADE20K labels as the authors' lists hold them: 0 (other) ignored, class k scored as k - 1
    model, metric = tiny_model("r50", align_corners=True), ConfusionMatrix(5)
    for name in names[:limit]:
        image = _rgb(folder / "images" / "validation" / f"{name}.jpg")
        probs = their_probs(model, image, 48, 33, SEMSEG_MS_SCALES if ms_flip else (1.0,), 5)
        label = np.array(Image.open(folder / "annotations" / "validation" / f"{name}.png")).astype(np.int64)
        metric.update(torch.from_numpy(probs.argmax(2)), torch.from_numpy(np.where(label == 0, 255, label - 1)))
    expected = metric.compute()
    metrics = result.ms_flip if ms_flip else result.single_scale
    assert metrics is not None and (result.single_scale is None) is ms_flip
    assert result.miou == pytest.approx(expected["mIoU"] * 100, abs=1e-9)
    assert result.aacc == pytest.approx(expected["aAcc"] * 100, abs=1e-9)
    for index, value in enumerate(expected["IoU"]):  # several classes predicted, each scored alike
        assert result.iou[str(index)] == pytest.approx(value * 100, abs=1e-9)
    test = result.settings["test"]
    assert (test["mode"], test["base_size"], test["crop_size"]) == ("semseg", 48, [33, 33])
    assert result.settings["ms_flip_ratios"] == (list(SEMSEG_MS_SCALES) if ms_flip else None)
    assert result.settings["reduce_zero_label"] is True


def test_predict_command_runs_their_protocol(manifest, tmp_path, capsys):
    image = _image(31, 23, seed=5)
    assert cv2.imwrite(str(tmp_path / "in.png"), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    model = tiny_model("r50", align_corners=True)
    for flag, scales in (([], (1.0,)), (["--ms-flip"], SEMSEG_MS_SCALES)):
        out = tmp_path / f"out{len(flag)}"
        code = main(["predict", NAME, str(tmp_path / "in.png"), "--out", str(out), "--format", "npy", "--device",
                     "cpu", "--manifest", str(manifest), "--checkpoint", str(tiny_checkpoint_path("r50")), *flag])
        assert code == 0, capsys.readouterr().err
        labels = np.load(out / "in.npy")
        expected = their_probs(model, image, 48, 33, scales, 5).argmax(2)
        assert labels.shape == (31, 23) and (labels == expected).mean() >= 0.999


def test_reproduce_scores_both_passes_and_times_their_protocol(ade, tmp_path):
    folder, _ = ade
    checkpoint = tiny_checkpoint_path("r50")
    arch = {k: v for k, v in tiny_info("r50")["config"].items() if k not in ("depth", "num_classes")}
    test = {"mode": "semseg", "base_size": 48, "crop_size": [33, 33], "align_corners": True}
    entry = manifest_entry(checkpoint, checkpoint.as_uri(), dataset="ade20k", num_classes=5, arch=arch, test=test)
    manifest = write_manifest(tmp_path / "manifest.yml", [entry])
    fetch = FetchOptions(manifest=manifest, cache_dir=tmp_path / "cache")
    report = reproduce("ade20k", folder, models=entry["name"], device="cpu", results_dir=tmp_path / "results",
                       fetch=fetch, num_workers=0, speed_images=3, speed_warmup=1, train_memory=False,
                       progress=False)
    (record,) = report.records
    assert record.status == "complete", record.error
    for ms_flip, metrics in ((False, record.single_scale), (True, record.ms_flip)):
        expected = evaluate(entry["name"], folder, fetch=fetch, device="cpu", num_workers=0, progress=False,
                            ms_flip=ms_flip)
        assert metrics.miou == pytest.approx(expected.miou, abs=1e-9)
        assert metrics.aacc == pytest.approx(expected.aacc, abs=1e-9)
    assert record.settings["test"]["mode"] == "semseg"
    assert record.settings["measure"]["timed_call"] == SEMSEG_CALL
    assert record.speed.fps > 0 and record.fast_speed.fps > 0 and SEMSEG_CALL in record.speed.detail


def test_mmseg_functions_point_a_semseg_entry_to_its_protocol():
    from psp_zoo.evaluation.inference import predict_probs

    settings = EvalSettings(mode="semseg", img_scale=(2048, 512), align_corners=True, crop_size=(19, 19),
                            base_size=40)
    with pytest.raises(ValueError, match="use psp_zoo.evaluation.semseg_inference"):
        predict_probs(Probe(), _image(31, 23), settings)


def test_an_authors_entry_with_their_file_runs_their_protocol(ade, tmp_path):
    """The built-in semseg_pspnet50_ade20k (their network, narrowed by a user manifest, 150 classes:
    the probabilities are resized in channel groups) with a file in their format, on generated ADE20K."""
    folder, names = ade
    model = tiny_semseg_model(num_classes=150, seed=3)
    path = write_semseg_checkpoint(tmp_path / "train_epoch_100.pth", model)
    test = {"mode": "semseg", "base_size": 48, "crop_size": [33, 33], "align_corners": True}
    manifest = write_manifest(tmp_path / "narrow.yml", [{
        "name": "semseg_pspnet50_ade20k", "model": {**TINY_SEMSEG_ARCH, "num_classes": 150}, "test": test}])
    plain = SpeedOptions(fuse_bn=False, channels_last=False, factorize_head=False, winograd=False)
    predictor = Predictor.create("semseg_pspnet50_ade20k", manifest=str(manifest), checkpoint=path, device="cpu",
                                 speed=plain)
    metric = ConfusionMatrix(150)
    for name in names:
        image = _rgb(folder / "images" / "validation" / f"{name}.jpg")
        expected = their_probs(model, image, 48, 33, (1.0,), 150).argmax(2)
        labels = predictor(image)
        assert (labels == expected).mean() >= 0.999 and len(np.unique(expected)) > 1
        label = np.array(Image.open(folder / "annotations" / "validation" / f"{name}.png")).astype(np.int64)
        metric.update(torch.from_numpy(labels.astype(np.int64)),
                      torch.from_numpy(np.where(label == 0, 255, label - 1)))
    result = evaluate("semseg_pspnet50_ade20k", folder, manifest=str(manifest), checkpoint=path, device="cpu",
                      num_workers=0, progress=False, speed=plain)
    assert result.aacc == pytest.approx(metric.compute()["aAcc"] * 100, abs=1e-9)
    assert result.settings["test"] == {"mode": "semseg", "img_scale": [2048, 512], "align_corners": True,
                                       "crop_size": [33, 33], "stride": None, "base_size": 48}
