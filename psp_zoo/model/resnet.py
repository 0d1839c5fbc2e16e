"""Dilated ResNets exactly as the published PSPNet checkpoints were built.

Two stems (mmseg's ``ResNetV1c``: three 3x3 convs keyed ``stem.*``; mmseg's plain ``ResNet``,
called V1b: one 7x7 ``conv1`` + ``bn1``), two blocks (BasicBlock for R-18, Bottleneck for R-50/101)
and two output strides (D8: strides (1, 2, 1, 1); D32: strides (1, 2, 2, 2)). Dilations are
(1, 1, 2, 4) in both cases and the first block of a dilated stage uses half the stage's dilation
("contract_dilation"), also where that block carries the stage's stride 2 (D32).

torchvision's ``Bottleneck`` already has the published parameter names, puts the stride on the
3x3 conv ("pytorch" style) and pads by the dilation, so it is used as is. Its ``BasicBlock``
refuses dilation, and the published R-18 block dilates only its first 3x3 conv, so that block is
written here.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple, Type

import torch
from torch import nn
from torchvision.models.resnet import Bottleneck

from ..errors import ModelConfigError
from ..manifest.backbones import STAGE_BLOCKS, STAGE_STRIDES


class BasicBlock(nn.Module):
    """Two 3x3 convs; stride and dilation on ``conv1`` only, ``conv2`` always dilation 1, padding 1.

    That asymmetry is how the R-18 checkpoints were trained: a "dilation 4" stage has one
    dilated conv per block, not two.
    """

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1,
                 downsample: Optional[nn.Module] = None, dilation: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, padding=dilation, dilation=dilation, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


ARCH: Dict[int, Tuple[Type[nn.Module], Tuple[int, ...]]] = {
    depth: (BasicBlock if depth < 50 else Bottleneck, blocks) for depth, blocks in STAGE_BLOCKS.items()}
STAGE_DILATIONS: Tuple[int, ...] = (1, 1, 2, 4)


def conv_bn_relu(in_ch: int, out_ch: int, stride: int = 1) -> List[nn.Module]:
    return [nn.Conv2d(in_ch, out_ch, 3, stride, 1, bias=False), nn.BatchNorm2d(out_ch), nn.ReLU(inplace=True)]


def check_backbone(depth: int, output_stride: int) -> None:
    """Refuse a depth or output stride that no published PSPNet uses."""
    if depth not in ARCH:
        raise ModelConfigError(f"PSPNet depth must be one of {sorted(ARCH)} (the published backbones), "
                               f"got {depth!r}")
    if output_stride not in STAGE_STRIDES:
        raise ModelConfigError(f"PSPNet output_stride must be one of {sorted(STAGE_STRIDES)} (D8 or D32), "
                               f"got {output_stride!r}")


def make_layer(block: Type[nn.Module], inplanes: int, planes: int, blocks: int,
               stride: int, dilation: int, contract_dilation: bool = True) -> nn.Sequential:
    """One stage: a projection shortcut where the shape changes, the first block's dilation
    contracted (mmseg), or every block at the stage's dilation (``contract_dilation=False``: the
    PSPNet authors' network)."""
    out = planes * block.expansion
    downsample = None
    if stride != 1 or inplanes != out:
        downsample = nn.Sequential(nn.Conv2d(inplanes, out, 1, stride, bias=False), nn.BatchNorm2d(out))
    # contract_dilation: halved whenever > 1, whatever the stride (so D32's stride-2 blocks dilate too)
    first_dilation = dilation // 2 if dilation > 1 and contract_dilation else dilation
    layers = [block(inplanes, planes, stride, downsample, dilation=first_dilation)]
    layers += [block(out, planes, dilation=dilation) for _ in range(1, blocks)]
    return nn.Sequential(*layers)


class ResNet(nn.Module):
    """ResNet-18/50/101 with stage dilations (1, 1, 2, 4); ``forward`` returns the four stage outputs.

    ``deep_stem=False`` is V1b (7x7 ``conv1``/``bn1``), ``True`` is V1c (``stem.*``). The stage
    outputs have strides (4, 8, 8, 8) with the default D8 strides, (4, 8, 16, 32) with D32's.
    ``contract_dilation=False`` dilates every block of a dilated stage fully (the PSPNet authors').
    """

    def __init__(self, depth: int = 50, stem_channels: int = 64, base_channels: int = 64,
                 strides: Sequence[int] = STAGE_STRIDES[8], dilations: Sequence[int] = STAGE_DILATIONS,
                 deep_stem: bool = False, contract_dilation: bool = True):
        super().__init__()
        if depth not in ARCH:
            raise ModelConfigError(f"ResNet depth must be one of {sorted(ARCH)}, got {depth!r}")
        self.deep_stem = deep_stem
        if deep_stem:
            half = stem_channels // 2
            self.stem = nn.Sequential(
                *conv_bn_relu(3, half, stride=2), *conv_bn_relu(half, half),
                *conv_bn_relu(half, stem_channels),
            )
        else:
            self.conv1 = nn.Conv2d(3, stem_channels, 7, stride=2, padding=3, bias=False)
            self.bn1 = nn.BatchNorm2d(stem_channels)
            self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        block, stage_blocks = ARCH[depth]
        inplanes = stem_channels
        self.out_channels: List[int] = []
        for i, (blocks, stride, dilation) in enumerate(zip(stage_blocks, strides, dilations)):
            planes = base_channels * 2**i
            self.add_module(f"layer{i + 1}", make_layer(block, inplanes, planes, blocks, stride, dilation,
                                                        contract_dilation))
            inplanes = planes * block.expansion
            self.out_channels.append(inplanes)

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        x = self.stem(x) if self.deep_stem else self.relu(self.bn1(self.conv1(x)))
        x = self.maxpool(x)
        features = []
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = layer(x)
            features.append(x)
        return features


class ResNetV1c(ResNet):
    """The deep-stem ResNet of the unsuffixed rows (R-50-D8, R-18-D8, ...)."""

    def __init__(self, depth: int = 50, stem_channels: int = 64, base_channels: int = 64,
                 strides: Sequence[int] = STAGE_STRIDES[8], dilations: Sequence[int] = STAGE_DILATIONS):
        super().__init__(depth, stem_channels, base_channels, strides, dilations, deep_stem=True)


class ResNetV1b(ResNet):
    """The 7x7-stem ResNet of the "b" rows (R-50b-D8, R-18b-D8, the rsb rows)."""

    def __init__(self, depth: int = 50, stem_channels: int = 64, base_channels: int = 64,
                 strides: Sequence[int] = STAGE_STRIDES[8], dilations: Sequence[int] = STAGE_DILATIONS):
        super().__init__(depth, stem_channels, base_channels, strides, dilations, deep_stem=False)
