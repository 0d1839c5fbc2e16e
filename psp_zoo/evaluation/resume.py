"""Resumable evaluation: the counts of an unfinished pass, kept on disk beside its results file.

A pass over a validation set saves its confusion matrix and the next image index every N images
(atomically); a killed run continues from the last save and ends with the same integer counts as
an uninterrupted one. A saved state made by a different run (other checkpoint, settings, image
list, options) is ignored with a warning rather than mixed into new counts.
"""
from __future__ import annotations

import io
import json
import warnings
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple, Union

import numpy as np
import torch

from ..files import atomic_write

__all__ = ["PartialState"]

PathLike = Union[str, Path]


class PartialState:
    """Accumulated arrays + the next image index of an unfinished evaluation, kept on disk.

    ``fingerprint`` describes the run (checkpoint, settings, image list...); a saved state made
    with a different fingerprint is ignored with a warning instead of being mixed into new counts.
    """

    def __init__(self, path: PathLike, fingerprint: Mapping[str, Any], every: int = 50):
        if every < 1:
            raise ValueError("every must be >= 1")
        self.path = Path(path)
        self.fingerprint = json.loads(json.dumps(dict(fingerprint), sort_keys=True, default=str))
        self.every = every

    @classmethod
    def for_result(cls, result_file: PathLike, fingerprint: Mapping[str, Any], every: int = 50) -> "PartialState":
        """The state file kept beside a results file: ``<results file>.partial.npz``."""
        return cls(Path(f"{result_file}.partial.npz"), fingerprint, every)

    def load(self) -> Optional[Tuple[int, Dict[str, np.ndarray]]]:
        """``(next_index, arrays)`` of a saved state of this run, or None to start from zero."""
        if not self.path.exists():
            return None
        try:
            with np.load(self.path, allow_pickle=False) as saved:
                meta = json.loads(str(saved["__meta__"]))
                arrays = {key: saved[key] for key in saved.files if key != "__meta__"}
        except (OSError, ValueError, KeyError) as exc:
            warnings.warn(f"ignoring unreadable partial state {self.path} ({exc}); starting over", stacklevel=2)
            return None
        if meta.get("fingerprint") != self.fingerprint:
            warnings.warn(f"ignoring partial state {self.path}: it belongs to a run with other "
                          f"settings; starting over", stacklevel=2)
            return None
        return int(meta["next_index"]), arrays

    def save(self, next_index: int, arrays: Mapping[str, Any]) -> None:
        """Atomically record that images ``[0, next_index)`` are counted in ``arrays``."""
        meta = json.dumps({"fingerprint": self.fingerprint, "next_index": int(next_index)})
        buffer = io.BytesIO()
        np.savez(buffer, __meta__=np.array(meta), **{k: _to_numpy(v) for k, v in arrays.items()})
        atomic_write(self.path, buffer.getvalue())

    def maybe_save(self, next_index: int, arrays: Mapping[str, Any]) -> bool:
        """Save every ``every`` images; the caller calls this after each image."""
        if next_index % self.every:
            return False
        self.save(next_index, arrays)
        return True

    def clear(self) -> None:
        """Forget the state once the results file is written."""
        self.path.unlink(missing_ok=True)


def _to_numpy(value: Any) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    return np.asarray(value)
