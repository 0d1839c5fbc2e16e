"""End-to-end ``evaluate`` on generated mini datasets against metrics computed from predictions."""
from __future__ import annotations

import json
import math

import cv2
import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from psp_zoo import ConfusionMatrix, DatasetError, PspZooError, classes, evaluate, predict_probs
from psp_zoo.cli import main
from psp_zoo.manifest.loading import EvalSettings as Settings
from psp_zoo.results.records import ResultRecord, read_result, write_result

import minidata
from helpers import tiny_checkpoint_path, tiny_model, write_tiny_ade_manifest

SMALL = dict(img_scale=(64, 32))


def _expected_scores(model, folder, names, settings, ms_flip=False) -> dict:
    """Predictions image by image through predict_probs, labels read and reduced by hand."""
    metric = ConfusionMatrix(5)
    for name in names:
        bgr = cv2.imread(str(folder / "images" / "validation" / f"{name}.jpg"))
        probs = predict_probs(model, cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), settings, ms_flip)
        label = np.array(Image.open(folder / "annotations" / "validation" / f"{name}.png")).astype(np.int64)
        metric.update(probs.argmax(0), np.where(label == 0, 255, label - 1))
    return metric.compute()


def _assert_same(result, scores: dict) -> None:
    for key, got in (("aAcc", result.aacc), ("mIoU", result.miou), ("mAcc", result.macc)):
        assert got == pytest.approx(scores[key] * 100, abs=1e-9), key
    for index, value in enumerate(scores["IoU"]):
        got = result.iou[str(index)]
        assert (got is None and math.isnan(value)) or got == pytest.approx(value * 100, abs=1e-9)


class PixelClassifier(nn.Module):
    """A 1x1 convolution: a cheap stand-in with a dataset's real class count."""

    def __init__(self, num_classes: int):
        super().__init__()
        self.num_classes = num_classes
        self.conv = nn.Conv2d(3, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


@pytest.fixture(scope="module")
def ade(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data") / "ADEChallengeData2016"
    names = sorted(minidata.write_ade20k(folder))
    return folder, names


def _evaluate_on_ade(model, ade, ms_flip: bool, limit=None) -> dict:
    folder, names = ade
    result = evaluate(model, folder.parent, dataset="ade20k", ms_flip=ms_flip, limit=limit, device="cpu",
                      num_workers=0, progress=False, **SMALL)
    settings = Settings(mode="whole", img_scale=(64, 32), align_corners=False)
    _assert_same(result, _expected_scores(model, folder, names[:limit], settings, ms_flip))
    assert result.images.count == len(names[:limit]) and (result.ms_flip is not None) is ms_flip
    assert result.dataset == "ade20k"
    assert result.settings["test"]["img_scale"] == [64, 32] and result.settings["test"]["mode"] == "whole"
    assert len(result.settings["ms_flip_ratios"] or [1.0]) == (6 if ms_flip else 1)
    assert list(result.iou) == ["0", "1", "2", "3", "4"]  # 5 classes, not ADE's 150: scored by index
    assert 0 < result.miou < 100
    return result


def test_tiny_checkpoint_equals_direct_metrics(ade):
    result = _evaluate_on_ade(tiny_model("r50"), ade, ms_flip=False)
    assert result.checkpoint == "PSPNet"


def test_ms_flip_equals_direct_metrics(ade):
    # ms+flip numerics are checked in test_inference; here the evaluation loop around them, with a
    # cheap model because each of the six scales is a new input shape for the convolution library.
    torch.manual_seed(1)
    _evaluate_on_ade(PixelClassifier(5), ade, ms_flip=True, limit=2)


@pytest.fixture
def tiny_manifest(tmp_path):
    """A user manifest serving the tiny r50 fixture as an ADE20K entry with small slide settings."""
    return write_tiny_ade_manifest(tmp_path / "tiny.yml",
                                   "{img_scale: [64, 32], mode: slide, crop_size: [24, 24], stride: [16, 16]}")


def test_manifest_name_with_local_checkpoint(ade, tiny_manifest):
    folder, names = ade
    manifest = tiny_manifest
    result = evaluate("tiny_pspnet_r50-d8_ade20k", folder, manifest=str(manifest), limit=2,
                      checkpoint=tiny_checkpoint_path("r50"), device="cpu", num_workers=1, progress=False)
    settings = Settings(mode="slide", img_scale=(64, 32), align_corners=False, crop_size=(24, 24), stride=(16, 16))
    _assert_same(result, _expected_scores(tiny_model("r50"), folder, names[:2], settings))
    assert result.checkpoint == "tiny_pspnet_r50-d8_ade20k" and result.settings["test"]["mode"] == "slide"
    with pytest.raises(PspZooError, match="ade20k checkpoint"):
        evaluate("tiny_pspnet_r50-d8_ade20k", folder, dataset="cityscapes", manifest=str(manifest),
                 checkpoint=tiny_checkpoint_path("r50"))


def test_dataset_defaults_and_class_names(tmp_path):
    minidata.write_pascal_context(tmp_path / "VOCdevkit" / "VOC2010")
    torch.manual_seed(0)
    result = evaluate(PixelClassifier(60), tmp_path, dataset="pascal_context", device="cpu", num_workers=0,
                      progress=False)
    settings = result.settings["test"]
    assert (settings["mode"], settings["img_scale"], settings["crop_size"], settings["stride"]) == \
        ("slide", [520, 520], [480, 480], [320, 320])
    assert settings["align_corners"] is False and result.settings["reduce_zero_label"] is False
    assert tuple(result.iou) == classes("pascal_context") == tuple(result.acc)
    assert result.images.count == 3


def test_bad_calls_are_user_errors(ade):
    folder, _ = ade
    model = tiny_model("r50")
    with pytest.raises(PspZooError, match="needs dataset="):
        evaluate(model, folder)
    with pytest.raises(PspZooError, match="unknown test setting 'crop'"):
        evaluate(model, folder, dataset="ade20k", crop=(1, 1))
    with pytest.raises(PspZooError, match="needs crop_size"):
        evaluate(model, folder, dataset="ade20k", mode="slide")
    with pytest.raises(PspZooError, match="checkpoint="):
        evaluate(model, folder, dataset="ade20k", checkpoint=tiny_checkpoint_path("r50"))


def test_cli_evaluate_prints_and_writes_json(ade, tiny_manifest, tmp_path, capsys):
    folder, _ = ade
    out = tmp_path / "results" / "tiny.json"
    argv = ["evaluate", "tiny_pspnet_r50-d8_ade20k", "--data-root", str(folder.parent), "--limit", "2",
            "--manifest", str(tiny_manifest), "--checkpoint", str(tiny_checkpoint_path("r50")),
            "--device", "cpu", "--num-workers", "0", "--json", str(out)]
    assert main(argv) == 0
    written = json.loads(out.read_text())
    expected = evaluate("tiny_pspnet_r50-d8_ade20k", folder, manifest=str(tiny_manifest), limit=2,
                        checkpoint=tiny_checkpoint_path("r50"), device="cpu", num_workers=0, progress=False)
    metrics = written["metrics"]["single_scale"]
    assert metrics["mIoU"] == pytest.approx(expected.miou, abs=1e-12) and written["images"]["count"] == 2
    # standard JSON: a class absent from the labels and predictions is null, not NaN
    absent = [k for k, v in expected.iou.items() if v is None]
    assert all(metrics["per_class"][k]["IoU"] is None for k in absent)
    assert "NaN" not in out.read_text()
    # evaluate returns the record type results files hold: its JSON reads back as an equal record
    assert isinstance(expected, ResultRecord)
    assert read_result(write_result(expected, tmp_path / "again.json")) == expected
    assert f"mIoU {expected.miou:.2f}" in capsys.readouterr().out
    assert main(argv[:3] + [str(tmp_path / "nowhere")] + argv[4:]) == 2
    err = capsys.readouterr().err.strip()
    assert "does not exist" in err and len(err.splitlines()) == 1


def test_evaluate_runs_the_fast_path_by_default_and_records_it(ade, tiny_manifest):
    folder, _ = ade
    kwargs = dict(manifest=str(tiny_manifest), limit=2, checkpoint=tiny_checkpoint_path("r50"),
                  device="cpu", num_workers=0, progress=False)
    fast = evaluate("tiny_pspnet_r50-d8_ade20k", folder, **kwargs)
    plain = evaluate("tiny_pspnet_r50-d8_ade20k", folder, fuse_bn=False, channels_last=False,
                     factorize_head=False, winograd=False, **kwargs)
    assert fast.optimizations == ("fuse_bn", "channels_last", "factorize_head", "winograd") and fast.precision == "fp32"
    assert plain.optimizations == ()
    # folding BN changes rounding only: the confusion matrix, hence every score, is the same
    assert fast.iou == plain.iou and fast.aacc == plain.aacc
    with pytest.raises(PspZooError, match="needs a CUDA device"):
        evaluate("tiny_pspnet_r50-d8_ade20k", folder, precision="fp16", **kwargs)


def test_evaluate_checks_the_data_before_fetching_the_checkpoint(tmp_path, hub_server, hub_manifest):
    with pytest.raises(DatasetError):
        evaluate("tiny_r50", tmp_path / "nowhere", manifest=str(hub_manifest), device="cpu")
    assert hub_server.requests_for("r50") == []  # nothing was downloaded for a typo in --data-root
