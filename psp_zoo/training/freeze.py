"""A frozen backbone: its weights take no gradient and its BatchNorm layers keep their statistics.

``freeze_backbone(model)`` turns every parameter of ``model.backbone`` off (``requires_grad``
False: the optimizer never sees them, so neither gradient nor weight decay touches them) and
replaces each of its BatchNorm layers by a :class:`FrozenBatchNorm2d`, which always normalizes
with the stored running statistics, as BatchNorm does in eval mode, whatever mode the model is put
in, and never updates them. It holds the same parameters and buffers under the same names
(``weight``, ``bias``, ``running_mean``, ``running_var``, ``num_batches_tracked``), so the model's
state dict keeps the published keys, and it is not a ``BatchNorm2d``: converting a model to
synchronized BatchNorm for torchrun leaves it alone.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["FrozenBatchNorm2d", "freeze_backbone"]


class FrozenBatchNorm2d(nn.Module):
    """BatchNorm2d in eval mode for good: running statistics used, never updated; no gradients."""

    def __init__(self, bn: nn.BatchNorm2d):
        super().__init__()
        self.num_features, self.eps = bn.num_features, bn.eps
        self.weight = nn.Parameter(bn.weight.detach(), requires_grad=False)
        self.bias = nn.Parameter(bn.bias.detach(), requires_grad=False)
        self.register_buffer("running_mean", bn.running_mean)
        self.register_buffer("running_var", bn.running_var)
        self.register_buffer("num_batches_tracked", bn.num_batches_tracked)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, frozen"


def _freeze(module: nn.Module) -> nn.Module:
    if isinstance(module, nn.BatchNorm2d):
        return FrozenBatchNorm2d(module)
    for name, child in module.named_children():
        module.add_module(name, _freeze(child))
    return module


def freeze_backbone(model: nn.Module) -> nn.Module:
    """``model`` (a PSPNet) with its backbone frozen in place: see the module docstring."""
    model.backbone = _freeze(model.backbone)
    for param in model.backbone.parameters():
        param.requires_grad_(False)
    return model

