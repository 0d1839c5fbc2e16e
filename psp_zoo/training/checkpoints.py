"""A training run's checkpoint files: the published format, written atomically, with latest/best pointers.

``iter_<N>.pth`` holds ``{'meta', 'state_dict', 'optimizer'}`` as mmcv 1.x's runner wrote it (the
published ``-<sha8>.pth`` files are these without ``optimizer``), so psp-zoo, mmseg and torch.hub
load it as they load a published file. What a resumed run needs beyond the weights and the
optimizer (the iteration, the seed, the loss scaler, the best score so far, the recipe) travels in
``meta['psp_zoo']``, plain data that ``torch.load(weights_only=True)`` reads. ``latest.pth`` and
``best.pth`` are symbolic links to the newest and the best-scoring file (copies where links are
not possible), replaced atomically.
"""
from __future__ import annotations

import os
import secrets
import shutil
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch

from ..errors import CheckpointError
from ..files import atomic_save
from ..model.checkpoint import checkpoint_parts, load_checkpoint_file

__all__ = ["checkpoint_name", "save_checkpoint", "point", "pointed", "read_training_state", "LATEST", "BEST"]

LATEST, BEST = "latest.pth", "best.pth"


def checkpoint_name(iteration: int) -> str:
    return f"iter_{iteration}.pth"


def save_checkpoint(work_dir: Path, iteration: int, state_dict: Dict[str, torch.Tensor], optimizer: dict,
                    meta: Dict[str, Any]) -> Path:
    """Write ``iter_<iteration>.pth`` atomically and point ``latest.pth`` at it."""
    path = Path(work_dir) / checkpoint_name(iteration)
    payload = {"meta": meta, "state_dict": state_dict, "optimizer": optimizer}
    atomic_save(path, lambda tmp: torch.save(payload, tmp))
    point(path, LATEST)
    return path


def point(target: Path, pointer: str) -> Path:
    """Make ``target.parent / pointer`` lead to ``target`` (a relative link, else a copy), atomically."""
    link = target.parent / pointer
    tmp = target.parent / f".{pointer}.{secrets.token_hex(4)}.tmp"
    try:
        os.symlink(target.name, tmp)
    except OSError:  # no links here (some Windows setups): a copy, written atomically too
        shutil.copyfile(target, tmp)
    os.replace(tmp, link)
    return link


def pointed(work_dir: Path, pointer: str = LATEST) -> Optional[Path]:
    """The file ``pointer`` leads to in ``work_dir``, or None where there is none.

    Without ``latest.pth`` (a run killed between writing a checkpoint and pointing at it) the
    newest ``iter_<N>.pth`` is the latest.
    """
    link = Path(work_dir) / pointer
    if not link.exists():
        if pointer != LATEST:
            return None
        written = [(int(p.stem[len("iter_"):]), p) for p in Path(work_dir).glob("iter_*.pth")
                   if p.stem[len("iter_"):].isdigit()]
        return max(written)[1] if written else None
    return link.resolve() if link.is_symlink() else link


def read_training_state(path: Path) -> Tuple[Dict[str, torch.Tensor], dict, dict]:
    """``(state_dict, optimizer state, meta['psp_zoo'])`` of a checkpoint this module wrote (weights-only)."""
    raw = load_checkpoint_file(path)
    state_dict, meta = checkpoint_parts(raw, path)
    own = meta.get("psp_zoo")
    if not isinstance(raw, dict) or "optimizer" not in raw or not isinstance(own, dict):
        raise CheckpointError(f"{path} is not a psp-zoo training checkpoint (no optimizer or training state); "
                              f"resume needs one written by psp_zoo.train")
    return state_dict, raw["optimizer"], own
