"""Readers for the validation sets in mmseg's folder layouts, with the reference test transform.

Every dataset's folders and file names are declared once, in the manifest (``DatasetSpec.layout``);
this module reads any such layout the way mmseg 0.30.0's ``CustomDataset`` does. A data root is
the dataset folder itself (``data/loveDA``) or a folder that contains it at one of the layout's
``folders``. Images are the files under the image folder (recursively) whose names end in the
image suffix, hidden files (``.*``) excepted, sorted by their path; a label's path is the image's
with the image suffix replaced by the label suffix, below the label folder. With a split file,
the images are its lines, in its order. Every image must have its label, or construction fails
naming both paths: a silently skipped image would change the metric's denominator.

Images are decoded with OpenCV (as mmseg's ``LoadImageFromFile``), labels with Pillow, unchanged
(as its ``LoadAnnotations``), so palette PNGs (VOC, iSAID) give class indices, not colours.
"""
from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, List, Optional, Sequence, Tuple, Union

import cv2
import numpy as np
import torch
from PIL import Image

from ..environment import on_device
from ..errors import DatasetError, PspZooError
from ..manifest.loading import DatasetSpec, Layout, get_manifest
from .transforms import resized_inputs

__all__ = [
    "Item", "Sample", "SegmentationDataset", "dataset_spec", "classes", "class_names", "palette",
    "find_dataset_root", "locate_split_folder", "list_items", "decode_image", "read_image", "read_label", "make_loader",
    "cityscapes_label_ids_to_train_ids", "cityscapes_train_ids_to_label_ids", "CITYSCAPES_LABEL_IDS",
    "reduce_zero_label", "default_num_workers", "training_items", "files_below", "LABEL_MAP_DECODERS",
]

PathLike = Union[str, Path]
#: Where a user learns how to prepare each layout; every "not in the layout" message points there.
SEE_README = "see docs/datasets.md"

# Official Cityscapes table: these labelIds are trainIds 0..18 in this order; the rest is ignored.
_CITYSCAPES_TRAIN_LABEL_IDS = (7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33)
_LABEL_ID_TO_TRAIN_ID = np.full(256, 255, dtype=np.uint8)
_LABEL_ID_TO_TRAIN_ID[list(_CITYSCAPES_TRAIN_LABEL_IDS)] = np.arange(19, dtype=np.uint8)
#: The inverse: the official labelId of each trainId 0..18 (index = trainId), as benchmark files hold.
CITYSCAPES_LABEL_IDS: Tuple[int, ...] = _CITYSCAPES_TRAIN_LABEL_IDS


# ---------------------------------------------------------------------------------------------
# the dataset's declaration, class names and palettes


def dataset_spec(dataset: str, manifest=None) -> DatasetSpec:
    """The manifest's declaration of ``dataset``; DatasetError naming the known keys if there is none."""
    datasets = get_manifest(manifest).datasets
    if dataset not in datasets:
        raise DatasetError(f"unknown dataset {dataset!r}; psp-zoo reads: {', '.join(datasets)}")
    return datasets[dataset]


def classes(dataset: str, manifest=None) -> Tuple[str, ...]:
    """The dataset's class names in label-index order (as the published checkpoints use them)."""
    return tuple(dataset_spec(dataset, manifest).classes)


def class_names(dataset: str, num_classes: int, manifest=None) -> Tuple[str, ...]:
    """Names to report per-class scores under: the dataset's, or "0".."C-1" for a model whose class
    count differs from the dataset's (e.g. a test fixture), which is then scored by index."""
    return dataset_spec(dataset, manifest).class_names(num_classes)


def palette(dataset: str, manifest=None) -> Tuple[Tuple[int, int, int], ...]:
    """One RGB colour per class, the reference's palette."""
    return tuple(tuple(colour) for colour in dataset_spec(dataset, manifest).palette)


# ---------------------------------------------------------------------------------------------
# finding files


@dataclass(frozen=True)
class Item:
    """One validation image: ``name`` is its path below the image folder without the image suffix."""

    name: str
    image_path: Path
    label_path: Path
    label_map: Optional[str] = None  # a fallback label file, whose ids this mapping turns into class ids


def find_dataset_root(dataset: str, data_root: PathLike, manifest=None) -> Path:
    """The dataset folder: the first of the layout's ``folders`` below ``data_root`` holding its images."""
    return locate_split_folder(dataset, data_root, dataset_spec(dataset, manifest).layout, "validation")


def locate_split_folder(dataset: str, data_root: PathLike, layout: Layout, split: str,
                        field: Optional[str] = None) -> Path:
    """The first of ``layout.folders`` below ``data_root`` holding ``layout.images``; else a DatasetError
    naming the split (``validation``, ``training``), the declaration's ``field`` when given, and where it looked."""
    root = Path(data_root).expanduser()
    if not root.is_dir():
        problem = "is not a folder" if root.exists() else "does not exist"
        raise DatasetError(f"data root {root} {problem}; pass the {dataset} dataset folder "
                           f"or a folder that contains it ({SEE_README})")
    for location in layout.folders:
        if (root / location / layout.images).is_dir():
            return root / location
    expected = " or ".join(str(root / loc / layout.images) for loc in layout.folders)
    declared = f" ({field} {layout.images!r})" if field else ""
    raise DatasetError(f"no {dataset} {split} images under {root}{declared}: expected the folder {expected} "
                       f"({SEE_README})")


def files_below(folder: Path, suffix: str) -> List[str]:
    """Paths relative to ``folder`` of the files below it whose path ends in ``suffix``, as mmcv's
    disk listing finds them: recursive through every sub-folder (links followed), hidden files
    (``.*``, e.g. macOS ``._`` copies) left out.

    Unlike ``Path.rglob``, which silently passes over a sub-folder it may not list, an unreadable
    folder is an error: skipping a city would evaluate fewer images and change the metric.
    """
    def refuse(exc: OSError) -> None:
        raise DatasetError(f"cannot list the folder {exc.filename} ({exc.strerror or exc}); make it readable: "
                           f"its images would otherwise be left out of the evaluation")

    found = []
    for parent, _folders, names in os.walk(folder, onerror=refuse, followlinks=True):
        rel = Path(parent).relative_to(folder)
        found += [(rel / name).as_posix() for name in names
                  if not name.startswith(".") and (rel / name).as_posix().endswith(suffix)]
    return found


def _listed_images(dataset: str, image_dir: Path, layout: Layout) -> List[str]:
    """Image paths below ``image_dir``, sorted as mmseg sorts them: by the whole file name."""
    found = sorted(files_below(image_dir, layout.image_suffix))
    if not found:
        others = files_below(image_dir, "")
        seen = f"; it holds {len(others)} other files, e.g. {sorted(others)[0]}" if others else ""
        raise DatasetError(f"no *{layout.image_suffix} images in {image_dir} ({dataset} validation set)"
                           f"{seen} ({SEE_README})")
    return found


def _split_images(dataset: str, folder: Path, layout: Layout) -> List[str]:
    """Image paths named by the split file, in its order (mmseg's); blank lines are not names."""
    split = folder / layout.split
    if not split.is_file():
        raise DatasetError(f"{dataset}: split file {split} is missing; it lists the validation images "
                           f"({SEE_README})")
    names = [line.strip() for line in split.read_text().splitlines() if line.strip()]
    if not names:
        raise DatasetError(f"{dataset}: split file {split} lists no images")
    repeated = [name for name, count in Counter(names).items() if count > 1]
    if repeated:  # mmseg would score such an image twice
        raise DatasetError(f"{dataset}: split file {split} lists {repeated[0]!r} more than once; "
                           f"each image is scored once")
    return [name + layout.image_suffix for name in names]


def _label_for(dataset: str, image: str, folder: Path, layout: Layout) -> Tuple[Path, Optional[str]]:
    """The label of the image at ``image`` (below the image folder), as mmseg names it: the image
    path with ``str.replace`` of the image suffix by the label suffix; else the fallback file."""
    label_dir = folder / layout.labels
    label = label_dir / image.replace(layout.image_suffix, layout.label_suffix)
    if label.is_file():
        return label, None
    also = ""
    if layout.fallback_label_suffix:
        fallback = label_dir / image.replace(layout.image_suffix, layout.fallback_label_suffix)
        if fallback.is_file():
            return fallback, layout.label_map
        also = f" (or {fallback})"
    raise DatasetError(f"{dataset}: image {folder / layout.images / image} has no label: expected "
                       f"{label}{also} ({SEE_README})")


def list_items(dataset: str, data_root: PathLike, limit: Optional[int] = None, *, manifest=None) -> List[Item]:
    """Every validation image with its label, in mmseg's order; the first ``limit`` when given."""
    if limit is not None and limit < 1:
        raise DatasetError(f"limit must be a positive number of images, got {limit}")
    layout = dataset_spec(dataset, manifest).layout
    folder = find_dataset_root(dataset, data_root, manifest)
    if not (folder / layout.labels).is_dir():
        raise DatasetError(f"{dataset}: label folder {folder / layout.labels} is missing ({SEE_README})")
    image_dir = folder / layout.images
    if layout.split is None:
        images = _listed_images(dataset, image_dir, layout)[:limit]
    else:
        images = _split_images(dataset, folder, layout)[:limit]
    items = []
    for image in images:
        if layout.split is not None and not (image_dir / image).is_file():
            raise DatasetError(f"{dataset}: image {image_dir / image} listed in {folder / layout.split} is missing")
        label, label_map = _label_for(dataset, image, folder, layout)
        items.append(Item(image[: -len(layout.image_suffix)], image_dir / image, label, label_map))
    return items


def _part_images(dataset: str, folder: Path, layout: Layout) -> List[str]:
    """Image paths below the part's image folder: its split file's lines in order, else every
    ``*image_suffix`` file, sorted. A split file may repeat a name (mmseg would train on it twice)."""
    image_dir = folder / layout.images
    if layout.split is None:
        images = sorted(files_below(image_dir, layout.image_suffix))
        if not images:
            raise DatasetError(f"no *{layout.image_suffix} images in {image_dir} ({dataset} training set) "
                               f"({SEE_README})")
        return images
    split = folder / layout.split
    if not split.is_file():
        raise DatasetError(f"{dataset}: split file {split} is missing; it lists the training images ({SEE_README})")
    names = [line.strip() for line in split.read_text().splitlines() if line.strip()]
    if not names:
        raise DatasetError(f"{dataset}: split file {split} lists no images")
    images = [name + layout.image_suffix for name in names]
    for image in images:
        if not (image_dir / image).is_file():
            raise DatasetError(f"{dataset}: image {image_dir / image} listed in {split} is missing")
    return images


def training_items(dataset: str, data_root: PathLike, *, manifest=None) -> List[Item]:
    """Every training image with its label, part after part in the declared order."""
    parts = dataset_spec(dataset, manifest).layout.train
    if not parts:
        raise DatasetError(f"{dataset} declares no training split (its layout has no 'train'); "
                           f"train on the dataset its checkpoints were trained on")
    folder = locate_split_folder(dataset, data_root, parts[0], "training")
    items = []
    for layout in parts:
        if not (folder / layout.labels).is_dir():
            raise DatasetError(f"{dataset}: label folder {folder / layout.labels} is missing ({SEE_README})")
        for image in _part_images(dataset, folder, layout):
            label, label_map = _label_for(dataset, image, folder, layout)
            items.append(Item(image[: -len(layout.image_suffix)], folder / layout.images / image, label, label_map))
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
        what = "empty file" if not data.size else "truncated or not an image file"
        raise DatasetError(f"cannot read image {path}: {what}")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def read_image(path: PathLike) -> np.ndarray:
    """H x W x 3 uint8 RGB of a dataset image, decoded by OpenCV like the reference."""
    try:
        return decode_image(path)
    except DatasetError as exc:
        raise DatasetError(f"{exc}; re-extract the dataset") from None


def read_label(path: PathLike) -> np.ndarray:
    """H x W uint8 label map exactly as stored, read as mmseg reads it: Pillow, no conversion
    (palette PNGs give their indices), single channel, 8-bit ids.

    A colour label (e.g. iSAID's or Potsdam's original RGB masks) or one holding ids above 255,
    which mmseg would wrap to 8 bits, is an error naming the file, not a wrong score.
    """
    try:
        with Image.open(path) as image:
            label = np.array(image)
    except (OSError, ValueError, SyntaxError) as exc:  # Pillow raises SyntaxError on some broken PNGs
        raise DatasetError(f"cannot read label {path}: {exc}; re-extract the dataset") from None
    if label.ndim == 3 and label.shape[2] == 1:
        label = label[:, :, 0]
    if label.ndim != 2:
        raise DatasetError(f"label {path} has shape {label.shape}: expected a single-channel H x W map of "
                           f"class ids, as mmseg's dataset converters write them ({SEE_README})")
    if label.dtype != np.uint8:
        if label.size and (label.min() < 0 or label.max() > 255):
            raise DatasetError(f"label {path} holds ids {label.min()}..{label.max()}: class ids are 8-bit "
                               f"(0..255), as mmseg's dataset converters write them ({SEE_README})")
        label = label.astype(np.uint8)
    return label


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


#: The id mappings a layout's ``label_map`` names (manifest.LABEL_MAPS), for its fallback labels.
LABEL_MAP_DECODERS = {"cityscapes_label_ids": cityscapes_label_ids_to_train_ids}


def reduce_zero_label(label: np.ndarray) -> np.ndarray:
    """mmseg's reduce_zero_label on uint8 ids, step for step: 0 -> 255, then every id minus 1
    (so 255 wraps to 254), then 254 -> 255. Net: 0 and 255 are ignored (255), k -> k - 1."""
    reduced = label.astype(np.uint8, copy=True)
    reduced[reduced == 0] = 255
    reduced -= 1
    reduced[reduced == 254] = 255
    return reduced


# ---------------------------------------------------------------------------------------------
# the torch Dataset


@dataclass
class Sample:
    """One test image: inputs resized to each test scale, the label at the original size."""

    index: int
    name: str
    inputs: List[torch.Tensor]  # 3 x h x w uint8 RGB, one per target scale (normalize_batch)
    label: torch.Tensor  # H x W, uint8 or int64; the dataset's ignore index is not scored
    ori_size: Tuple[int, int]  # (H, W) of the original image

    def pin_memory(self) -> "Sample":  # called by DataLoader(pin_memory=True)
        self.inputs = [inp.pin_memory() for inp in self.inputs]
        self.label = self.label.pin_memory()
        return self


class SegmentationDataset(torch.utils.data.Dataset):
    """The validation set of ``dataset`` under ``data_root``, transformed for testing.

    ``img_scales`` lists the resize targets (long, short): the test img_scale, or the six ms+flip
    scales (``transforms.target_scales``), or None for the image as read (the authors' protocol,
    which scales the image itself: ``evaluation.semseg_inference.loader_scales``). Default: the
    dataset's img_scale from the manifest (``manifest``: as for ``get_manifest``; a dataset a user
    manifest declares is read the same way).
    """

    def __init__(self, dataset: str, data_root: PathLike, *, img_scales: Optional[Sequence[Sequence[int]]] = None,
                 limit: Optional[int] = None, reduce_zero_label: Optional[bool] = None,
                 items: Optional[Sequence[Item]] = None, manifest=None, ignore_index: Optional[int] = None):
        if img_scales is None or reduce_zero_label is None:
            spec = dataset_spec(dataset, manifest)
            img_scales = img_scales or [spec.img_scale]
            reduce_zero_label = spec.reduce_zero_label if reduce_zero_label is None else reduce_zero_label
        self.dataset = dataset
        self.data_root = Path(data_root)
        self.manifest = manifest
        self.img_scales = [None if scale is None else tuple(scale) for scale in img_scales]
        self.reduce_zero_label = reduce_zero_label
        self._ignore_index = ignore_index
        self.items = list(items) if items is not None else list_items(dataset, data_root, limit, manifest=manifest)

    @property
    def ignore_index(self) -> int:
        """The label value that is never scored: the dataset's declared one unless given."""
        if self._ignore_index is None:
            self._ignore_index = dataset_spec(self.dataset, self.manifest).ignore_index
        return self._ignore_index

    def __len__(self) -> int:
        return len(self.items)

    def subset(self, indices: Sequence[int]) -> "SegmentationDataset":
        """The same dataset restricted to ``indices`` (e.g. the images one process evaluates)."""
        return SegmentationDataset(self.dataset, self.data_root, img_scales=self.img_scales,
                                   reduce_zero_label=self.reduce_zero_label,
                                   items=[self.items[i] for i in indices], manifest=self.manifest,
                                   ignore_index=self._ignore_index)

    def shard(self, rank: int, world_size: int) -> "SegmentationDataset":
        """Every ``world_size``-th image starting at ``rank``: disjoint shards covering all images."""
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside [0, {world_size})")
        return self.subset(range(rank, len(self.items), world_size))

    def load_label(self, index: int) -> np.ndarray:
        """The label of image ``index`` as evaluated: trainIds, reduce_zero_label applied."""
        item = self.items[index]
        label = read_label(item.label_path)
        if item.label_map is not None:
            label = LABEL_MAP_DECODERS[item.label_map](label)
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
                pin_memory: bool = False, device: Union[None, str, torch.device] = None) -> Iterator[Sample]:
    """Samples of ``dataset`` in order, decoded and transformed in ``num_workers`` processes.

    ``device``: where the samples go next; a CUDA device pins them in host memory for its copies
    (``pin_memory``, default on for CUDA), with that device made current while the loader runs:
    PyTorch pins for the current device, so a run on ``cuda:1`` would otherwise also create a
    context (and hold memory) on GPU 0. A DatasetError raised in a worker (an unreadable file)
    is raised here with its own message.
    """
    device = torch.device(device) if device is not None else None
    cuda = device is not None and device.type == "cuda"
    workers = default_num_workers() if num_workers is None else num_workers
    with on_device(device):
        loader = torch.utils.data.DataLoader(
            _CatchErrors(dataset), batch_size=1, shuffle=False, num_workers=workers,
            collate_fn=_single, pin_memory=pin_memory or cuda, prefetch_factor=2 if workers else None,
            persistent_workers=False)
        for sample in loader:
            if isinstance(sample, _Failure):
                raise DatasetError(sample.message)
            yield sample
