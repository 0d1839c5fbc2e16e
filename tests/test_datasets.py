"""Dataset readers on generated mini datasets in each mmseg layout, and their errors."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from psp_zoo import DatasetError, PSPNet, SegmentationDataset, classes, evaluate, make_loader, palette
from psp_zoo.datasets.readers import cityscapes_label_ids_to_train_ids, dataset_spec, find_dataset_root, list_items
from psp_zoo.datasets.transforms import resize_image, to_tensor

import minidata

SCALE = [(64, 32)]


def _read_all(dataset: SegmentationDataset, workers: int = 0) -> dict:
    return {sample.name: sample for sample in make_loader(dataset, num_workers=workers)}


def _reduce(label: np.ndarray) -> np.ndarray:
    return np.where(label == 0, 255, label.astype(np.int64) - 1).astype(np.uint8)


def _split_names(path: Path) -> list:
    return path.read_text().split()


def _check(samples: dict, written: dict, label_fn=lambda label: label, order=None):
    assert list(samples) == (order or sorted(written))
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
    # palette PNGs read as indices; the image outside val.txt is not read; the split file's order is
    # kept, as mmseg keeps it (the writer lists the names in reverse)
    _check(samples, written, order=_split_names(tmp_path / "VOCdevkit/VOC2012/ImageSets/Segmentation/val.txt"))


@pytest.mark.parametrize("dataset, reduce", [("pascal_context", False), ("pascal_context_59", True)])
def test_pascal_context(tmp_path, dataset, reduce):
    written = minidata.write_pascal_context(tmp_path / "VOC2010")
    samples = _read_all(SegmentationDataset(dataset, tmp_path / "VOC2010", img_scales=SCALE))
    _check(samples, written, _reduce if reduce else (lambda label: label),
           order=_split_names(tmp_path / "VOC2010/ImageSets/SegmentationContext/val.txt"))


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
    with pytest.raises(DatasetError, match="does not exist"):
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


# ---------------------------------------------------------------------------------------------
# the rest of the family, each in its real folder layout

#: mmseg 0.30.0's facts (configs/_base_/datasets/*.py and the dataset classes), written out here
#: so that the manifest is checked against them: image folder, label folder, image suffix, label
#: suffix, reduce_zero_label, test img_scale.
FAMILY = {
    "coco_stuff10k": ("images/test2014", "annotations/test2014", ".jpg", "_labelTrainIds.png", True, (2048, 512)),
    "coco_stuff164k": ("images/val2017", "annotations/val2017", ".jpg", "_labelTrainIds.png", False, (2048, 512)),
    "loveda": ("img_dir/val", "ann_dir/val", ".png", ".png", True, (1024, 1024)),
    "potsdam": ("img_dir/val", "ann_dir/val", ".png", ".png", True, (512, 512)),
    "vaihingen": ("img_dir/val", "ann_dir/val", ".png", ".png", True, (512, 512)),
    "isaid": ("img_dir/val", "ann_dir/val", ".png", "_instance_color_RGB.png", False, (896, 896)),
    "dark_zurich": ("rgb_anon/val/night/GOPR0356", "gt/val/night/GOPR0356", "_rgb_anon.png",
                    "_gt_labelTrainIds.png", False, (1920, 1080)),
    "night_driving": ("leftImg8bit/test/night", "gtCoarse_daytime_trainvaltest/test/night", "_leftImg8bit.png",
                      "_gtCoarse_labelTrainIds.png", False, (1920, 1080)),
}


def _mmseg_label(stored: np.ndarray, reduce: bool) -> np.ndarray:
    """What mmseg's LoadAnnotations makes of a stored label: uint8, then its reduce_zero_label ops."""
    label = stored.astype(np.uint8)
    if reduce:
        label[label == 0] = 255
        label = label - 1
        label[label == 254] = 255
    return label


def _write_family(dataset: str, data_root: Path) -> tuple:
    writer, folder = minidata.FAMILY[dataset]
    return data_root / "data" / folder, writer(data_root / "data" / folder)


@pytest.mark.parametrize("dataset", list(FAMILY))
def test_family_listing_in_mmseg_order(tmp_path, dataset):
    images, labels, image_suffix, label_suffix, _, _ = FAMILY[dataset]
    folder, written = _write_family(dataset, tmp_path)
    order = sorted(written, key=lambda name: name + image_suffix)  # mmseg sorts the file names
    for root in (tmp_path, tmp_path / "data", folder):  # mmseg's data root, its parent, the folder
        items = list_items(dataset, root)
        assert [item.name for item in items] == order  # the decoys (other suffixes, ._ files) are not listed
        assert [item.image_path for item in items] == [folder / images / f"{n}{image_suffix}" for n in order]
        assert [item.label_path for item in items] == [folder / labels / f"{n}{label_suffix}" for n in order]
    assert [item.name for item in list_items(dataset, folder, limit=2)] == order[:2]


@pytest.mark.parametrize("dataset", list(FAMILY))
def test_family_labels_as_mmseg_decodes_them(tmp_path, dataset):
    *_, reduce, img_scale = FAMILY[dataset]
    folder, written = _write_family(dataset, tmp_path)
    data = SegmentationDataset(dataset, folder)
    assert data.reduce_zero_label is reduce and data.img_scales == [img_scale]
    samples = {sample.name: sample for sample in (data[i] for i in range(len(data)))}
    for name, (rgb, stored) in written.items():
        sample = samples[name]
        np.testing.assert_array_equal(sample.label.numpy(), _mmseg_label(stored, reduce))
        assert sample.label.dtype == torch.uint8 and sample.ori_size == rgb.shape[:2]
        assert torch.equal(sample.inputs[0], to_tensor(resize_image(rgb, img_scale)))


def test_reduce_zero_label_keeps_mmseg_uint8_arithmetic(tmp_path):
    minidata.write_loveda(tmp_path)
    every_id = np.arange(256, dtype=np.uint8).reshape(16, 16)
    stored = np.zeros((24, 40), np.uint8)  # 2522 is the first, 24 x 40 image
    stored[:16, :16] = every_id
    minidata._write_label(tmp_path / "ann_dir" / "val" / "2522.png", stored)
    label = SegmentationDataset("loveda", tmp_path, img_scales=SCALE).load_label(0)
    np.testing.assert_array_equal(label, _mmseg_label(stored, True))
    assert (label[0, 0], label[0, 1], label[0, 7], label[15, 14], label[15, 15]) == (255, 0, 6, 253, 255)


def test_family_listing_sorts_whole_file_names(tmp_path):
    # mmseg sorts '1366-1.png' before '1366.png' ('-' < '.'): names alone would sort the other way
    for name in ("1366", "1366-1"):
        minidata._write_png_rgb(tmp_path / "img_dir" / "val" / f"{name}.png", np.zeros((4, 4, 3), np.uint8))
        minidata._write_label(tmp_path / "ann_dir" / "val" / f"{name}.png", np.zeros((4, 4), np.uint8))
    assert [item.name for item in list_items("potsdam", tmp_path)] == ["1366-1", "1366"]


def test_isaid_label_name_and_palette_labels(tmp_path):
    written = minidata.write_isaid(tmp_path)
    item = list_items("isaid", tmp_path)[0]
    assert item.label_path.name == "P0003_0_896_0_896_instance_color_RGB.png"
    label = SegmentationDataset("isaid", tmp_path, img_scales=SCALE).load_label(0)
    np.testing.assert_array_equal(label, written["P0003_0_896_0_896"][1])  # indices, background 0 kept
    assert 0 in label and 255 in label


def _one_line_error(match: str, call) -> str:
    with pytest.raises(DatasetError, match=match) as info:
        call()
    message = str(info.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("dataset", list(FAMILY))
def test_family_folder_not_in_layout_names_the_expected_folders(tmp_path, dataset):
    images = FAMILY[dataset][0]
    _, folder = minidata.FAMILY[dataset]
    (tmp_path / "elsewhere" / "val").mkdir(parents=True)
    message = _one_line_error(f"no {dataset} validation images under", lambda: list_items(dataset, tmp_path))
    for location in ("", f"{folder}/", f"data/{folder}/"):
        assert str(tmp_path / f"{location}{images}") in message
    assert "see docs/datasets.md" in message


def test_family_wrong_layouts_are_explained(tmp_path):
    # Nighttime Driving images saved under another suffix
    minidata.write_night_driving(tmp_path / "nd")
    for path in (tmp_path / "nd" / "leftImg8bit" / "test" / "night").glob("*_leftImg8bit.png"):
        path.rename(path.with_name(path.name.replace("_leftImg8bit.png", ".png")))
    message = _one_line_error(r"no \*_leftImg8bit\.png images in .*night \(night_driving validation set\); "
                              r"it holds 4 other files", lambda: list_items("night_driving", tmp_path / "nd"))
    assert "see docs/datasets.md" in message
    # COCO-Stuff 164k not converted: the class-id maps are there, the train-id maps are not
    minidata.write_coco_stuff164k(tmp_path / "coco")
    for path in (tmp_path / "coco" / "annotations" / "val2017").glob("*_labelTrainIds.png"):
        path.unlink()
    _one_line_error(r"000000000139\.jpg has no label: expected .*000000000139_labelTrainIds\.png "
                    r"\(see docs/datasets\.md",
                    lambda: list_items("coco_stuff164k", tmp_path / "coco"))
    # Dark Zurich without its gt folder
    minidata.write_dark_zurich(tmp_path / "dz")
    (tmp_path / "dz" / "gt").rename(tmp_path / "dz" / "labels")
    _one_line_error(r"dark_zurich: label folder .*gt[/\\]val[/\\]night[/\\]GOPR0356 is missing",
                    lambda: list_items("dark_zurich", tmp_path / "dz"))


def test_colour_and_wide_labels_are_refused_not_misread(tmp_path):
    minidata.write_isaid(tmp_path)
    raw = tmp_path / "ann_dir" / "val" / "P0003_0_896_0_896_instance_color_RGB.png"
    minidata._write_png_rgb(raw, np.zeros((24, 40, 3), np.uint8))  # iSAID's own colour masks, unconverted
    data = SegmentationDataset("isaid", tmp_path, img_scales=SCALE)
    _one_line_error(r"has shape \(24, 40, 3\): expected a single-channel H x W map of class ids", lambda: data[0])
    Image.fromarray(np.full((24, 40), 300, np.uint16)).save(raw)  # 16-bit ids mmseg would wrap to 44
    _one_line_error(r"holds ids 300\.\.300: class ids are 8-bit", lambda: data[0])
    Image.fromarray(np.full((24, 40), 7, np.uint16)).save(raw)  # 16-bit file, 8-bit ids: read as mmseg
    assert data.load_label(0).dtype == np.uint8 and (data.load_label(0) == 7).all()


# ---------------------------------------------------------------------------------------------
# evaluate on each new layout against a reference pipeline written out plainly

EVAL_SCALE = (48, 32)  # small, so that each dataset's test takes a moment; the resize rule is the same
_MEAN = np.array([123.675, 116.28, 103.53])
_STD = np.array([58.395, 57.12, 57.375])


def _narrow_pspnet(num_classes: int, seed: int) -> torch.nn.Module:
    """A randomly initialised narrow PSPNet R-18-D8 with the dataset's class count."""
    torch.manual_seed(seed)
    model = PSPNet(depth=18, num_classes=num_classes, stem_channels=8, base_channels=8, channels=8,
                   aux_channels=8).eval()
    for module in model.modules():  # activations that keep their spread through the narrow layers,
        if isinstance(module, torch.nn.Conv2d):  # so that the predictions vary over the image
            torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
        if isinstance(module, torch.nn.BatchNorm2d):  # and BN statistics for eval mode to apply
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 2.0)
    torch.nn.init.zeros_(model.decode_head.conv_seg.bias)
    return model


def _reference_probs(model, rgb: np.ndarray, img_scale, flip: bool) -> torch.Tensor:
    """mmseg's test pipeline for one scale: mmcv keep-ratio resize (round half up, bilinear),
    normalization as mmcv.imnormalize (float32 image, float64 mean and 1 / std), the model,
    bilinear resize of the logits to the original size, softmax; a flipped input is flipped back."""
    h, w = rgb.shape[:2]
    factor = min(max(img_scale) / max(h, w), min(img_scale) / min(h, w))
    size = (int(w * factor + 0.5), int(h * factor + 0.5))
    image = cv2.resize(rgb, size, interpolation=cv2.INTER_LINEAR).astype(np.float32)
    image = cv2.multiply(cv2.subtract(image, _MEAN.reshape(1, -1)), (1 / _STD).reshape(1, -1))
    x = torch.from_numpy(image.transpose(2, 0, 1).copy())[None]
    if flip:
        x = x.flip(3)
    with torch.no_grad():
        logits = torch.nn.functional.interpolate(model(x), size=(h, w), mode="bilinear", align_corners=False)
    probs = logits.softmax(dim=1)[0]
    return probs.flip(2) if flip else probs


def _reference_matrix(model, items, dataset: str, num_classes: int, ms_flip: bool) -> np.ndarray:
    """C x C histogram (label row, prediction column) of the labelled pixels of every image."""
    *_, reduce, _ = FAMILY[dataset]
    scales = [(int(EVAL_SCALE[0] * r), int(EVAL_SCALE[1] * r)) for r in (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)] \
        if ms_flip else [EVAL_SCALE]
    matrix = np.zeros((num_classes, num_classes), np.int64)
    for item in items:
        rgb = cv2.cvtColor(cv2.imread(str(item.image_path), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
        probs = sum(_reference_probs(model, rgb, scale, flip) for scale in scales
                    for flip in ((False, True) if ms_flip else (False,)))
        pred = probs.argmax(dim=0).numpy()
        label = _mmseg_label(np.array(Image.open(item.label_path)), reduce)
        keep = label != 255
        matrix += np.bincount(label[keep].astype(np.int64) * num_classes + pred[keep],
                              minlength=num_classes ** 2).reshape(num_classes, num_classes)
    return matrix


def _assert_scores_from(result, matrix: np.ndarray) -> None:
    """evaluate's scores are those of ``matrix``: per class IoU and Acc, and aAcc (all in percent)."""
    diag, labelled, predicted = np.diag(matrix), matrix.sum(1), matrix.sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = diag / (labelled + predicted - diag) * 100
        acc = diag / labelled * 100
    nan = lambda values: [float("nan") if v is None else v for v in values]  # noqa: E731
    np.testing.assert_allclose(nan(result.iou.values()), iou, rtol=0, atol=1e-9)
    np.testing.assert_allclose(nan(result.acc.values()), acc, rtol=0, atol=1e-9)
    assert result.aacc == pytest.approx(diag.sum() / matrix.sum() * 100, abs=1e-9)
    assert result.miou == pytest.approx(np.nanmean(iou), abs=1e-9)


def _pixel_classifier(num_classes: int) -> torch.nn.Module:
    """A random 1x1 convolution: ms+flip runs the model at twelve input shapes, cheap with this."""
    torch.manual_seed(0)
    return torch.nn.Conv2d(3, num_classes, 1).eval()


@pytest.mark.parametrize("dataset, ms_flip", [(key, False) for key in FAMILY] + [("loveda", True)])
def test_family_evaluate_equals_the_reference_pipeline(tmp_path, dataset, ms_flip):
    folder, written = _write_family(dataset, tmp_path)
    spec = dataset_spec(dataset)
    model = _pixel_classifier(spec.num_classes) if ms_flip else _narrow_pspnet(spec.num_classes, len(dataset))
    result = evaluate(model, tmp_path, dataset=dataset, ms_flip=ms_flip, img_scale=EVAL_SCALE, device="cpu",
                      num_workers=0, progress=False)
    matrix = _reference_matrix(model, list_items(dataset, tmp_path), dataset, spec.num_classes, ms_flip)
    assert result.images.count == len(written) and matrix.sum() > 0
    assert (matrix.sum(0) > 0).sum() > 1, "a degenerate model predicting one class would test little"
    assert tuple(result.iou) == classes(dataset)  # scored under the dataset's class names
    assert result.settings["reduce_zero_label"] is FAMILY[dataset][4]
    _assert_scores_from(result, matrix)
