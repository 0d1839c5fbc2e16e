"""Fast inference: fold BN into convs, factorized PSP head, Winograd 3x3 convs, channels-last,
bf16/fp16 autocast, optional torch.compile.

``optimize(model)`` returns a new module (the caller's model is never touched) that takes and
returns ordinary NCHW float32 tensors exactly like ``model(x)``. The default (fp32, folded BN,
factorized head, Winograd convs on the CPU, channels-last, no compile) stays within rounding of
the eager model, so it can be the default everywhere; every other setting is recorded in
``.optimizations`` for results files to state.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
from typing import Any, Dict, Iterator, Optional

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_weights

from ..hub.options import SpeedOptions, cpu_supports_bf16
from .fast_head import factorize_psp_head
from .winograd import use_winograd

__all__ = ["optimize", "OptimizedModel", "fold_batchnorm", "cpu_supports_bf16", "DTYPES", "model_device"]

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def model_device(model: Any) -> torch.device:
    """The device of the model's first parameter (CPU for a model without parameters)."""
    first = next(iter(model.parameters()), None) if hasattr(model, "parameters") else None
    return first.device if first is not None else torch.device("cpu")


class OptimizedModel(nn.Module):
    """An inference-only wrapper: NCHW float32 in, NCHW float32 logits out, no autograd.

    ``model`` is the prepared (folded, channels-last) copy; ``runner`` is what is called (the
    compiled module when ``compile=True``). ``num_classes`` and ``align_corners`` are copied from
    the source model so inference code can treat this like a PSPNet.
    """

    def __init__(self, model: nn.Module, runner: nn.Module, optimizations: Dict[str, Any],
                 options: SpeedOptions):
        super().__init__()
        self.options = options
        self.model = model
        # Not registered as a submodule: the compiled wrapper holds ``model`` again, and its
        # weights must appear once in state_dict() and move once with .to().
        self.__dict__["runner"] = runner
        self.optimizations = optimizations
        self.num_classes = getattr(model, "num_classes", None)
        self.align_corners = getattr(model, "align_corners", None)
        self.autocast_dtype = DTYPES[optimizations["precision"]]
        self.device_type = optimizations["device"].split(":")[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.optimizations["channels_last"]:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.no_grad(), self._autocast(), self._compile_config():
            out = self.runner(x)
        # Callers (slide sums, argmax, metric code) expect ordinary contiguous float32 logits.
        return out.float().contiguous()

    def _autocast(self):
        if self.autocast_dtype is torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.autocast_dtype)

    def _compile_config(self):
        # Inductor compiles lazily on the first call (and on each new input shape), so the
        # freezing switch must be on at call time, not when torch.compile() is invoked.
        if not self.optimizations["freezing"]:
            return contextlib.nullcontext()
        import torch._inductor.config as inductor_config

        return inductor_config.patch(freezing=True)


def optimize(model: nn.Module, options: Optional[SpeedOptions] = None, *,
             freezing: Optional[bool] = None, **switches: Any) -> OptimizedModel:
    """An inference copy of ``model`` prepared as ``options`` says; ``model`` is left as it was.

    ``options`` is a :class:`psp_zoo.SpeedOptions` (default: the exact fp32 fast path), or give
    its fields as keywords (``precision='bf16'``, ``compile=True``...). ``fuse_bn`` folds every
    eval-mode BatchNorm into the preceding conv; ``channels_last`` runs in NHWC memory format;
    ``compile`` wraps the model in ``torch.compile`` (inductor) with weight freezing
    (``freezing``, default on with compile); ``factorize_head`` swaps a PSP decode head for
    FactorizedPSPHead, which applies the bottleneck conv to the pooled pyramid maps before
    upsampling them (same logits within rounding, about a fifth less arithmetic for R-50-D8);
    ``winograd`` (CPU, fp32 only) computes every 3x3 conv with at least 256 input and output
    channels by Winograd F(4x4, 3x3) (a quarter of the products, same sums within rounding).
    ``.optimizations`` records what was applied (``winograd_convs``: how many convs).
    """
    options = dataclasses.replace(options or SpeedOptions(), **switches)
    device = model_device(model)
    options.check(device)
    freezing = options.compile if freezing is None else bool(freezing and options.compile)
    prepared = copy.deepcopy(model).eval()
    for param in prepared.parameters():
        param.requires_grad_(False)
    folded = fold_batchnorm(prepared) if options.fuse_bn else 0
    factorized = factorize_psp_head(prepared) if options.factorize_head else False
    winograd = use_winograd(prepared) if options.winograd_applies(device) else 0
    if options.channels_last:
        prepared = prepared.to(memory_format=torch.channels_last)
    runner = torch.compile(prepared, backend="inductor") if options.compile else prepared
    optimizations = {**dataclasses.asdict(options), "factorize_head": factorized, "folded_bn": folded,
                     "winograd": winograd > 0, "winograd_convs": winograd,
                     "freezing": freezing,
                     "device": str(device), "torch": torch.__version__}
    return OptimizedModel(prepared, runner, optimizations, options)


def fold_batchnorm(model: nn.Module) -> int:
    """Fold each eval-mode BatchNorm2d into the Conv2d feeding it, in place; returns how many.

    A BN is folded when it directly follows a conv in an ``nn.Sequential`` (stems, ConvModules,
    downsample paths) or is the ``bnK`` partner of a ``convK`` (torchvision's Bottleneck).
    Folding is computed in float64 so the folded weights carry no extra rounding.
    """
    folded = 0
    for parent in list(model.modules()):
        for conv_name, bn_name in list(_conv_bn_pairs(parent)):
            conv, bn = getattr(parent, conv_name), getattr(parent, bn_name)
            setattr(parent, conv_name, _folded_conv(conv, bn))
            setattr(parent, bn_name, nn.Identity())
            folded += 1
    return folded


def _conv_bn_pairs(parent: nn.Module) -> Iterator[tuple]:
    children = dict(parent.named_children())
    names = list(children)
    if isinstance(parent, nn.Sequential):
        for first, second in zip(names, names[1:]):
            if _foldable(children[first], children[second]):
                yield first, second
        return
    for name, child in children.items():
        if name.startswith("bn") and _foldable(children.get("conv" + name[2:]), child):
            yield "conv" + name[2:], name


def _foldable(conv: Optional[nn.Module], bn: nn.Module) -> bool:
    return (type(conv) is nn.Conv2d and isinstance(bn, nn.BatchNorm2d) and not bn.training
            and bn.track_running_stats and bn.num_features == conv.out_channels)


def _folded_conv(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    fused = copy.deepcopy(conv)
    double = {"dtype": torch.float64}
    weight, bias = fuse_conv_bn_weights(
        conv.weight.to(**double), None if conv.bias is None else conv.bias.to(**double),
        bn.running_mean.to(**double), bn.running_var.to(**double), bn.eps,
        None if bn.weight is None else bn.weight.to(**double), None if bn.bias is None else bn.bias.to(**double),
    )
    fused.weight = nn.Parameter(weight.to(conv.weight.dtype), requires_grad=False)
    fused.bias = nn.Parameter(bias.to(conv.weight.dtype), requires_grad=False)
    return fused
