"""The PSPNet network: dilated ResNet (V1c/V1b, R-18/50/101, D8/D32), pyramid pooling and FCN heads.

Beside it, not imported here: ``checkpoint.py`` (reading a published file safely and strictly),
``factory.py`` (``create_model``, ``resolve``) and ``optimization.py`` (``optimize``, the fast path).
"""
from .fast_head import FactorizedPSPHead
from .heads import FCNHead, PSPHead, PyramidPooling
from .pspnet import PSPNet, backbone_kwargs
from .resnet import BasicBlock, ResNet, ResNetV1b, ResNetV1c

__all__ = ["PSPNet", "backbone_kwargs", "ResNet", "ResNetV1b", "ResNetV1c", "BasicBlock",
           "PSPHead", "FactorizedPSPHead", "FCNHead", "PyramidPooling"]
