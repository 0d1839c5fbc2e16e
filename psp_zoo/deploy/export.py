"""Writing a PSPNet as a file other runtimes load: ONNX (dynamic shapes), TorchScript, safetensors.

The exported graph is the fp32 fast path (BatchNorm folded into the convs): it takes a normalized
NCHW float32 batch named ``input`` and returns ``logits`` at the input's height and width, the
same as ``model(x)``; softmax, argmax, sliding windows and ms+flip stay outside, so psp-zoo's
inference functions run on top of an exported file through
:class:`psp_zoo.deploy.runtime.OnnxModel`. Every format is one row of :data:`FORMATS`: its
writer, its check against PyTorch and the optional packages it needs.
"""
from __future__ import annotations

import copy
import io
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .._version import __version__
from ..errors import PspZooError
from ..files import atomic_write
from ..hub.options import FetchOptions
from ..manifest.loading import get_checkpoint
from ..model.factory import create_model, refuse_checkpoint_for_model_object
from ..model.optimization import fold_batchnorm
from ..optional import require
from .onnx_head import OnnxPSPHead, use_onnx_head
from .pooling import exact_pooling as _exact_pooling
from .verify import DEFAULT_SIZE, VerifyReport, verify_onnx, verify_safetensors, verify_torchscript

__all__ = [
    "FORMATS", "ExportFormat", "DEFAULT_OPSET", "export_onnx", "export_torchscript", "export_safetensors",
    "export_model", "exportable_copy", "export_file", "verify_file", "check_format", "default_input_size",
]

DEFAULT_OPSET = 17
MIN_OPSET, MAX_OPSET = 11, 21  # the opsets the exporter accepts
Model = Union[str, nn.Module]


def exportable_copy(model: nn.Module, *, exact_pooling: bool = True, factorized_head: bool = False) -> nn.Module:
    """A CPU fp32 eval copy of ``model`` with BN folded (and, for ONNX, exact dynamic pooling).

    ``factorized_head``: a PSP decode head becomes :class:`~psp_zoo.deploy.onnx_head.OnnxPSPHead`
    (the bottleneck conv applied to the pooled pyramid, resized by operators built from the
    runtime shape) instead of convolving the upsampled pyramid; the same logits within rounding.
    This is the one preparation step every writer runs before tracing.
    """
    prepared = copy.deepcopy(model).cpu().float().eval()
    for param in prepared.parameters():
        param.requires_grad_(False)
    fold_batchnorm(prepared)
    if factorized_head:
        use_onnx_head(prepared)
    return _exact_pooling(prepared) if exact_pooling else prepared


# ------------------------------------------------------------------------------------------------
# the model to export


def export_model(name_or_model: Model, *, checkpoint: Union[None, str, Path] = None,
                 fetch: Optional[FetchOptions] = None, entry: Optional[Any] = None) -> Tuple[nn.Module, Optional[Any]]:
    """(model in eval mode on the CPU, manifest entry or None) for a manifest name or a model object.

    ``fetch`` says where a named checkpoint comes from; ``entry`` names the manifest entry a model
    object was built from (its name and test size are recorded).
    """
    if isinstance(name_or_model, str):
        fetch = fetch or FetchOptions()
        entry = get_checkpoint(name_or_model, manifest=fetch.manifest)
        return create_model(entry.name, checkpoint=checkpoint, device="cpu", fetch=fetch), entry
    refuse_checkpoint_for_model_object(checkpoint)
    if not isinstance(name_or_model, nn.Module):
        raise PspZooError(f"expected a manifest name or a torch model, got {type(name_or_model).__name__}")
    return name_or_model.eval(), entry


def default_input_size(entry) -> Tuple[int, int]:
    """The checkpoint's own test input: its sliding-window crop, else a square of the short side."""
    if entry is None:
        return DEFAULT_SIZE
    if entry.test.mode == "slide" and entry.test.crop_size:
        return tuple(entry.test.crop_size)
    short = min(entry.test.img_scale)
    return (short, short)


def _check_input_size(input_size: Optional[Sequence[int]], entry) -> Tuple[int, int]:
    if input_size is None:
        return default_input_size(entry)
    size = tuple(input_size)
    if len(size) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in size):
        raise PspZooError(f"input_size must be (height, width) in whole pixels >= 1, got {input_size!r}")
    return size


def _check_opset(opset: Optional[int]) -> int:
    opset = DEFAULT_OPSET if opset is None else opset
    if not isinstance(opset, int) or isinstance(opset, bool) or not MIN_OPSET <= opset <= MAX_OPSET:
        raise PspZooError(f"opset must be a whole number from {MIN_OPSET} to {MAX_OPSET}, got {opset!r}")
    return opset


def _metadata(model: nn.Module, entry, dynamic: bool) -> Dict[str, str]:
    """What a user of the file needs besides the graph: class count, resize convention, origin."""
    return {
        "psp_zoo.version": __version__,
        "psp_zoo.model": entry.name if entry is not None else type(model).__name__,
        "psp_zoo.num_classes": str(getattr(model, "num_classes", "")),
        "psp_zoo.align_corners": str(bool(getattr(model, "align_corners", False))),
        "psp_zoo.dynamic": str(bool(dynamic)),
        "psp_zoo.input": "normalized RGB, NCHW float32 (mean 123.675/116.28/103.53, std 58.395/57.12/57.375)",
    }


# ------------------------------------------------------------------------------------------------
# ONNX


def _onnx_bytes(prepared: nn.Module, size: Tuple[int, int], dynamic: bool, opset: int) -> bytes:
    """The graph from torch's TorchScript-based exporter (``dynamo=False``).

    It writes a correct dynamic graph in about a second and needs nothing beyond onnx; the
    torch.export-based exporter (torch's default since 2.9) also exports this model correctly
    but needs onnxscript and took about 50x longer.
    """
    buffer = io.BytesIO()
    axes = {"input": {0: "batch", 2: "height", 3: "width"}, "logits": {0: "batch", 2: "height", 3: "width"}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's deprecation and tracer notices
        torch.onnx.export(prepared, (torch.zeros(1, 3, *size),), buffer, dynamo=False, input_names=["input"],
                          output_names=["logits"], dynamic_axes=axes if dynamic else None,
                          opset_version=opset, do_constant_folding=True)
    return buffer.getvalue()


def export_onnx(name_or_model: Model, path: Union[str, Path], *, input_size: Optional[Sequence[int]] = None,
                dynamic: bool = True, opset: Optional[int] = None, checkpoint: Union[None, str, Path] = None,
                fetch: Optional[FetchOptions] = None, entry: Optional[Any] = None,
                plain_head: bool = False) -> Path:
    """Write ``name_or_model`` as an ONNX file at ``path`` (atomically) and return the path.

    ``dynamic``: batch, height and width are free (the default); otherwise the graph is fixed to
    1 x 3 x ``input_size``. ``input_size`` (H, W) is the example traced, by default the
    checkpoint's test crop (512 x 512 for a model object). ``opset`` defaults to 17 (at least 11).
    The PSP head is written factorized (its bottleneck conv applied to the pooled pyramid maps,
    about a fifth less arithmetic for R-50-D8, the same logits within rounding);
    ``plain_head=True`` writes the head as the model computes it (the conv over the upsampled
    pyramid). The file's metadata records num_classes, align_corners and the head for ``OnnxModel``.
    """
    onnx = _require_all("onnx")
    opset = _check_opset(opset)
    model, entry = export_model(name_or_model, checkpoint=checkpoint, fetch=fetch, entry=entry)
    size = _check_input_size(input_size, entry)
    prepared = exportable_copy(model, factorized_head=not plain_head)
    proto = onnx.load_from_string(_onnx_bytes(prepared, size, dynamic, opset))
    head = "factorized" if isinstance(getattr(prepared, "decode_head", None), OnnxPSPHead) else "plain"
    for key, value in {**_metadata(model, entry, dynamic), "psp_zoo.head": head}.items():
        proto.metadata_props.add(key=key, value=value)
    onnx.checker.check_model(proto)
    atomic_write(path, proto.SerializeToString())
    return Path(path)


# ------------------------------------------------------------------------------------------------
# TorchScript and safetensors


def export_torchscript(name_or_model: Model, path: Union[str, Path], *,
                       input_size: Optional[Sequence[int]] = None, checkpoint: Union[None, str, Path] = None,
                       fetch: Optional[FetchOptions] = None, entry: Optional[Any] = None) -> Path:
    """Write a traced TorchScript module (BN folded, any input size) at ``path``, atomically.

    Load it with ``torch.jit.load``; it takes and returns the same tensors as ``model(x)``.
    """
    model, entry = export_model(name_or_model, checkpoint=checkpoint, fetch=fetch, entry=entry)
    size = _check_input_size(input_size, entry)
    prepared = exportable_copy(model, exact_pooling=False)  # TorchScript's adaptive pool follows the input
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(prepared, torch.zeros(1, 3, *size), check_trace=False)
        buffer = io.BytesIO()
        extra = {key: value.encode() for key, value in _metadata(model, entry, True).items()}
        torch.jit.save(traced, buffer, _extra_files=extra)
    atomic_write(path, buffer.getvalue())
    return Path(path)


def export_safetensors(name_or_model: Model, path: Union[str, Path], *,
                       checkpoint: Union[None, str, Path] = None, fetch: Optional[FetchOptions] = None,
                       entry: Optional[Any] = None) -> Path:
    """Write the model's state dict (mmseg key names, unfolded) as a safetensors file, atomically.

    :func:`psp_zoo.load_checkpoint` reads it back; loading it runs no pickle code.
    """
    safetensors_torch = _require_all("safetensors")
    model, entry = export_model(name_or_model, checkpoint=checkpoint, fetch=fetch, entry=entry)
    state = {key: value.detach().cpu().contiguous() for key, value in model.state_dict().items()}
    meta = {key: value for key, value in _metadata(model, entry, True).items() if key != "psp_zoo.dynamic"}
    atomic_write(path, safetensors_torch.save(state, metadata=meta))
    return Path(path)


# ------------------------------------------------------------------------------------------------
# the formats: one row each


@dataclass(frozen=True)
class ExportFormat:
    """One file format: how it is written and checked, and the optional packages it needs."""

    write: Callable[..., Path]          # (model, path, *, input_size, dynamic, opset, entry, plain_head) -> Path
    verify: Callable[..., VerifyReport]  # (path, model, input_size) -> VerifyReport
    needs: Tuple[str, ...]              # modules imported, the first one returned by _require_all
    extra: str                          # the pip extra that brings them
    purpose: str                        # what they are needed for, in a missing-package message
    shapes: bool = False                # whether fixed shapes, the opset and the head choice apply


FORMATS: Dict[str, ExportFormat] = {
    "onnx": ExportFormat(
        write=lambda model, path, *, input_size, dynamic, opset, entry, plain_head: export_onnx(
            model, path, input_size=input_size, dynamic=dynamic, opset=opset, entry=entry, plain_head=plain_head),
        verify=lambda path, model, input_size: verify_onnx(path, model, input_size=input_size),
        needs=("onnx", "onnxruntime"), extra="onnx", purpose="exporting to ONNX", shapes=True),
    "torchscript": ExportFormat(
        write=lambda model, path, *, input_size, dynamic, opset, entry, plain_head: export_torchscript(
            model, path, input_size=input_size, entry=entry),
        verify=lambda path, model, input_size: verify_torchscript(path, model, input_size=input_size),
        needs=(), extra="", purpose="exporting to TorchScript"),
    "safetensors": ExportFormat(
        write=lambda model, path, *, input_size, dynamic, opset, entry, plain_head: export_safetensors(
            model, path, entry=entry),
        verify=lambda path, model, input_size: verify_safetensors(path, model),
        needs=("safetensors.torch",), extra="safetensors", purpose="writing safetensors files"),
}


def _require_all(format: str):
    """Import what ``format`` needs (or say which extra brings it); the first module, or None."""
    spec = FORMATS[format]
    modules = [require(module, spec.extra, purpose=spec.purpose) for module in spec.needs]
    return modules[0] if modules else None


def check_format(format: str, *, dynamic: bool = True, opset: Optional[int] = None,
                 plain_head: bool = False) -> None:
    """Refuse an unknown format, options it does not take, a bad opset or missing packages,
    before any model is built or downloaded."""
    if format not in FORMATS:
        raise PspZooError(f"unknown export format {format!r}; choose one of: {', '.join(FORMATS)}")
    if not FORMATS[format].shapes and (not dynamic or opset is not None):
        raise PspZooError(f"fixed shapes and opset apply to ONNX files only, not to {format}")
    if not FORMATS[format].shapes and plain_head:
        raise PspZooError(f"the plain-head choice applies to ONNX files only, not to {format}")
    if FORMATS[format].shapes:
        _check_opset(opset)
    _require_all(format)


def export_file(model: nn.Module, path: Union[str, Path], format: str = "onnx", *,
                input_size: Optional[Sequence[int]] = None, dynamic: bool = True,
                opset: Optional[int] = None, entry: Optional[Any] = None, plain_head: bool = False) -> Path:
    """Write ``model`` in ``format`` (a key of :data:`FORMATS`); static shapes and the head
    choice (``plain_head``, see :func:`export_onnx`) exist only for ONNX."""
    check_format(format, dynamic=dynamic, opset=opset, plain_head=plain_head)
    return FORMATS[format].write(model, path, input_size=input_size, dynamic=dynamic, opset=opset, entry=entry,
                                 plain_head=plain_head)


def verify_file(path: Union[str, Path], model: nn.Module, format: str = "onnx", *,
                input_size: Optional[Sequence[int]] = None, entry: Optional[Any] = None) -> VerifyReport:
    """The check matching :func:`export_file`: exported vs PyTorch logits on random inputs."""
    check_format(format)
    return FORMATS[format].verify(path, model, input_size or default_input_size(entry))
