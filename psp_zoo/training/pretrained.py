"""Where a training run's weights start: mmcv's initialization and the ImageNet backbone files.

The published runs built the network, initialized it as mmcv 1.x does (every conv Kaiming normal,
fan_out, ReLU gain, bias 0; BatchNorm weight 1, bias 0; each head's ``conv_seg`` normal(0, 0.01),
bias 0), then loaded an ImageNet backbone over the backbone: ``open-mmlab://resnet{18,50,101}_v1c``
for the V1c rows, ``torchvision://resnet{18,50,101}`` for the "b" rows, an mmcls checkpoint (keys
under ``backbone.``) for the rsb rows. Those files are the manifest's ``backbones:`` entries,
fetched, verified and cached by the same hub as the checkpoints, and loaded strictly: a missing
backbone key or a wrong shape is an error, and keys the backbone does not use (the classifier's
``fc.*``) are listed, not silently dropped.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import List, Mapping, Optional, Tuple, Union

from torch import nn

from ..errors import CheckpointError, ManifestError, PspZooError
from ..hub.cache import download
from ..hub.options import FetchOptions
from ..manifest.backbones import DEPTH_WORDS, DEPTHS, STAGE_BLOCKS
from ..manifest.loading import get_manifest
from ..model.checkpoint import read_checkpoint

__all__ = ["Backbone", "backbone_entry", "init_weights", "load_backbone", "load_pretrained_backbone"]

log = logging.getLogger("psp_zoo")
_FIELDS = ("name", "url", "depth", "stem", "prefix", "sha256")


@dataclass(frozen=True)
class Backbone:
    """One ImageNet backbone file of the manifest's ``backbones:`` list."""

    name: str
    url: str
    depth: int
    deep_stem: bool  # v1c (three 3x3 stem convs) or v1b (one 7x7 conv1)
    prefix: str = ""  # keys kept (and stripped) from the file: mmcls files hold "backbone.*"
    sha256: Optional[str] = None


def _parse(source: str, raw: Mapping) -> Backbone:
    where = f"{source}: backbones '{raw.get('name')}'"
    unknown = sorted(set(raw) - set(_FIELDS))
    if unknown:
        raise ManifestError(f"{where}: field {unknown[0]!r}: unknown field; allowed: {', '.join(_FIELDS)}")
    if not isinstance(raw.get("url"), str) or "://" not in raw["url"]:
        raise ManifestError(f"{where}: field 'url': expected the file's URL, got {raw.get('url')!r}")
    if raw.get("depth") not in DEPTHS:
        raise ManifestError(f"{where}: field 'depth': expected {DEPTH_WORDS}, got {raw.get('depth')!r}")
    if raw.get("stem") not in ("v1c", "v1b"):
        raise ManifestError(f"{where}: field 'stem': expected 'v1c' or 'v1b', got {raw.get('stem')!r}")
    return Backbone(raw["name"], raw["url"], raw["depth"], raw["stem"] == "v1c", str(raw.get("prefix") or ""),
                    raw.get("sha256"))


def backbone_entry(name: str, manifest=None) -> Backbone:
    """The ``backbones:`` entry ``name``; PspZooError listing the known names if there is none."""
    backbones = get_manifest(manifest).backbones
    if name not in backbones:
        raise PspZooError(f"unknown ImageNet backbone {name!r}; the manifest lists: {', '.join(backbones)}")
    source, raw = backbones[name]
    return _parse(source, raw)


def init_weights(model: nn.Module) -> nn.Module:
    """mmcv's initialization of a PSPNet (in place): Kaiming convs, unit BatchNorm, conv_seg N(0, 0.01)."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.modules.batchnorm._BatchNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
    for head in (model.decode_head, model.auxiliary_head):
        nn.init.normal_(head.conv_seg.weight, 0.0, 0.01)
        nn.init.zeros_(head.conv_seg.bias)
    return model


def load_backbone(backbone: nn.Module, path: Union[str, Path], prefix: str = "") -> List[str]:
    """Load an ImageNet file into ``backbone`` strictly; return the file's keys it does not use.

    Every backbone key must be in the file (below ``prefix``) with its shape; the file's other keys
    (``fc.*``, an mmcls file's ``head.*``) are returned so the caller can say which were left out.
    """
    whole, _ = read_checkpoint(path)
    state = {key[len(prefix):]: value for key, value in whole.items() if key.startswith(prefix)}
    expected = backbone.state_dict()
    missing = [key for key in expected if key not in state]
    shapes = [f"{key} {tuple(state[key].shape)} vs {tuple(value.shape)}" for key, value in expected.items()
              if key in state and state[key].shape != value.shape]
    if missing or shapes:
        problems = ([f"{len(missing)} missing: {', '.join(missing[:5])}"] if missing else []) + (
            [f"{len(shapes)} shape mismatch: {', '.join(shapes[:5])}"] if shapes else [])
        raise CheckpointError(f"{Path(path).name} does not fit the backbone: {'; '.join(problems)}; check that "
                              f"the backbone's depth and stem match the file")
    unused = sorted(key for key in whole if not key.startswith(prefix) or key[len(prefix):] not in expected)
    backbone.load_state_dict({key: state[key].to(value.dtype) for key, value in expected.items()}, strict=True)
    return unused


def load_pretrained_backbone(model: nn.Module, name: str,
                             fetch: Optional[FetchOptions] = None) -> Tuple[Path, List[str]]:
    """Fetch (or find in the cache) the backbone file ``name`` and load it into ``model.backbone``.

    Returns the file and its unused keys (also logged). The file's depth and stem must be the model's.
    """
    fetch = fetch or FetchOptions()
    entry = backbone_entry(name, fetch.manifest)
    if (entry.depth, entry.deep_stem) != (_depth(model), model.backbone.deep_stem):
        raise PspZooError(f"ImageNet backbone {name} is a ResNet-{entry.depth} "
                          f"{'V1c' if entry.deep_stem else 'V1b'}; the model is not: choose a matching backbone")
    kwargs = {k: v for k, v in fetch.download_kwargs().items() if k != "manifest"}
    path = download(entry.url, sha256=entry.sha256, **kwargs)
    unused = load_backbone(model.backbone, path, entry.prefix)
    if unused:
        more = f" (+{len(unused) - 8} more)" if len(unused) > 8 else ""
        log.warning("%s: %d keys not used by the backbone: %s%s", path.name, len(unused), ", ".join(unused[:8]), more)
    return path, unused


def _depth(model: nn.Module) -> int:
    """The depth whose stage lengths the backbone has (``STAGE_BLOCKS``)."""
    lengths = tuple(len(getattr(model.backbone, f"layer{i}")) for i in range(1, 5))
    return next(depth for depth, blocks in STAGE_BLOCKS.items() if blocks == lengths)

