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

from typing import List, Optional, Tuple

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
BAND_TILES = 256  # tiles per band (see winograd_conv2d)


def winograd_weight(weight: torch.Tensor) -> torch.Tensor:
    """(out, in, 3, 3) conv weight -> (36, in, out): ``G g G^T`` per (out, in) pair, in float64."""
    g = _G.to(weight.device)
    transformed = torch.einsum("ai,ocij,bj->abco", g, weight.detach().double(), g)
    return transformed.reshape(SPAN * SPAN, weight.shape[1], weight.shape[0]).to(weight.dtype).contiguous()


def _input_rows(d: List[torch.Tensor], out: Optional[List[torch.Tensor]] = None) -> List[torch.Tensor]:
    """``B^T`` applied across six equally shaped slices (the 6 rows or columns of each tile),
    written into ``out`` (six tensors of the slices' shape) when given."""
    out = out or [None] * SPAN
    t1, t2 = torch.add(d[4], d[2], alpha=-4), torch.add(d[3], d[1], alpha=-4)
    t3, t4 = d[4] - d[2], d[3] - d[1]
    return [torch.add(torch.add(d[4], d[2], alpha=-5), d[0], alpha=4, out=out[0]),
            torch.add(t1, t2, out=out[1]), torch.sub(t1, t2, out=out[2]),
            torch.add(t3, t4, alpha=2, out=out[3]), torch.add(t3, t4, alpha=-2, out=out[4]),
            torch.add(torch.add(d[5], d[3], alpha=-5), d[1], alpha=4, out=out[5])]


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
    return padded.reshape(n * d * d, TILE * th + 2, TILE * tw + 2, c), (n, d, height, width, sub_h, sub_w, th, tw)


def _transform_input(band: torch.Tensor) -> torch.Tensor:
    """(B, 4 rows + 2, 4 tw + 2, C) -> V (36, B * rows * tw, C): ``B^T d B`` of every 6x6 tile."""
    batch, rows, tw, channels = band.shape[0], (band.shape[1] - 2) // TILE, (band.shape[2] - 2) // TILE, band.shape[3]
    across = _input_rows([band[:, k:k + TILE * rows:TILE] for k in range(SPAN)])
    v = band.new_empty(SPAN, SPAN, batch, rows, tw, channels)
    for i, row in enumerate(across):
        _input_rows([row[:, :, k:k + TILE * tw:TILE] for k in range(SPAN)], out=list(v[i]))
    return v.reshape(SPAN * SPAN, batch * rows * tw, channels)


def _transform_output(m: torch.Tensor, out: torch.Tensor, bias: torch.Tensor) -> None:
    """M (36, B * rows * tw, K) -> ``out`` (B, rows, 4, tw, 4, K): ``A^T m A + bias`` of every tile."""
    m = m.reshape(SPAN, SPAN, out.shape[0], out.shape[1], out.shape[3], out.shape[5])
    rows = _output_rows([m[i] for i in range(SPAN)])  # each (6, B, rows, tw, K): a row of A^T m
    for i, row in enumerate(rows):
        for j, value in enumerate(_output_rows([row[j] for j in range(SPAN)])):
            torch.add(value, bias, out=out[:, :, i, :, j])


def _from_tiles(out: torch.Tensor, shape: Tuple[int, ...]) -> torch.Tensor:
    """(N * d * d, th, 4, tw, 4, K) tiles -> the NCHW (channels-last memory) conv output."""
    n, d, height, width, sub_h, sub_w, th, tw = shape
    k = out.shape[-1]
    out = out.reshape(n, d, d, TILE * th, TILE * tw, k)[:, :, :, :sub_h, :sub_w]
    # interleave the sub-images back: (n, a, b, i, j, k) -> pixel (i * d + a, j * d + b)
    out = out.permute(0, 3, 1, 4, 2, 5).reshape(n, sub_h * d, sub_w * d, k)[:, :height, :width]
    return out.permute(0, 3, 1, 2)


def winograd_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, dilation: int = 1,
                    band_tiles: int = BAND_TILES) -> torch.Tensor:
    """``F.conv2d(x, w, bias, padding=dilation, dilation=dilation)`` for a 3x3 ``w`` given as
    ``winograd_weight(w)``; ``x`` is (N, C, H, W), the result is channels-last (N, K, H, W).

    Tile rows go through the transforms and the matrix products in bands of about
    ``band_tiles`` tiles: the transformed band stays in cache on the way to the matrix products,
    which are still large enough to run at full speed, and the extra memory stays bounded on
    large images.
    """
    padded, shape = _to_tiles(x, dilation)
    th, tw = shape[-2:]
    batch = padded.shape[0]
    out = padded.new_empty(batch, th, TILE, tw, TILE, weight.shape[2])
    step = max(1, round(band_tiles / (batch * tw)))
    for r0 in range(0, th, step):
        r1 = min(th, r0 + step)
        v = _transform_input(padded[:, TILE * r0:TILE * r1 + 2])
        _transform_output(torch.bmm(v, weight), out[:, r0:r1], bias)
    return _from_tiles(out, shape)


@torch.library.custom_op("psp_zoo::winograd_conv2d", mutates_args=())
def _winograd_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, dilation: int) -> torch.Tensor:
    # One opaque operator for torch.compile: traced, inductor's fused tile transforms are no faster
    # than these eager ops after a long build; as a graph break per conv it would split the compiled
    # model into pieces (docs/performance.md, "Why the code does what it does").
    return winograd_conv2d(x, weight, bias, dilation).contiguous(memory_format=torch.channels_last)


@_winograd_op.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, dilation: int) -> torch.Tensor:
    n, _, height, width = x.shape
    return x.new_empty((n, weight.shape[2], height, width)).contiguous(memory_format=torch.channels_last)


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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _winograd_op(x, self.weight.to(x.dtype), self.bias.to(x.dtype), self.dilation)

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, kernel_size=(3, 3), dilation={self.dilation}, F(4x4, 3x3)"


def use_winograd(model: nn.Module, min_channels: int = 256) -> int:
    """Swap every eligible 3x3 conv with at least ``min_channels`` input and output channels for a
    WinogradConv2d, in place; returns how many. Narrower convs gain too little over the direct
    kernels to pay for the tile transforms (docs/performance.md, per conv)."""
    swapped = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if winograd_eligible(child) and min(child.in_channels, child.out_channels) >= min_channels:
                setattr(parent, name, WinogradConv2d(child))
                swapped += 1
    return swapped
