"""The results tables' backbone names and what they mean, for the manifest and the model alike.

A name is ``R-<depth>[b]-D<stride>[ rsb]``: a depth of ``STAGE_BLOCKS``; ``b`` the 7x7-stem ResNetV1b
(no ``b``: the deep-stem V1c); ``D8``/``D32`` the output stride; a trailing ``" rsb"`` (ResNet
strikes back pretraining) does not change the network. Torch-free: the manifest is read without it.
"""
from __future__ import annotations

import re
from typing import Optional, Tuple

__all__ = ["STAGE_BLOCKS", "DEPTHS", "DEPTH_WORDS", "STAGE_STRIDES", "OUTPUT_STRIDES", "BACKBONE_RE", "BACKBONE_FORMS",
           "HEAD_CHANNELS", "DEFAULT_HEAD_CHANNELS", "FAMILIES", "METHOD_NAMES", "parse_backbone", "head_channels"]

#: The published ResNet depths and their blocks per stage (R-18 in basic blocks, deeper nets in
#: bottlenecks): the one table the manifest, the backbone files and ``model/resnet.py`` read.
STAGE_BLOCKS = {18: (2, 2, 2, 2), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}
DEPTHS = tuple(STAGE_BLOCKS)
DEPTH_WORDS = ", ".join(map(str, DEPTHS[:-1])) + f" or {DEPTHS[-1]}"  # the depths in words, for messages
#: Output stride (D8, D32) -> the strides of the four stages (the later stages dilate instead).
STAGE_STRIDES = {8: (1, 2, 1, 1), 32: (1, 2, 2, 2)}
OUTPUT_STRIDES = tuple(STAGE_STRIDES)

BACKBONE_RE = re.compile(rf"R-(?P<depth>{'|'.join(map(str, DEPTHS))})(?P<v1b>b?)"
                         rf"-D(?P<stride>{'|'.join(map(str, OUTPUT_STRIDES))})(?: rsb)?")
BACKBONE_FORMS = (f"'R-<depth>[b]-D<stride>[ rsb]' with depth {DEPTH_WORDS} and stride "
                  f"{' or '.join(map(str, OUTPUT_STRIDES))} (e.g. 'R-18-D8', 'R-50b-D32', 'R-50b-D8 rsb')")

# the published configs narrow both heads for R-18 (decode 128, auxiliary 64); deeper nets use 512 / 256
HEAD_CHANNELS = {18: (128, 64)}
DEFAULT_HEAD_CHANNELS = (512, 256)

#: The families of published PSPNets and what each changes in the network (PSPNet keyword
#: arguments): mmseg's (the default), and the PSPNet authors' (hszhao/semseg: a 64-64-128 deep
#: stem, every block of the dilated stages at the full dilation).
FAMILIES = {"mmseg": {}, "semseg": {"stem_channels": 128, "contract_dilation": False}}
#: The results tables' Method cell of each family's rows.
METHOD_NAMES = {"mmseg": "PSPNet", "semseg": "PSPNet (semseg)"}


def parse_backbone(name: object) -> Optional[dict]:
    """``{"depth", "deep_stem", "output_stride"}`` for a backbone name, or None if it is not one."""
    match = BACKBONE_RE.fullmatch(name.strip()) if isinstance(name, str) else None
    if match is None:
        return None
    return {"depth": int(match["depth"]), "deep_stem": not match["v1b"], "output_stride": int(match["stride"])}


def head_channels(depth: int) -> Tuple[int, int]:
    """(decode head, auxiliary head) widths of the published configs for ``depth``."""
    return HEAD_CHANNELS.get(depth, DEFAULT_HEAD_CHANNELS)
