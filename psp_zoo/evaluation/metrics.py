"""Dataset-level segmentation metrics: a confusion-matrix accumulator, mergeable across processes.

The reference (mmseg ``intersect_and_union``) drops pixels labelled ``ignore_index`` and then
histograms intersection, prediction and label with ``num_classes`` bins over [0, C). A label
outside [0, C) that is not ``ignore_index`` is therefore not counted as a label, but its pixel's
prediction still counts in the prediction area. The matrix keeps one extra row for such pixels so
that all three histograms come out exactly as the reference's.
"""
from __future__ import annotations

import warnings
from typing import Dict, Optional, Union

import numpy as np
import torch
import torch.distributed as dist

from ..manifest.loading import IGNORE_INDEX  # declared once, with the datasets

__all__ = ["ConfusionMatrix", "IGNORE_INDEX", "count_cells"]

ArrayLike = Union[torch.Tensor, np.ndarray]


class ConfusionMatrix:
    """Counts of (label, prediction) pixel pairs summed over a dataset, int64.

    ``matrix[l, p]`` for labels l in [0, C); row C counts pixels whose label is outside [0, C)
    (and not ignored) by their prediction.
    """

    def __init__(self, num_classes: int, *, ignore_index: int = IGNORE_INDEX,
                 device: Union[str, torch.device, None] = None):
        if num_classes < 1:
            raise ValueError(f"num_classes must be positive, got {num_classes}")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.matrix = torch.zeros(num_classes + 1, num_classes, dtype=torch.int64, device=device)
        self._invalid = torch.zeros((), dtype=torch.int64, device=device)  # predictions outside [0, C)

    def update(self, pred: ArrayLike, label: ArrayLike) -> "ConfusionMatrix":
        """Add one image (or a batch) of predicted class indices and labels of the same shape.

        Nothing here waits for a GPU: every pixel is sent to one cell (its label row and
        prediction, or one of two spare cells for ignored pixels and for predictions outside
        [0, C)), so no boolean selection or min/max has to be read back per image. A prediction
        outside [0, C) raises ValueError at once on the CPU; on a GPU when the counts are read
        (``areas``, ``compute``, ``state_dict``).
        """
        pred = torch.as_tensor(pred, device=self.matrix.device).long().flatten()
        label = torch.as_tensor(label, device=self.matrix.device).long().flatten()
        if pred.shape != label.shape:
            raise ValueError(f"prediction has {pred.numel()} pixels but label has {label.numel()}")
        classes = self.num_classes
        cells = (classes + 1) * classes
        row = torch.where((label >= 0) & (label < classes), label, classes)
        cell = torch.where((pred >= 0) & (pred < classes), row * classes + pred, cells + 1)
        cell = torch.where(label == self.ignore_index, cells, cell)  # ignored: not even checked
        counts = count_cells(cell, cells + 2)
        if self.matrix.device.type == "cpu" and counts[cells + 1]:
            raise ValueError(self._range_message())
        self._invalid += counts[cells + 1]
        self.matrix += counts[:cells].view(classes + 1, classes)
        return self

    def _range_message(self) -> str:
        return f"predictions must lie in [0, {self.num_classes})"

    def _check(self) -> None:
        if int(self._invalid):
            raise ValueError(self._range_message() + f"; {int(self._invalid)} pixel(s) were outside")

    def merge(self, other: "ConfusionMatrix") -> "ConfusionMatrix":
        """Add another accumulator's counts into this one (same class count)."""
        if other.num_classes != self.num_classes or other.ignore_index != self.ignore_index:
            raise ValueError("cannot merge confusion matrices of different class counts or ignore index")
        self.matrix += other.matrix.to(self.matrix.device)
        self._invalid += other._invalid.to(self.matrix.device)
        return self

    def __iadd__(self, other: "ConfusionMatrix") -> "ConfusionMatrix":
        return self.merge(other)

    def __add__(self, other: "ConfusionMatrix") -> "ConfusionMatrix":
        return self.copy().merge(other)

    def copy(self) -> "ConfusionMatrix":
        twin = ConfusionMatrix(self.num_classes, ignore_index=self.ignore_index, device=self.matrix.device)
        twin.matrix.copy_(self.matrix)
        twin._invalid.copy_(self._invalid)
        return twin

    def all_reduce(self) -> "ConfusionMatrix":
        """Sum the matrices of every process when torch.distributed is initialised (else no-op)."""
        if dist.is_available() and dist.is_initialized():
            # NCCL reduces CUDA tensors only; gloo reduces CPU tensors.
            device = torch.device("cuda", torch.cuda.current_device()) \
                if dist.get_backend() == "nccl" else torch.device("cpu")
            buffer = self.matrix.to(device)
            dist.all_reduce(buffer, op=dist.ReduceOp.SUM)
            self.matrix.copy_(buffer)
        return self

    def areas(self) -> Dict[str, np.ndarray]:
        """Per-class intersection, prediction and label areas (int64), as the reference's histograms."""
        self._check()
        counts = self.matrix.cpu().numpy()
        return {
            "intersect": np.diag(counts[: self.num_classes]).copy(),
            "pred": counts.sum(axis=0),
            "label": counts[: self.num_classes].sum(axis=1),
        }

    def compute(self) -> Dict[str, object]:
        """aAcc, mIoU, mAcc (fractions) and per-class IoU / Acc arrays; NaN where undefined."""
        area = self.areas()
        union = area["pred"] + area["label"] - area["intersect"]
        with np.errstate(divide="ignore", invalid="ignore"):
            iou = area["intersect"] / union.astype(np.float64)
            acc = area["intersect"] / area["label"].astype(np.float64)
        total_label = area["label"].sum()
        return {
            "aAcc": float(area["intersect"].sum() / total_label) if total_label else float("nan"),
            "mIoU": _nanmean(iou),
            "mAcc": _nanmean(acc),
            "IoU": iou,
            "Acc": acc,
        }

    def state_dict(self) -> Dict[str, object]:
        self._check()
        return {"num_classes": self.num_classes, "ignore_index": self.ignore_index,
                "matrix": self.matrix.cpu().clone()}

    @classmethod
    def from_state_dict(cls, state: Dict[str, object],
                        device: Union[str, torch.device, None] = None) -> "ConfusionMatrix":
        metric = cls(int(state["num_classes"]), ignore_index=int(state["ignore_index"]), device=device)
        metric.matrix.copy_(torch.as_tensor(state["matrix"]))
        return metric


def count_cells(cells: torch.Tensor, size: int, *, index_add: Optional[bool] = None) -> torch.Tensor:
    """How often each of ``size`` cells occurs in ``cells`` (int64 in [0, size)).

    ``torch.bincount`` on the CPU; on a GPU (or with ``index_add=True``) an ``index_add_``,
    because CUDA's bincount reads the min and max back to the host: a synchronisation per image.
    """
    if not (cells.device.type != "cpu" if index_add is None else index_add):
        return torch.bincount(cells, minlength=size)
    return torch.zeros(size, dtype=torch.int64, device=cells.device).index_add_(
        0, cells, torch.ones_like(cells))


def _nanmean(values: np.ndarray) -> float:
    """np.nanmean without the empty-slice warning: NaN when every class is undefined."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=RuntimeWarning)
        return float(np.nanmean(values)) if values.size else float("nan")
