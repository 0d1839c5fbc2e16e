"""Dilated ResNetV1c (mmseg ``ResNetV1c``, output stride 8) built from torchvision's Bottleneck.

torchvision's ``Bottleneck`` already has mmseg's parameter names (``conv1/bn1/conv2/bn2/conv3/bn3``,
``downsample.{0,1}``), puts the stride on the 3x3 conv ("pytorch" style) and pads by the dilation,
so only the deep stem and the stage layout are written here.
"""
from __future__ import annotations

from typing import List, Sequence

import torch
from torch import nn
from torchvision.models.resnet import Bottleneck

STAGE_BLOCKS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}


def conv_bn_relu(in_ch: int, out_ch: int, stride: int = 1) -> List[nn.Module]:
    return [nn.Conv2d(in_ch, out_ch, 3, stride, 1, bias=False), nn.BatchNorm2d(out_ch), nn.ReLU(inplace=True)]


class ResNetV1c(nn.Module):
    """ResNet with a three-conv deep stem, strides (1, 2, 1, 1) and dilations (1, 1, 2, 4).

    ``contract_dilation``: the first block of a dilated stage uses half the stage's dilation,
    which is what torchvision's ``replace_stride_with_dilation`` also does.
    ``forward`` returns the four stage outputs (strides 4, 8, 8, 8).
    """

    def __init__(self, depth: int = 50, stem_channels: int = 64, base_channels: int = 64,
                 strides: Sequence[int] = (1, 2, 1, 1), dilations: Sequence[int] = (1, 1, 2, 4)):
        super().__init__()
        if depth not in STAGE_BLOCKS:
            raise ValueError(f"depth must be one of {sorted(STAGE_BLOCKS)}, got {depth}")
        half = stem_channels // 2
        self.stem = nn.Sequential(
            *conv_bn_relu(3, half, stride=2), *conv_bn_relu(half, half), *conv_bn_relu(half, stem_channels)
        )
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        inplanes = stem_channels
        self.out_channels = []
        for i, (blocks, stride, dilation) in enumerate(zip(STAGE_BLOCKS[depth], strides, dilations)):
            planes = base_channels * 2**i
            layer = self._make_layer(inplanes, planes, blocks, stride, dilation)
            self.add_module(f"layer{i + 1}", layer)
            inplanes = planes * Bottleneck.expansion
            self.out_channels.append(inplanes)

    @staticmethod
    def _make_layer(inplanes: int, planes: int, blocks: int, stride: int, dilation: int) -> nn.Sequential:
        out = planes * Bottleneck.expansion
        downsample = None
        if stride != 1 or inplanes != out:
            downsample = nn.Sequential(nn.Conv2d(inplanes, out, 1, stride, bias=False), nn.BatchNorm2d(out))
        first_dilation = dilation // 2 if dilation > 1 else dilation  # contract_dilation=True
        layers = [Bottleneck(inplanes, planes, stride, downsample, dilation=first_dilation)]
        layers += [Bottleneck(out, planes, dilation=dilation) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        x = self.maxpool(self.stem(x))
        features = []
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = layer(x)
            features.append(x)
        return features
