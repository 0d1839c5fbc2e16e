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
    """leftImg8bit/val/<city>/*_leftImg8bit.png + gtFine/val/<city>/*_gtFine_label{TrainIds,Ids}.png."""
    rng = np.random.default_rng(seed)
    written = {}
    for i, (h, w) in enumerate(SIZES):
        city = ("aachen", "bonn")[i % 2]
        name = f"{city}/{city}_{i:06d}_000019"
        rgb = _rgb(rng, h, w)
        _write_png_rgb(folder / "leftImg8bit" / "val" / f"{name}_leftImg8bit.png", rgb)
        if label_ids:
            label = _labels(rng, h, w, [0, 1, 7, 8, 11, 12, 13, 26, 33])
            _write_label(folder / "gtFine" / "val" / f"{name}_gtFine_labelIds.png", label)
        else:
            label = _labels(rng, h, w, [0, 1, 2, 3, 4, 255])
            _write_label(folder / "gtFine" / "val" / f"{name}_gtFine_labelTrainIds.png", label)
        written[name] = (rgb, label)
    return written


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
