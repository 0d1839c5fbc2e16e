"""The manifest's records: one frozen, typed record per checkpoint, dataset, test setting and
folder layout. :mod:`psp_zoo.manifest.schema` builds them from YAML; :mod:`psp_zoo.manifest` holds them."""
from __future__ import annotations

import dataclasses
import re
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Mapping, Optional, Tuple

from ..errors import ManifestError, PspZooError
from .backbones import FAMILIES, METHOD_NAMES, head_channels

__all__ = ["IGNORE_INDEX", "LABEL_MAPS", "PUBLISHED_FIELDS", "Published", "EvalSettings", "Layout", "DatasetSpec",
           "Checkpoint"]

#: Label value that is never scored (mmseg's ignore_index), unless a dataset declares another.
IGNORE_INDEX = 255
TEST_FIELDS = ("mode", "img_scale", "crop_size", "stride", "align_corners", "base_size")
#: The test modes: mmseg's whole-image and sliding-window inference, and the PSPNet authors' protocol
#: (semseg's tool/test.py: long side scaled to ``base_size``, ``crop_size`` windows, flip always).
TEST_MODES = ("whole", "slide", "semseg")
#: Named id mappings a layout's ``label_map`` may ask for (applied to its fallback label files).
LABEL_MAPS = ("cityscapes_label_ids",)

# Published-table column names as they appear in the manifest and in the README tables.
# mAcc / aAcc: published by the PSPNet authors beside mIoU (mean class accuracy, pixel accuracy).
PUBLISHED_FIELDS = {
    "mIoU": ("miou", 0.0, 100.0),
    "mIoU(ms+flip)": ("miou_ms_flip", 0.0, 100.0),
    "Mem (GB)": ("mem_gb", 0.0, 1000.0),
    "Inf time (fps)": ("fps", 0.0, 100000.0),
    "mAcc": ("macc", 0.0, 100.0),
    "aAcc": ("aacc", 0.0, 100.0),
    "mAcc(ms+flip)": ("macc_ms_flip", 0.0, 100.0),
    "aAcc(ms+flip)": ("aacc_ms_flip", 0.0, 100.0),
}
# The hashed file name convention: <anything>-<8 hex>.pth at the end of the URL path.
WEIGHTS_RE = re.compile(r"^(?P<stem>[^/?#]+-(?P<hash>[0-9a-f]{8}))\.pth$")


class ReadOnlyMap(Mapping):
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
    macc: Optional[float] = None
    aacc: Optional[float] = None
    macc_ms_flip: Optional[float] = None
    aacc_ms_flip: Optional[float] = None


@dataclass(frozen=True)
class EvalSettings:
    """How a checkpoint is evaluated: the resize target, whole or sliding-window inference, or the
    PSPNet authors' protocol (``mode='semseg'``: ``base_size`` and ``crop_size``, no ``stride``,
    which that protocol derives from the crop)."""

    mode: str
    img_scale: Tuple[int, int]
    align_corners: bool
    crop_size: Optional[Tuple[int, int]] = None
    stride: Optional[Tuple[int, int]] = None
    base_size: Optional[int] = None

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
        if merged["mode"] == "semseg" and (merged["crop_size"] is None or merged["base_size"] is None):
            raise PspZooError("semseg inference needs base_size=N (the long side at scale 1) and crop_size=(h, w)")
        plain = {k: list(v) if isinstance(v, tuple) else v for k, v in overrides.items()}
        return parse_test(Where("test settings", "overrides"), plain, self, "")


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
    urls: Tuple[str, ...]  # the same file's published locations, tried in order; () = downloaded by hand
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
    # the checkpoint a fine-tuned entry started from (schema.FINETUNED_FROM_FIELDS); empty for published ones
    finetuned_from: Mapping[str, str] = field(default_factory=dict, hash=False, repr=False)
    # whose network and file layout: 'mmseg' or 'semseg' (the PSPNet authors'), backbones.FAMILIES
    family: str = "mmseg"
    # a file with no stable URL: the page to download it from by hand (then ``urls`` is empty)
    download_page: Optional[str] = None

    @property
    def url(self) -> Optional[str]:
        """The primary weights URL; None for a file downloaded by hand (``download_page``)."""
        return self.urls[0] if self.urls else None

    @property
    def by_hand(self) -> bool:
        """True for a file with no download URL: the user fetches it from ``download_page``."""
        return not self.urls

    @property
    def method(self) -> str:
        """The results tables' Method cell: 'PSPNet', or 'PSPNet (semseg)' for the authors' models."""
        return METHOD_NAMES[self.family]

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
        URL's file name, with ``-<hash8>`` added when the URL's name does not carry it. A file
        downloaded by hand is ``<name>.pth`` (``<name>-<hash8>.pth`` when the entry gives its sha256)."""
        if self.by_hand:
            return f"{self.name}-{self.hash_prefix}.pth" if self.hash_prefix else f"{self.name}.pth"
        name = self.url.rsplit("/", 1)[-1]
        if WEIGHTS_RE.match(name):
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
            finetuned_from=dict(self.finetuned_from),
        )
        return {key: asdict(v) if dataclasses.is_dataclass(v) else v for key, v in fields.items()}

    def model_kwargs(self) -> dict:
        """Keyword arguments for :class:`psp_zoo.PSPNet` that build this checkpoint's network."""
        channels, aux_channels = head_channels(self.depth)
        kwargs = {
            **FAMILIES[self.family],
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
# reading test settings (the manifest's and a caller's overrides alike)


class Where:
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


def parse_test(where: Where, raw: Mapping, base: Optional[EvalSettings], fld: str) -> EvalSettings:
    where.mapping(raw, fld)
    where.known_keys(raw, TEST_FIELDS, fld)
    merged = dict(base.__dict__) if base else {}
    merged.update(raw)
    mode = merged.get("mode")
    if mode not in TEST_MODES:
        where.fail(f"{fld}.mode", f"expected one of {', '.join(map(repr, TEST_MODES))}, got {mode!r}")
    if "img_scale" not in merged:
        where.fail(f"{fld}.img_scale", "missing")
    settings = {
        "mode": mode,
        "img_scale": where.pair(merged["img_scale"], f"{fld}.img_scale"),
        "align_corners": where.boolean(merged.get("align_corners", False), f"{fld}.align_corners"),
        "crop_size": None,
        "stride": None,
        "base_size": None,
    }
    if mode == "slide":
        for key in ("crop_size", "stride"):
            if merged.get(key) is None:
                where.fail(f"{fld}.{key}", "required when mode is 'slide'")
            settings[key] = where.pair(merged[key], f"{fld}.{key}")
    if mode == "semseg":
        if raw.get("stride") is not None:
            where.fail(f"{fld}.stride", "not used when mode is 'semseg': its windows step by ceil(2/3 crop_size)")
        for key in ("base_size", "crop_size"):
            if merged.get(key) is None:
                where.fail(f"{fld}.{key}", "required when mode is 'semseg'")
        settings["base_size"] = where.pos_int(merged["base_size"], f"{fld}.base_size")
        settings["crop_size"] = where.pair(merged["crop_size"], f"{fld}.crop_size")
    return EvalSettings(**settings)
