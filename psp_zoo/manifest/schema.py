"""The manifest schema: which fields an entry and a dataset have, and their validation.

Every mistake names the file, the entry (or dataset) and the field, and says what was expected.
docs/manifests.md documents these fields for people; a test keeps the two in step.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import replace
from functools import lru_cache
from pathlib import Path
from typing import Any, Mapping, Tuple

import numpy as np
import yaml

from ..errors import ManifestError
from .backbones import BACKBONE_FORMS, DEPTH_WORDS, DEPTHS, FAMILIES, parse_backbone
from .entries import (
    IGNORE_INDEX,
    LABEL_MAPS,
    PUBLISHED_FIELDS,
    WEIGHTS_RE,
    Checkpoint,
    DatasetSpec,
    Layout,
    Published,
    ReadOnlyMap,
    Where,
    parse_test,
)

CLASSES_FILE = Path(__file__).with_name("dataset_classes.json")

ARCH_FIELDS = ("num_classes", "stem_channels", "base_channels", "channels", "aux_channels")
ENTRY_REQUIRED = ("name", "dataset", "crop_size", "schedule", "weights", "published")
# one of the two is required: backbone or depth
ENTRY_EITHER = (("backbone", "depth"),)
# hash and sha256: the hash prefix comes from the weights file name or sha256; given, they must agree
ENTRY_OPTIONAL = ("hash", "sha256", "aliases", "log", "test", "model", "published_on", "train", "finetuned_from",
                  "family", "download_page")
# what a fine-tuned entry says about the checkpoint it started from
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
TRAIN_LAYOUT_FIELDS = ("images", "labels", "image_suffix", "label_suffix", "split", "fallback_label_suffix",
                       "label_map")
_DATASET_KEY_RE = re.compile(r"^[a-z0-9][a-z0-9_]*$")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")
_HEX8_RE = re.compile(r"^[0-9a-f]{8}$")
_HEX64_RE = re.compile(r"^[0-9a-f]{64}$")


# --------------------------------------------------------------------------------------------
# validation helpers: each raises ManifestError naming the source, the entry and the field


def _rel_path(where: Where, value: Any, fld: str, *, empty: bool = False) -> str:
    """A folder or file below the dataset folder: relative, inside it, '/'-separated."""
    if not isinstance(value, str) or (not value and not empty):
        where.fail(fld, f"expected a relative path, got {value!r}")
    parts = value.replace("\\", "/").split("/")
    if value.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", value) or ".." in parts:
        where.fail(fld, f"expected a path inside the dataset folder (relative, no '..'), got {value!r}")
    return value.strip("/")


def _suffix(where: Where, value: Any, fld: str) -> str:
    if not isinstance(value, str) or not value or "/" in value or "\\" in value:
        where.fail(fld, f"expected the end of a file name like '.png' or '_labelTrainIds.png', got {value!r}")
    return value


def _parse_layout(where: Where, raw: Any) -> Layout:
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


def _parse_train_layouts(where: Where, raw: Mapping) -> Tuple[Layout, ...]:
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
        layouts.append(_parse_layout(Where(where.source, f"{where.entry}: layout.train[{i}]"), {**inherited, **part}))
    return tuple(layouts)


@lru_cache(maxsize=None)
def _class_table() -> Mapping:
    return json.loads(CLASSES_FILE.read_text(encoding="utf-8"))


def _default_palette(count: int) -> list:
    """mmseg's colours for classes without a palette: seeded random RGB, the same on every run."""
    return np.random.RandomState(42).randint(0, 255, size=(count, 3)).tolist()


def _parse_classes(where: Where, key: str, raw: Mapping, num_classes: int) -> Tuple[tuple, tuple]:
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


def parse_dataset(source: str, key: str, raw: Any) -> DatasetSpec:
    where = Where(source, f"datasets.{key}")
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
        where.fail("ignore_index", f"expected a label value from num_classes to 255 (a class cannot be ignored; "
                                   f"labels that store 'unlabelled' as 0 declare reduce_zero_label: true), "
                                   f"got {ignore_index!r}")
    if raw["reduce_zero_label"] is True and ignore_index != IGNORE_INDEX:
        where.fail("ignore_index", f"reduce_zero_label marks label 0 as {IGNORE_INDEX}, so the ignore index must be "
                                   f"{IGNORE_INDEX}, got {ignore_index!r}")
    classes, palette = _parse_classes(where, key, raw, num_classes)
    return DatasetSpec(
        key=key,
        title=raw["title"].strip(),
        num_classes=num_classes,
        img_scale=img_scale,
        reduce_zero_label=where.boolean(raw["reduce_zero_label"], "reduce_zero_label"),
        train_images_per_gpu=where.pos_int(raw["train_images_per_gpu"], "train_images_per_gpu"),
        test=parse_test(where, test_raw, None, "test"),
        layout=_parse_layout(where, raw["layout"]),
        classes=classes,
        palette=palette,
        ignore_index=ignore_index,
        source=source,
        train=ReadOnlyMap(where.mapping(raw.get("train") or {}, "train")),
    )


def _parse_published(where: Where, raw: Any, fld: str = "published") -> Published:
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


def _names(where: Where, value: Any, fld: str) -> Tuple[str, ...]:
    value = value or []
    if not isinstance(value, list) or not all(isinstance(a, str) and _NAME_RE.match(a) for a in value):
        where.fail(fld, f"expected a list of names, got {value!r}")
    return tuple(value)


def _parse_weights(where: Where, raw: Mapping) -> Tuple[Tuple[str, ...], str]:
    """The weights URLs (one, or a list of the same file's locations) and their hash prefix.

    The prefix is the ``-<8 hex>`` of the file name (the published files' convention) or, for a
    file named otherwise, the first 8 digits of the entry's full ``sha256``.
    """
    value = raw["weights"]
    page = raw.get("download_page")
    if page is not None and (not isinstance(page, str) or not re.match(r"^https?://", page)):
        where.fail("download_page",
                   f"expected the http(s):// address of the page to download the file from, got {page!r}")
    if value is None or page is not None:
        return _by_hand(where, raw, value, page)
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
        if sha256 is None and not WEIGHTS_RE.match(url.rsplit("/", 1)[-1]):
            where.fail(fld, f"file name must end in -<8 hex digits>.pth (the SHA-256 prefix), got {url!r}; "
                            f"rename the file so, or give the file's full 'sha256' instead")
        if url.rsplit("/", 1)[-1] != urls[0].rsplit("/", 1)[-1]:
            where.fail(fld, f"every URL must name the same file as the first ({urls[0].rsplit('/', 1)[-1]}), "
                            f"got {url!r}")
    named = WEIGHTS_RE.match(urls[0].rsplit("/", 1)[-1])
    derived = named.group("hash") if named else sha256[:8]
    hash_prefix = raw.get("hash", derived)
    if not isinstance(hash_prefix, str) or not _HEX8_RE.match(hash_prefix):
        where.fail("hash", f"expected 8 lowercase hex digits, got {hash_prefix!r}")
    if hash_prefix != derived:
        where.fail("hash", f"{hash_prefix!r} does not match the weights file name or sha256 ({derived!r})")
    if sha256 is not None and not sha256.startswith(hash_prefix):
        where.fail("sha256", f"expected 64 lowercase hex digits starting with {hash_prefix!r}, got {sha256!r}")
    return tuple(urls), hash_prefix


def _by_hand(where: Where, raw: Mapping, value: Any, page: Any) -> Tuple[Tuple[str, ...], str]:
    """A file with no stable URL (``weights: null``): ``download_page`` says where people get it; its
    hash prefix is that of the optional ``sha256`` (then the file placed by hand is checked against it)."""
    if value is not None:
        where.fail("weights", "must be null when download_page is given (the file is downloaded by hand)")
    if page is None:
        where.fail("weights", "null needs download_page: the address of the page to download the file from")
    sha256 = raw.get("sha256")
    if sha256 is not None and (not isinstance(sha256, str) or not _HEX64_RE.match(sha256)):
        where.fail("sha256", f"expected 64 lowercase hex digits, got {sha256!r}")
    if raw.get("hash") is not None and (sha256 is None or raw["hash"] != sha256[:8]):
        where.fail("hash", "a file downloaded by hand has no hashed name: give its full sha256 instead")
    return (), "" if sha256 is None else sha256[:8]


def _parse_family(where: Where, raw: Mapping) -> str:
    family = raw.get("family", "mmseg")
    if family not in FAMILIES:
        where.fail("family", f"expected one of {', '.join(FAMILIES)}, got {family!r}")
    return family


def _parse_backbone(where: Where, raw: Mapping) -> Tuple[str, dict]:
    """The table's backbone name and what it means: depth, stem (V1c/V1b) and output stride."""
    depth = raw.get("depth")
    if depth is not None and (depth not in DEPTHS or isinstance(depth, bool)):
        where.fail("depth", f"expected {DEPTH_WORDS}, got {depth!r}")
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


def _parse_arch(where: Where, raw: Mapping) -> dict:
    arch = dict(where.mapping(raw.get("model") or {}, "model"))
    where.known_keys(arch, ARCH_FIELDS, "model")
    for key, value in arch.items():
        where.pos_int(value, f"model.{key}")
    return arch


def _parse_cross(where: Where, raw: Mapping, datasets: Mapping[str, DatasetSpec], own: str,
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


def _parse_finetuned_from(where: Where, raw: Any) -> Mapping[str, str]:
    """A fine-tuned entry's source checkpoint: its name, full SHA-256 and where it was read from."""
    raw = where.mapping(raw or {}, "finetuned_from")
    where.known_keys(raw, FINETUNED_FROM_FIELDS, "finetuned_from")
    for key, value in raw.items():
        if not isinstance(value, str) or not value:
            where.fail(f"finetuned_from.{key}", f"expected text, got {value!r}")
    return ReadOnlyMap(raw)


def _entry_where(source: str, index: int, raw: Any) -> Where:
    label = f"models[{index}]"
    if isinstance(raw, Mapping) and isinstance(raw.get("name"), str):
        label += f" '{raw['name']}'"
    where = Where(source, label)
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


def parse_entry(source: str, index: int, raw: Any, datasets: Mapping[str, DatasetSpec]) -> Checkpoint:
    where = _entry_where(source, index, raw)
    dataset = raw["dataset"]
    if dataset not in datasets:
        where.fail("dataset", f"unknown dataset {dataset!r}; expected one of: {', '.join(datasets)}")
    spec = datasets[dataset]
    backbone, net = _parse_backbone(where, raw)
    urls, hash_prefix = _parse_weights(where, raw)
    arch = _parse_arch(where, raw)
    num_classes = arch.pop("num_classes", spec.num_classes)
    test = spec.test if raw.get("test") is None else parse_test(where, raw["test"], spec.test, "test")
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
        published_on=ReadOnlyMap({dataset: published, **cross}),
        dataset_aliases=dataset_aliases,
        _tests=ReadOnlyMap(tests),
        train=ReadOnlyMap(where.mapping(raw.get("train") or {}, "train")),
        finetuned_from=_parse_finetuned_from(where, raw.get("finetuned_from")),
        family=_parse_family(where, raw),
        download_page=raw.get("download_page"),
        **net,
    )


def read_yaml(path: Path) -> Mapping:
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


def overridden(previous: Mapping, override: Mapping) -> dict:
    """An entry overridden field by field: the override's fields, the previous entry's for the rest.

    Inherited fields that describe what the override replaced go with it: new ``weights`` are
    another file (its hash is not the previous one), a new ``dataset`` or ``model`` another network
    (the published rows on other datasets were measured with the previous one).
    """
    replaced = {key for trigger, keys in _REPLACED_WITH.items() if trigger in override for key in keys}
    return {**{key: value for key, value in previous.items() if key not in replaced}, **override}


_REPLACED_WITH = {"weights": ("hash", "sha256", "download_page"), "dataset": ("published_on",),
                  "model": ("published_on",)}


