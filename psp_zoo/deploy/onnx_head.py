"""The factorized PSP head in a form ``torch.onnx.export`` traces into one dynamic-shape graph.

:class:`~psp_zoo.model.fast_head.FactorizedPSPHead` applies the bottleneck conv's pyramid share
to the pooled s x s maps and resizes the result with two small matrix products; its matrices
come from a per-size cache, so a traced copy would freeze them at the example's size.
:class:`OnnxPSPHead` computes the same sums with everything that depends on the input's height
and width built from the traced shape inside the graph:

- the adaptive-average-pooling bins of every pool scale (:mod:`psp_zoo.deploy.pooling`, the
  exporter's exact pooling: PyTorch's bins for any size);
- F.interpolate's bilinear operator from each scale to the feature size (PyTorch's float32
  source index, clamping and weights, for either ``align_corners``), shifted by the 3x3 taps.

The branch share is then, per branch, a 1x1 conv to 9 x ``channels`` tap maps at the pooled
size, a product with the shifted column operator, and one product with all branches' shifted
row operators, giving an NCHW tensor added to the x part of the bottleneck conv. Only float
summation order differs from the plain head.
"""
from __future__ import annotations

from typing import Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..model.fast_head import FactorizedPSPHead
from ..model.heads import PSPHead
from .pooling import adaptive_avg_pool_exact

__all__ = ["OnnxPSPHead", "use_onnx_head", "bilinear_operator", "shifted_operator"]

Size = Union[int, torch.Tensor]  # a Python int when eager, a traced 0-d tensor under torch.onnx.export


def _as_size(size: Size) -> torch.Tensor:
    return size if isinstance(size, torch.Tensor) else torch.tensor(size)


def bilinear_operator(size: Size, scale: int, align_corners: bool, like: torch.Tensor) -> torch.Tensor:
    """(size x scale): F.interpolate's bilinear resize from ``scale`` to ``size`` along one axis.

    PyTorch's rule in float32: source index ``(r + 0.5) * scale / size - 0.5`` clamped at 0 (or
    ``r * (scale - 1) / (size - 1)`` with ``align_corners``), its floor and the next index
    (clamped to the last), weights ``1 - frac`` and ``frac``. ``size`` may be traced.
    """
    size = _as_size(size)
    length = size.to(torch.float32)
    dst = torch.arange(size, device=like.device).to(torch.float64)
    if align_corners:
        ratio = torch.where(length > 1, length.new_tensor(scale - 1.0) / (length - 1).clamp(min=1),
                            torch.zeros_like(length))
        src = (dst * ratio.to(torch.float64)).to(torch.float32)
    else:
        # PyTorch's kernel rounds ``ratio * (r + 0.5) - 0.5`` once (a fused multiply-add): the
        # product and difference in float64, rounded to float32 once, give its index bit for bit
        ratio = (length.new_tensor(float(scale)) / length).to(torch.float64)
        src = ((dst + 0.5) * ratio - 0.5).to(torch.float32).clamp(min=0)
    low = src.floor().clamp(max=scale - 1)
    frac = (src - low).clamp(0, 1)
    high = low + (low < scale - 1).to(torch.float32)
    columns = torch.arange(scale, device=like.device).to(torch.float32)
    near = (columns[None, :] == low[:, None]).to(torch.float32) * (1 - frac)[:, None]
    far = (columns[None, :] == high[:, None]).to(torch.float32) * frac[:, None]
    return (near + far).to(like.dtype)


def shifted_operator(size: Size, scale: int, align_corners: bool, like: torch.Tensor) -> torch.Tensor:
    """(size x 3 scale): :func:`bilinear_operator` with its rows shifted by the taps -1, 0, +1.

    Column block d holds row ``r + d - 1`` of the operator, zero outside the image (the 3x3
    conv's zero padding).
    """
    size = _as_size(size)
    padded = F.pad(bilinear_operator(size, scale, align_corners, like), (0, 0, 1, 1))
    return torch.cat([padded[d:d + size] for d in range(3)], dim=1)


class OnnxPSPHead(FactorizedPSPHead):
    """FactorizedPSPHead whose pooling and interpolation follow the traced input shape.

    Built from an eval-mode PSPHead (BN folded or not; the source is not modified), with its
    ``AdaptiveAvgPool2d`` branches; any pool scales and head width. Eager, it returns the same
    logits as the head it replaces within float rounding; exported, one graph serves every
    height, width and batch size.
    """

    def __init__(self, head: PSPHead):
        super().__init__(head)
        taps = self.branch_weight  # (branch, tap, out, in)
        out, inner = taps.shape[2], taps.shape[3]
        # the branches' ConvModules without their pools; each branch's tap weights as one 1x1 conv
        self.branches = nn.ModuleList(branch[1:] for branch in self.branches)
        self.tap_convs = nn.ModuleList()
        for weight in taps:
            conv = nn.Conv2d(inner, 9 * out, 1, bias=False, device="meta")
            conv.weight = nn.Parameter(weight.reshape(9 * out, inner, 1, 1).clone(), requires_grad=False)
            self.tap_convs.append(conv)
        del self.branch_weight

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        x = features[3]
        out = self.conv_x(x) + self.pyramid_term(x)
        return self.conv_seg(F.relu(out))

    def pyramid_term(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        """The branches' share of the bottleneck conv as an NCHW tensor (N, channels, H, W)."""
        height, width = x.shape[2], x.shape[3]
        blocks, row_ops = [], []
        for branch, tap_conv, scale in zip(self.branches, self.tap_convs, self.scales):
            z = tap_conv(branch(adaptive_avg_pool_exact(x, scale)))  # (N, (dy, dx, out), a, b)
            n, o = z.shape[0], z.shape[1] // 9
            z = z.reshape(n, 3, 3, o, scale, scale).permute(0, 3, 1, 4, 2, 5).reshape(n, o, 3 * scale, 3 * scale)
            # (N, out, (dy, a), (dx, b)) times the shifted column operator: the w axis resized
            blocks.append(torch.matmul(z, shifted_operator(width, scale, self.align_corners, x).transpose(0, 1)))
            row_ops.append(shifted_operator(height, scale, self.align_corners, x))
        # one product resizes the h axis of every branch at once
        return torch.matmul(torch.cat(row_ops, dim=1), torch.cat(blocks, dim=2))


def use_onnx_head(model: nn.Module) -> bool:
    """Swap ``model.decode_head`` for its :class:`OnnxPSPHead` in place; False where it is no PSPHead.

    Call it before the model's ``AdaptiveAvgPool2d`` modules are replaced for export.
    """
    head = getattr(model, "decode_head", None)
    if not isinstance(head, PSPHead):
        return False
    model.decode_head = OnnxPSPHead(head.eval())
    return True
