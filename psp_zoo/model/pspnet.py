"""PSPNet R-50/101-D8 exactly as mmseg's ``EncoderDecoder`` runs it at test time."""
from __future__ import annotations

from typing import List, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .heads import FCNHead, PSPHead
from .resnet import ResNetV1c


class PSPNet(nn.Module):
    """PSPNet with mmseg's state-dict layout (``backbone.*``, ``decode_head.*``, ``auxiliary_head.*``).

    ``model(x)`` is mmseg's ``encode_decode``: the decode head's logits resized bilinearly (with
    the head's ``align_corners``) to x's height and width. ``x`` is a normalized RGB batch.
    """

    def __init__(self, *, depth: int = 50, num_classes: int, align_corners: bool = False,
                 stem_channels: int = 64, base_channels: int = 64, channels: int = 512,
                 aux_channels: int = 256, pool_scales: Sequence[int] = (1, 2, 3, 6)):
        super().__init__()
        self.num_classes = num_classes
        self.align_corners = align_corners
        self.backbone = ResNetV1c(depth, stem_channels=stem_channels, base_channels=base_channels)
        c3, c4 = self.backbone.out_channels[2:]
        self.decode_head = PSPHead(c4, channels, num_classes, pool_scales, align_corners)
        self.auxiliary_head = FCNHead(c3, aux_channels, num_classes)

    def extract_features(self, x: torch.Tensor) -> List[torch.Tensor]:
        """The four backbone stage outputs."""
        return self.backbone(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.decode_head(self.backbone(x))
        return F.interpolate(logits, size=x.shape[2:], mode="bilinear", align_corners=self.align_corners)
