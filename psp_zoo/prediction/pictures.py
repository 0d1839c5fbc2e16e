"""Pictures of a label map: palette PNG, overlay on the image, and a legend of the classes present."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence, Union

import cv2
import numpy as np
from PIL import Image

from ..files import atomic_save

__all__ = ["colorize", "overlay", "legend", "save_palette_png", "save_rgb_png", "save_labels_npy",
           "save_cityscapes_png"]


IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
OUTPUT_FORMATS = ("png", "npy", "cityscapes")
# What one image produces, by format; used to name outputs and to skip earlier outputs as inputs.
OUTPUT_SUFFIXES = {"png": ("_labels.png", "_overlay.png", "_legend.png"), "npy": (".npy",)}


def _palette_array(palette: Sequence[Sequence[int]]) -> np.ndarray:
    lut = np.zeros((256, 3), dtype=np.uint8)  # labels without a colour (e.g. 255 = ignore) are black
    colours = np.asarray(palette, dtype=np.uint8).reshape(-1, 3)
    lut[: len(colours)] = colours
    return lut


def colorize(label: np.ndarray, palette: Sequence[Sequence[int]]) -> np.ndarray:
    """RGB uint8 image of an (H, W) label map, each class in its palette colour."""
    return _palette_array(palette)[np.asarray(label, dtype=np.uint8)]


def overlay(image_rgb: np.ndarray, label: np.ndarray, palette: Sequence[Sequence[int]],
            alpha: float = 0.5) -> np.ndarray:
    """The image blended with the class colours (``alpha`` = weight of the colours)."""
    colours = colorize(label, palette)
    return cv2.addWeighted(image_rgb, 1.0 - alpha, colours, alpha, 0.0)


def legend(label: np.ndarray, palette: Sequence[Sequence[int]], class_names: Sequence[str],
           width: int = 260, row: int = 22) -> np.ndarray:
    """An RGB image listing the classes present in ``label`` (most pixels first) with their colours."""
    ids, counts = np.unique(np.asarray(label), return_counts=True)
    present = [(int(i), int(c)) for i, c in zip(ids, counts) if i < len(class_names)]
    present.sort(key=lambda item: -item[1])
    total = max(sum(c for _, c in present), 1)
    image = np.full((max(len(present), 1) * row + 8, width, 3), 255, dtype=np.uint8)
    lut = _palette_array(palette)
    for n, (cls, count) in enumerate(present):
        y = 4 + n * row
        cv2.rectangle(image, (6, y + 2), (6 + row - 6, y + row - 4), tuple(int(v) for v in lut[cls]), -1)
        cv2.rectangle(image, (6, y + 2), (6 + row - 6, y + row - 4), (0, 0, 0), 1)
        text = f"{class_names[cls]} {100.0 * count / total:.1f}%"
        cv2.putText(image, text, (row + 8, y + row - 8), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1,
                    cv2.LINE_AA)
    return image


def save_palette_png(path: Union[str, Path], label: np.ndarray, palette: Sequence[Sequence[int]]) -> Path:
    """An indexed-colour PNG: pixel values are the class ids, shown in the dataset's colours."""
    image = Image.fromarray(np.asarray(label, dtype=np.uint8))  # mode L; putpalette makes it P
    image.putpalette(_palette_array(palette).reshape(-1).tolist())
    return atomic_save(path, lambda tmp: image.save(tmp, format="PNG"))


def save_rgb_png(path: Union[str, Path], image_rgb: np.ndarray) -> Path:
    def save(tmp):
        if not cv2.imwrite(tmp, cv2.cvtColor(image_rgb, cv2.COLOR_RGB2BGR)):
            raise OSError(f"could not write {path}")
    return atomic_save(path, save)


def save_labels_npy(path: Union[str, Path], label: np.ndarray) -> Path:
    """The raw label map as a ``.npy`` file (``numpy.load`` gives it back unchanged)."""
    if Path(path).suffix != ".npy":  # numpy.save would append one, and the rename would miss it
        raise ValueError(f"{path}: a label array file must end in .npy")
    return atomic_save(path, lambda tmp: np.save(tmp, np.asarray(label)))


def save_cityscapes_png(path: Union[str, Path], label_ids: np.ndarray) -> Path:
    """A Cityscapes benchmark file: official labelIds (``datasets.cityscapes_train_ids_to_label_ids``)
    as a single-channel 8-bit greyscale PNG. Greyscale rather than a palette image so that every
    reader, OpenCV included, gets the labelIds themselves and not colours."""
    label_ids = np.asarray(label_ids)
    if label_ids.ndim != 2:
        raise ValueError(f"{path}: expected an H x W label map, got shape {label_ids.shape}")
    image = Image.fromarray(label_ids)  # 2-D uint8: mode L
    return atomic_save(path, lambda tmp: image.save(tmp, format="PNG"))
