"""A generated dataset of coloured shapes in a layout of its own, declared in a user manifest.

``images/{train,val}/shape_NNN.jpg`` with ``masks/{train,val}/shape_NNN_mask.png``: 3 classes
(background, disc, square), a 2-pixel ring of 255 (ignored) around each shape, as VOC marks its
object borders. Discs are bright yellow-orange, squares dark blue, the background smooth mid-grey
blotches, so a narrow PSPNet can learn it in a few hundred iterations on a CPU.

Run as a script to write the walk-through's example: ``python tests/finetune_data.py DIR``.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Dict, Optional, Tuple

import cv2
import numpy as np
import yaml
from PIL import Image

CLASSES = ("background", "disc", "square")
PALETTE = ((0, 0, 0), (220, 20, 60), (0, 0, 142))
SIZE = (96, 96)  # (h, w)
#: the dataset's training facts in docs/finetune.md: milder scale jitter than mmseg's 0.5-2.0 for 96x96 images
WALK_THROUGH_TRAIN = {"ratio_range": [0.75, 1.5]}


def declaration(**changes) -> dict:
    """The dataset's manifest declaration (``changes`` replace or add top-level fields)."""
    spec = {
        "title": "Shapes",
        "num_classes": 3,
        "classes": list(CLASSES),
        "palette": [list(c) for c in PALETTE],
        "img_scale": [SIZE[1], SIZE[0]],
        "reduce_zero_label": False,
        "ignore_index": 255,
        "train_images_per_gpu": 4,
        "test": {"mode": "whole"},
        "layout": {"folders": [""], "images": "images/val", "labels": "masks/val", "image_suffix": ".jpg",
                   "label_suffix": "_mask.png", "train": {"images": "images/train", "labels": "masks/train"}},
    }
    spec.update(changes)
    return spec


def write_manifest(path: Path, key: str = "shapes", spec: Optional[dict] = None, models=()) -> Path:
    """A user manifest declaring the dataset under ``key`` (and any model entries)."""
    data = {"version": 1, "datasets": {key: declaration() if spec is None else spec}}
    if models:
        data["models"] = list(models)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Smooth mid-grey blotches with a slight green tint: neither as bright as a disc nor as blue as a square."""
    grey = rng.integers(90, 150, (h // 12 + 2, w // 12 + 2, 1)).astype(np.float32)
    coarse = grey + rng.integers(-10, 11, grey.shape[:2] + (3,)) + np.array([0, 15, 0], np.float32)
    return cv2.resize(coarse, (w, h), interpolation=cv2.INTER_LINEAR)


def shape_sample(rng: np.random.Generator, size: Tuple[int, int] = SIZE) -> Tuple[np.ndarray, np.ndarray]:
    """One RGB image and its label: one or two discs and squares on the background."""
    h, w = size
    image = _background(rng, h, w)
    label = np.zeros((h, w), np.uint8)
    for _ in range(rng.integers(2, 4)):
        cls = int(rng.integers(1, 3))
        r = int(rng.integers(h // 10, h // 4))
        cy, cx = (int(v) for v in rng.integers(r, (h - r, w - r)))
        mask = np.zeros((h, w), np.uint8)
        if cls == 1:
            cv2.circle(mask, (cx, cy), r, 1, -1)
            colour = (rng.integers(210, 251), rng.integers(160, 221), rng.integers(30, 81))  # bright yellow-orange
        else:
            cv2.rectangle(mask, (cx - r, cy - r), (cx + r, cy + r), 1, -1)
            colour = (rng.integers(20, 51), rng.integers(30, 71), rng.integers(120, 181))  # dark blue
        ring = cv2.dilate(mask, np.ones((5, 5), np.uint8)) - cv2.erode(mask, np.ones((3, 3), np.uint8))
        image[mask > 0] = colour
        label[mask > 0] = cls
        label[ring > 0] = 255
    noise = rng.normal(0, 6, image.shape)
    return np.clip(image + noise, 0, 255).astype(np.uint8), label


def write_split(root: Path, split: str, count: int, *, seed: int, size: Tuple[int, int] = SIZE
                ) -> Dict[str, Tuple[Path, Path]]:
    """``count`` images and masks of ``split`` under ``root``: ``{name: (image path, mask path)}``."""
    rng = np.random.default_rng(seed)
    written = {}
    for index in range(count):
        image, label = shape_sample(rng, size)
        name = f"shape_{index:03d}"
        image_path = Path(root) / "images" / split / f"{name}.jpg"
        label_path = Path(root) / "masks" / split / f"{name}_mask.png"
        image_path.parent.mkdir(parents=True, exist_ok=True)
        label_path.parent.mkdir(parents=True, exist_ok=True)
        assert cv2.imwrite(str(image_path), cv2.cvtColor(image, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 95])
        Image.fromarray(label, mode="L").save(label_path)
        written[name] = (image_path, label_path)
    return written


def write_dataset(root: Path, *, train: int = 32, val: int = 8, seed: int = 0) -> Path:
    """The whole dataset: ``train`` training and ``val`` held-out images (different seeds)."""
    write_split(root, "train", train, seed=seed)
    write_split(root, "val", val, seed=seed + 1000)
    return Path(root)


if __name__ == "__main__":
    target = Path(sys.argv[1] if len(sys.argv) > 1 else "shapes")
    write_dataset(target, train=int(sys.argv[2]) if len(sys.argv) > 2 else 64)
    write_manifest(target / "shapes.yml", spec=declaration(train=WALK_THROUGH_TRAIN))
    print(f"wrote {target}/images, {target}/masks and the manifest {target}/shapes.yml")
