"""Synchronized BatchNorm for a torchrun job: batch statistics over all its processes.

The published checkpoints were trained with SyncBN: in training mode each BatchNorm normalizes
with the mean and variance of the images of ALL GPUs. On CUDA that is torch's own
``torch.nn.SyncBatchNorm`` (NCCL). Torch has none for CPU, so there psp-zoo uses its own
:class:`SyncBatchNorm2d`, which does it with differentiable all-reduces (gloo): N processes x B
images give the statistics, outputs and gradients of one process with N x B images (the
all-reduce of the statistics sums their gradients across processes in the backward pass). It is a
``BatchNorm2d``: its state-dict keys are plain BN's. :func:`sync_batchnorm_converter` says which of
the two a device gets.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["SyncBatchNorm2d", "convert_sync_batchnorm", "sync_batchnorm_converter", "all_reduce_sum"]


class _AllReduceSum(torch.autograd.Function):
    """Sum over processes whose gradient is the sum over processes of the incoming gradients."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        total = tensor.clone()
        dist.all_reduce(total)
        return total

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        total = grad.clone()
        dist.all_reduce(total)
        return total


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` summed over every process of the job, differentiably."""
    return _AllReduceSum.apply(tensor)


class SyncBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training-mode statistics are those of every process's batch together."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().forward(x)
        channels = x.shape[1]
        dims = (0, 2, 3)
        count = torch.tensor([x.numel() // channels], dtype=x.dtype, device=x.device)
        totals = all_reduce_sum(torch.cat([x.sum(dims), count]))
        n = totals[-1]
        mean = totals[:channels] / n
        centered = x - mean.view(1, -1, 1, 1)
        # two passes (mean, then squared deviations) as BatchNorm's own kernel, not E[x^2] - E[x]^2
        var = all_reduce_sum(centered.pow(2).sum(dims)) / n
        self._update_running_stats(mean.detach(), var.detach(), n.item())
        out = centered * torch.rsqrt(var + self.eps).view(1, -1, 1, 1)
        if self.affine:
            out = out * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)
        return out

    @torch.no_grad()
    def _update_running_stats(self, mean: torch.Tensor, var: torch.Tensor, n: float) -> None:
        if not self.track_running_stats:
            return
        self.num_batches_tracked += 1
        momentum = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
        unbiased = var * (n / max(n - 1, 1))
        self.running_mean.mul_(1 - momentum).add_(mean.to(self.running_mean.dtype), alpha=momentum)
        self.running_var.mul_(1 - momentum).add_(unbiased.to(self.running_var.dtype), alpha=momentum)


def sync_batchnorm_converter(device: torch.device) -> Callable[[nn.Module], nn.Module]:
    """The function that synchronizes a model's BatchNorm on ``device``: torch's
    ``nn.SyncBatchNorm.convert_sync_batchnorm`` on CUDA, psp-zoo's :class:`SyncBatchNorm2d` elsewhere."""
    if torch.device(device).type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm
    return _convert


def convert_sync_batchnorm(model: nn.Module) -> nn.Module:
    """``model`` with every BatchNorm2d synchronized, by :func:`sync_batchnorm_converter` of its device.

    The weights and running statistics are kept (the same tensors); the keys do not change.
    """
    return sync_batchnorm_converter(next(model.parameters()).device)(model)


def _convert(module: nn.Module) -> nn.Module:
    if isinstance(module, nn.BatchNorm2d) and not isinstance(module, SyncBatchNorm2d):
        synced = SyncBatchNorm2d(module.num_features, module.eps, module.momentum, module.affine,
                                 module.track_running_stats, device=module.running_mean.device
                                 if module.running_mean is not None else None)
        if module.affine:
            synced.weight, synced.bias = module.weight, module.bias
        if module.track_running_stats:
            synced.running_mean, synced.running_var = module.running_mean, module.running_var
            synced.num_batches_tracked = module.num_batches_tracked
        synced.train(module.training)
        return synced
    for name, child in module.named_children():
        module.add_module(name, _convert(child))
    return module
