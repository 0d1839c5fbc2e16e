"""Build a manifest entry's model: resolve -> build -> (fetch) -> load, in four visible steps."""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

import torch

from .checkpoint import load_checkpoint
from .download import download
from .errors import PspZooError
from .manifest import get_checkpoint
from .model import PSPNet

__all__ = ["create_model", "usable_device"]


def usable_device(device: Union[None, str, torch.device] = None) -> torch.device:
    """``device`` as a torch.device that works here (None: CUDA when available, else the CPU).

    A misspelt or absent device (``cuda`` on a machine without one, ``cuda:7`` of two) raises
    PspZooError saying so, instead of a RuntimeError from deep inside torch.
    """
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        raise PspZooError(f"unknown device {str(device)!r}; use cpu, cuda or cuda:N") from None
    if parsed.type not in ("cpu", "cuda"):
        reason = "psp-zoo runs on cpu and cuda devices"
    elif parsed.type == "cuda" and not torch.cuda.is_available():
        reason = "no CUDA device is available to this torch"
    elif parsed.type == "cuda" and (parsed.index or 0) >= torch.cuda.device_count():
        reason = f"there are {torch.cuda.device_count()} CUDA devices, numbered from 0"
    else:
        try:
            torch.empty(0, device=parsed)  # the one check that covers every other kind of device
            return parsed
        except (RuntimeError, AssertionError) as exc:
            reason = str(exc).strip().split(". ")[0].splitlines()[0] if str(exc).strip() else type(exc).__name__
    raise PspZooError(f"device {str(device)!r} is not usable here ({reason}); use --device cpu, "
                      f"or a device that `psp-zoo selftest` lists")


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
    device = usable_device(device)
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

