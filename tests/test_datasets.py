"""Dataset readers on generated mini datasets in each mmseg layout, and their errors."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from psp_zoo import DatasetError, SegmentationDataset, classes, make_loader, palette
from psp_zoo.datasets import cityscapes_label_ids_to_train_ids, find_dataset_root, list_items
from psp_zoo.transforms import resize_image, to_tensor

import minidata

SCALE = [(64, 32)]


def _read_all(dataset: SegmentationDataset, workers: int = 0) -> dict:
    return {sample.name: sample for sample in make_loader(dataset, num_workers=workers)}


def _reduce(label: np.ndarray) -> np.ndarray:
    return np.where(label == 0, 255, label.astype(np.int64) - 1).astype(np.uint8)


def _check(samples: dict, written: dict, label_fn=lambda label: label):
    assert list(samples) == sorted(written)
    for name, (rgb, label) in written.items():
        sample = samples[name]
        assert sample.ori_size == rgb.shape[:2]
        assert torch.equal(sample.inputs[0], to_tensor(resize_image(rgb, SCALE[0])))
        np.testing.assert_array_equal(sample.label.numpy(), label_fn(label))


def test_cityscapes_train_ids(tmp_path):
    written = minidata.write_cityscapes(tmp_path / "cityscapes")
    # The data root may be the parent of the dataset folder.
    _check(_read_all(SegmentationDataset("cityscapes", tmp_path, img_scales=SCALE)), written)


def test_cityscapes_label_ids_are_mapped_to_train_ids(tmp_path):
    written = minidata.write_cityscapes(tmp_path, label_ids=True)
    samples = _read_all(SegmentationDataset("cityscapes", tmp_path, img_scales=SCALE))
    table = {0: 255, 1: 255, 7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 26: 13, 33: 18}  # official table
    _check(samples, written, lambda label: np.vectorize(table.get)(label).astype(np.uint8))
    ids = np.arange(256, dtype=np.uint8)
    assert (cityscapes_label_ids_to_train_ids(ids) != 255).sum() == 19


def test_ade20k_reduce_zero_label_and_worker_loading(tmp_path):
    written = minidata.write_ade20k(tmp_path / "ade" / "ADEChallengeData2016")
    dataset = SegmentationDataset("ade20k", tmp_path, img_scales=SCALE)
    assert dataset.reduce_zero_label
    _check(_read_all(dataset, workers=1), written, _reduce)


def test_voc12_palette_labels_and_split_file(tmp_path):
    written = minidata.write_voc12(tmp_path / "VOCdevkit" / "VOC2012")
    samples = _read_all(SegmentationDataset("voc12aug", tmp_path, img_scales=SCALE))
    _check(samples, written)  # palette PNGs read as indices; the image outside val.txt is not read


@pytest.mark.parametrize("dataset, reduce", [("pascal_context", False), ("pascal_context_59", True)])
def test_pascal_context(tmp_path, dataset, reduce):
    written = minidata.write_pascal_context(tmp_path / "VOC2010")
    samples = _read_all(SegmentationDataset(dataset, tmp_path / "VOC2010", img_scales=SCALE))
    _check(samples, written, _reduce if reduce else (lambda label: label))


def test_default_scale_limit_and_shards(tmp_path):
    minidata.write_ade20k(tmp_path)
    dataset = SegmentationDataset("ade20k", tmp_path)
    assert dataset.img_scales == [(2048, 512)]
    assert [tuple(t.shape) for t in dataset[0].inputs] == [(3, 512, 853)]  # 24 x 40 upscaled
    limited = SegmentationDataset("ade20k", tmp_path, limit=2)
    assert [item.name for item in limited.items] == ["ADE_val_00000001", "ADE_val_00000002"]
    shards = [dataset.shard(rank, 2) for rank in range(2)]
    names = [item.name for shard in shards for item in shard.items]
    assert sorted(names) == [item.name for item in dataset.items] and len(set(names)) == 3
    with pytest.raises(DatasetError, match="limit"):
        list_items("ade20k", tmp_path, limit=0)


def test_missing_folders_are_named(tmp_path):
    with pytest.raises(DatasetError, match="is not a folder"):
        SegmentationDataset("ade20k", tmp_path / "nowhere")
    with pytest.raises(DatasetError, match=r"ADEChallengeData2016[/\\]images[/\\]validation"):
        SegmentationDataset("ade20k", tmp_path)
    (tmp_path / "VOC2012" / "JPEGImages").mkdir(parents=True)
    (tmp_path / "VOC2012" / "SegmentationClass").mkdir()
    with pytest.raises(DatasetError, match=r"val\.txt is missing"):
        SegmentationDataset("voc12aug", tmp_path)
    with pytest.raises(DatasetError, match="unknown dataset"):
        SegmentationDataset("coco", tmp_path)


def test_image_without_label_is_an_error_not_a_skip(tmp_path):
    minidata.write_cityscapes(tmp_path)
    missing = tmp_path / "gtFine" / "val" / "bonn" / "bonn_000001_000019_gtFine_labelTrainIds.png"
    missing.unlink()
    with pytest.raises(DatasetError, match="bonn_000001_000019_leftImg8bit.png has no label: expected .*"
                                           "bonn_000001_000019_gtFine_labelTrainIds.png"):
        SegmentationDataset("cityscapes", tmp_path)


def test_image_listed_in_split_but_missing(tmp_path):
    minidata.write_voc12(tmp_path)
    (tmp_path / "JPEGImages" / "2008_000001.jpg").unlink()
    with pytest.raises(DatasetError, match=r"2008_000001\.jpg listed in .*val\.txt is missing"):
        SegmentationDataset("voc12aug", tmp_path)


@pytest.mark.parametrize("workers", [0, 1])
def test_unreadable_files_raise_in_the_main_process(tmp_path, workers):
    minidata.write_ade20k(tmp_path)
    broken = tmp_path / "images" / "validation" / "ADE_val_00000002.jpg"
    broken.write_bytes(b"not a jpeg")
    dataset = SegmentationDataset("ade20k", tmp_path, img_scales=SCALE)
    with pytest.raises(DatasetError, match=r"cannot read image .*ADE_val_00000002\.jpg"):
        list(make_loader(dataset, num_workers=workers))
    (tmp_path / "annotations" / "validation" / "ADE_val_00000001.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(DatasetError, match=r"cannot read label .*ADE_val_00000001\.png"):
        dataset[0]


def test_label_of_another_size_is_an_error(tmp_path):
    written = minidata.write_ade20k(tmp_path)
    minidata._write_label(tmp_path / "annotations" / "validation" / "ADE_val_00000003.png",
                          np.zeros((5, 5), np.uint8))
    with pytest.raises(DatasetError, match="5x5 but image"):
        SegmentationDataset("ade20k", tmp_path, img_scales=SCALE)[2]
    assert len(written) == 3


def test_classes_and_palettes():
    counts = {"cityscapes": 19, "ade20k": 150, "voc12aug": 21, "pascal_context": 60, "pascal_context_59": 59}
    for dataset, count in counts.items():
        assert len(classes(dataset)) == count and len(palette(dataset)) == count
        assert all(len(colour) == 3 and all(0 <= c <= 255 for c in colour) for colour in palette(dataset))
    assert classes("cityscapes")[:3] == ("road", "sidewalk", "building")
    assert classes("pascal_context")[1:] == classes("pascal_context_59")
    with pytest.raises(DatasetError, match="unknown dataset"):
        classes("coco")


def test_find_dataset_root_accepts_folder_or_parent(tmp_path):
    minidata.write_voc12(tmp_path / "data" / "VOCdevkit" / "VOC2012")
    folder = tmp_path / "data" / "VOCdevkit" / "VOC2012"
    for root in (folder, folder.parent, folder.parent.parent, tmp_path):
        assert find_dataset_root("voc12aug", root) == folder


def test_an_unlistable_city_folder_is_an_error_not_a_skip(tmp_path, monkeypatch):
    import os

    minidata.write_cityscapes(tmp_path)
    bonn = tmp_path / "leftImg8bit" / "val" / "bonn"
    real_scandir = os.scandir

    def scandir(path="."):  # what a folder without read permission does (tests run as root)
        if Path(path) == bonn:
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    with pytest.raises(DatasetError, match=r"cannot list the folder .*bonn \(Permission denied\)"):
        list_items("cityscapes", tmp_path)
