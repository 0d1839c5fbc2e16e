"""Training refuses bad data before it starts, and honours the dataset's declared ignore index.

A user-declared dataset (psp_zoo.testing's example: 3 classes, 255 ignored, or 254 where declared so) is trained
with a narrow PSPNet declared next to it in the user manifest (no weights needed: ``--no-pretrained``).
"""
from __future__ import annotations

import contextlib
import io
import os

import numpy as np
import pytest
import torch
from PIL import Image

from psp_zoo import testing
from psp_zoo.cli import main
from psp_zoo.datasets import check as dataset_check
from psp_zoo.datasets.check import SCAN_RECORD, check_split, scan_for_training
from psp_zoo.datasets.readers import SegmentationDataset
from psp_zoo.errors import DatasetError, ManifestError
from psp_zoo.evaluation.scoring import score
from psp_zoo.hub.options import FetchOptions
from psp_zoo.manifest.loading import get_manifest, load_manifest
from psp_zoo.model import PSPNet
from psp_zoo.testing import TINY_ARCH
from psp_zoo.training.loop import train
from psp_zoo.training.pipeline import TrainTransform, crop_is_acceptable

from helpers import tiny_checkpoint_path

NAME = "shapes_tiny"
RUN = ("--no-pretrained", "--max-iters", "2", "--batch-size", "2", "--gpus", "1", "--eval-interval", "2",
       "--num-workers", "0", "--crop-size", "64")


def _entry(dataset: str = "shapes") -> dict:
    """A narrow PSPNet for the dataset, trained from scratch (its weights are never fetched)."""
    return {"name": NAME, "dataset": dataset, "depth": 18, "crop_size": [64, 64], "schedule": 2,
            "weights": f"http://127.0.0.1:9/{NAME}-00000000.pth", "published": {},
            "model": dict(TINY_ARCH, num_classes=3), "test": {"img_scale": [96, 96]}}


def _cli(*argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


def _set_label(path, change):
    label = np.array(Image.open(path))
    Image.fromarray(change(label)).save(path)


@pytest.fixture
def shapes(tmp_path):
    root = testing.write_example_dataset(tmp_path / "data", train=4, val=2)
    manifest = testing.write_example_manifest(tmp_path / "shapes.yml", models=[_entry()])
    return root, manifest, tmp_path / "work"


def _outside(label):
    label[:2, :5] = 7  # a value that is neither a class (0..2) nor the ignore index
    return label


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


# every problem `dataset check` finds: (what to break, words of the one line, the file it names)
PROBLEMS = {
    "value outside the classes": (lambda root: _set_label(root / "masks/train/shape_001_mask.png", _outside),
                                  "holds value 7 outside the classes 0..2", "masks/train/shape_001_mask.png"),
    "missing label": (lambda root: (root / "masks/train/shape_002_mask.png").unlink(),
                      "has no label", "images/train/shape_002.jpg"),
    "size mismatch": (lambda root: Image.fromarray(np.zeros((40, 50), np.uint8)).save(
        root / "masks/train/shape_003_mask.png"), "is 50x40 but image", "masks/train/shape_003_mask.png"),
    "truncated label": (lambda root: _truncate(root / "masks/train/shape_000_mask.png"),
                        "cannot read label", "masks/train/shape_000_mask.png"),
    "truncated image": (lambda root: _truncate(root / "images/train/shape_001.jpg"),
                        "cannot read image", "images/train/shape_001.jpg"),
    "a problem in the validation split": (lambda root: _set_label(root / "masks/val/shape_001_mask.png", _outside),
                                          "holds value 7", "masks/val/shape_001_mask.png"),
}


@pytest.mark.parametrize("problem", list(PROBLEMS))
def test_train_refuses_bad_data_before_the_first_iteration_and_writes_nothing(shapes, problem):
    root, manifest, work = shapes
    plant, words, names = PROBLEMS[problem]
    plant(root)
    code, out, err = _cli("train", NAME, "--data-root", root, "--work-dir", work, "--manifest", manifest, *RUN)
    assert code == 2 and out == "", err[-2000:]
    line, = err.strip().splitlines()  # one line, no traceback
    assert words in line and str(root / names) in line, line
    assert f"psp-zoo dataset check {root} --dataset shapes --manifest {manifest}" in line, line
    assert not work.exists()  # nothing written: no checkpoint, no log, no scan record


def test_the_api_raises_the_same_refusal_as_a_dataset_error(shapes):
    root, manifest, work = shapes
    PROBLEMS["value outside the classes"][0](root)
    with pytest.raises(DatasetError, match="holds value 7 outside the classes"):
        train(NAME, data_root=root, work_dir=work, no_pretrained=True, max_iters=2, batch_size=2, gpus=1,
              num_workers=0, crop_size=64, fetch=FetchOptions(manifest=str(manifest)))
    assert not work.exists()


def test_fine_tuning_refuses_bad_data_before_writing_its_starting_weights(shapes):
    root, manifest, work = shapes
    PROBLEMS["value outside the classes"][0](root)
    code, out, err = _cli("train", "--from", tiny_checkpoint_path("r50"), "--dataset", "shapes", "--data-root", root,
                          "--work-dir", work, "--manifest", manifest, "--max-iters", "2", "--gpus", "1")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "holds value 7" in err, err[-2000:]
    assert not work.exists()  # no init/ either


@pytest.fixture
def reads(monkeypatch):
    """The label files the scan decodes, by path (the scan reads each pair's label once)."""
    seen = []
    real = dataset_check.read_label

    def counted(path):
        seen.append(os.path.basename(path))
        return real(path)
    monkeypatch.setattr(dataset_check, "read_label", counted)
    return seen


def test_a_second_start_reads_only_the_files_that_changed(shapes, reads):
    root, manifest, work = shapes
    assert scan_for_training("shapes", root, work, manifest=str(manifest)) == 6 and len(reads) == 6
    assert (work / SCAN_RECORD).is_file()
    reads.clear()
    assert scan_for_training("shapes", root, work, manifest=str(manifest)) == 0 and reads == []
    touched = root / "masks/train/shape_002_mask.png"
    later = touched.stat().st_mtime_ns + 5_000_000_000
    os.utime(touched, ns=(later, later))
    assert scan_for_training("shapes", root, work, manifest=str(manifest)) == 1
    assert reads == ["shape_002_mask.png"]
    # a file broken after a passed scan is read again and refused, the record left as it was
    record = (work / SCAN_RECORD).read_bytes()
    _set_label(touched, _outside)
    with pytest.raises(DatasetError, match="shape_002_mask.png holds value 7"):
        scan_for_training("shapes", root, work, manifest=str(manifest))
    assert (work / SCAN_RECORD).read_bytes() == record


def test_another_declaration_reads_everything_again(shapes, tmp_path, reads):
    root, manifest, work = shapes
    scan_for_training("shapes", root, work, manifest=str(manifest))
    reads.clear()
    other = testing.write_example_manifest(tmp_path / "other.yml", spec=testing.example_declaration(
        num_classes=4, classes=[*testing.EXAMPLE_CLASSES, "star"],
        palette=[*map(list, testing.EXAMPLE_PALETTE), [1, 2, 3]]))
    assert scan_for_training("shapes", root, work, manifest=str(other)) == 6 and len(reads) == 6


def test_a_resumed_run_does_not_rescan(shapes, reads):
    root, manifest, work = shapes
    code, _, err = _cli("train", NAME, "--data-root", root, "--work-dir", work, "--manifest", manifest, *RUN)
    assert code == 0, err[-2000:]
    assert len(reads) == 6 and (work / SCAN_RECORD).is_file()
    reads.clear()
    code, _, err = _cli("train", NAME, "--data-root", root, "--work-dir", work, "--manifest", manifest, *RUN)
    assert code == 0 and "resuming from" in err and reads == [], err[-2000:]


# ---------------------------------------------------------------------------------------------
# the declared ignore index


@pytest.fixture
def shapes254(tmp_path):
    """The shapes with their ignored rings stored as 254, declared ``ignore_index: 254``."""
    root = testing.write_example_dataset(tmp_path / "data", train=4, val=2)
    for path in root.glob("masks/*/*.png"):
        _set_label(path, lambda label: np.where(label == 255, 254, label).astype(np.uint8))
    manifest = testing.write_example_manifest(tmp_path / "shapes.yml",
                                              spec=testing.example_declaration(ignore_index=254), models=[_entry()])
    return root, manifest, tmp_path / "work"


def test_the_check_ignores_the_declared_index_and_reports_255(shapes254):
    root, manifest, _ = shapes254
    check = check_split("shapes", root, "train", manifest=str(manifest))
    stored = np.concatenate([np.array(Image.open(p)).ravel() for p in sorted(root.glob("masks/train/*.png"))])
    assert check.ok and check.ignored == int((stored == 254).sum()) > 0
    _set_label(root / "masks/train/shape_001_mask.png",
               lambda label: np.where(label == 254, 255, label).astype(np.uint8))
    check = check_split("shapes", root, "train", manifest=str(manifest))
    assert [values for _, values, _ in check.out_of_range] == [(255,)]


def test_training_uses_the_declared_ignore_index_in_the_crop_the_padding_and_the_loss(shapes254):
    root, manifest, work = shapes254
    # crops of 64 from images resized 0.5-2.0 x 96: some are padded, every one holds 254-valued rings
    code, _, err = _cli("train", NAME, "--data-root", root, "--work-dir", work, "--manifest", manifest, *RUN,
                        "--crop-size", "150")
    assert code == 0, err[-2000:]  # 254 as a target of 3 classes, or 255 padding, would fail in the loss


def test_the_transform_pads_labels_with_the_ignore_index_and_leaves_it_out_of_the_75_percent_rule():
    image = np.full((40, 40, 3), 100, np.uint8)
    label = np.full((40, 40), 254, np.uint8)
    label[:5, :4] = 1  # 20 pixels
    label[:4, 4:8] = 2  # 16 pixels
    transform = TrainTransform(crop_size=(48, 48), img_scale=(40, 40), ratio_range=None, cat_max_ratio=0.75,
                               flip_prob=0, photometric=False, ignore_index=254)
    _, out = transform(image, label, np.random.default_rng(0))
    assert out.shape == (48, 48) and (out[40:, :] == 254).all() and (out[:, 40:] == 254).all()
    # mostly 254 with classes 1 and 2 as 20:16: the rule passes only when 254 is not counted
    assert crop_is_acceptable(label, 0.75, 254) and not crop_is_acceptable(label, 0.75, 255)


def test_scoring_leaves_out_the_declared_ignore_index(shapes254):
    root, manifest, _ = shapes254
    entry = get_manifest(str(manifest)).get(NAME)
    data = SegmentationDataset("shapes", root, manifest=str(manifest))
    torch.manual_seed(0)
    matrix = score(PSPNet(**entry.model_kwargs()).eval(), data, entry.test, 3, ms_flip=False,
                   device=torch.device("cpu"), num_workers=0, show=False)
    labels = np.concatenate([np.array(Image.open(p)).ravel() for p in sorted(root.glob("masks/val/*.png"))])
    assert matrix.ignore_index == 254
    assert int(matrix.matrix[:3].sum()) == int((labels < 3).sum()) and int(matrix.matrix[3].sum()) == 0


@pytest.mark.parametrize("change, words", [
    ({"ignore_index": 0}, "a class cannot be ignored"),
    ({"reduce_zero_label": True, "ignore_index": 254}, "reduce_zero_label marks label 0 as 255"),
])
def test_an_ignore_index_that_cannot_work_is_refused_in_the_declaration(tmp_path, change, words):
    manifest = testing.write_example_manifest(tmp_path / "m.yml", spec=testing.example_declaration(**change))
    with pytest.raises(ManifestError, match=words):
        load_manifest(manifest)


# ---------------------------------------------------------------------------------------------
# the whole declaration


def test_dataset_check_refuses_a_train_block_typo_with_trains_message(shapes, tmp_path):
    root, _, work = shapes
    manifest = testing.write_example_manifest(tmp_path / "typo.yml",
                                              spec=testing.example_declaration(train={"lrr": 0.1}))
    code, out, check_err = _cli("dataset", "check", root, "--dataset", "shapes", "--manifest", manifest)
    assert code == 2 and out == "" and len(check_err.strip().splitlines()) == 1, check_err
    assert "datasets.shapes: field 'train': unknown training setting 'lrr'" in check_err
    code, _, train_err = _cli("train", "--from", tiny_checkpoint_path("r50"), "--dataset", "shapes", "--data-root",
                              root, "--work-dir", work, "--manifest", manifest)
    assert code == 2 and train_err.split(": error: ")[1] == check_err.split(": error: ")[1]  # the same message
    assert not work.exists()
