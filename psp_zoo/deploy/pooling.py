"""Adaptive average pooling whose bins follow the runtime input size, for export.

Adaptive average pooling has no ONNX operator whose bins follow a runtime input size, so for
export each ``nn.AdaptiveAvgPool2d`` is replaced by :func:`adaptive_avg_pool_exact`, which builds
PyTorch's bins from the input's shape inside the graph. One file then serves every height, width
and batch size, with the pooling PyTorch computes, not only sizes divisible by the pool scales.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import torch
from torch import nn

__all__ = ["adaptive_avg_pool_exact", "ExactAdaptiveAvgPool2d", "exact_pooling"]


def _bin_matrix(size, bins: int, like: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """0/1 matrix (bins x size) of PyTorch's adaptive bins and each bin's length.

    Bin i covers [floor(i * size / bins), ceil((i + 1) * size / bins)). ``size`` is the traced
    dimension, so the integer arithmetic below becomes graph ops, not constants.
    """
    index = torch.arange(bins, device=like.device)
    position = torch.arange(size, device=like.device)
    start = torch.div(index * size, bins, rounding_mode="floor")
    end = torch.div((index + 1) * size + bins - 1, bins, rounding_mode="floor")
    inside = (position[None, :] >= start[:, None]) & (position[None, :] < end[:, None])
    return inside.to(like.dtype), (end - start).to(like.dtype)


def adaptive_avg_pool_exact(x: torch.Tensor, output_size: Union[int, Sequence[Optional[int]]]) -> torch.Tensor:
    """``F.adaptive_avg_pool2d(x, output_size)`` as two matrix products, exportable with dynamic H, W.

    Each bin is summed and then divided by its pixel count, as PyTorch's kernel does; only the
    summation order differs (float rounding).
    """
    out_h, out_w = (output_size, output_size) if isinstance(output_size, int) else output_size
    out_h = x.shape[2] if out_h is None else out_h
    out_w = x.shape[3] if out_w is None else out_w
    rows, row_count = _bin_matrix(x.shape[2], out_h, x)
    cols, col_count = _bin_matrix(x.shape[3], out_w, x)
    sums = torch.matmul(torch.matmul(rows, x), cols.transpose(0, 1))
    return sums / (row_count[:, None] * col_count[None, :])


class ExactAdaptiveAvgPool2d(nn.Module):
    """Drop-in for ``nn.AdaptiveAvgPool2d`` whose bins follow the traced input shape."""

    def __init__(self, output_size: Union[int, Sequence[Optional[int]]]):
        super().__init__()
        self.output_size = output_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return adaptive_avg_pool_exact(x, self.output_size)



def exact_pooling(model: nn.Module) -> nn.Module:
    """Replace every ``nn.AdaptiveAvgPool2d`` of ``model`` (in place) by :class:`ExactAdaptiveAvgPool2d`."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.AdaptiveAvgPool2d):
                setattr(parent, name, ExactAdaptiveAvgPool2d(child.output_size))
    return model
