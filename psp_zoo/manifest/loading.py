"""The checkpoint manifest: typed, frozen records loaded and validated from ``model_index.yml``.

The records are :mod:`psp_zoo.manifest.entries`, the schema and its validation
:mod:`psp_zoo.manifest.schema`; this module loads, merges and looks them up. The built-in manifest
declares every dataset psp-zoo reads (one ``DatasetSpec`` each: title, class
names, palette, test settings and folder ``Layout``) and lists every published PSPNet checkpoint
of the mmsegmentation v0.5 model zoo. A user manifest (``PSP_ZOO_MANIFEST`` or an explicit path,
several joined with ``os.pathsep``) has the same schema: it adds datasets and entries or overrides
built-in ones by key and name, e.g. for private checkpoints or a dataset in a new folder layout.
"""
from __future__ import annotations

import difflib
import fnmatch
import os
import re
from functools import lru_cache
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Tuple, Union

from ..constants import MANIFEST_ENV, env_paths
from ..errors import ManifestError, PspZooError, UnknownModelError
from .entries import IGNORE_INDEX, LABEL_MAPS, Checkpoint, DatasetSpec, EvalSettings, Layout, Published
from .schema import overridden, parse_dataset, parse_entry, read_yaml

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


@lru_cache(maxsize=1)
def _builtin_data() -> Mapping:
    return read_yaml(BUILTIN_MANIFEST)


def load_manifest(*user_paths: Union[str, Path], builtin: bool = True) -> Manifest:
    """Read the built-in manifest, then each user manifest in order (later ones override)."""
    datasets: dict = {}
    backbones: dict = {}
    entries: dict = {}
    raws: dict = {}
    sources = ([BUILTIN_MANIFEST] if builtin else []) + [Path(p) for p in user_paths]
    for path in sources:
        data = _builtin_data() if path == BUILTIN_MANIFEST else read_yaml(path)
        source = "model_index.yml" if path == BUILTIN_MANIFEST else str(path)
        for key, raw in (data.get("datasets") or {}).items():
            datasets[key] = parse_dataset(source, key, raw)
        backbones.update((raw["name"], (source, raw)) for raw in data.get("backbones") or [])
        seen = set()
        for index, raw in enumerate(data.get("models") or []):
            name = raw.get("name") if isinstance(raw, Mapping) else None
            if name in seen:
                raise ManifestError(f"{source}: models[{index}] '{name}': field 'name': duplicate name")
            seen.add(name)
            if isinstance(name, str) and name in raws:
                raw = overridden(raws[name], raw)
            ckpt = parse_entry(source, index, raw, datasets)
            raws[ckpt.name] = raw
            entries[ckpt.name] = ckpt  # an override keeps the entry's place in the list
    return Manifest(datasets, list(entries.values()), backbones)


_CACHE: dict = {}


def user_manifest_paths(manifest: Union[None, str, Path, Sequence]) -> Tuple[str, ...]:
    if manifest is None:
        manifest = env_paths(MANIFEST_ENV)
    if isinstance(manifest, (str, Path)):
        manifest = [p for p in str(manifest).split(os.pathsep) if p]
    return tuple(str(Path(p).expanduser()) for p in manifest)


def get_manifest(manifest: Union[None, str, Path, Sequence] = None) -> Manifest:
    """The manifest in force: built-in plus ``manifest`` (or ``$PSP_ZOO_MANIFEST``) overrides.

    Cached per set of files and their modification times, so an edited user manifest is reread.
    """
    paths = user_manifest_paths(manifest)
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
