"""PSPNet (every published backbone variant) exactly as mmseg's ``EncoderDecoder`` runs it at test time."""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ModelConfigError
from ..manifest.backbones import BACKBONE_FORMS, HEAD_CHANNELS, head_channels, parse_backbone
from .heads import FCNHead, PSPHead
from .resnet import STAGE_STRIDES, ResNet, check_backbone


def backbone_kwargs(backbone: str) -> dict:
    """PSPNet keyword arguments for a results-table backbone name such as ``"R-50b-D32"``.

    ``b`` means the 7x7-stem ResNetV1b (no ``b``: the deep-stem V1c); ``D8``/``D32`` is the output
    stride; a trailing ``" rsb"`` (ResNet strikes back pretraining) does not change the network.
    R-18 names also give the narrower published head widths.
    """
    kwargs = parse_backbone(backbone)
    if kwargs is None:
        raise ModelConfigError(f"unknown PSPNet backbone {backbone!r}; expected {BACKBONE_FORMS}")
    if kwargs["depth"] in HEAD_CHANNELS:
        kwargs["channels"], kwargs["aux_channels"] = HEAD_CHANNELS[kwargs["depth"]]
    return kwargs


class PSPNet(nn.Module):
    """PSPNet with mmseg's state-dict layout (``backbone.*``, ``decode_head.*``, ``auxiliary_head.*``).

    ``deep_stem`` picks ResNetV1c (True, ``backbone.stem.*``) or V1b (False, ``backbone.conv1``);
    ``output_stride`` 8 or 32 picks D8 or D32. ``channels``/``aux_channels`` default to the
    published head widths for ``depth``. Both heads' inputs follow the backbone's stage widths.

    The PSPNet authors' network (hszhao/semseg, ``manifest.backbones.FAMILIES['semseg']``) is this class
    with ``stem_channels=128`` (their deep stem: 64, 64, 128), ``contract_dilation=False`` (every
    block of stages 3 and 4 at dilation 2 and 4) and ``align_corners=True`` (pyramid and output
    resize); their output size ``(H - 1) / 8 * 8 + 1`` is ``H`` for the inputs they run
    (``(H - 1) % 8 == 0``). Their files' key names are mapped by :mod:`psp_zoo.model.checkpoint`.

    ``model(x)`` is mmseg's ``encode_decode``: the decode head's logits resized bilinearly (with
    the head's ``align_corners``) to x's height and width. ``x`` is a normalized RGB batch.
    """

    def __init__(self, *, depth: int = 50, num_classes: int, align_corners: bool = False,
                 deep_stem: bool = True, output_stride: int = 8,
                 stem_channels: int = 64, base_channels: int = 64, channels: Optional[int] = None,
                 aux_channels: Optional[int] = None, pool_scales: Sequence[int] = (1, 2, 3, 6),
                 contract_dilation: bool = True):
        super().__init__()
        check_backbone(depth, output_stride)
        default_channels, default_aux = head_channels(depth)
        channels = default_channels if channels is None else channels
        aux_channels = default_aux if aux_channels is None else aux_channels
        self.num_classes = num_classes
        self.align_corners = align_corners
        self.backbone = ResNet(depth, stem_channels=stem_channels, base_channels=base_channels,
                               strides=STAGE_STRIDES[output_stride], deep_stem=deep_stem,
                               contract_dilation=contract_dilation)
        c3, c4 = self.backbone.out_channels[2:]
        self.decode_head = PSPHead(c4, channels, num_classes, pool_scales, align_corners)
        self.auxiliary_head = FCNHead(c3, aux_channels, num_classes)

    def extract_features(self, x: torch.Tensor) -> List[torch.Tensor]:
        """The four backbone stage outputs."""
        return self.backbone(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.decode_head(self.backbone(x))
        return F.interpolate(logits, size=x.shape[2:], mode="bilinear", align_corners=self.align_corners)
