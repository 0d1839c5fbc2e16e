"""Readers for the validation sets in mmseg's folder layouts, with the reference test transform.

A data root is the dataset folder itself (``data/cityscapes``, ``data/ade/ADEChallengeData2016``,
``data/VOCdevkit/VOC2012``, ``data/VOCdevkit/VOC2010``) or a folder that contains it. Images are
listed in sorted order; every image must have its label, or construction fails naming both
paths: a silently skipped image would change the metric's denominator.

Images are decoded with OpenCV (as mmseg's ``LoadImageFromFile``), labels with Pillow (as its
``LoadAnnotations``), so palette PNGs (VOC) give class indices, not colours.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

import cv2
import numpy as np
import torch
from PIL import Image

from .errors import DatasetError, PspZooError
from .manifest import DATASETS, get_manifest
from .transforms import resized_inputs

__all__ = [
    "Layout", "LAYOUTS", "Item", "Sample", "SegmentationDataset", "classes", "class_names", "palette",
    "find_dataset_root", "list_items", "decode_image", "read_image", "read_label", "make_loader",
    "cityscapes_label_ids_to_train_ids", "cityscapes_train_ids_to_label_ids", "CITYSCAPES_LABEL_IDS",
    "reduce_zero_label", "default_num_workers",
]

PathLike = Union[str, Path]
CLASSES_FILE = Path(__file__).with_name("data") / "dataset_classes.json"


@dataclass(frozen=True)
class Layout:
    """Where one dataset's validation images and labels live, relative to its folder."""

    locations: Tuple[str, ...]  # the dataset folder relative to a data root, most specific last
    image_dir: str
    label_dir: str
    image_suffix: str
    label_suffix: str
    split_file: Optional[str] = None  # one image stem per line; None = every image in image_dir
    fallback_label_suffix: Optional[str] = None  # Cityscapes labelIds, mapped to trainIds on load


_CITYSCAPES = Layout(("", "cityscapes", "data/cityscapes"), "leftImg8bit/val", "gtFine/val",
                     "_leftImg8bit.png", "_gtFine_labelTrainIds.png",
                     fallback_label_suffix="_gtFine_labelIds.png")
_ADE20K = Layout(("", "ADEChallengeData2016", "ade/ADEChallengeData2016", "data/ade/ADEChallengeData2016"),
                 "images/validation", "annotations/validation", ".jpg", ".png")
_VOC2012 = Layout(("", "VOC2012", "VOCdevkit/VOC2012", "data/VOCdevkit/VOC2012"),
                  "JPEGImages", "SegmentationClass", ".jpg", ".png", "ImageSets/Segmentation/val.txt")
_CONTEXT = Layout(("", "VOC2010", "VOCdevkit/VOC2010", "data/VOCdevkit/VOC2010"),
                  "JPEGImages", "SegmentationClassContext", ".jpg", ".png",
                  "ImageSets/SegmentationContext/val.txt")
LAYOUTS: Dict[str, Layout] = {
    "cityscapes": _CITYSCAPES, "ade20k": _ADE20K, "voc12aug": _VOC2012,
    "pascal_context": _CONTEXT, "pascal_context_59": _CONTEXT,
}

# Official Cityscapes table: these labelIds are trainIds 0..18 in this order; the rest is ignored.
_CITYSCAPES_TRAIN_LABEL_IDS = (7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33)
_LABEL_ID_TO_TRAIN_ID = np.full(256, 255, dtype=np.uint8)
_LABEL_ID_TO_TRAIN_ID[list(_CITYSCAPES_TRAIN_LABEL_IDS)] = np.arange(19, dtype=np.uint8)
#: The inverse: the official labelId of each trainId 0..18 (index = trainId), as benchmark files hold.
CITYSCAPES_LABEL_IDS: Tuple[int, ...] = _CITYSCAPES_TRAIN_LABEL_IDS


# ---------------------------------------------------------------------------------------------
# class names and palettes


@lru_cache(maxsize=None)
def _class_table() -> dict:
    return json.loads(CLASSES_FILE.read_text())


def _check_dataset(dataset: str) -> str:
    if dataset not in DATASETS:
        raise DatasetError(f"unknown dataset {dataset!r}; psp-zoo reads: {', '.join(DATASETS)}")
    return dataset


def classes(dataset: str) -> Tuple[str, ...]:
    """The dataset's class names in label-index order (as the published checkpoints use them)."""
    return tuple(_class_table()[_check_dataset(dataset)]["classes"])


def class_names(dataset: str, num_classes: int) -> Tuple[str, ...]:
    """Names to report per-class scores under: the dataset's, or "0".."C-1" for a model whose class
    count differs from the dataset's (e.g. a test fixture), which is then scored by index."""
    names = classes(dataset)
    return names if len(names) == num_classes else tuple(str(i) for i in range(num_classes))


def palette(dataset: str) -> Tuple[Tuple[int, int, int], ...]:
    """One RGB colour per class, the reference's palette."""
    return tuple(tuple(colour) for colour in _class_table()[_check_dataset(dataset)]["palette"])


# ---------------------------------------------------------------------------------------------
# finding files


@dataclass(frozen=True)
class Item:
    """One validation image: ``name`` is its path below the image folder without the suffix."""

    name: str
    image_path: Path
    label_path: Path
    label_ids: bool = False  # Cityscapes labelIds file, to be mapped to trainIds


def find_dataset_root(dataset: str, data_root: PathLike) -> Path:
    """The dataset folder: ``data_root`` itself or the first known sub-location holding its images."""
    layout = LAYOUTS[_check_dataset(dataset)]
    root = Path(data_root).expanduser()
    if not root.is_dir():
        raise DatasetError(f"data root {root} is not a folder; pass the {dataset} dataset folder "
                           f"or a folder that contains it")
    for location in layout.locations:
        if (root / location / layout.image_dir).is_dir():
            return root / location
    expected = " or ".join(str(root / loc / layout.image_dir) for loc in layout.locations)
    raise DatasetError(f"no {dataset} validation images under {root}: expected the folder {expected} "
                       f"(see README, 'Datasets')")


def _files_below(folder: Path, suffix: str) -> List[Path]:
    """Every file under ``folder`` (recursively) whose name ends in ``suffix``.

    Unlike ``Path.rglob``, which silently passes over a sub-folder it may not list, an unreadable
    folder is an error: skipping a city would evaluate fewer images and change the metric.
    """
    def refuse(exc: OSError) -> None:
        raise DatasetError(f"cannot list the folder {exc.filename} ({exc.strerror or exc}); make it readable: "
                           f"its images would otherwise be left out of the evaluation")

    found = []
    for parent, _folders, names in os.walk(folder, onerror=refuse, followlinks=True):
        found += [Path(parent) / name for name in names if name.endswith(suffix)]
    return found


def _image_names(dataset: str, folder: Path, layout: Layout) -> List[str]:
    image_dir = folder / layout.image_dir
    if layout.split_file is None:
        found = [str(path.relative_to(image_dir).as_posix())[: -len(layout.image_suffix)]
                 for path in _files_below(image_dir, layout.image_suffix)]
        if not found:
            raise DatasetError(f"no *{layout.image_suffix} images in {image_dir} ({dataset} validation set)")
        return sorted(found)
    split = folder / layout.split_file
    if not split.is_file():
        raise DatasetError(f"{dataset}: split file {split} is missing; it lists the validation images")
    names = sorted({line.strip() for line in split.read_text().splitlines() if line.strip()})
    if not names:
        raise DatasetError(f"{dataset}: split file {split} lists no images")
    return names


def _label_for(dataset: str, name: str, folder: Path, layout: Layout) -> Tuple[Path, bool]:
    label_dir = folder / layout.label_dir
    stem = name
    label = label_dir / f"{stem}{layout.label_suffix}"
    if label.is_file():
        return label, False
    if layout.fallback_label_suffix:
        fallback = label_dir / f"{stem}{layout.fallback_label_suffix}"
        if fallback.is_file():
            return fallback, True
    also = f" (or {label_dir / (stem + layout.fallback_label_suffix)})" if layout.fallback_label_suffix else ""
    raise DatasetError(f"{dataset}: image {folder / layout.image_dir / (name + layout.image_suffix)} "
                       f"has no label: expected {label}{also}")


def list_items(dataset: str, data_root: PathLike, limit: Optional[int] = None, *, manifest=None) -> List[Item]:
    """Every validation image with its label, sorted by name; the first ``limit`` when given."""
    if limit is not None and limit < 1:
        raise DatasetError(f"limit must be a positive number of images, got {limit}")
    folder = find_dataset_root(dataset, data_root)
    layout = LAYOUTS[dataset]
    if not (folder / layout.label_dir).is_dir():
        raise DatasetError(f"{dataset}: label folder {folder / layout.label_dir} is missing")
    names = _image_names(dataset, folder, layout)[:limit]
    items = []
    for name in names:
        image = folder / layout.image_dir / f"{name}{layout.image_suffix}"
        if not image.is_file():
            raise DatasetError(f"{dataset}: image {image} listed in {folder / layout.split_file} is missing")
        label, label_ids = _label_for(dataset, name, folder, layout)
        items.append(Item(name, image, label, label_ids))
    return items


# ---------------------------------------------------------------------------------------------
# reading files


def decode_image(path: PathLike) -> np.ndarray:
    """H x W x 3 uint8 RGB of an image file; DatasetError ``cannot read image PATH: why`` if impossible.

    The bytes are read by Python and decoded with ``cv2.imdecode``, as the reference's
    ``mmcv.imfrombytes`` does: an unreadable file then says why (e.g. permission denied), and
    OpenCV prints no warning of its own on stderr.
    """
    try:
        data = np.fromfile(str(path), dtype=np.uint8)
    except OSError as exc:
        raise DatasetError(f"cannot read image {path}: {exc.strerror or exc}") from None
    image = cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size else None
    if image is None:
        raise DatasetError(f"cannot read image {path}: {'empty file' if not data.size else 'truncated or not an image file'}")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def read_image(path: PathLike) -> np.ndarray:
    """H x W x 3 uint8 RGB of a dataset image, decoded by OpenCV like the reference."""
    try:
        return decode_image(path)
    except DatasetError as exc:
        raise DatasetError(f"{exc}; re-extract the dataset") from None


def read_label(path: PathLike) -> np.ndarray:
    """H x W label map exactly as stored (palette PNGs give indices), decoded by Pillow."""
    try:
        with Image.open(path) as image:
            label = np.array(image)
    except (OSError, ValueError, SyntaxError) as exc:  # Pillow raises SyntaxError on some broken PNGs
        raise DatasetError(f"cannot read label {path}: {exc}; re-extract the dataset") from None
    if label.ndim != 2:
        raise DatasetError(f"label {path} has shape {label.shape}: expected a single-channel "
                           f"H x W map of class indices")
    return label if label.dtype == np.uint8 else label.astype(np.int64)


def cityscapes_label_ids_to_train_ids(label: np.ndarray) -> np.ndarray:
    """Map Cityscapes labelIds to trainIds (official table); ids outside it become 255."""
    if label.dtype != np.uint8:
        label = np.where((label >= 0) & (label < 256), label, 0).astype(np.uint8)
    return _LABEL_ID_TO_TRAIN_ID[label]


def cityscapes_train_ids_to_label_ids(label: np.ndarray) -> np.ndarray:
    """Map trainIds 0..18 back to the official labelIds (uint8), the values the Cityscapes benchmark
    scores. Any other value has no labelId of its own, so it is refused rather than guessed."""
    label = np.asarray(label)
    outside = (label < 0) | (label >= len(CITYSCAPES_LABEL_IDS))
    if outside.any():
        raise PspZooError(f"a Cityscapes prediction holds trainId {int(label[outside].flat[0])}; only "
                          f"0..{len(CITYSCAPES_LABEL_IDS) - 1} have an official labelId")
    return np.asarray(CITYSCAPES_LABEL_IDS, dtype=np.uint8)[label.astype(np.intp)]


def reduce_zero_label(label: np.ndarray) -> np.ndarray:
    """mmseg's reduce_zero_label: 0 (other/background) -> 255, every other class id minus 1."""
    reduced = label.astype(np.int64) - 1
    reduced[label == 0] = 255
    reduced[label == 255] = 255
    return reduced.astype(label.dtype) if label.dtype == np.uint8 else reduced


# ---------------------------------------------------------------------------------------------
# the torch Dataset


@dataclass
class Sample:
    """One test image: inputs resized to each test scale, the label at the original size."""

    index: int
    name: str
    inputs: List[torch.Tensor]  # 3 x h x w uint8 RGB, one per target scale (normalize_batch)
    label: torch.Tensor  # H x W, uint8 or int64; 255 = ignore
    ori_size: Tuple[int, int]  # (H, W) of the original image

    def pin_memory(self) -> "Sample":  # called by DataLoader(pin_memory=True)
        self.inputs = [inp.pin_memory() for inp in self.inputs]
        self.label = self.label.pin_memory()
        return self


class SegmentationDataset(torch.utils.data.Dataset):
    """The validation set of ``dataset`` under ``data_root``, transformed for testing.

    ``img_scales`` lists the resize targets (long, short): the test img_scale, or the six ms+flip
    scales (``transforms.target_scales``). Default: the dataset's img_scale from the manifest.
    """

    def __init__(self, dataset: str, data_root: PathLike, *, img_scales: Optional[Sequence[Sequence[int]]] = None,
                 limit: Optional[int] = None, reduce_zero_label: Optional[bool] = None,
                 items: Optional[Sequence[Item]] = None, manifest=None):
        if img_scales is None or reduce_zero_label is None:
            spec = get_manifest(manifest).datasets[_check_dataset(dataset)]
            img_scales = img_scales or [spec.img_scale]
            reduce_zero_label = spec.reduce_zero_label if reduce_zero_label is None else reduce_zero_label
        self.dataset = _check_dataset(dataset)
        self.data_root = Path(data_root)
        self.img_scales = [tuple(scale) for scale in img_scales]
        self.reduce_zero_label = reduce_zero_label
        self.items = list(items) if items is not None else list_items(dataset, data_root, limit)

    def __len__(self) -> int:
        return len(self.items)

    def subset(self, indices: Sequence[int]) -> "SegmentationDataset":
        """The same dataset restricted to ``indices`` (e.g. the images one process evaluates)."""
        return SegmentationDataset(self.dataset, self.data_root, img_scales=self.img_scales,
                                   reduce_zero_label=self.reduce_zero_label,
                                   items=[self.items[i] for i in indices])

    def shard(self, rank: int, world_size: int) -> "SegmentationDataset":
        """Every ``world_size``-th image starting at ``rank``: disjoint shards covering all images."""
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside [0, {world_size})")
        return self.subset(range(rank, len(self.items), world_size))

    def load_label(self, index: int) -> np.ndarray:
        """The label of image ``index`` as evaluated: trainIds, reduce_zero_label applied."""
        item = self.items[index]
        label = read_label(item.label_path)
        if item.label_ids:
            label = cityscapes_label_ids_to_train_ids(label)
        return reduce_zero_label(label) if self.reduce_zero_label else label

    def __getitem__(self, index: int) -> Sample:
        item = self.items[index]
        image = read_image(item.image_path)
        label = self.load_label(index)
        if label.shape != image.shape[:2]:
            raise DatasetError(f"label {item.label_path} is {label.shape[1]}x{label.shape[0]} but image "
                               f"{item.image_path} is {image.shape[1]}x{image.shape[0]}; they must match")
        return Sample(index, item.name, resized_inputs(image, self.img_scales),
                      torch.from_numpy(np.ascontiguousarray(label)), image.shape[:2])


# ---------------------------------------------------------------------------------------------
# loading in worker processes


@dataclass
class _Failure:
    message: str


class _CatchErrors(torch.utils.data.Dataset):
    """Hands a worker's PspZooError to the main process as a value, to re-raise there in one line."""

    def __init__(self, dataset: torch.utils.data.Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        try:
            return self.dataset[index]
        except PspZooError as exc:
            return _Failure(str(exc))


def _single(batch: list):
    return batch[0]


def default_num_workers() -> int:
    """Decoding workers: all cores but one for the main process, at most 8."""
    return max(1, min(8, (os.cpu_count() or 2) - 1))


def make_loader(dataset: SegmentationDataset, *, num_workers: Optional[int] = None,
                pin_memory: bool = False) -> Iterator[Sample]:
    """Samples of ``dataset`` in order, decoded and transformed in ``num_workers`` processes.

    A DatasetError raised in a worker (an unreadable file) is raised here with its own message.
    """
    workers = default_num_workers() if num_workers is None else num_workers
    loader = torch.utils.data.DataLoader(
        _CatchErrors(dataset), batch_size=1, shuffle=False, num_workers=workers,
        collate_fn=_single, pin_memory=pin_memory, prefetch_factor=2 if workers else None,
        persistent_workers=False)
    for sample in loader:
        if isinstance(sample, _Failure):
            raise DatasetError(sample.message)
        yield sample
