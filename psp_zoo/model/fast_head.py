"""PSPHead without convolving the upsampled pyramid: the same logits for far less arithmetic.

The ``bottleneck`` 3x3 conv of PSPHead reads the concatenation of x and four pyramid branches,
each a bilinear upsampling of a tiny s x s map. Convolution and bilinear upsampling are both
linear, so the branches' share of the conv is computed exactly from the tiny maps. With ``A_h``
(H x s) and ``A_w`` (W x s) the bilinear operators (``up(p) = A_h p A_w^T``) and ``S_d`` the
shift of a 3x3 tap with zero fill at the border::

    conv3x3(up(p), W_i) = sum over taps (dy, dx) of (S_dy A_h) (W_i[:, :, dy, dx] . p) (S_dx A_w)^T

At R-50-D8's width (2048 of the bottleneck's 4096 input channels are branches) this removes
about a fifth of the whole network's arithmetic; only float summation order changes.
"""
from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_weights

from ..errors import PspZooError
from .heads import PSPHead
from .winograd import winograd_eligible

__all__ = ["FactorizedPSPHead", "factorize_psp_head", "interpolation_matrix", "shifted_interpolation"]

def interpolation_matrix(size: int, scale: int, align_corners: bool, device: torch.device,
                         dtype: torch.dtype) -> torch.Tensor:
    """The (size x scale) matrix of F.interpolate's bilinear resize along one axis.

    Built by resizing an identity with F.interpolate itself, so its source-index and weight
    rounding are PyTorch's own for this (scale -> size, align_corners) pair.
    """
    eye = torch.eye(scale, dtype=torch.float64, device=device).reshape(scale, 1, scale, 1)
    resized = F.interpolate(eye, size=(size, 1), mode="bilinear", align_corners=align_corners)
    return resized.reshape(scale, size).t().to(dtype)


def shifted_interpolation(size: int, scale: int, align_corners: bool, device: torch.device,
                          dtype: torch.dtype) -> torch.Tensor:
    """(size, 3 * scale): the interpolation matrix shifted by each 3x3 tap offset -1, 0, +1.

    Column block d holds rows ``A[r + d - 1]``, zero where that row is outside the image (the
    conv's zero padding).
    """
    base = interpolation_matrix(size, scale, align_corners, device, torch.float64)
    padded = F.pad(base, (0, 0, 1, 1))
    return torch.cat([padded[d:d + size] for d in range(3)], dim=1).to(dtype)


def _folded_bottleneck(head: PSPHead) -> Tuple[torch.Tensor, torch.Tensor]:
    """The bottleneck's weight and bias with its BatchNorm folded in (if still present)."""
    conv, bn = head.bottleneck.conv, head.bottleneck.bn
    weight, bias = conv.weight.detach(), None if conv.bias is None else conv.bias.detach()
    if isinstance(bn, nn.BatchNorm2d):
        as64 = lambda t: None if t is None else t.detach().double()  # noqa: E731
        weight, bias = fuse_conv_bn_weights(as64(weight), as64(bias), as64(bn.running_mean),
                                            as64(bn.running_var), bn.eps, as64(bn.weight), as64(bn.bias))
        weight, bias = weight.detach().to(conv.weight.dtype), bias.detach().to(conv.weight.dtype)
    elif bias is None:
        bias = torch.zeros(conv.out_channels, dtype=weight.dtype, device=weight.device)
    return weight, bias


def _check_bottleneck(head: PSPHead) -> None:
    conv = head.bottleneck.conv
    if not (winograd_eligible(conv) and conv.dilation == (1, 1)):
        raise PspZooError("FactorizedPSPHead needs PSPHead's 3x3, padding-1 bottleneck conv")
    if isinstance(head.bottleneck.bn, nn.BatchNorm2d) and head.bottleneck.bn.training:
        raise PspZooError("FactorizedPSPHead is for inference: put the head in eval mode first")


class FactorizedPSPHead(nn.Module):
    """An inference-only PSPHead computing the same logits, pyramid branches never upsampled.

    Built from an eval-mode PSPHead (BN folded or not); the source head is not modified. The
    branch convs, ``conv_seg`` and the x part of the bottleneck are ordinary convs; the branch
    part of the bottleneck is applied to the pooled maps and resized by two small matmuls.
    """

    def __init__(self, head: PSPHead):
        super().__init__()
        _check_bottleneck(head)
        weight, bias = _folded_bottleneck(head)
        in_x = weight.shape[1] - len(head.psp_modules) * head.bottleneck.conv.out_channels
        self.align_corners = bool(head.psp_modules.align_corners)
        self.scales: List[int] = [int(_scale(branch[0])) for branch in head.psp_modules]
        # The branches keep their module objects (pool, conv, BN or folded conv, ReLU).
        self.branches = nn.ModuleList(nn.Sequential(*branch) for branch in head.psp_modules)
        # built on the meta device: its weights are replaced at once, no need to initialise them
        self.conv_x = nn.Conv2d(in_x, weight.shape[0], 3, padding=1, bias=True, device="meta")
        self.conv_x.weight = nn.Parameter(weight[:, :in_x].clone(), requires_grad=False)
        self.conv_x.bias = nn.Parameter(bias.clone(), requires_grad=False)
        # (branch, tap, out, in): each tap's weights as a matrix applied to the pooled map.
        per_branch = weight[:, in_x:].reshape(weight.shape[0], len(self.scales), -1, 9)
        self.register_buffer("branch_weight", per_branch.permute(1, 3, 0, 2).contiguous())
        self.conv_seg = head.conv_seg
        # shifted_interpolation per (size, scale, device, dtype), kept by this head only: a cache
        # shared by the module would keep GPU memory of one model alive into the next one's run
        self._matrices: Dict[tuple, torch.Tensor] = {}

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        x = features[3]
        out = self.conv_x(x)
        out = out + self.pyramid_term(x, out.dtype).permute(0, 3, 1, 2)
        return self.conv_seg(F.relu(out))

    def pyramid_term(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The branches' share of the bottleneck conv, (N, H, W, out) channels-last order."""
        height, width = x.shape[2:]
        rows, blocks = [], []
        for index, (branch, scale) in enumerate(zip(self.branches, self.scales)):
            pooled = branch(x)
            tap_weight = self.branch_weight[index].to(pooled.dtype)
            # z[n, dy, a, dx, b, o]: each tap's weights on the pooled map, then the w axis resized
            z = torch.einsum("toc,ncab->nabto", tap_weight, pooled).reshape(*pooled.shape[:1], scale, scale, 3, 3, -1)
            z = z.permute(0, 3, 1, 4, 2, 5).reshape(pooled.shape[0], 3 * scale, 3 * scale, -1)
            a_w = self._shifted(width, scale, x.device, z.dtype)
            blocks.append(torch.einsum("wq,nrqo->nrwo", a_w, z))
            rows.append(self._shifted(height, scale, x.device, z.dtype))
        # one matmul resizes the h axis of every branch at once
        a_h, stacked = torch.cat(rows, dim=1), torch.cat(blocks, dim=1)
        n, r, _, o = stacked.shape
        term = torch.matmul(a_h.to(stacked.dtype), stacked.reshape(n, r, width * o))
        return term.reshape(n, height, width, o).to(dtype)


    def _shifted(self, size: int, scale: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        if torch.compiler.is_compiling():  # traced into the graph: no Python-side state
            return shifted_interpolation(size, scale, self.align_corners, device, dtype)
        key = (size, scale, str(device), dtype)
        if key not in self._matrices:
            self._matrices[key] = shifted_interpolation(size, scale, self.align_corners, device, dtype)
        return self._matrices[key]


def _scale(pool: nn.Module) -> int:
    size = pool.output_size
    size = size if isinstance(size, int) else size[0]
    if not isinstance(pool, nn.AdaptiveAvgPool2d) or size is None:
        raise PspZooError("FactorizedPSPHead needs AdaptiveAvgPool2d(s) pyramid branches")
    return int(size)


def factorize_psp_head(model: nn.Module) -> bool:
    """Swap ``model.decode_head`` for its FactorizedPSPHead in place; False where it is no PSPHead."""
    head = getattr(model, "decode_head", None)
    if not isinstance(head, PSPHead):
        return False
    model.decode_head = FactorizedPSPHead(head.eval())
    return True
