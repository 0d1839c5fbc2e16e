"""`psp-zoo predict --format cityscapes`: benchmark files with official labelIds under the image names."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from psp_zoo.cli import main
from psp_zoo.datasets.readers import CITYSCAPES_LABEL_IDS, cityscapes_train_ids_to_label_ids
from psp_zoo.errors import PspZooError
from psp_zoo.prediction.predictor import Predictor
from psp_zoo.testing import manifest_entry, write_manifest, write_tiny_checkpoint

pytestmark = pytest.mark.usefixtures("single_thread")

OFFICIAL = {7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33}
# Whole-image inference at a small size keeps the 19-class tiny model fast.
TEST_SETTINGS = {"mode": "whole", "img_scale": [96, 48]}


@pytest.fixture(scope="module")
def cityscapes_checkpoint(tmp_path_factory) -> Path:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("cs") / "ckpt", "tiny_cs_pspnet_r50-d8",
                                 num_classes=19, stamp="20260101_000000")


@pytest.fixture
def manifest(cityscapes_checkpoint) -> Path:
    entry = manifest_entry(cityscapes_checkpoint, cityscapes_checkpoint.as_uri(), test=TEST_SETTINGS)
    return write_manifest(cityscapes_checkpoint.parent.parent / "manifest.yml", [entry])


def _write_image(path: Path, seed: int) -> None:
    coarse = np.random.default_rng(seed).integers(0, 256, (6, 8, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), cv2.resize(coarse, (72, 40), interpolation=cv2.INTER_LINEAR))


def _predict(capsys, manifest: Path, *argv) -> tuple:
    checkpoint = next(manifest.parent.glob("ckpt/*.pth"))  # local weights: no download messages
    code = main(["predict", "tiny_cs_pspnet_r50-d8", "--device", "cpu", "--format", "cityscapes",
                 "--manifest", str(manifest), "--checkpoint", str(checkpoint), *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out.splitlines(), err


def test_inverse_mapping_gives_back_the_official_label_ids():
    train_ids = np.arange(19, dtype=np.uint8).reshape(1, 19)
    np.testing.assert_array_equal(cityscapes_train_ids_to_label_ids(train_ids)[0], list(CITYSCAPES_LABEL_IDS))
    assert set(CITYSCAPES_LABEL_IDS) == OFFICIAL
    with pytest.raises(PspZooError, match="trainId 255"):
        cityscapes_train_ids_to_label_ids(np.array([[3, 255]], dtype=np.uint8))


def test_writes_official_label_ids_under_the_image_names(capsys, manifest, tmp_path):
    names = ["frankfurt_000000_000294_leftImg8bit", "munster_000012_000019_leftImg8bit"]
    for seed, name in enumerate(names):
        _write_image(tmp_path / "in" / name.split("_")[0] / f"{name}.png", seed)
    code, lines, err = _predict(capsys, manifest, str(tmp_path / "in" / "**"), "--out", tmp_path / "out")
    assert code == 0 and all(line.startswith("psp-zoo: predicting ") for line in err.splitlines())  # progress only
    assert lines == [str(tmp_path / "out" / f"{name}.png") for name in names]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [f"{name}.png" for name in names]
    predictor = Predictor.create("tiny_cs_pspnet_r50-d8", manifest=manifest, device="cpu",
                                 checkpoint=next(manifest.parent.glob("ckpt/*.pth")))
    seen = set()
    for name in names:
        with Image.open(tmp_path / "out" / f"{name}.png") as png:
            assert png.mode == "L" and png.size == (72, 40)
            label_ids = np.array(png)
        assert label_ids.dtype == np.uint8 and set(np.unique(label_ids)) <= OFFICIAL
        # the same pixels as the trainId prediction, each mapped through the official table
        train_ids = predictor(cv2.cvtColor(cv2.imread(str(next((tmp_path / "in").rglob(f"{name}.png")))),
                                           cv2.COLOR_BGR2RGB))
        np.testing.assert_array_equal(label_ids, np.asarray(CITYSCAPES_LABEL_IDS)[train_ids])
        seen |= set(np.unique(label_ids).tolist())
    assert len(seen) > 1  # a real prediction, not a constant picture


def test_other_names_are_kept_with_a_warning(capsys, manifest, tmp_path):
    _write_image(tmp_path / "street.png", 3)
    code, lines, err = _predict(capsys, manifest, tmp_path / "street.png", "--out", tmp_path / "out")
    assert code == 0 and lines == [str(tmp_path / "out" / "street.png")]
    assert "warning: 1 image name(s), e.g. street.png, are not <city>_<seq>_<frame>_leftImg8bit.png" in err


def test_refuses_to_write_over_the_images(capsys, manifest, tmp_path):
    image = tmp_path / "frankfurt_000000_000294_leftImg8bit.png"
    _write_image(image, 4)
    before = image.read_bytes()
    code, lines, err = _predict(capsys, manifest, image, "--out", tmp_path)
    assert code == 2 and lines == []
    assert "would replace it" in err and len(err.strip().splitlines()) == 1
    assert image.read_bytes() == before


def test_refused_for_an_ade20k_model_before_downloading(capsys, tmp_path, cityscapes_checkpoint):
    # the weights URL leads nowhere: the refusal must come before any fetch is tried
    absent = (tmp_path / "nowhere" / cityscapes_checkpoint.name).as_uri()
    entry = manifest_entry(cityscapes_checkpoint, absent, dataset="ade20k", num_classes=150)
    manifest = write_manifest(tmp_path / "ade.yml", [entry])
    _write_image(tmp_path / "in" / "room.png", 5)
    code = main(["predict", "tiny_cs_pspnet_r50-d8", str(tmp_path / "in"), "--out", str(tmp_path / "out"),
                 "--format", "cityscapes", "--manifest", str(manifest), "--device", "cpu"])
    out, err = capsys.readouterr()
    assert code == 2 and out == ""
    assert err.strip() == ("psp-zoo predict: error: --format cityscapes: tiny_cs_pspnet_r50-d8: the cityscapes "
                           "output format needs a Cityscapes model with 19 classes; this one predicts 150 "
                           "ade20k classes: choose the png or npy format")
    assert not (tmp_path / "out").exists()


def test_library_write_refuses_a_model_without_the_cityscapes_classes(tmp_path, manifest):
    predictor = Predictor.create("tiny_cs_pspnet_r50-d8", manifest=manifest, device="cpu",
                                 checkpoint=next(manifest.parent.glob("ckpt/*.pth")))
    predictor.num_classes = 5  # as a model object with other classes would be
    with pytest.raises(PspZooError, match="needs a Cityscapes model with 19 classes"):
        predictor.write(np.zeros((4, 4, 3), np.uint8), np.zeros((4, 4), np.uint8), tmp_path, "x", "cityscapes")
    assert list(tmp_path.iterdir()) == []
