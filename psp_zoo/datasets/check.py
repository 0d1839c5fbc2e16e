"""Checking a dataset folder against its declaration, reading it as training and evaluation will.

``check_split(dataset, data_root, split)`` lists the images and labels of one split (``val``: the
dataset's ``layout``; ``train``: its ``layout.train`` parts) with the same rules as the readers
(suffixes, recursion, split files, the label named by replacing the image suffix), then reads
every pair the way the readers do (OpenCV for images; Pillow, the label map and
``reduce_zero_label`` for labels). Where a reader stops at the first problem, this reports every
one, each naming its file: images without a label, labels without an image, label values that
are neither a class nor the ignore index, labels whose size differs from their image's, files
that cannot be read. It also counts how often each class occurs (pixels, and images holding it),
so a class that is missing or swamped shows before a run is spent on it.

A missing folder or split file is not a finding but an error (``DatasetError``): nothing could be
checked.
"""
from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np

from ..errors import DatasetError, PspZooError
from ..files import atomic_write
from ..manifest.loading import DatasetSpec, Layout
from .readers import (
    LABEL_MAP_DECODERS,
    SEE_README,
    dataset_spec,
    decode_image,
    files_below,
    locate_split_folder,
    read_label,
    reduce_zero_label,
)

__all__ = ["SPLITS", "SCAN_RECORD", "SplitCheck", "check_split", "check_dataset", "check_folders", "split_layouts",
           "scan_for_training"]

PathLike = Union[str, Path]
Pair = Tuple[Path, Path, Optional[str]]  # (image, label, the label map of a fallback label)
#: The splits a dataset declares: ``val`` (its ``layout``) and ``train`` (``layout.train``).
SPLITS = ("train", "val")


@dataclass
class SplitCheck:
    """What one split of one dataset folder holds, and every problem found in it."""

    dataset: str
    split: str
    folder: Path  # the dataset folder below the data root
    classes: Tuple[str, ...]
    ignore_index: int
    images: int = 0  # image files of the split
    labels: int = 0  # label files found in the label folders (a split file's: those of its images)
    pairs: int = 0  # images with their label
    missing_labels: List[Tuple[Path, Path]] = field(default_factory=list)  # (image, the label expected)
    missing_images: List[Tuple[str, Path]] = field(default_factory=list)  # (the label or split line, image expected)
    # (label, the stored values outside, how many pixels hold them)
    out_of_range: List[Tuple[Path, Tuple[int, ...], int]] = field(default_factory=list)
    size_mismatches: List[Tuple[Path, Tuple[int, int], Path, Tuple[int, int]]] = field(default_factory=list)
    unreadable: List[str] = field(default_factory=list)  # the reader's message, naming the file
    pixels: np.ndarray = None  # labelled pixels per class (as training reads them)
    images_with: np.ndarray = None  # images holding each class
    ignored: int = 0  # pixels equal to the ignore index

    def __post_init__(self):
        count = len(self.classes)
        self.pixels = np.zeros(count, np.int64) if self.pixels is None else self.pixels
        self.images_with = np.zeros(count, np.int64) if self.images_with is None else self.images_with

    @property
    def ok(self) -> bool:
        return not self.problems()

    def problems(self) -> List[str]:
        """One line per problem, each naming the file."""
        last = len(self.classes) - 1
        lines = [f"image {image} has no label: expected {label}" for image, label in self.missing_labels]
        lines += [f"{source} has no image: expected {image}" for source, image in self.missing_images]
        lines += [f"label {label} holds {_values(values)} outside the classes 0..{last} (ignore {self.ignore_index}):"
                  f" {pixels} pixels" for label, values, pixels in self.out_of_range]
        lines += [f"label {label} is {lw}x{lh} but image {image} is {iw}x{ih}"
                  for label, (lh, lw), image, (ih, iw) in self.size_mismatches]
        return lines + list(self.unreadable)

    def frequency_lines(self) -> List[str]:
        """The class frequencies: share of the labelled pixels and images holding each class."""
        labelled = int(self.pixels.sum())
        width = max(map(len, self.classes))
        lines = []
        for index, name in enumerate(self.classes):
            share = 100.0 * self.pixels[index] / labelled if labelled else 0.0
            lines.append(f"{index:>3} {name:<{width}} {share:6.2f}% of labelled pixels, "
                         f"in {int(self.images_with[index])} of {self.pairs} images")
        total = labelled + self.ignored
        ignored = 100.0 * self.ignored / total if total else 0.0
        lines.append(f"    {'ignored':<{width}} {ignored:6.2f}% of all pixels (value {self.ignore_index})")
        return lines

    def describe(self) -> str:
        """The report for people: counts, every problem, the class frequencies."""
        head = [f"{self.dataset} {self.split}: {self.folder}",
                f"  {self.images} images, {self.labels} labels, {self.pairs} pairs read"]
        problems = self.problems()
        head += [f"  problem: {line}" for line in problems]
        head.append("  class frequencies:")
        head += [f"  {line}" for line in self.frequency_lines()]
        head.append(f"  {len(problems)} problem{'s' if len(problems) != 1 else ''} found" if problems
                    else "  no problems found")
        return "\n".join(head)


def _values(values: Sequence[int]) -> str:
    shown = ", ".join(map(str, values[:8])) + (", ..." if len(values) > 8 else "")
    return f"value{'s' if len(values) > 1 else ''} {shown}"


def split_layouts(spec: DatasetSpec, split: str) -> Tuple[Layout, ...]:
    """The layouts that make up ``split`` of ``spec``: its layout for ``val``, ``layout.train`` for ``train``."""
    if split not in SPLITS:
        raise PspZooError(f"unknown split {split!r}; expected one of: {', '.join(SPLITS)}")
    if split == "val":
        return (spec.layout,)
    if not spec.layout.train:
        raise DatasetError(f"{spec.key} declares no training split: add 'train' to its layout in "
                           f"{spec.source} (e.g. train: {{images: images/train, labels: masks/train}})")
    return spec.layout.train


def _field(split: str, part: int) -> str:
    """The declaration's name for a layout part: ``layout`` (val) or ``layout.train[i]``."""
    return "layout" if split == "val" else f"layout.train[{part}]"


def _split_folder(spec: DatasetSpec, data_root: PathLike, layout: Layout, split: str) -> Path:
    """The dataset folder holding the split's images; the error names the declaration's field."""
    words = "validation" if split == "val" else "training"
    return locate_split_folder(spec.key, data_root, layout, words, field=f"{_field(split, 0)}.images")


def _check_part(spec: DatasetSpec, folder: Path, layout: Layout, split: str, part: int) -> None:
    """DatasetError naming the field when the part's image or label folder is missing."""
    for kind, sub in (("image", layout.images), ("label", layout.labels)):
        if not (folder / sub).is_dir():
            where = f"{_field(split, part)}.{kind}s"
            raise DatasetError(f"{spec.key} {split}: {kind} folder {folder / sub} ({where} {sub!r}) is missing "
                               f"({SEE_README})")


def check_folders(dataset: str, data_root: PathLike, splits: Sequence[str] = SPLITS, *, manifest=None) -> None:
    """DatasetError naming the layout field when a split's image or label folder is missing (nothing is read)."""
    spec = dataset_spec(dataset, manifest)
    for split in splits:
        layouts = split_layouts(spec, split)
        folder = _split_folder(spec, data_root, layouts[0], split)
        for part, layout in enumerate(layouts):
            _check_part(spec, folder, layout, split, part)


def _pairs_of(check: SplitCheck, spec: DatasetSpec, folder: Path,
              layout: Layout) -> List[Tuple[Path, Path, Optional[str]]]:
    """The (image, label, label map) pairs of one layout part; missing files recorded in ``check``."""
    image_dir, label_dir = folder / layout.images, folder / layout.labels
    suffixes = [s for s in (layout.label_suffix, layout.fallback_label_suffix) if s]
    label_files = {name for suffix in suffixes for name in files_below(label_dir, suffix)}
    images = _listed_images(check, spec, folder, layout)
    check.images += len(images)
    pairs, expected = [], set()
    for image in images:
        names = [image.replace(layout.image_suffix, suffix) for suffix in suffixes]
        expected.update(names)
        found = [(name, None if i == 0 else layout.label_map) for i, name in enumerate(names) if name in label_files]
        if found:
            pairs.append((image_dir / image, label_dir / found[0][0], found[0][1]))
        else:
            check.missing_labels.append((image_dir / image, label_dir / names[0]))
    check.labels += len(label_files & expected) if layout.split else len(label_files)
    if layout.split is None:  # with a split file, other labels may belong to other splits
        for name in sorted(label_files - expected):
            suffix = next(s for s in suffixes if name.endswith(s))
            image = image_dir / (name[: -len(suffix)] + layout.image_suffix)
            check.missing_images.append((f"label {label_dir / name}", image))
    return pairs


def _listed_images(check: SplitCheck, spec: DatasetSpec, folder: Path, layout: Layout) -> List[str]:
    """The split's images below the image folder: its split file's lines that exist, else every file
    ending in the image suffix; a split line without its image is recorded in ``check``."""
    image_dir = folder / layout.images
    if layout.split is None:
        return sorted(files_below(image_dir, layout.image_suffix))
    split = folder / layout.split
    if not split.is_file():
        raise DatasetError(f"{spec.key} {check.split}: split file {split} (layout.split) is missing")
    names = [line.strip() for line in split.read_text().splitlines() if line.strip()]
    present = []
    for name in names:
        if (image_dir / (name + layout.image_suffix)).is_file():
            present.append(name + layout.image_suffix)
        else:
            expected = image_dir / (name + layout.image_suffix)
            check.missing_images.append((f"split file {split}: line {name!r}", expected))
    return present


def _read_pair(spec: DatasetSpec, image: Path, label: Path, label_map: Optional[str]):
    """(image size, stored label, label as training reads it), or the reader's message."""
    try:
        size = decode_image(image).shape[:2]
        stored = read_label(label)
    except DatasetError as exc:
        return str(exc)
    decoded = LABEL_MAP_DECODERS[label_map](stored) if label_map else stored
    decoded = reduce_zero_label(decoded) if spec.reduce_zero_label else decoded
    return size, stored, decoded


def _count(check: SplitCheck, spec: DatasetSpec, image: Path, label: Path, read) -> None:
    if isinstance(read, str):
        check.unreadable.append(read)
        return
    size, stored, decoded = read
    if decoded.shape != tuple(size):
        check.size_mismatches.append((label, decoded.shape, image, tuple(size)))
    counts = np.bincount(decoded.ravel(), minlength=256)
    classes = len(spec.classes)
    outside = np.ones(256, bool)
    outside[:classes] = False
    outside[spec.ignore_index] = False
    if counts[outside].any():
        bad = outside[decoded]
        check.out_of_range.append((label, tuple(int(v) for v in np.unique(stored[bad])), int(bad.sum())))
    check.pairs += 1
    check.pixels += counts[:classes]
    check.images_with += counts[:classes] > 0
    check.ignored += int(counts[spec.ignore_index])


def _listed(spec: DatasetSpec, data_root: PathLike, split: str) -> Tuple[SplitCheck, List[Pair]]:
    """The split's check with its missing files recorded, and the (image, label, label map) pairs to read."""
    layouts = split_layouts(spec, split)
    folder = _split_folder(spec, data_root, layouts[0], split)
    for part, layout in enumerate(layouts):
        _check_part(spec, folder, layout, split, part)
    check = SplitCheck(spec.key, split, folder, tuple(spec.classes), spec.ignore_index)
    return check, [pair for layout in layouts for pair in _pairs_of(check, spec, folder, layout)]


def _read_all(check: SplitCheck, spec: DatasetSpec, pairs: Sequence[Pair], workers: Optional[int]) -> None:
    """Read and count every pair into ``check``."""
    # decoding releases the GIL (OpenCV, Pillow, numpy): threads read several files at once
    with ThreadPoolExecutor(max_workers=workers or min(8, os.cpu_count() or 1)) as pool:
        for (image, label, _), read in zip(pairs, pool.map(lambda p: _read_pair(spec, *p), pairs)):
            _count(check, spec, image, label, read)


def check_split(dataset: str, data_root: PathLike, split: str = "val", *, manifest=None,
                workers: Optional[int] = None) -> SplitCheck:
    """Every image and label of ``split`` of ``dataset`` under ``data_root``, read and checked."""
    spec = dataset_spec(dataset, manifest)
    check, pairs = _listed(spec, data_root, split)
    _read_all(check, spec, pairs, workers)
    return check


def check_dataset(dataset: str, data_root: PathLike, splits: Optional[Sequence[str]] = None, *,
                  manifest=None) -> List[SplitCheck]:
    """``check_split`` for each of ``splits`` (default: every split the dataset declares)."""
    spec = dataset_spec(dataset, manifest)
    if splits is None:
        splits = [s for s in SPLITS if s != "train" or spec.layout.train]
    return [check_split(dataset, data_root, split, manifest=manifest) for split in splits]


# ---------------------------------------------------------------------------------------------
# the scan before a training run

#: The scan's record in a work dir: every pair a passed scan read, by its files' size and mtime.
SCAN_RECORD = "dataset_scan.json"
_SCAN_FORMAT = 1


def _stamp(pair: Pair) -> Optional[List[int]]:
    """(size, mtime in ns) of the pair's image and label; None when one cannot be read (it is then read)."""
    try:
        image, label = os.stat(pair[0]), os.stat(pair[1])
    except OSError:
        return None
    return [image.st_size, image.st_mtime_ns, label.st_size, label.st_mtime_ns]


def _key(pair: Pair) -> str:
    return "\n".join((os.path.abspath(pair[0]), os.path.abspath(pair[1]), pair[2] or ""))


def _declared(spec: DatasetSpec) -> dict:
    """What a verdict depends on besides the files: a change (a class added, another ignore index) rescans."""
    return {"num_classes": len(spec.classes), "ignore_index": spec.ignore_index,
            "reduce_zero_label": spec.reduce_zero_label}


def _read_record(path: Path, declared: dict) -> dict:
    """The verdicts of the last passed scan ({} if none, unreadable, or for another declaration)."""
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(record, dict) or record.get("format") != _SCAN_FORMAT or record.get("declared") != declared:
        return {}
    files = record.get("files")
    return files if isinstance(files, dict) else {}


def _cli_command(spec: DatasetSpec, data_root: PathLike, split: str) -> str:
    manifest = "" if spec.source == "model_index.yml" else f" --manifest {spec.source}"
    return f"psp-zoo dataset check {data_root} --dataset {spec.key}{manifest} --split {split}"


def scan_for_training(dataset: str, data_root: PathLike, work_dir: PathLike, *, manifest=None,
                      workers: Optional[int] = None) -> int:
    """Refuse, before a training run starts, data in which ``check_split`` finds a problem.

    Both splits a run reads (``train``, and ``val`` for its validations) are listed and read exactly
    as ``check_split`` reads them. The first problem raises ``DatasetError``: one line naming the file,
    how many more there are, and where every problem is listed. When both splits pass, the size and
    modification time of every file read are recorded in ``work_dir/dataset_scan.json`` (atomically),
    so that the next start (a resume) reads only the pairs whose files changed; a change of the
    declaration's classes, ignore index or ``reduce_zero_label`` reads everything again. Returns how
    many pairs were read.
    """
    spec = dataset_spec(dataset, manifest)
    record_path = Path(work_dir) / SCAN_RECORD
    declared = _declared(spec)
    known = _read_record(record_path, declared)
    passed, read = {}, 0
    for split in SPLITS:
        check, pairs = _listed(spec, data_root, split)
        stamps = {_key(pair): _stamp(pair) for pair in pairs}
        fresh = [pair for pair in pairs if stamps[_key(pair)] is None or known.get(_key(pair)) != stamps[_key(pair)]]
        _read_all(check, spec, fresh, workers)
        read += len(fresh)
        problems = check.problems()
        if problems:
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            raise DatasetError(f"{spec.key} {split}: {problems[0]}{more}; fix the dataset before training "
                               f"(psp_zoo.datasets.check.check_split lists every problem)",
                               cli_hint=f"run {_cli_command(spec, data_root, split)} to list every problem")
        passed.update(stamps)
    if passed != known:
        atomic_write(record_path, json.dumps({"format": _SCAN_FORMAT, "declared": declared, "files": passed}))
    return read
