"""Fast inference: fold BN into convs, channels-last, bf16/fp16 autocast, optional torch.compile.

``optimize(model)`` returns a new module (the caller's model is never touched) that takes and
returns ordinary NCHW float32 tensors exactly like ``model(x)``. The default (fp32, folded BN,
channels-last, no compile) stays within rounding of the eager model, so it can be the default
everywhere; every other setting is recorded in ``.optimizations`` for results files to state.
"""
from __future__ import annotations

import contextlib
import copy
from typing import Any, Dict, Iterator, Optional

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_weights

from .errors import PspZooError
from .inference import model_device
from .model.fast_head import factorize_psp_head

__all__ = ["optimize", "OptimizedModel", "fold_batchnorm", "check_options", "PRECISIONS", "cpu_supports_bf16"]

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class OptimizedModel(nn.Module):
    """An inference-only wrapper: NCHW float32 in, NCHW float32 logits out, no autograd.

    ``model`` is the prepared (folded, channels-last) copy; ``runner`` is what is called (the
    compiled module when ``compile=True``). ``num_classes`` and ``align_corners`` are copied from
    the source model so inference code can treat this like a PSPNet.
    """

    def __init__(self, model: nn.Module, runner: nn.Module, optimizations: Dict[str, Any]):
        super().__init__()
        self.model = model
        # Not registered as a submodule: the compiled wrapper holds ``model`` again, and its
        # weights must appear once in state_dict() and move once with .to().
        self.__dict__["runner"] = runner
        self.optimizations = optimizations
        self.num_classes = getattr(model, "num_classes", None)
        self.align_corners = getattr(model, "align_corners", None)
        self.autocast_dtype = PRECISIONS[optimizations["precision"]]
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


def optimize(model: nn.Module, *, precision: str = "fp32", channels_last: bool = True,
             fuse_bn: bool = True, compile: bool = False, freezing: Optional[bool] = None,
             factorize_head: bool = True) -> OptimizedModel:
    """An inference copy of ``model`` with the chosen optimizations; ``model`` is left as it was.

    ``precision``: 'fp32' (exact path), 'bf16' (autocast; CUDA or a CPU with native bf16) or
    'fp16' (autocast; CUDA only). ``fuse_bn`` folds every eval-mode BatchNorm into the preceding
    conv; ``channels_last`` runs in NHWC memory format; ``compile`` wraps the model in
    ``torch.compile`` (inductor) with weight freezing (``freezing``, default on with compile).
    ``factorize_head`` swaps a PSP decode head for FactorizedPSPHead, which applies the
    bottleneck conv to the pooled pyramid maps before upsampling them (same logits within
    rounding, about a fifth less arithmetic for R-50-D8).
    The result's ``.optimizations`` dict records what was applied.
    """
    device = model_device(model)
    check_options(precision, device, channels_last=channels_last, fuse_bn=fuse_bn, compile=compile,
                  factorize_head=factorize_head)
    freezing = bool(compile) if freezing is None else bool(freezing and compile)
    prepared = copy.deepcopy(model).eval()
    for param in prepared.parameters():
        param.requires_grad_(False)
    folded = fold_batchnorm(prepared) if fuse_bn else 0
    factorized = factorize_psp_head(prepared) if factorize_head else False
    if channels_last:
        prepared = prepared.to(memory_format=torch.channels_last)
    runner = torch.compile(prepared, backend="inductor") if compile else prepared
    optimizations = {
        "precision": precision, "fuse_bn": bool(fuse_bn), "folded_bn": folded,
        "channels_last": bool(channels_last), "compile": bool(compile), "freezing": freezing,
        "factorize_head": factorized,
        "device": str(device), "torch": torch.__version__,
    }
    return OptimizedModel(prepared, runner, optimizations)


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


def cpu_supports_bf16() -> bool:
    """Whether this CPU runs bf16 natively (AVX512-BF16 / AMX), so bf16 autocast is a speed-up."""
    check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return bool(check is not None and check())


def check_options(precision: str, device: Any = "cpu", **flags: Any) -> None:
    """Refuse an unknown precision, a non-bool flag or a precision the device cannot run.

    Called by ``optimize`` and, before any model is downloaded or built, by the commands.
    """
    device = torch.device(device)
    if precision not in PRECISIONS:
        raise PspZooError(f"unknown precision {precision!r}; choose one of: {', '.join(PRECISIONS)}")
    for name, value in flags.items():
        if not isinstance(value, bool):
            raise PspZooError(f"{name} must be True or False, got {value!r}")
    if device.type == "cpu" and precision == "fp16":
        raise PspZooError("precision 'fp16' needs a CUDA device; on the CPU use 'bf16' or 'fp32'")
    if device.type == "cpu" and precision == "bf16" and not cpu_supports_bf16():
        raise PspZooError(
            "precision 'bf16' needs a CPU with native bf16 (AVX512-BF16 or AMX) or a CUDA device; "
            "use 'fp32' on this machine"
        )
