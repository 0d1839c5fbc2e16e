"""PSPNet (every published backbone variant) exactly as mmseg's ``EncoderDecoder`` runs it at test time."""
from __future__ import annotations

import re
from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ModelConfigError
from .heads import FCNHead, PSPHead
from .resnet import STAGE_STRIDES, ResNet, check_backbone

# the published configs narrow both heads for R-18 (decode 128, auxiliary 64); deeper nets use 512 / 256
HEAD_CHANNELS = {18: (128, 64)}
DEFAULT_HEAD_CHANNELS = (512, 256)

_BACKBONE_RE = re.compile(r"R-(?P<depth>18|50|101)(?P<v1b>b?)-D(?P<stride>8|32)(?: rsb)?")
_BACKBONE_FORMS = ("'R-<depth>[b]-D<stride>[ rsb]' with depth 18, 50 or 101 and stride 8 or 32 "
                   "(e.g. 'R-18-D8', 'R-50b-D32', 'R-50b-D8 rsb')")


def backbone_kwargs(backbone: str) -> dict:
    """PSPNet keyword arguments for a results-table backbone name such as ``"R-50b-D32"``.

    ``b`` means the 7x7-stem ResNetV1b (no ``b``: the deep-stem V1c); ``D8``/``D32`` is the output
    stride; a trailing ``" rsb"`` (ResNet strikes back pretraining) does not change the network.
    R-18 names also give the narrower published head widths.
    """
    match = _BACKBONE_RE.fullmatch(backbone.strip()) if isinstance(backbone, str) else None
    if match is None:
        raise ModelConfigError(f"unknown PSPNet backbone {backbone!r}; expected {_BACKBONE_FORMS}")
    depth = int(match["depth"])
    kwargs = {"depth": depth, "deep_stem": not match["v1b"], "output_stride": int(match["stride"])}
    if depth in HEAD_CHANNELS:
        kwargs["channels"], kwargs["aux_channels"] = HEAD_CHANNELS[depth]
    return kwargs


class PSPNet(nn.Module):
    """PSPNet with mmseg's state-dict layout (``backbone.*``, ``decode_head.*``, ``auxiliary_head.*``).

    ``deep_stem`` picks ResNetV1c (True, ``backbone.stem.*``) or V1b (False, ``backbone.conv1``);
    ``output_stride`` 8 or 32 picks D8 or D32. ``channels``/``aux_channels`` default to the
    published head widths for ``depth``. Both heads' inputs follow the backbone's stage widths.

    ``model(x)`` is mmseg's ``encode_decode``: the decode head's logits resized bilinearly (with
    the head's ``align_corners``) to x's height and width. ``x`` is a normalized RGB batch.
    """

    def __init__(self, *, depth: int = 50, num_classes: int, align_corners: bool = False,
                 deep_stem: bool = True, output_stride: int = 8,
                 stem_channels: int = 64, base_channels: int = 64, channels: Optional[int] = None,
                 aux_channels: Optional[int] = None, pool_scales: Sequence[int] = (1, 2, 3, 6)):
        super().__init__()
        check_backbone(depth, output_stride)
        default_channels, default_aux = HEAD_CHANNELS.get(depth, DEFAULT_HEAD_CHANNELS)
        channels = default_channels if channels is None else channels
        aux_channels = default_aux if aux_channels is None else aux_channels
        self.num_classes = num_classes
        self.align_corners = align_corners
        self.backbone = ResNet(depth, stem_channels=stem_channels, base_channels=base_channels,
                               strides=STAGE_STRIDES[output_stride], deep_stem=deep_stem)
        c3, c4 = self.backbone.out_channels[2:]
        self.decode_head = PSPHead(c4, channels, num_classes, pool_scales, align_corners)
        self.auxiliary_head = FCNHead(c3, aux_channels, num_classes)

    def extract_features(self, x: torch.Tensor) -> List[torch.Tensor]:
        """The four backbone stage outputs."""
        return self.backbone(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.decode_head(self.backbone(x))
        return F.interpolate(logits, size=x.shape[2:], mode="bilinear", align_corners=self.align_corners)
