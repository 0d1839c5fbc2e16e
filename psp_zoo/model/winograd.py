"""3x3 convolutions by Winograd's minimal filtering F(4x4, 3x3): the same sums for a quarter of the products.

A stride-1 3x3 conv computes each 4x4 block of outputs from a 6x6 block of inputs. Winograd's
algorithm (Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks", 2016) transforms
the 6x6 input tile (``B^T d B``) and the 3x3 kernel (``G g G^T``) so that the convolution becomes
36 independent matrix products over the channels, then maps the 36 products back to 4x4 outputs
(``A^T m A``). The products are 4x fewer than the direct conv's (36 per 16 outputs instead of
144); the transforms are additions and small-constant multiplications. Only the order and
grouping of float operations change, so the result is the conv's within fp32 rounding (the
kernel transform is computed in float64).

Dilated convs (ResNet-D8's stages 3 and 4) are computed on the ``d x d`` interleaved sub-images
(space-to-batch): a 3x3 conv with dilation ``d`` on an image is a dilation-1 conv on each of
the ``d * d`` images of every d-th pixel.

On CUDA, cuDNN already chooses Winograd kernels itself; this module is for the CPU fp32 path.
"""
from __future__ import annotations

from typing import List, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import PspZooError

__all__ = ["WinogradConv2d", "winograd_conv2d", "winograd_weight", "winograd_eligible", "use_winograd"]

# Lavin & Gray's F(4x4, 3x3) with interpolation points 0, +-1, +-2 and infinity.
_G = torch.tensor([[1 / 4, 0, 0],
                   [-1 / 6, -1 / 6, -1 / 6],
                   [-1 / 6, 1 / 6, -1 / 6],
                   [1 / 24, 1 / 12, 1 / 6],
                   [1 / 24, -1 / 12, 1 / 6],
                   [0, 0, 1]], dtype=torch.float64)
TILE = 4  # outputs per tile side
SPAN = TILE + 2  # inputs per tile side


def winograd_weight(weight: torch.Tensor) -> torch.Tensor:
    """(out, in, 3, 3) conv weight -> (36, in, out): ``G g G^T`` per (out, in) pair, in float64."""
    g = _G.to(weight.device)
    transformed = torch.einsum("ai,ocij,bj->abco", g, weight.detach().double(), g)
    return transformed.reshape(SPAN * SPAN, weight.shape[1], weight.shape[0]).to(weight.dtype).contiguous()


def _input_rows(d: List[torch.Tensor]) -> List[torch.Tensor]:
    """``B^T`` applied across six equally shaped slices (the 6 rows or columns of each tile)."""
    t1, t2 = torch.add(d[4], d[2], alpha=-4), torch.add(d[3], d[1], alpha=-4)
    t3, t4 = d[4] - d[2], d[3] - d[1]
    return [torch.add(torch.add(d[4], d[2], alpha=-5), d[0], alpha=4),
            t1 + t2, t1 - t2,
            torch.add(t3, t4, alpha=2), torch.add(t3, t4, alpha=-2),
            torch.add(torch.add(d[5], d[3], alpha=-5), d[1], alpha=4)]


def _output_rows(m: List[torch.Tensor]) -> List[torch.Tensor]:
    """``A^T`` applied across six equally shaped slices: four output rows (or columns)."""
    s12, d12, s34, d34 = m[1] + m[2], m[1] - m[2], m[3] + m[4], m[3] - m[4]
    return [m[0] + s12 + s34, torch.add(d12, d34, alpha=2), torch.add(s12, s34, alpha=4),
            torch.add(d12, d34, alpha=8) + m[5]]


def _to_tiles(x: torch.Tensor, dilation: int) -> Tuple[torch.Tensor, Tuple[int, ...]]:
    """NCHW x -> zero-padded NHWC sub-images (N * d * d, 4 th + 2, 4 tw + 2, C) ready for tiling."""
    n, c, height, width = x.shape
    d = dilation
    sub_h, sub_w = -(-height // d), -(-width // d)
    th, tw = -(-sub_h // TILE), -(-sub_w // TILE)
    padded = x.new_zeros(n, d, d, TILE * th + 2, TILE * tw + 2, c)
    nhwc = x.permute(0, 2, 3, 1)
    if sub_h * d != height or sub_w * d != width:
        nhwc = F.pad(nhwc, (0, 0, 0, sub_w * d - width, 0, sub_h * d - height))
    # pixel (i * d + a, j * d + b) goes to sub-image (a, b) at (i, j), one pixel in from the border
    padded[:, :, :, 1:1 + sub_h, 1:1 + sub_w] = nhwc.reshape(n, sub_h, d, sub_w, d, c).permute(0, 2, 4, 1, 3, 5)
    return padded.reshape(n * d * d, TILE * th + 2, TILE * tw + 2, c), (n, height, width, sub_h, sub_w, th, tw)


def _transform_input(padded: torch.Tensor, th: int, tw: int) -> torch.Tensor:
    """(B, 4 th + 2, 4 tw + 2, C) -> V (36, B * th * tw, C): ``B^T d B`` of every 6x6 tile."""
    batch, channels = padded.shape[0], padded.shape[3]
    rows = _input_rows([padded[:, k:k + TILE * th:TILE] for k in range(SPAN)])
    out = padded.new_empty(SPAN, SPAN, batch, th, tw, channels)
    for i, row in enumerate(rows):
        for j, value in enumerate(_input_rows([row[:, :, k:k + TILE * tw:TILE] for k in range(SPAN)])):
            out[i, j] = value
    return out.reshape(SPAN * SPAN, batch * th * tw, channels)


def _transform_output(m: torch.Tensor, shape: Tuple[int, ...], bias: torch.Tensor) -> torch.Tensor:
    """M (36, B * th * tw, K) -> NCHW (channels-last memory) conv output with ``bias`` added."""
    n, height, width, sub_h, sub_w, th, tw = shape
    batch, k = m.shape[1] // (th * tw), m.shape[2]
    m = m.reshape(SPAN, SPAN, batch, th, tw, k)
    rows = _output_rows([m[i] for i in range(SPAN)])  # each (6, B, th, tw, K): a row of A^T m
    out = m.new_empty(batch, th, TILE, tw, TILE, k)
    for i, row in enumerate(rows):
        for j, value in enumerate(_output_rows([row[j] for j in range(SPAN)])):
            torch.add(value, bias, out=out[:, :, i, :, j])
    d = int(round((batch // n) ** 0.5))
    out = out.reshape(n, d, d, TILE * th, TILE * tw, k)[:, :, :, :sub_h, :sub_w]
    # interleave the sub-images back: (n, a, b, i, j, k) -> pixel (i * d + a, j * d + b)
    out = out.permute(0, 3, 1, 4, 2, 5).reshape(n, sub_h * d, sub_w * d, k)[:, :height, :width]
    return out.permute(0, 3, 1, 2)


def winograd_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, dilation: int = 1) -> torch.Tensor:
    """``F.conv2d(x, w, bias, padding=dilation, dilation=dilation)`` for a 3x3 ``w`` given as
    ``winograd_weight(w)``; ``x`` is (N, C, H, W), the result is channels-last (N, K, H, W)."""
    padded, shape = _to_tiles(x, dilation)
    v = _transform_input(padded, shape[5], shape[6])
    return _transform_output(torch.bmm(v, weight), shape, bias)


def winograd_eligible(conv: nn.Module) -> bool:
    """A plain 3x3, stride-1 conv whose zero padding equals its dilation (the ResNet and PSP 3x3s)."""
    return (type(conv) is nn.Conv2d and conv.kernel_size == (3, 3) and conv.stride == (1, 1)
            and conv.groups == 1 and conv.padding_mode == "zeros" and conv.dilation[0] == conv.dilation[1]
            and conv.padding == conv.dilation)


class WinogradConv2d(nn.Module):
    """An inference-only stand-in for an eligible 3x3 ``nn.Conv2d``: same outputs within fp32 rounding.

    Holds the transformed weight (36, in, out) and the bias; the source conv is not modified.
    """

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        if not winograd_eligible(conv):
            raise PspZooError("WinogradConv2d needs a 3x3, stride-1, ungrouped conv with padding == dilation")
        self.in_channels, self.out_channels, self.dilation = conv.in_channels, conv.out_channels, conv.dilation[0]
        self.register_buffer("weight", winograd_weight(conv.weight))
        bias = conv.bias.detach() if conv.bias is not None else conv.weight.new_zeros(conv.out_channels)
        self.register_buffer("bias", bias.clone())

    # Inductor fuses the tile transforms into kernels that are slower than these eager ops and
    # take ten times the memory (benchmarks/speed.py, fast_fp32_compile): compiled models call it eagerly.
    @torch.compiler.disable
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return winograd_conv2d(x, self.weight.to(x.dtype), self.bias.to(x.dtype), self.dilation)

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, kernel_size=(3, 3), dilation={self.dilation}, F(4x4, 3x3)"


def use_winograd(model: nn.Module, min_channels: int = 256) -> int:
    """Swap every eligible 3x3 conv with at least ``min_channels`` input and output channels for a
    WinogradConv2d, in place; returns how many. Narrower convs gain too little over the direct
    kernels to pay for the tile transforms (see benchmarks/speed.py)."""
    swapped = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if winograd_eligible(child) and min(child.in_channels, child.out_channels) >= min_channels:
                setattr(parent, name, WinogradConv2d(child))
                swapped += 1
    return swapped
