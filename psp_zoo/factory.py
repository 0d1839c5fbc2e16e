"""Build a manifest entry's model: resolve -> build -> (fetch) -> load, in four visible steps."""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

import torch

from .checkpoint import load_checkpoint
from .download import download
from .manifest import get_checkpoint
from .model import PSPNet

__all__ = ["create_model"]


def create_model(name: str, *, pretrained: bool = True, checkpoint: Union[None, str, Path] = None,
                 device: Union[str, torch.device] = "cpu", manifest=None,
                 cache_dir: Union[None, str, Path] = None, mirror: Optional[str] = None,
                 offline: Optional[bool] = None, quiet: Optional[bool] = None) -> PSPNet:
    """The PSPNet of manifest entry ``name`` in eval mode, with its published weights.

    The weights are downloaded and verified, or found in the cache (see :func:`psp_zoo.download`
    for ``cache_dir``, ``mirror``, ``offline`` and ``quiet``). ``checkpoint=PATH`` loads a local
    file instead of the published one; ``pretrained=False`` returns randomly initialised weights.
    """
    entry = get_checkpoint(name, manifest=manifest)
    model = PSPNet(**entry.model_kwargs())
    if checkpoint is not None:
        path = Path(checkpoint)
    elif pretrained:
        path = download(entry, cache_dir=cache_dir, mirror=mirror, offline=offline, quiet=quiet)
    else:
        path = None
    if path is not None:
        meta = load_checkpoint(model, path)
        model.checkpoint_meta = meta
    model.checkpoint_entry = entry
    return model.eval().to(device)

