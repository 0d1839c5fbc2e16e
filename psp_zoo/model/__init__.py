"""The PSPNet network: dilated ResNetV1c backbone, pyramid pooling head, auxiliary FCN head."""
from .fast_head import FactorizedPSPHead
from .heads import FCNHead, PSPHead, PyramidPooling
from .pspnet import PSPNet
from .resnet import ResNetV1c

__all__ = ["PSPNet", "ResNetV1c", "PSPHead", "FCNHead", "PyramidPooling"]
