"""From what a user names to a model and how to run it, in one resolution step.

``resolve(name or model, dataset=, checkpoint=, fetch=, device=, overrides=)`` checks everything
that can be checked without the weights (the name, the dataset, test-setting overrides, the
device) and returns a :class:`Resolved` record; ``Resolved.load()`` then fetches, verifies and
loads the weights. evaluate, predict and reproduce all go through it, so a misspelt override or a
wrong dataset is refused before anything is downloaded, and nothing is hung on the model.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Tuple, Union

import torch
from torch import nn

from ..environment import usable_device
from ..errors import PspZooError
from ..hub.cache import download
from ..hub.options import FetchOptions
from ..manifest.loading import Checkpoint, DatasetSpec, EvalSettings, get_checkpoint, get_manifest
from . import PSPNet
from .checkpoint import load_checkpoint

__all__ = ["create_model", "resolve", "Resolved", "refuse_checkpoint_for_model_object", "usable_device"]

PathLike = Union[str, Path]


def create_model(name: str, *, pretrained: bool = True, checkpoint: Optional[PathLike] = None,
                 device: Union[None, str, torch.device] = "cpu",
                 fetch: Optional[FetchOptions] = None, **fetch_fields: Any) -> PSPNet:
    """The PSPNet of manifest entry ``name`` in eval mode, with its published weights.

    The weights are downloaded and verified, or found in the cache, as ``fetch`` says (a
    :class:`psp_zoo.FetchOptions`, or its fields as keywords: ``manifest``, ``cache_dir``,
    ``mirror``, ``offline``, ``quiet``). ``checkpoint=PATH`` loads a local file instead of the
    published one; ``pretrained=False`` returns randomly initialised weights.
    """
    fetch = _fetch_options(fetch, fetch_fields)
    entry = get_checkpoint(name, manifest=fetch.manifest)
    device = usable_device(device)
    return _build(entry, checkpoint if checkpoint is not None else (None if pretrained else False),
                  fetch).to(device)


def _fetch_options(fetch: Optional[FetchOptions], fields: Mapping[str, Any]) -> FetchOptions:
    try:
        return FetchOptions(**{**(vars(fetch) if fetch else {}), **fields})
    except TypeError as exc:
        raise TypeError(f"{exc}; fetch options are: manifest, cache_dir, mirror, offline, quiet") from None


def _build(entry: Checkpoint, checkpoint: Union[None, bool, PathLike], fetch: FetchOptions) -> PSPNet:
    """Build -> fetch -> load; ``checkpoint``: a local file, None (the published one) or False (none)."""
    model = PSPNet(**entry.model_kwargs())
    if checkpoint is None:
        checkpoint = download(entry, **fetch.download_kwargs())
    if checkpoint is not False:
        load_checkpoint(model, Path(checkpoint))
    return model.eval()


@dataclass(frozen=True)
class Resolved:
    """A model to run and how: the manifest entry (None for a model object), the dataset it is
    scored on, and the test settings after overrides. ``load()`` gives the model itself."""

    name: str
    entry: Optional[Checkpoint]
    dataset: DatasetSpec
    settings: EvalSettings
    num_classes: int
    device: torch.device
    fetch: FetchOptions = field(default_factory=FetchOptions)
    checkpoint: Optional[Path] = None
    model: Optional[nn.Module] = field(default=None, compare=False)  # a model object given by the user

    def load(self) -> nn.Module:
        """The model in eval mode on ``device``: the user's object, or the entry's weights fetched."""
        if self.model is not None:
            return self.model.eval().to(self.device)
        return _build(self.entry, self.checkpoint, self.fetch).to(self.device)

    @property
    def class_names(self) -> Tuple[str, ...]:
        """Names to report per-class scores under (indices for a model of another class count)."""
        return self.dataset.class_names(self.num_classes)


def resolve(name_or_model: Union[str, nn.Module], *, dataset: Optional[str] = None,
            checkpoint: Optional[PathLike] = None, fetch: Optional[FetchOptions] = None,
            device: Union[None, str, torch.device] = None,
            overrides: Optional[Mapping[str, Any]] = None) -> Resolved:
    """Everything about running ``name_or_model`` that can be known before the weights are fetched.

    A manifest name brings its dataset and test settings (``dataset`` may name another dataset
    the checkpoint is published on). A model object needs ``dataset``, whose default settings
    apply with the model's own ``align_corners``. ``overrides`` (``mode``, ``img_scale``,
    ``crop_size``, ``stride``, ``align_corners``) are validated here.
    """
    fetch = fetch or FetchOptions()
    device = usable_device(device)
    manifest = get_manifest(fetch.manifest)
    if isinstance(name_or_model, str):
        entry, named_dataset = manifest.resolve(name_or_model)  # a cross-dataset row's name brings its dataset
        spec, settings = _entry_settings(entry, dataset or named_dataset, manifest)
        return Resolved(entry.name, entry, spec, settings.with_overrides(overrides or {}), entry.num_classes,
                        device, fetch, None if checkpoint is None else Path(checkpoint))
    refuse_checkpoint_for_model_object(checkpoint)
    spec = _dataset_spec(manifest, dataset)
    settings = spec.test.with_overrides({"align_corners": bool(getattr(name_or_model, "align_corners",
                                                                       spec.test.align_corners))})
    num_classes = int(getattr(name_or_model, "num_classes", spec.num_classes))
    return Resolved(type(name_or_model).__name__, None, spec, settings.with_overrides(overrides or {}),
                    num_classes, device, fetch, model=name_or_model)


def refuse_checkpoint_for_model_object(checkpoint: Optional[PathLike]) -> None:
    """``checkpoint=`` names the weights of a manifest entry; a model object brings its own."""
    if checkpoint is not None:
        raise PspZooError("checkpoint= selects the weights of a named model; load them into the model "
                          "object yourself (psp_zoo.load_checkpoint) or pass a manifest name")


def _entry_settings(entry: Checkpoint, dataset: str, manifest) -> Tuple[DatasetSpec, EvalSettings]:
    """The dataset and test settings of ``entry`` on ``dataset``: its own, or one it is published on."""
    if dataset not in entry.datasets:
        raise PspZooError(f"{entry.name} is a {entry.dataset} checkpoint; it cannot be scored on {dataset} "
                          f"(it is published on: {', '.join(entry.datasets)})")
    return manifest.datasets[dataset], entry.test_settings(dataset)


def _dataset_spec(manifest, dataset: Optional[str]) -> DatasetSpec:
    if dataset not in manifest.datasets:
        raise PspZooError(f"running a model object needs dataset=, one of: {', '.join(manifest.datasets)}")
    return manifest.datasets[dataset]
