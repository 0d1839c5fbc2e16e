"""A dataset of one's own: declared in a user manifest, checked by ``psp-zoo dataset check``.

The dataset is generated (psp_zoo.testing.write_example_dataset) in a layout of its own: ``images/{train,val}/*.jpg``
and ``masks/{train,val}/*_mask.png``, 3 classes, 255 ignored.
"""
from __future__ import annotations

import numpy as np
import pytest
import yaml
from PIL import Image

from psp_zoo import testing
from psp_zoo.cli import main
from psp_zoo.datasets.check import check_dataset, check_split
from psp_zoo.errors import DatasetError, ManifestError
from psp_zoo.manifest.loading import load_manifest


@pytest.fixture
def shapes(tmp_path):
    root = testing.write_example_dataset(tmp_path / "data", train=6, val=4)
    return root, testing.write_example_manifest(tmp_path / "shapes.yml")


def _cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_the_declaration_reads_like_a_builtin_dataset(shapes):
    _, manifest = shapes
    spec = load_manifest(manifest).datasets["shapes"]
    assert spec.classes == testing.EXAMPLE_CLASSES and spec.palette == testing.EXAMPLE_PALETTE
    assert (spec.num_classes, spec.ignore_index, spec.reduce_zero_label) == (3, 255, False)
    layout = spec.layout
    assert (layout.images, layout.labels, layout.label_suffix) == ("images/val", "masks/val", "_mask.png")
    train, = spec.layout.train
    assert (train.images, train.labels, train.image_suffix, train.label_suffix) == (
        "images/train", "masks/train", ".jpg", "_mask.png")


def test_an_omitted_palette_is_generated_the_same_way_every_time(tmp_path):
    spec = testing.example_declaration()
    del spec["palette"]
    path = testing.write_example_manifest(tmp_path / "m.yml", spec=spec)
    first, second = (load_manifest(path).datasets["shapes"].palette for _ in range(2))
    # mmseg's colours for a dataset without a palette: RandomState(42), 3 values per class
    assert first == second == tuple(map(tuple, np.random.RandomState(42).randint(0, 255, size=(3, 3)).tolist()))


def test_a_clean_dataset_passes_with_its_counts_and_class_frequencies(shapes, capsys):
    root, manifest = shapes
    code, out, err = _cli(capsys, "dataset", "check", str(root), "--dataset", "shapes", "--manifest", str(manifest))
    assert code == 0, err
    assert "shapes train" in out and "shapes val" in out
    assert "6 images, 6 labels, 6 pairs read" in out and "4 images, 4 labels, 4 pairs read" in out
    assert out.count("no problems found") == 2 and "disc" in out and "square" in out


def test_class_frequencies_count_the_pixels_as_stored(shapes):
    root, manifest = shapes
    check, = check_dataset("shapes", root, ["val"], manifest=str(manifest))
    labels = [np.array(Image.open(path)) for path in sorted((root / "masks" / "val").glob("*.png"))]
    stacked = np.concatenate([label.ravel() for label in labels])
    assert check.pixels.tolist() == [int((stacked == c).sum()) for c in range(3)]
    assert check.ignored == int((stacked == 255).sum()) > 0
    assert check.images_with.tolist() == [sum(int((label == c).any()) for label in labels) for c in range(3)]


def test_each_planted_problem_is_reported_naming_its_file(shapes, capsys):
    root, manifest = shapes
    (root / "masks" / "val" / "shape_001_mask.png").unlink()  # an image without its label
    label_path = root / "masks" / "val" / "shape_002_mask.png"
    label = np.array(Image.open(label_path))
    label[:2, :5] = 7  # a value outside the 3 classes that is not the ignore index
    Image.fromarray(label).save(label_path)
    Image.fromarray(np.zeros((40, 50), np.uint8)).save(root / "masks" / "train" / "shape_003_mask.png")
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(root / "masks" / "train" / "stray_mask.png")  # no image

    code, out, err = _cli(capsys, "dataset", "check", str(root), "--dataset", "shapes", "--manifest", str(manifest))
    assert code == 1
    problems = [line.strip() for line in out.splitlines() if line.strip().startswith("problem:")]
    assert len(problems) == 4, out
    assert any(f"image {root / 'images/val/shape_001.jpg'} has no label" in p
               and str(root / "masks/val/shape_001_mask.png") in p for p in problems)
    assert any(f"label {label_path} holds value 7 outside the classes 0..2 (ignore 255): 10 pixels" in p
               for p in problems)
    assert any(f"label {root / 'masks/train/shape_003_mask.png'} is 50x40 but image "
               f"{root / 'images/train/shape_003.jpg'} is 96x96" in p for p in problems)
    assert any(f"label {root / 'masks/train/stray_mask.png'} has no image" in p for p in problems)
    assert "4 problems found" in err and len(err.strip().splitlines()) == 1
    assert "6 images, 7 labels, 6 pairs read" in out and "4 images, 3 labels, 3 pairs read" in out


def test_one_split_only(shapes, capsys):
    root, manifest = shapes
    (root / "masks" / "train" / "shape_000_mask.png").unlink()
    code, out, _ = _cli(capsys, "dataset", "check", str(root), "--dataset", "shapes", "--split", "val",
                        "--manifest", str(manifest))
    assert code == 0 and "shapes val" in out and "shapes train" not in out
    assert not check_split("shapes", root, "train", manifest=str(manifest)).ok


def test_a_split_file_line_without_its_image_is_a_problem(tmp_path):
    root = testing.write_example_dataset(tmp_path / "data", train=2, val=3)
    (root / "val.txt").write_text("shape_000\nshape_002\nshape_404\n")
    layout = dict(testing.example_declaration()["layout"], split="val.txt")
    manifest = testing.write_example_manifest(tmp_path / "m.yml", spec=testing.example_declaration(layout=layout))
    check = check_split("shapes", root, "val", manifest=str(manifest))
    assert (check.images, check.labels, check.pairs) == (2, 2, 2)  # the other label is not this split's
    assert check.problems() == [f"split file {root / 'val.txt'}: line 'shape_404' has no image: "
                                f"expected {root / 'images/val/shape_404.jpg'}"]


@pytest.mark.parametrize("change, field", [
    ({"colours": [[0, 0, 0]]}, "field 'colours': unknown field"),
    ({"palette": [[0, 0, 0], [255, 0, 0]]}, "field 'palette': expected 3 colours"),
    ({"layout": dict(testing.example_declaration()["layout"], train={"images": "images/train", "masks": "m"})},
     "field 'layout.train[0].masks': unknown field"),
    ({"ignore_index": 2}, "field 'ignore_index'"),
    ({"classes": ["background", "disc"]}, "field 'classes'"),
])
def test_a_wrong_declaration_is_one_line_naming_the_field(shapes, tmp_path, capsys, change, field):
    root, _ = shapes
    manifest = testing.write_example_manifest(tmp_path / "bad.yml", spec=testing.example_declaration(**change))
    with pytest.raises(ManifestError, match=field.replace("[", r"\[").replace("]", r"\]")):
        load_manifest(manifest)
    code, out, err = _cli(capsys, "dataset", "check", str(root), "--dataset", "shapes", "--manifest", str(manifest))
    assert code == 2 and out == "" and field in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("folder, field", [("images", "layout.images"), ("labels", "layout.labels")])
def test_a_missing_folder_is_one_line_naming_the_field(shapes, tmp_path, capsys, folder, field):
    root, _ = shapes
    layout = dict(testing.example_declaration()["layout"], **{folder: f"nowhere/{folder}"})
    manifest = testing.write_example_manifest(tmp_path / "m.yml", spec=testing.example_declaration(layout=layout))
    with pytest.raises(DatasetError, match=f"{field} 'nowhere/{folder}'"):
        check_split("shapes", root, "val", manifest=str(manifest))
    code, _, err = _cli(capsys, "dataset", "check", str(root), "--dataset", "shapes", "--manifest", str(manifest))
    assert code == 2 and field in err and len(err.strip().splitlines()) == 1


def test_a_dataset_without_a_training_split_says_how_to_declare_one(tmp_path):
    root = testing.write_example_dataset(tmp_path / "data", train=1, val=1)
    layout = {k: v for k, v in testing.example_declaration()["layout"].items() if k != "train"}
    manifest = testing.write_example_manifest(tmp_path / "m.yml", spec=testing.example_declaration(layout=layout))
    assert [c.split for c in check_dataset("shapes", root, manifest=str(manifest))] == ["val"]
    with pytest.raises(DatasetError, match="declares no training split: add 'train' to its layout"):
        check_split("shapes", root, "train", manifest=str(manifest))


def test_a_missing_training_folder_names_its_part_of_the_layout(shapes, tmp_path, capsys):
    root, _ = shapes
    layout = dict(testing.example_declaration()["layout"], train={"images": "images/train", "labels": "labels/train"})
    manifest = testing.write_example_manifest(tmp_path / "m.yml", spec=testing.example_declaration(layout=layout))
    code, out, err = _cli(capsys, "dataset", "check", str(root), "--dataset", "shapes", "--split", "train",
                          "--manifest", str(manifest))
    assert code == 2 and out == ""
    assert f"label folder {root / 'labels/train'} (layout.train[0].labels 'labels/train') is missing" in err


def test_the_walk_through_declares_the_dataset_the_tests_generate():
    from helpers import REPO

    page = (REPO / "docs" / "finetune.md").read_text()
    declared = yaml.safe_load(page.split("```yaml\n", 1)[1].split("```", 1)[0])
    assert declared == {"version": 1, "datasets": {
        "shapes": testing.example_declaration(train=testing.EXAMPLE_TRAIN)}}


def test_reduce_zero_label_is_applied_before_the_values_are_checked(tmp_path):
    root = testing.write_example_dataset(tmp_path / "data", train=1, val=1)
    label = np.array([[0, 1, 2, 3, 4, 255]] * 96, np.uint8).repeat(16, axis=1)  # 96 x 96
    Image.fromarray(label).save(root / "masks" / "val" / "shape_000_mask.png")
    spec = testing.example_declaration(reduce_zero_label=True)
    manifest = testing.write_example_manifest(tmp_path / "m.yml", spec=spec)
    check = check_split("shapes", root, "val", manifest=str(manifest))
    # stored 1..3 are classes 0..2, stored 0 and 255 are ignored, stored 4 would be class 3: outside
    assert check.pixels.tolist() == [96 * 16] * 3 and check.ignored == 2 * 96 * 16
    assert check.out_of_range == [(root / "masks" / "val" / "shape_000_mask.png", (4,), 96 * 16)]
