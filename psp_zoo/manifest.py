"""The checkpoint manifest: typed, frozen records loaded and validated from ``model_index.yml``.

The built-in manifest declares every dataset psp-zoo reads (one ``DatasetSpec`` each: title, class
names, palette, test settings and folder ``Layout``) and lists every published PSPNet checkpoint
of the mmsegmentation v0.5 model zoo. A user manifest (``PSP_ZOO_MANIFEST`` or an explicit path,
several joined with ``os.pathsep``) has the same schema: it adds datasets and entries or overrides
built-in ones by key and name, e.g. for private checkpoints or a dataset in a new folder layout.
"""
from __future__ import annotations

import dataclasses
import difflib
import fnmatch
import json
import math
import os
import re
from dataclasses import asdict, dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import yaml

from .backbones import BACKBONE_FORMS, head_channels, parse_backbone
from .constants import MANIFEST_ENV, env_paths
from .errors import ManifestError, PspZooError, UnknownModelError

__all__ = [
    "DATASETS",
    "IGNORE_INDEX",
    "LABEL_MAPS",
    "Published",
    "EvalSettings",
    "Layout",
    "DatasetSpec",
    "Checkpoint",
    "Manifest",
    "load_manifest",
    "get_manifest",
    "get_checkpoint",
    "list_models",
]

BUILTIN_MANIFEST = Path(__file__).with_name("model_index.yml")
CLASSES_FILE = Path(__file__).with_name("data") / "dataset_classes.json"

#: Label value that is never scored (mmseg's ignore_index), unless a dataset declares another.
IGNORE_INDEX = 255
#: Named id mappings a layout's ``label_map`` may ask for (applied to its fallback label files).
LABEL_MAPS = ("cityscapes_label_ids",)

# Published-table column names as they appear in the manifest and in the README tables.
PUBLISHED_FIELDS = {
    "mIoU": ("miou", 0.0, 100.0),
    "mIoU(ms+flip)": ("miou_ms_flip", 0.0, 100.0),
    "Mem (GB)": ("mem_gb", 0.0, 1000.0),
    "Inf time (fps)": ("fps", 0.0, 100000.0),
}
ARCH_FIELDS = ("num_classes", "stem_channels", "base_channels", "channels", "aux_channels")
TEST_FIELDS = ("mode", "img_scale", "crop_size", "stride", "align_corners")
ENTRY_REQUIRED = ("name", "dataset", "crop_size", "schedule", "weights", "published")
# one of the two is required: backbone or depth
ENTRY_EITHER = (("backbone", "depth"),)
# hash and sha256: the hash prefix comes from the weights file name or sha256; given, they must agree
ENTRY_OPTIONAL = ("hash", "sha256", "aliases", "log", "test", "model", "published_on", "train")
# a fine-tuned entry names the checkpoint it started from: name, sha256, url
ENTRY_OPTIONAL += ("finetuned_from",)
FINETUNED_FROM_FIELDS = ("name", "sha256", "url")
# Results-table backbone names: R-<depth>[b]-D<output stride>[ rsb] ('b': ResNetV1b stem; 'rsb': the
# ResNet-strikes-back pretraining, which does not change the network).
# Head widths (decode head channels, auxiliary head channels) of the published configs.
DATASET_REQUIRED = ("title", "num_classes", "img_scale", "reduce_zero_label", "train_images_per_gpu",
                    "test", "layout")
DATASET_OPTIONAL = ("ignore_index", "classes", "palette", "train")
LAYOUT_REQUIRED = ("folders", "images", "labels", "image_suffix", "label_suffix")
LAYOUT_OPTIONAL = ("split", "fallback_label_suffix", "label_map", "train")
# What a training split may set; the rest (folders, and whatever it leaves out but ``split``) is the test layout's.
TRAIN_LAYOUT_FIELDS = ("images", "labels", "image_suffix", "label_suffix", "split", "fallback_label_suffix", "label_map")
_DATASET_KEY_RE = re.compile(r"^[a-z0-9][a-z0-9_]*$")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")
_HEX8_RE = re.compile(r"^[0-9a-f]{8}$")
_HEX64_RE = re.compile(r"^[0-9a-f]{64}$")
# The hashed file name convention: <anything>-<8 hex>.pth at the end of the URL path.
_WEIGHTS_RE = re.compile(r"^(?P<stem>[^/?#]+-(?P<hash>[0-9a-f]{8}))\.pth$")


class _ReadOnlyMap(Mapping):
    """A read-only mapping that pickles and deep-copies (records travel to worker processes)."""

    def __init__(self, items: Mapping):
        self._items = dict(items)

    def __getitem__(self, key: str) -> Any:
        return self._items[key]

    def __iter__(self):
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __repr__(self) -> str:
        return repr(self._items)


@dataclass(frozen=True)
class Published:
    """The numbers the results table claims for one checkpoint (None where it shows '-')."""

    miou: Optional[float] = None
    miou_ms_flip: Optional[float] = None
    mem_gb: Optional[float] = None
    fps: Optional[float] = None


@dataclass(frozen=True)
class EvalSettings:
    """How a checkpoint is evaluated: the resize target, whole or sliding-window inference."""

    mode: str
    img_scale: Tuple[int, int]
    align_corners: bool
    crop_size: Optional[Tuple[int, int]] = None
    stride: Optional[Tuple[int, int]] = None

    def with_overrides(self, overrides: Mapping[str, Any]) -> "EvalSettings":
        """These settings with ``overrides`` applied and checked (slide needs crop_size and stride)."""
        unknown = sorted(set(overrides) - set(TEST_FIELDS))
        if unknown:
            raise PspZooError(f"unknown test setting {unknown[0]!r}; settable: {', '.join(TEST_FIELDS)}")
        if not overrides:
            return self
        merged = {**self.__dict__, **overrides}
        if merged["mode"] == "slide" and (merged["crop_size"] is None or merged["stride"] is None):
            raise PspZooError("slide inference needs crop_size=(h, w) and stride=(h, w)")
        plain = {k: list(v) if isinstance(v, tuple) else v for k, v in overrides.items()}
        return _parse_test(_Where("test settings", "overrides"), plain, self, "")


@dataclass(frozen=True)
class Layout:
    """Where one dataset's validation images and labels live, relative to its folder.

    A label's path is its image's path below ``images`` with ``image_suffix`` replaced by
    ``label_suffix``, below ``labels``.
    """

    folders: Tuple[str, ...]  # the dataset folder relative to a data root ("" = the root), most specific last
    images: str
    labels: str
    image_suffix: str
    label_suffix: str
    split: Optional[str] = None  # one image name per line; None = every image under ``images``
    fallback_label_suffix: Optional[str] = None  # read when the label file is absent, mapped by label_map
    label_map: Optional[str] = None  # one of LABEL_MAPS
    # The training split: one layout per part, read in this order (VOC + Aug: train.txt, then aug.txt).
    train: Tuple["Layout", ...] = ()


@dataclass(frozen=True)
class DatasetSpec:
    """Everything psp-zoo knows about one dataset: one declaration in the manifest."""

    key: str
    title: str  # the section title of the published results tables
    num_classes: int
    img_scale: Tuple[int, int]
    reduce_zero_label: bool
    train_images_per_gpu: int
    test: EvalSettings
    layout: Layout
    classes: Tuple[str, ...]
    palette: Tuple[Tuple[int, int, int], ...]
    ignore_index: int = IGNORE_INDEX
    source: str = "builtin"
    # the training recipe's facts for this dataset, read and checked by psp_zoo.training.recipe
    train: Mapping[str, Any] = field(default_factory=dict, hash=False, repr=False)

    def class_names(self, num_classes: int) -> Tuple[str, ...]:
        """Names for ``num_classes`` scores: the dataset's, or "0".."C-1" for a model whose class
        count differs from the dataset's (e.g. a test model), which is then reported by index."""
        names = self.classes
        return names if len(names) == num_classes else tuple(str(i) for i in range(num_classes))


@dataclass(frozen=True)
class Checkpoint:
    """One published checkpoint file with everything needed to build, fetch and evaluate it.

    ``dataset`` is the dataset it was trained on; ``published_on`` holds the published numbers on
    every dataset it is evaluated on (its own first, then e.g. Cityscapes checkpoints on Dark
    Zurich), ``published`` those on its own.
    """

    name: str
    aliases: Tuple[str, ...]
    dataset: str
    backbone: str  # the results table's backbone, e.g. "R-50b-D8 rsb"
    depth: int
    deep_stem: bool  # ResNetV1c (True) or V1b, the "b" rows (False)
    output_stride: int  # 8 (D8) or 32 (D32)
    crop_size: Tuple[int, int]
    schedule: int
    urls: Tuple[str, ...]  # the same file's published locations, tried in order
    log_url: Optional[str]
    hash_prefix: str
    sha256: Optional[str]
    num_classes: int
    reduce_zero_label: bool
    train_images_per_gpu: int
    test: EvalSettings
    published: Published
    arch: Tuple[Tuple[str, int], ...] = field(default=())
    source: str = "builtin"
    published_on: Mapping[str, Published] = field(default_factory=dict, hash=False)
    # names of the published rows on other datasets (e.g. mmseg's '..._dark' configs): dataset -> names
    dataset_aliases: Tuple[Tuple[str, Tuple[str, ...]], ...] = ()
    _tests: Mapping[str, EvalSettings] = field(default_factory=dict, hash=False, repr=False)
    # this entry's own training-recipe fields (e.g. AdamW for the rsb rows), read by psp_zoo.training.recipe
    train: Mapping[str, Any] = field(default_factory=dict, hash=False, repr=False)
    # the checkpoint a fine-tuned entry started from (FINETUNED_FROM_FIELDS); empty for the published ones
    finetuned_from: Mapping[str, str] = field(default_factory=dict, hash=False, repr=False)

    @property
    def url(self) -> str:
        """The primary weights URL."""
        return self.urls[0]

    @property
    def datasets(self) -> Tuple[str, ...]:
        """Every dataset with published numbers for this checkpoint, its own first."""
        return tuple(self.published_on) or (self.dataset,)

    def test_settings(self, dataset: Optional[str] = None) -> EvalSettings:
        """How this checkpoint is evaluated on ``dataset`` (default: its own dataset)."""
        if dataset is None or dataset == self.dataset:
            return self.test
        if dataset not in self._tests:
            raise PspZooError(f"checkpoint '{self.name}' has no published results on dataset {dataset!r}; "
                              f"it is published on: {', '.join(self.datasets)}")
        return self._tests[dataset]

    # Flat views of the test settings, the names users and checks rely on.
    @property
    def img_scale(self) -> Tuple[int, int]:
        return self.test.img_scale

    @property
    def test_mode(self) -> str:
        return self.test.mode

    @property
    def test_crop_size(self) -> Optional[Tuple[int, int]]:
        return self.test.crop_size

    @property
    def test_stride(self) -> Optional[Tuple[int, int]]:
        return self.test.stride

    @property
    def align_corners(self) -> bool:
        return self.test.align_corners

    @property
    def filename(self) -> str:
        """The hashed weight file name in the cache, e.g. ``<name>_<date>_<time>-<hash8>.pth``: the
        URL's file name, with ``-<hash8>`` added when the URL's name does not carry it."""
        name = self.url.rsplit("/", 1)[-1]
        if _WEIGHTS_RE.match(name):
            return name
        stem = name[: -len(".pth")] if name.endswith(".pth") else name
        return f"{stem}-{self.hash_prefix}.pth"

    @property
    def file_stem(self) -> str:
        return self.filename[: -len(".pth")]

    def as_dict(self) -> dict:
        """Every field as plain JSON-ready data (``url`` included; mappings as dicts)."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if not f.name.startswith("_")}
        fields.update(
            url=self.url,
            published_on={key: asdict(p) for key, p in self.published_on.items()},
            dataset_aliases={key: list(names) for key, names in self.dataset_aliases},
            test_settings={key: asdict(self.test_settings(key)) for key in self.datasets},
            train=dict(self.train),
        )
        fields["finetuned_from"] = dict(self.finetuned_from)
        return {key: asdict(v) if dataclasses.is_dataclass(v) else v for key, v in fields.items()}

    def model_kwargs(self) -> dict:
        """Keyword arguments for :class:`psp_zoo.PSPNet` that build this checkpoint's network."""
        channels, aux_channels = head_channels(self.depth)
        kwargs = {
            "depth": self.depth,
            "deep_stem": self.deep_stem,
            "output_stride": self.output_stride,
            "num_classes": self.num_classes,
            "align_corners": self.align_corners,
            "channels": channels,
            "aux_channels": aux_channels,
        }
        kwargs.update(dict(self.arch))
        return kwargs


# --------------------------------------------------------------------------------------------
# validation helpers: each raises ManifestError naming the source, the entry and the field


class _Where:
    def __init__(self, source: str, entry: str):
        self.source, self.entry = source, entry

    def fail(self, fld: str, msg: str) -> "None":
        where = f"field '{fld}'" if fld else "the entry itself"  # fld '' = the whole entry
        raise ManifestError(f"{self.source}: {self.entry}: {where}: {msg}")

    def pair(self, value: Any, fld: str) -> Tuple[int, int]:
        if (
            not isinstance(value, (list, tuple))
            or len(value) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)
        ):
            self.fail(fld, f"expected two positive integers like [512, 1024], got {value!r}")
        return int(value[0]), int(value[1])

    def pos_int(self, value: Any, fld: str) -> int:
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            self.fail(fld, f"expected a positive integer, got {value!r}")
        return int(value)

    def boolean(self, value: Any, fld: str) -> bool:
        if not isinstance(value, bool):
            self.fail(fld, f"expected true or false, got {value!r}")
        return value

    def mapping(self, value: Any, fld: str) -> Mapping:
        if not isinstance(value, Mapping):
            self.fail(fld, f"expected a mapping, got {type(value).__name__}")
        return value

    def known_keys(self, value: Mapping, allowed: Iterable[str], fld: str) -> None:
        unknown = sorted(set(map(str, value)) - set(allowed))
        if unknown:
            self.fail(f"{fld}.{unknown[0]}" if fld else unknown[0],
                      f"unknown field; allowed: {', '.join(allowed)}")


def _parse_test(where: _Where, raw: Mapping, base: Optional[EvalSettings], fld: str) -> EvalSettings:
    where.mapping(raw, fld)
    where.known_keys(raw, TEST_FIELDS, fld)
    merged = dict(base.__dict__) if base else {}
    merged.update(raw)
    mode = merged.get("mode")
    if mode not in ("whole", "slide"):
        where.fail(f"{fld}.mode", f"expected 'whole' or 'slide', got {mode!r}")
    if "img_scale" not in merged:
        where.fail(f"{fld}.img_scale", "missing")
    settings = {
        "mode": mode,
        "img_scale": where.pair(merged["img_scale"], f"{fld}.img_scale"),
        "align_corners": where.boolean(merged.get("align_corners", False), f"{fld}.align_corners"),
        "crop_size": None,
        "stride": None,
    }
    if mode == "slide":
        for key in ("crop_size", "stride"):
            if merged.get(key) is None:
                where.fail(f"{fld}.{key}", "required when mode is 'slide'")
            settings[key] = where.pair(merged[key], f"{fld}.{key}")
    return EvalSettings(**settings)


def _rel_path(where: _Where, value: Any, fld: str, *, empty: bool = False) -> str:
    """A folder or file below the dataset folder: relative, inside it, '/'-separated."""
    if not isinstance(value, str) or (not value and not empty):
        where.fail(fld, f"expected a relative path, got {value!r}")
    parts = value.replace("\\", "/").split("/")
    if value.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", value) or ".." in parts:
        where.fail(fld, f"expected a path inside the dataset folder (relative, no '..'), got {value!r}")
    return value.strip("/")


def _suffix(where: _Where, value: Any, fld: str) -> str:
    if not isinstance(value, str) or not value or "/" in value or "\\" in value:
        where.fail(fld, f"expected the end of a file name like '.png' or '_labelTrainIds.png', got {value!r}")
    return value


def _parse_layout(where: _Where, raw: Any) -> Layout:
    where.mapping(raw, "layout")
    where.known_keys(raw, LAYOUT_REQUIRED + LAYOUT_OPTIONAL, "layout")
    for fld in LAYOUT_REQUIRED:
        if fld not in raw:
            where.fail(f"layout.{fld}", "missing")
    folders = raw["folders"]
    if not isinstance(folders, list) or not folders:
        where.fail("layout.folders", f"expected a list of folders relative to a data root, got {folders!r}")
    split = raw.get("split")
    fallback, label_map = raw.get("fallback_label_suffix"), raw.get("label_map")
    if (fallback is None) != (label_map is None):
        where.fail("layout.label_map" if label_map is None else "layout.fallback_label_suffix",
                   "fallback_label_suffix and label_map go together: the fallback files hold other ids")
    if label_map is not None and label_map not in LABEL_MAPS:
        where.fail("layout.label_map", f"unknown mapping {label_map!r}; psp-zoo knows: {', '.join(LABEL_MAPS)}")
    layout = Layout(
        folders=tuple(_rel_path(where, f, f"layout.folders[{i}]", empty=True) for i, f in enumerate(folders)),
        images=_rel_path(where, raw["images"], "layout.images"),
        labels=_rel_path(where, raw["labels"], "layout.labels"),
        image_suffix=_suffix(where, raw["image_suffix"], "layout.image_suffix"),
        label_suffix=_suffix(where, raw["label_suffix"], "layout.label_suffix"),
        split=None if split is None else _rel_path(where, split, "layout.split"),
        fallback_label_suffix=None if fallback is None else _suffix(where, fallback, "layout.fallback_label_suffix"),
        label_map=label_map,
    )
    if (layout.images, layout.image_suffix) == (layout.labels, layout.label_suffix):
        where.fail("layout.label_suffix", "images and labels would be the same files; give the label folder or suffix")
    return replace(layout, train=_parse_train_layouts(where, raw)) if "train" in raw else layout


def _parse_train_layouts(where: _Where, raw: Mapping) -> Tuple[Layout, ...]:
    """``layout.train``: one mapping or a list of them, each a training split whose fields override
    the test layout's; ``split`` is never inherited (the test split file lists validation images)."""
    parts = raw["train"]
    parts = [parts] if isinstance(parts, Mapping) else parts
    if not isinstance(parts, list) or not parts:
        where.fail("layout.train", f"expected a mapping or a list of mappings (the training split), got {parts!r}")
    inherited = {key: value for key, value in raw.items() if key not in ("train", "split")}
    layouts = []
    for i, part in enumerate(parts):
        where.mapping(part, f"layout.train[{i}]")
        where.known_keys(part, TRAIN_LAYOUT_FIELDS, f"layout.train[{i}]")
        layouts.append(_parse_layout(_Where(where.source, f"{where.entry}: layout.train[{i}]"), {**inherited, **part}))
    return tuple(layouts)


@lru_cache(maxsize=None)
def _class_table() -> Mapping:
    return json.loads(CLASSES_FILE.read_text(encoding="utf-8"))


def _default_palette(count: int) -> list:
    """mmseg's colours for classes without a palette: seeded random RGB, the same on every run."""
    return np.random.RandomState(42).randint(0, 255, size=(count, 3)).tolist()


def _parse_classes(where: _Where, key: str, raw: Mapping, num_classes: int) -> Tuple[tuple, tuple]:
    known = _class_table().get(key, {})
    origin = "field" if "classes" in raw else f"{CLASSES_FILE.name}"
    names = raw.get("classes", known.get("classes"))
    if names is None:
        where.fail("classes", f"missing: list the {num_classes} class names in label-index order")
    if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names):
        where.fail("classes", f"expected a list of class names, got {names!r}")
    if len(names) != num_classes:
        where.fail("classes", f"{origin} lists {len(names)} class names but num_classes is {num_classes}; "
                              f"declare one name per class")
    colours = raw.get("palette", known.get("palette") if "classes" not in raw else None)
    colours = _default_palette(num_classes) if colours is None else colours
    if not isinstance(colours, list) or len(colours) != num_classes or not all(
            isinstance(c, list) and len(c) == 3
            and all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 255 for v in c) for c in colours):
        where.fail("palette", f"expected {num_classes} colours [r, g, b] with values 0..255")
    return tuple(names), tuple(tuple(c) for c in colours)


def _parse_dataset(source: str, key: str, raw: Any) -> DatasetSpec:
    where = _Where(source, f"datasets.{key}")
    if not isinstance(key, str) or not _DATASET_KEY_RE.match(key):
        where.fail("", f"a dataset key is lowercase letters, digits and '_', got {key!r}")
    where.mapping(raw, "")
    where.known_keys(raw, DATASET_REQUIRED + DATASET_OPTIONAL, "")
    for fld in DATASET_REQUIRED:
        if fld not in raw:
            where.fail(fld, "missing")
    if not isinstance(raw["title"], str) or not raw["title"].strip():
        where.fail("title", f"expected the dataset's name as the results tables title it, got {raw['title']!r}")
    img_scale = where.pair(raw["img_scale"], "img_scale")
    test_raw = dict(where.mapping(raw["test"], "test"))
    test_raw.setdefault("img_scale", list(img_scale))
    num_classes = where.pos_int(raw["num_classes"], "num_classes")
    ignore_index = raw.get("ignore_index", IGNORE_INDEX)
    if not isinstance(ignore_index, int) or isinstance(ignore_index, bool) or not num_classes <= ignore_index <= 255:
        where.fail("ignore_index", f"expected a label value from num_classes to 255, got {ignore_index!r}")
    classes, palette = _parse_classes(where, key, raw, num_classes)
    return DatasetSpec(
        key=key,
        title=raw["title"].strip(),
        num_classes=num_classes,
        img_scale=img_scale,
        reduce_zero_label=where.boolean(raw["reduce_zero_label"], "reduce_zero_label"),
        train_images_per_gpu=where.pos_int(raw["train_images_per_gpu"], "train_images_per_gpu"),
        test=_parse_test(where, test_raw, None, "test"),
        layout=_parse_layout(where, raw["layout"]),
        classes=classes,
        palette=palette,
        ignore_index=ignore_index,
        source=source,
        train=_ReadOnlyMap(where.mapping(raw.get("train") or {}, "train")),
    )


def _parse_published(where: _Where, raw: Any, fld: str = "published") -> Published:
    where.mapping(raw, fld)
    where.known_keys(raw, PUBLISHED_FIELDS, fld)
    values = {}
    for column, (attr, low, high) in PUBLISHED_FIELDS.items():
        value = raw.get(column)
        if value is not None:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
                where.fail(f"{fld}.{column}", f"expected a number or null, got {value!r}")
            if not low < value <= high:
                where.fail(f"{fld}.{column}", f"{value} is out of range ({low}, {high}]")
            value = float(value)
        values[attr] = value
    return Published(**values)


def _names(where: _Where, value: Any, fld: str) -> Tuple[str, ...]:
    value = value or []
    if not isinstance(value, list) or not all(isinstance(a, str) and _NAME_RE.match(a) for a in value):
        where.fail(fld, f"expected a list of names, got {value!r}")
    return tuple(value)


def _parse_weights(where: _Where, raw: Mapping) -> Tuple[Tuple[str, ...], str]:
    """The weights URLs (one, or a list of the same file's locations) and their hash prefix.

    The prefix is the ``-<8 hex>`` of the file name (the published files' convention) or, for a
    file named otherwise, the first 8 digits of the entry's full ``sha256``.
    """
    value = raw["weights"]
    urls = value if isinstance(value, list) else [value]
    if not urls:
        where.fail("weights", "expected a URL or a list of URLs of the same file, got an empty list")
    sha256 = raw.get("sha256")
    if sha256 is not None and (not isinstance(sha256, str) or not _HEX64_RE.match(sha256)):
        where.fail("sha256", f"expected 64 lowercase hex digits, got {sha256!r}")
    for index, url in enumerate(urls):
        fld = f"weights[{index}]" if isinstance(value, list) else "weights"
        if not isinstance(url, str) or not re.match(r"^(https?|file)://", url):
            where.fail(fld, f"expected an http(s):// or file:// URL, got {url!r}")
        if sha256 is None and not _WEIGHTS_RE.match(url.rsplit("/", 1)[-1]):
            where.fail(fld, f"file name must end in -<8 hex digits>.pth (the SHA-256 prefix), got {url!r}; "
                            f"rename the file so, or give the file's full 'sha256' instead")
        if url.rsplit("/", 1)[-1] != urls[0].rsplit("/", 1)[-1]:
            where.fail(fld, f"every URL must name the same file as the first ({urls[0].rsplit('/', 1)[-1]}), "
                            f"got {url!r}")
    named = _WEIGHTS_RE.match(urls[0].rsplit("/", 1)[-1])
    derived = named.group("hash") if named else sha256[:8]
    hash_prefix = raw.get("hash", derived)
    if not isinstance(hash_prefix, str) or not _HEX8_RE.match(hash_prefix):
        where.fail("hash", f"expected 8 lowercase hex digits, got {hash_prefix!r}")
    if hash_prefix != derived:
        where.fail("hash", f"{hash_prefix!r} does not match the weights file name or sha256 ({derived!r})")
    if sha256 is not None and not sha256.startswith(hash_prefix):
        where.fail("sha256", f"expected 64 lowercase hex digits starting with {hash_prefix!r}, got {sha256!r}")
    return tuple(urls), hash_prefix


def _parse_backbone(where: _Where, raw: Mapping) -> Tuple[str, dict]:
    """The table's backbone name and what it means: depth, stem (V1c/V1b) and output stride."""
    depth = raw.get("depth")
    if depth is not None and (depth not in (18, 50, 101) or isinstance(depth, bool)):
        where.fail("depth", f"expected 18, 50 or 101, got {depth!r}")
    backbone = raw.get("backbone")
    if backbone is None:
        if depth is None:
            where.fail("backbone", "missing: give the results table's backbone, e.g. 'R-50-D8' (or the depth "
                                   "of an R-<depth>-D8 network)")
        backbone = f"R-{depth}-D8"
    net = parse_backbone(backbone) if isinstance(backbone, str) and backbone == backbone.strip() else None
    if net is None:
        where.fail("backbone", f"expected {BACKBONE_FORMS}, got {backbone!r}")
    if depth is not None and depth != net["depth"]:
        where.fail("depth", f"{depth} contradicts backbone {backbone!r}; give one or make them agree")
    return backbone, net


def _parse_arch(where: _Where, raw: Mapping) -> dict:
    arch = dict(where.mapping(raw.get("model") or {}, "model"))
    where.known_keys(arch, ARCH_FIELDS, "model")
    for key, value in arch.items():
        where.pos_int(value, f"model.{key}")
    return arch


def _parse_cross(where: _Where, raw: Mapping, datasets: Mapping[str, DatasetSpec], own: str,
                 num_classes: int) -> Tuple[dict, Tuple[Tuple[str, Tuple[str, ...]], ...]]:
    """``published_on``: the checkpoint's published numbers on datasets other than its own."""
    published, aliases = {}, []
    for key, item in where.mapping(raw.get("published_on") or {}, "published_on").items():
        fld = f"published_on.{key}"
        if key not in datasets:
            where.fail(fld, f"unknown dataset {key!r}; expected one of: {', '.join(datasets)}")
        if key == own:
            where.fail(fld, "this is the entry's own dataset: its numbers go in 'published'")
        if datasets[key].num_classes != num_classes:
            where.fail(fld, f"{key} has {datasets[key].num_classes} classes but the checkpoint predicts "
                            f"{num_classes}; it cannot be scored there")
        where.mapping(item, fld)
        where.known_keys(item, ("aliases", "published"), fld)
        if "published" not in item:
            where.fail(f"{fld}.published", "missing")
        published[key] = _parse_published(where, item["published"], f"{fld}.published")
        aliases.append((key, _names(where, item.get("aliases"), f"{fld}.aliases")))
    return published, tuple(aliases)


def _parse_finetuned_from(where: _Where, raw: Any) -> Mapping[str, str]:
    """A fine-tuned entry's source checkpoint: its name, full SHA-256 and where it was read from."""
    raw = where.mapping(raw or {}, "finetuned_from")
    where.known_keys(raw, FINETUNED_FROM_FIELDS, "finetuned_from")
    for key, value in raw.items():
        if not isinstance(value, str) or not value:
            where.fail(f"finetuned_from.{key}", f"expected text, got {value!r}")
    return _ReadOnlyMap(raw)


def _entry_where(source: str, index: int, raw: Any) -> _Where:
    label = f"models[{index}]"
    if isinstance(raw, Mapping) and isinstance(raw.get("name"), str):
        label += f" '{raw['name']}'"
    where = _Where(source, label)
    where.mapping(raw, "")
    where.known_keys(raw, ENTRY_REQUIRED + sum(ENTRY_EITHER, ()) + ENTRY_OPTIONAL, "")
    for fld in ENTRY_REQUIRED:
        if fld not in raw:
            where.fail(fld, "missing")
    if not isinstance(raw["name"], str) or not _NAME_RE.match(raw["name"]):
        where.fail("name", f"expected a name of letters, digits, '_', '-', '.', got {raw['name']!r}")
    if raw.get("log") is not None and not isinstance(raw["log"], str):
        where.fail("log", f"expected a URL or null, got {raw['log']!r}")
    return where


def _parse_entry(source: str, index: int, raw: Any, datasets: Mapping[str, DatasetSpec]) -> Checkpoint:
    where = _entry_where(source, index, raw)
    dataset = raw["dataset"]
    if dataset not in datasets:
        where.fail("dataset", f"unknown dataset {dataset!r}; expected one of: {', '.join(datasets)}")
    spec = datasets[dataset]
    backbone, net = _parse_backbone(where, raw)
    urls, hash_prefix = _parse_weights(where, raw)
    arch = _parse_arch(where, raw)
    num_classes = arch.pop("num_classes", spec.num_classes)
    test = spec.test if raw.get("test") is None else _parse_test(where, raw["test"], spec.test, "test")
    published = _parse_published(where, raw["published"])
    cross, dataset_aliases = _parse_cross(where, raw, datasets, dataset, num_classes)
    # on another dataset: that dataset's test settings, the network's own align_corners
    tests = {key: replace(datasets[key].test, align_corners=test.align_corners) for key in cross}
    return Checkpoint(
        name=raw["name"],
        aliases=_names(where, raw.get("aliases"), "aliases"),
        dataset=dataset,
        backbone=backbone,
        crop_size=where.pair(raw["crop_size"], "crop_size"),
        schedule=where.pos_int(raw["schedule"], "schedule"),
        urls=urls,
        log_url=raw.get("log"),
        hash_prefix=hash_prefix,
        sha256=raw.get("sha256"),
        num_classes=num_classes,
        reduce_zero_label=spec.reduce_zero_label,
        train_images_per_gpu=spec.train_images_per_gpu,
        test=test,
        published=published,
        arch=tuple(sorted(arch.items())),
        source=source,
        published_on=_ReadOnlyMap({dataset: published, **cross}),
        dataset_aliases=dataset_aliases,
        _tests=_ReadOnlyMap(tests),
        train=_ReadOnlyMap(where.mapping(raw.get("train") or {}, "train")),
        finetuned_from=_parse_finetuned_from(where, raw.get("finetuned_from")),
        **net,
    )


# --------------------------------------------------------------------------------------------


class Manifest:
    """Datasets and an ordered collection of checkpoints with name, alias and file-stem lookup.

    Every name resolves to one checkpoint and one dataset: its own names to the dataset it was
    trained on, the names of its rows on other datasets (``published_on``) to those datasets.
    """

    def __init__(self, datasets: Mapping[str, DatasetSpec], checkpoints: Sequence[Checkpoint],
                 backbones: Optional[Mapping[str, Tuple[str, Mapping]]] = None):
        self.datasets = dict(datasets)
        # ImageNet backbone files by name: (source, raw declaration), read by psp_zoo.training.pretrained
        self.backbones = dict(backbones or {})
        self._checkpoints = {c.name: c for c in checkpoints}
        self._lookup: dict = {}
        for ckpt in self._checkpoints.values():
            names = [(key, ckpt.dataset) for key in (ckpt.name, *ckpt.aliases, ckpt.file_stem, ckpt.filename)]
            names += [(key, dataset) for dataset, keys in ckpt.dataset_aliases for key in keys]
            for key, dataset in names:
                owner = self._lookup.get(key)
                if owner is not None and owner != (ckpt, dataset):
                    raise ManifestError(
                        f"{ckpt.source}: models '{ckpt.name}': field 'aliases': {key!r} already "
                        f"names '{owner[0].name}' on {owner[1]}; every name and alias must be unique"
                    )
                self._lookup[key] = (ckpt, dataset)

    def __iter__(self):
        return iter(self._checkpoints.values())

    def __len__(self) -> int:
        return len(self._checkpoints)

    def __contains__(self, name: str) -> bool:
        return name in self._lookup

    @property
    def names(self) -> list:
        return list(self._checkpoints)

    def get(self, name: str) -> Checkpoint:
        """The checkpoint a name, alias, weight file name or stem, or a cross-dataset row's name means."""
        return self.resolve(name)[0]

    def resolve(self, name: str) -> Tuple[Checkpoint, str]:
        """The checkpoint and the dataset a name means: e.g. mmseg's ``pspnet_r50-d8_512x1024_40k_dark``
        is the Cityscapes checkpoint evaluated on ``dark_zurich``; its own names give its own dataset."""
        if isinstance(name, str) and name in self._lookup:
            return self._lookup[name]
        raise UnknownModelError(self._unknown_message(name))

    def _unknown_message(self, name: Any) -> str:
        candidates = [key for c in self for key in _all_names(c)]
        close = difflib.get_close_matches(str(name), candidates, n=5, cutoff=0.5)
        if not close:  # fall back on shared tokens, e.g. 'pspnet_r50_cityscapes'
            tokens = set(re.split(r"[_\-]", str(name).lower())) - {"", "pspnet"}
            scored = sorted(((len(tokens & set(re.split(r"[_\-]", n))), n) for n in self.names), reverse=True)
            close = [n for score, n in scored[:5] if score > 0]
        hint = f"did you mean: {', '.join(close)}" if close else "list_models() lists the known names"
        return f"unknown checkpoint {name!r}; {hint}"

    def list(self, dataset: Optional[str] = None, pattern: Optional[str] = None) -> list:
        """Checkpoint names in manifest order: those published on ``dataset`` (trained there or
        evaluated there, e.g. ``dark_zurich``) whose name or an alias matches ``pattern``."""
        if dataset is not None and dataset not in self.datasets:
            raise PspZooError(f"unknown dataset {dataset!r}; expected one of: {', '.join(self.datasets)}")
        return [
            c.name for c in self
            if (dataset is None or dataset in c.datasets)
            and (pattern is None or any(fnmatch.fnmatchcase(a, pattern) for a in _all_names(c)))
        ]


def _all_names(ckpt: Checkpoint) -> Tuple[str, ...]:
    return (ckpt.name, *ckpt.aliases, *(key for _, keys in ckpt.dataset_aliases for key in keys))


def _read_yaml(path: Path) -> Mapping:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ManifestError(f"cannot read manifest {path}: {exc.strerror or exc}; check the path") from None
    except UnicodeDecodeError as exc:  # a binary file, or a text file saved in another encoding
        raise ManifestError(f"{path}: not UTF-8 text (byte {exc.start}); save the manifest as UTF-8 YAML") from None
    try:
        data = yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    except yaml.YAMLError as exc:
        raise ManifestError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, Mapping):
        raise ManifestError(f"{path}: expected a mapping with 'models' at the top level")
    unknown = sorted(set(data) - {"version", "datasets", "models", "backbones"})
    if unknown:
        raise ManifestError(f"{path}: unknown top-level field {unknown[0]!r}; "
                            f"allowed: version, datasets, models, backbones")
    if data.get("version", 1) != 1:
        raise ManifestError(f"{path}: field 'version': this psp-zoo reads version 1, got {data.get('version')!r}")
    if not isinstance(data.get("models", []), list):
        raise ManifestError(f"{path}: field 'models': expected a list of entries")
    if not isinstance(data.get("backbones", []), list) or not all(
            isinstance(b, Mapping) and isinstance(b.get("name"), str) for b in data.get("backbones") or []):
        raise ManifestError(f"{path}: field 'backbones': expected a list of entries, each with a 'name'")
    if not isinstance(data.get("datasets", {}), Mapping):
        raise ManifestError(f"{path}: field 'datasets': expected a mapping of dataset keys")
    return data


@lru_cache(maxsize=1)
def _builtin_data() -> Mapping:
    return _read_yaml(BUILTIN_MANIFEST)


def load_manifest(*user_paths: Union[str, Path], builtin: bool = True) -> Manifest:
    """Read the built-in manifest, then each user manifest in order (later ones override)."""
    datasets: dict = {}
    entries: dict = {}
    backbones: dict = {}
    raws: dict = {}
    sources = ([BUILTIN_MANIFEST] if builtin else []) + [Path(p) for p in user_paths]
    for path in sources:
        data = _builtin_data() if path == BUILTIN_MANIFEST else _read_yaml(path)
        source = "model_index.yml" if path == BUILTIN_MANIFEST else str(path)
        for key, raw in (data.get("datasets") or {}).items():
            datasets[key] = _parse_dataset(source, key, raw)
        backbones.update((raw["name"], (source, raw)) for raw in data.get("backbones") or [])
        seen = set()
        for index, raw in enumerate(data.get("models") or []):
            name = raw.get("name") if isinstance(raw, Mapping) else None
            if name in seen:
                raise ManifestError(f"{source}: models[{index}] '{name}': field 'name': duplicate name")
            seen.add(name)
            if isinstance(name, str) and name in raws:
                raw = _overridden(raws[name], raw)
            ckpt = _parse_entry(source, index, raw, datasets)
            raws[ckpt.name] = raw
            entries[ckpt.name] = ckpt  # an override keeps the entry's place in the list
    return Manifest(datasets, list(entries.values()), backbones)


def _overridden(previous: Mapping, override: Mapping) -> dict:
    """An entry overridden field by field: the override's fields, the previous entry's for the rest.

    Inherited fields that describe what the override replaced go with it: new ``weights`` are
    another file (its hash is not the previous one), a new ``dataset`` or ``model`` another network
    (the published rows on other datasets were measured with the previous one).
    """
    replaced = {key for trigger, keys in _REPLACED_WITH.items() if trigger in override for key in keys}
    return {**{key: value for key, value in previous.items() if key not in replaced}, **override}


_REPLACED_WITH = {"weights": ("hash", "sha256"), "dataset": ("published_on",), "model": ("published_on",)}


_CACHE: dict = {}


def _user_manifest_paths(manifest: Union[None, str, Path, Sequence]) -> Tuple[str, ...]:
    if manifest is None:
        manifest = env_paths(MANIFEST_ENV)
    if isinstance(manifest, (str, Path)):
        manifest = [p for p in str(manifest).split(os.pathsep) if p]
    return tuple(str(Path(p).expanduser()) for p in manifest)


def get_manifest(manifest: Union[None, str, Path, Sequence] = None) -> Manifest:
    """The manifest in force: built-in plus ``manifest`` (or ``$PSP_ZOO_MANIFEST``) overrides.

    Cached per set of files and their modification times, so an edited user manifest is reread.
    """
    paths = _user_manifest_paths(manifest)
    stamp = []
    for p in paths:
        try:
            stamp.append(os.stat(p).st_mtime_ns)
        except OSError:
            stamp.append(None)  # load_manifest reports the unreadable path
    key = (paths, tuple(stamp))
    if key not in _CACHE:
        _CACHE.clear()
        _CACHE[key] = load_manifest(*paths)
    return _CACHE[key]


def get_checkpoint(name: str, *, manifest: Union[None, str, Path, Sequence] = None) -> Checkpoint:
    """The manifest record for a name, an alias (mmseg 1.x config name) or a weight file stem."""
    return get_manifest(manifest).get(name)


def list_models(dataset: Optional[str] = None, pattern: Optional[str] = None, *,
                manifest: Union[None, str, Path, Sequence] = None) -> list:
    """Checkpoint names in manifest order, filtered by dataset (where they are published: trained
    there or evaluated there) and a shell-style wildcard on names and aliases."""
    return get_manifest(manifest).list(dataset=dataset, pattern=pattern)


#: Keys of the built-in datasets in manifest order, read from ``model_index.yml`` (a user manifest
#: may declare more: ``get_manifest().datasets`` holds them all).
DATASETS: Tuple[str, ...] = tuple(_builtin_data().get("datasets") or ())
