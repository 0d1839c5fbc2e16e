"""Generate tiny validation sets in each mmseg folder layout (images written with OpenCV/Pillow).

Each writer returns ``{name: (rgb_image, stored_label)}`` so tests can check what is read back.
Image content is random but seeded; labels use class ids valid for a 5-class tiny model so the
fixture checkpoints can be scored on them.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Tuple

import cv2
import numpy as np
from PIL import Image

from psp_zoo.testing import write_mini_cityscapes

SIZES = ((24, 40), (31, 23), (20, 20))  # (h, w): landscape, portrait (odd), square


def _rgb(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


def _write_png_rgb(path: Path, rgb: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))


def _write_label(path: Path, label: np.ndarray, palette: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(label.astype(np.uint8), mode="L")
    if palette:  # VOC's SegmentationClass PNGs are palette images: indices, not colours
        image = image.convert("P")
        image.putpalette([(i * 37) % 256 for i in range(768)])
    image.save(path)


def _read_back_rgb(path: Path) -> np.ndarray:
    """The decoded pixels (JPEG is lossy), as the reader should see them."""
    return cv2.cvtColor(cv2.imread(str(path), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


def _labels(rng, h, w, values) -> np.ndarray:
    return rng.choice(np.asarray(values, dtype=np.uint8), size=(h, w))


Written = Dict[str, Tuple[np.ndarray, np.ndarray]]


def write_cityscapes(folder: Path, *, label_ids: bool = False, seed: int = 0) -> Written:
    """leftImg8bit/val/<city>/*_leftImg8bit.png + gtFine/val/<city>/*_gtFine_label{TrainIds,Ids}.png,
    written by psp_zoo.testing (the selftest's writer) with noise images and the sizes above."""
    values = [0, 1, 7, 8, 11, 12, 13, 26, 33] if label_ids else [0, 1, 2, 3, 4, 255]
    return write_mini_cityscapes(folder, sizes=SIZES, label_values=values, label_ids=label_ids, smooth=False,
                                 seed=seed)


def write_ade20k(folder: Path, *, seed: int = 1) -> Written:
    """images/validation/*.jpg + annotations/validation/*.png (0 = other, classes from 1)."""
    rng = np.random.default_rng(seed)
    written = {}
    for i, (h, w) in enumerate(SIZES):
        name = f"ADE_val_{i + 1:08d}"
        image_path = folder / "images" / "validation" / f"{name}.jpg"
        _write_png_rgb(image_path, _rgb(rng, h, w))
        label = _labels(rng, h, w, [0, 1, 2, 3, 4, 5])
        _write_label(folder / "annotations" / "validation" / f"{name}.png", label)
        written[name] = (_read_back_rgb(image_path), label)
    return written


def _write_voc_style(folder: Path, label_dir: str, split: str, values, palette: bool, seed: int) -> Written:
    rng = np.random.default_rng(seed)
    written = {}
    for i, (h, w) in enumerate(SIZES):
        name = f"2008_{i:06d}"
        image_path = folder / "JPEGImages" / f"{name}.jpg"
        _write_png_rgb(image_path, _rgb(rng, h, w))
        label = _labels(rng, h, w, values)
        _write_label(folder / label_dir / f"{name}.png", label, palette=palette)
        written[name] = (_read_back_rgb(image_path), label)
    # An image outside the split must not be read.
    _write_png_rgb(folder / "JPEGImages" / "2012_999999.jpg", _rgb(rng, 8, 8))
    split_path = folder / split
    split_path.parent.mkdir(parents=True, exist_ok=True)
    split_path.write_text("".join(f"{name}\n" for name in reversed(list(written))))
    return written


def write_voc12(folder: Path, *, seed: int = 2) -> Written:
    """VOC2012: JPEGImages, palette SegmentationClass PNGs, ImageSets/Segmentation/val.txt."""
    return _write_voc_style(folder, "SegmentationClass", "ImageSets/Segmentation/val.txt",
                            [0, 1, 2, 3, 4, 255], True, seed)


def write_pascal_context(folder: Path, *, seed: int = 3) -> Written:
    """VOC2010: JPEGImages, SegmentationClassContext, ImageSets/SegmentationContext/val.txt."""
    return _write_voc_style(folder, "SegmentationClassContext", "ImageSets/SegmentationContext/val.txt",
                            [0, 1, 2, 3, 4, 5], False, seed)


# ---------------------------------------------------------------------------------------------
# the rest of the family: file names and label values as mmseg's tools/convert_datasets write them


def _write_flat(folder: Path, image_dir: str, label_dir: str, names, image_suffix: str, label_suffix: str,
                values, seed: int, *, mode: str = "L") -> Written:
    """One image and one label per name; ``mode`` 'P' writes palette labels (as the iSAID converter)."""
    rng = np.random.default_rng(seed)
    written = {}
    for i, name in enumerate(names):
        h, w = SIZES[i % len(SIZES)]
        image_path = folder / image_dir / f"{name}{image_suffix}"
        _write_png_rgb(image_path, _rgb(rng, h, w))
        label = _labels(rng, h, w, values)
        _write_label(folder / label_dir / f"{name}{label_suffix}", label, palette=mode == "P")
        written[name] = (_read_back_rgb(image_path), label)
    return written


def _decoys(folder: Path, image_dir: str, names) -> None:
    """Files a reader must not list: other suffixes, and hidden files (mmcv's scandir skips '.*')."""
    for name in names:
        path = folder / image_dir / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"not an image of the validation set")


def write_coco_stuff10k(folder: Path, *, seed: int = 10) -> Written:
    """images/test2014/*.jpg + annotations/test2014/*_labelTrainIds.png: 0 = unlabeled, classes 1..171."""
    names = ["COCO_train2014_000000000077", "COCO_train2014_000000000139", "COCO_train2014_000000000285"]
    written = _write_flat(folder, "images/test2014", "annotations/test2014", names, ".jpg",
                          "_labelTrainIds.png", [0, 1, 2, 3, 100, 171], seed)
    _decoys(folder, "images/test2014", ["COCO_train2014_000000000077.png", "._COCO_train2014_000000000001.jpg"])
    # the converter's input, beside its output: never read as a label
    _write_label(folder / "annotations/test2014/COCO_train2014_000000000077.png", np.zeros((24, 40), np.uint8))
    return written


def write_coco_stuff164k(folder: Path, *, seed: int = 11) -> Written:
    """images/val2017/*.jpg + annotations/val2017/*_labelTrainIds.png: classes 0..170, 255 = unlabeled."""
    names = ["000000000139", "000000000285", "000000000632"]
    written = _write_flat(folder, "images/val2017", "annotations/val2017", names, ".jpg",
                          "_labelTrainIds.png", [0, 1, 2, 3, 170, 255], seed)
    _decoys(folder, "images/val2017", ["000000000724.txt", ".000000000776.jpg"])
    for name in names:  # the stuff-thing maps the converter read: class ids, not train ids
        _write_label(folder / f"annotations/val2017/{name}.png", np.full(written[name][1].shape, 182, np.uint8))
    return written


def _write_remote_sensing(folder: Path, names, classes: int, seed: int) -> Written:
    written = _write_flat(folder, "img_dir/val", "ann_dir/val", names, ".png", ".png", range(classes + 1), seed)
    _decoys(folder, "img_dir/val", ["Thumbs.db", f"._{names[0]}.png"])
    _write_label(folder / "ann_dir/val/unpaired.png", np.zeros((4, 4), np.uint8))  # a label without image
    return written


def write_loveda(folder: Path, *, seed: int = 12) -> Written:
    """img_dir/val/*.png + ann_dir/val/*.png: 0 = no-data (ignored), classes 1..7."""
    return _write_remote_sensing(folder, ["2522", "3514", "4191"], 7, seed)


def write_potsdam(folder: Path, *, seed: int = 13) -> Written:
    """img_dir/val/*.png + ann_dir/val/*.png: 0 = boundary (ignored), classes 1..6."""
    return _write_remote_sensing(folder, ["2_13_0_0_512_512", "2_13_0_1536_512_2048", "6_15_512_0_1024_512"],
                                 6, seed)


def write_vaihingen(folder: Path, *, seed: int = 14) -> Written:
    """img_dir/val/*.png + ann_dir/val/*.png: 0 = boundary (ignored), classes 1..6."""
    return _write_remote_sensing(folder, ["area10_0_0_512_512", "area2_0_0_512_512", "area2_256_0_768_512"],
                                 6, seed)


def write_isaid(folder: Path, *, seed: int = 15) -> Written:
    """img_dir/val/*.png + ann_dir/val/*_instance_color_RGB.png (palette PNGs of class ids):
    0 = background (a class), 1..15, 255 = padding of patches smaller than 896."""
    names = ["P0003_0_896_0_896", "P0003_0_896_600_1496", "P0004_0_800_0_896"]
    written = _write_flat(folder, "img_dir/val", "ann_dir/val", names, ".png", "_instance_color_RGB.png",
                          list(range(16)) + [255], seed, mode="P")
    _decoys(folder, "img_dir/val", ["P0003.json", "._P0003_0_896_0_896.png"])
    return written


def write_dark_zurich(folder: Path, *, seed: int = 16) -> Written:
    """rgb_anon/val/night/GOPR0356/*_rgb_anon.png + gt/val/night/GOPR0356/*_gt_labelTrainIds.png."""
    names = ["GOPR0356_frame_000321", "GOPR0356_frame_000339", "GOPR0356_frame_000357"]
    written = _write_flat(folder, "rgb_anon/val/night/GOPR0356", "gt/val/night/GOPR0356", names,
                          "_rgb_anon.png", "_gt_labelTrainIds.png", [0, 1, 2, 10, 18, 255], seed)
    _decoys(folder, "rgb_anon/val/night/GOPR0356", ["GOPR0356_frame_000321_rgb_anon.jpg", "readme.txt"])
    _decoys(folder, "rgb_anon/val/night", ["GOPR0351_frame_000001_rgb_anon.png"])  # outside the scored folder
    for name in names:  # labelIds and colour maps sit beside the trainIds
        _write_label(folder / f"gt/val/night/GOPR0356/{name}_gt_labelIds.png",
                     np.full(written[name][1].shape, 33, np.uint8))
        _write_png_rgb(folder / f"gt/val/night/GOPR0356/{name}_gt_labelColor.png",
                       np.zeros(written[name][1].shape + (3,), np.uint8))
    return written


def write_night_driving(folder: Path, *, seed: int = 17) -> Written:
    """leftImg8bit/test/night/*_leftImg8bit.png + gtCoarse_daytime_trainvaltest/test/night/
    *_gtCoarse_labelTrainIds.png (Cityscapes trainIds 0..18, 255 = ignored)."""
    names = ["0_frame_0037", "0_frame_0171", "1_frame_0011"]
    labels = "gtCoarse_daytime_trainvaltest/test/night"
    written = _write_flat(folder, "leftImg8bit/test/night", labels, names, "_leftImg8bit.png",
                          "_gtCoarse_labelTrainIds.png", [0, 1, 2, 10, 18, 255], seed)
    _decoys(folder, "leftImg8bit/test/night", ["0_frame_0037_leftImg8bit.jpg", ".0_frame_0001_leftImg8bit.png"])
    for name in names:
        _write_label(folder / labels / f"{name}_gtCoarse_labelIds.png", np.full(written[name][1].shape, 26, np.uint8))
    return written


#: dataset key -> (writer, the dataset folder's name in mmseg's data root)
FAMILY = {
    "coco_stuff10k": (write_coco_stuff10k, "coco_stuff10k"),
    "coco_stuff164k": (write_coco_stuff164k, "coco_stuff164k"),
    "loveda": (write_loveda, "loveDA"),
    "potsdam": (write_potsdam, "potsdam"),
    "vaihingen": (write_vaihingen, "vaihingen"),
    "isaid": (write_isaid, "iSAID"),
    "dark_zurich": (write_dark_zurich, "dark_zurich"),
    "night_driving": (write_night_driving, "NighttimeDrivingTest"),
}
