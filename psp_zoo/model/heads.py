"""PSPNet's decode head (pyramid pooling) and the auxiliary FCN head, with mmseg's key names."""
from __future__ import annotations

from typing import List, Sequence

import torch
import torch.nn.functional as F
from torch import nn


class ConvModule(nn.Sequential):
    """conv (no bias) -> BN -> ReLU, keyed ``conv`` / ``bn`` like mmcv's ConvModule."""

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int):
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch, kernel_size, padding=kernel_size // 2, bias=False)
        self.bn = nn.BatchNorm2d(out_ch)
        self.activate = nn.ReLU(inplace=True)


class PyramidPooling(nn.ModuleList):
    """Pool to each scale, 1x1 ConvModule, upsample back to the input size (keys ``{i}.1.conv``)."""

    def __init__(self, pool_scales: Sequence[int], in_ch: int, out_ch: int, align_corners: bool):
        super().__init__(
            nn.Sequential(nn.AdaptiveAvgPool2d(scale), ConvModule(in_ch, out_ch, 1)) for scale in pool_scales
        )
        self.align_corners = align_corners

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        size = x.shape[2:]
        return [
            F.interpolate(branch(x), size=size, mode="bilinear", align_corners=self.align_corners)
            for branch in self
        ]


class PSPHead(nn.Module):
    """Concat [x, pyramid branches] -> 3x3 ``bottleneck`` -> Dropout2d(0.1) -> 1x1 ``conv_seg``."""

    def __init__(self, in_channels: int, channels: int, num_classes: int,
                 pool_scales: Sequence[int] = (1, 2, 3, 6), align_corners: bool = False):
        super().__init__()
        self.psp_modules = PyramidPooling(pool_scales, in_channels, channels, align_corners)
        self.bottleneck = ConvModule(in_channels + len(pool_scales) * channels, channels, 3)
        self.dropout = nn.Dropout2d(0.1)
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)
        self.align_corners = align_corners

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        x = features[3]
        x = self.bottleneck(torch.cat([x, *self.psp_modules(x)], dim=1))
        return self.conv_seg(self.dropout(x))


class FCNHead(nn.Module):
    """Auxiliary head on stage 3: one 3x3 ConvModule -> Dropout2d(0.1) -> 1x1 ``conv_seg``.

    Trained with loss weight 0.4; at test time it is unused but present in every checkpoint.
    """

    def __init__(self, in_channels: int, channels: int, num_classes: int):
        super().__init__()
        self.convs = nn.Sequential(ConvModule(in_channels, channels, 3))
        self.dropout = nn.Dropout2d(0.1)
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        return self.conv_seg(self.dropout(self.convs(features[2])))
