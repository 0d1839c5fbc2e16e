"""Deploy a PSPNet without PyTorch: ONNX (dynamic shapes), TorchScript and safetensors files.

The exported graph is the fp32 fast path (BatchNorm folded into the convs): it takes a normalized
NCHW float32 batch named ``input`` and returns ``logits`` at the input's height and width, the
same as ``model(x)``; softmax, argmax, sliding windows and ms+flip stay outside, so psp-zoo's
inference functions run on top of an exported file through :class:`OnnxModel`.

Adaptive average pooling has no ONNX operator whose bins follow a runtime input size, so for
export each ``nn.AdaptiveAvgPool2d`` is replaced by :func:`adaptive_avg_pool_exact`, which builds
PyTorch's bins from the input's shape inside the graph. One file then serves every height, width
and batch size, with the pooling PyTorch computes, not only sizes divisible by the pool scales.
"""
from __future__ import annotations

import copy
import dataclasses
import importlib
import io
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn

from ._version import __version__
from .errors import PspZooError
from .factory import create_model, refuse_checkpoint_for_model_object
from .manifest import get_checkpoint
from .optimization import fold_batchnorm
from .files import atomic_write

__all__ = [
    "FORMATS", "DEFAULT_OPSET", "export_onnx", "export_torchscript", "export_safetensors", "export_model",
    "exportable_copy", "adaptive_avg_pool_exact", "ExactAdaptiveAvgPool2d", "verify_onnx",
    "verify_torchscript", "compare_outputs", "verify_sizes", "Comparison", "VerifyReport",
    "OnnxModel", "onnx_backend_info", "require", "verify_safetensors", "export_file", "verify_file",
    "check_format", "default_input_size",
]

FORMATS = ("onnx", "torchscript", "safetensors")
DEFAULT_OPSET = 17
#: pip extra that brings each optional module
EXTRAS = {"onnx": "onnx", "onnxruntime": "onnx", "safetensors": "safetensors"}
MAX_REL_DIFF = 1e-4          # max |exported - PyTorch| / max |PyTorch logit|
MIN_AGREEMENT = 0.9999       # share of pixels whose argmax class agrees
DEFAULT_SIZE = (512, 512)

Model = Union[str, nn.Module]


def require(module: str, purpose: str):
    """Import an optional dependency, or say which psp-zoo extra brings it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        extra = EXTRAS.get(module.split(".")[0], module.split(".")[0])
        raise PspZooError(f"{purpose} needs the {module} package, which is not installed; "
                          f"install it with: pip install 'psp-zoo[{extra}]'") from None


# ------------------------------------------------------------------------------------------------
# exact adaptive pooling from the runtime shape


def _bin_matrix(size, bins: int, like: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """0/1 matrix (bins x size) of PyTorch's adaptive bins and each bin's length.

    Bin i covers [floor(i * size / bins), ceil((i + 1) * size / bins)). ``size`` is the traced
    dimension, so the integer arithmetic below becomes graph ops, not constants.
    """
    index = torch.arange(bins, device=like.device)
    position = torch.arange(size, device=like.device)
    start = torch.div(index * size, bins, rounding_mode="floor")
    end = torch.div((index + 1) * size + bins - 1, bins, rounding_mode="floor")
    inside = (position[None, :] >= start[:, None]) & (position[None, :] < end[:, None])
    return inside.to(like.dtype), (end - start).to(like.dtype)


def adaptive_avg_pool_exact(x: torch.Tensor, output_size: Union[int, Sequence[Optional[int]]]) -> torch.Tensor:
    """``F.adaptive_avg_pool2d(x, output_size)`` as two matrix products, exportable with dynamic H, W.

    Each bin is summed and then divided by its pixel count, as PyTorch's kernel does; only the
    summation order differs (float rounding).
    """
    out_h, out_w = (output_size, output_size) if isinstance(output_size, int) else output_size
    out_h = x.shape[2] if out_h is None else out_h
    out_w = x.shape[3] if out_w is None else out_w
    rows, row_count = _bin_matrix(x.shape[2], out_h, x)
    cols, col_count = _bin_matrix(x.shape[3], out_w, x)
    sums = torch.matmul(torch.matmul(rows, x), cols.transpose(0, 1))
    return sums / (row_count[:, None] * col_count[None, :])


class ExactAdaptiveAvgPool2d(nn.Module):
    """Drop-in for ``nn.AdaptiveAvgPool2d`` whose bins follow the traced input shape."""

    def __init__(self, output_size: Union[int, Sequence[Optional[int]]]):
        super().__init__()
        self.output_size = output_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return adaptive_avg_pool_exact(x, self.output_size)


def exportable_copy(model: nn.Module, *, exact_pooling: bool = True) -> nn.Module:
    """A CPU fp32 eval copy of ``model`` with BN folded (and, for ONNX, exact dynamic pooling)."""
    prepared = copy.deepcopy(model).cpu().float().eval()
    for param in prepared.parameters():
        param.requires_grad_(False)
    fold_batchnorm(prepared)
    if exact_pooling:
        for parent in list(prepared.modules()):
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.AdaptiveAvgPool2d):
                    setattr(parent, name, ExactAdaptiveAvgPool2d(child.output_size))
    return prepared


# ------------------------------------------------------------------------------------------------
# the model to export


def export_model(name_or_model: Model, *, checkpoint: Union[None, str, Path] = None, manifest=None,
                 entry: Optional[Any] = None, **fetch: Any) -> Tuple[nn.Module, Optional[Any]]:
    """(model in eval mode on the CPU, manifest entry or None) for a manifest name or a model object.

    ``fetch`` goes to :func:`psp_zoo.create_model` (cache_dir, mirror, offline, quiet); ``entry``
    names the manifest entry a model object was built from (its name and test size are recorded).
    """
    if isinstance(name_or_model, str):
        entry = get_checkpoint(name_or_model, manifest=manifest)
        return create_model(entry.name, checkpoint=checkpoint, manifest=manifest, device="cpu", **fetch), entry
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
                manifest=None, **fetch: Any) -> Path:
    """Write ``name_or_model`` as an ONNX file at ``path`` (atomically) and return the path.

    ``dynamic``: batch, height and width are free (the default); otherwise the graph is fixed to
    1 x 3 x ``input_size``. ``input_size`` (H, W) is the example traced, by default the
    checkpoint's test crop (512 x 512 for a model object). ``opset`` defaults to 17 (at least 11).
    The file's metadata records num_classes and align_corners for :class:`OnnxModel`.
    """
    onnx = require("onnx", "exporting to ONNX")
    require("onnxruntime", "exporting to ONNX")
    opset = DEFAULT_OPSET if opset is None else opset
    if not isinstance(opset, int) or not 11 <= opset <= 21:
        raise PspZooError(f"opset must be a whole number from 11 to 21, got {opset!r}")
    model, entry = export_model(name_or_model, checkpoint=checkpoint, manifest=manifest, **fetch)
    size = _check_input_size(input_size, entry)
    proto = onnx.load_from_string(_onnx_bytes(exportable_copy(model), size, dynamic, opset))
    for key, value in _metadata(model, entry, dynamic).items():
        proto.metadata_props.add(key=key, value=value)
    onnx.checker.check_model(proto)
    atomic_write(path, proto.SerializeToString())
    return Path(path)


# ------------------------------------------------------------------------------------------------
# TorchScript and safetensors


def export_torchscript(name_or_model: Model, path: Union[str, Path], *,
                       input_size: Optional[Sequence[int]] = None, checkpoint: Union[None, str, Path] = None,
                       manifest=None, **fetch: Any) -> Path:
    """Write a traced TorchScript module (BN folded, any input size) at ``path``, atomically.

    Load it with ``torch.jit.load``; it takes and returns the same tensors as ``model(x)``.
    """
    model, entry = export_model(name_or_model, checkpoint=checkpoint, manifest=manifest, **fetch)
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
                       checkpoint: Union[None, str, Path] = None, manifest=None, **fetch: Any) -> Path:
    """Write the model's state dict (mmseg key names, unfolded) as a safetensors file, atomically.

    :func:`psp_zoo.load_checkpoint` reads it back; loading it runs no pickle code.
    """
    safetensors_torch = require("safetensors.torch", "writing safetensors files")
    model, entry = export_model(name_or_model, checkpoint=checkpoint, manifest=manifest, **fetch)
    state = {key: value.detach().cpu().contiguous() for key, value in model.state_dict().items()}
    meta = {key: value for key, value in _metadata(model, entry, True).items() if key != "psp_zoo.dynamic"}
    atomic_write(path, safetensors_torch.save(state, metadata=meta))
    return Path(path)


# ------------------------------------------------------------------------------------------------
# verification against PyTorch


@dataclasses.dataclass(frozen=True)
class Comparison:
    """Exported vs PyTorch logits on one random input of ``shape`` (N, C, H, W)."""

    shape: Tuple[int, ...]
    rel_diff: float      # max |exported - PyTorch| / max |PyTorch|
    agreement: float     # share of pixels with the same argmax class
    error: str = ""      # why the exported model gave no comparable output

    @property
    def ok(self) -> bool:
        return not self.error and self.rel_diff <= MAX_REL_DIFF and self.agreement >= MIN_AGREEMENT

    def line(self) -> str:
        size = " x ".join(map(str, self.shape))
        if self.error:
            return f"{size}: FAILED ({self.error})"
        return (f"{size}: max rel diff {self.rel_diff:.2e}, argmax agreement {self.agreement * 100:.4f}%  "
                f"{'ok' if self.ok else 'FAILED'}")


@dataclasses.dataclass(frozen=True)
class VerifyReport:
    """Every comparison of one exported file; ``ok`` when all are within the limits."""

    comparisons: List[Comparison]

    @property
    def ok(self) -> bool:
        return bool(self.comparisons) and all(c.ok for c in self.comparisons)

    def text(self) -> str:
        limits = f"limits: rel diff <= {MAX_REL_DIFF:g}, agreement >= {MIN_AGREEMENT * 100:g}%"
        return "\n".join([*(c.line() for c in self.comparisons), limits])


def compare_outputs(reference: torch.Tensor, got: torch.Tensor) -> Comparison:
    """How far ``got`` is from ``reference`` (both N x C x H x W logits)."""
    reference, got = reference.detach().float().cpu(), got.detach().float().cpu()
    if got.shape != reference.shape:
        return Comparison(tuple(reference.shape), float("inf"), 0.0,
                          f"output shape {tuple(got.shape)}, expected {tuple(reference.shape)}")
    scale = float(reference.abs().max()) or 1.0
    rel = float((got - reference).abs().max()) / scale
    agreement = float((got.argmax(dim=1) == reference.argmax(dim=1)).float().mean())
    return Comparison(tuple(reference.shape), rel if np.isfinite(rel) else float("inf"), agreement)


def verify_sizes(input_size: Sequence[int], dynamic: bool = True) -> List[Tuple[int, int, int]]:
    """(batch, H, W) inputs to check: the export size and, for a dynamic graph, two more.

    61 x 87 reaches the pyramid pooling at 8 x 11 (not divisible by the scales 2, 3, 6) in a batch
    of 2; 37 x 29 at 5 x 4, smaller than the 6 x 6 pooling grid.
    """
    sizes = [(1, int(input_size[0]), int(input_size[1]))]
    if dynamic:
        sizes += [(2, 61, 87), (1, 37, 29)]
    return sizes


def _verify(runner: Callable[[torch.Tensor], torch.Tensor], model: nn.Module,
            sizes: Sequence[Tuple[int, int, int]], seed: int) -> VerifyReport:
    generator = torch.Generator().manual_seed(seed)
    model = model.eval()
    comparisons = []
    for batch, height, width in sizes:
        x = torch.randn(batch, 3, height, width, generator=generator)
        with torch.no_grad():
            reference = model(x)
        try:
            got = runner(x)
        except Exception as exc:  # the runtime refused the input: report it as this size's failure
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            comparisons.append(Comparison(tuple(reference.shape), float("inf"), 0.0, first[:200]))
            continue
        comparisons.append(compare_outputs(reference, got))
    return VerifyReport(comparisons)


def verify_onnx(path: Union[str, Path], model: nn.Module, sizes: Optional[Sequence[Tuple[int, int, int]]] = None,
                *, input_size: Optional[Sequence[int]] = None, providers: Optional[Sequence[str]] = None,
                threads: Optional[int] = None, seed: int = 0) -> VerifyReport:
    """Run the ONNX file through onnxruntime and ``model`` through PyTorch on the same random inputs.

    ``sizes``: (batch, H, W) triples; by default the graph's own size for a static graph, else
    :func:`verify_sizes` of ``input_size`` (default 512 x 512). The model is run as given (on the CPU).
    """
    runner = OnnxModel(path, providers=providers, threads=threads)
    if sizes is None:
        static = runner.static_size
        sizes = [(1, *static)] if static else verify_sizes(input_size or DEFAULT_SIZE)
    return _verify(runner, model.cpu(), sizes, seed)


def verify_torchscript(path: Union[str, Path], model: nn.Module,
                       sizes: Optional[Sequence[Tuple[int, int, int]]] = None, *,
                       input_size: Optional[Sequence[int]] = None, seed: int = 0) -> VerifyReport:
    """As :func:`verify_onnx` for a file written by :func:`export_torchscript`.

    ``torch.jit.load`` can run code stored in the file: verify only files you wrote yourself.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # TorchScript's deprecation notice
        runner = torch.jit.load(str(path), map_location="cpu")
    sizes = verify_sizes(input_size or DEFAULT_SIZE) if sizes is None else sizes
    return _verify(lambda x: runner(x), model.cpu(), sizes, seed)


# ------------------------------------------------------------------------------------------------
# running an exported file


def _providers(ort, device: Optional[str], providers: Optional[Sequence[str]]) -> List[str]:
    available = ort.get_available_providers()
    if providers is not None:
        missing = [p for p in providers if p not in available]
        if missing:
            raise PspZooError(f"onnxruntime here has no {', '.join(missing)}; available: {', '.join(available)}")
        return list(providers)
    if device is not None and torch.device(device).type == "cuda":
        if "CUDAExecutionProvider" not in available:
            raise PspZooError("this onnxruntime has no CUDA provider; install onnxruntime-gpu "
                              "or run the ONNX model on the CPU")
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def _session(ort, path: Union[str, Path, bytes], providers: List[str], threads: Optional[int]):
    if isinstance(path, (str, Path)) and not Path(path).is_file():
        raise PspZooError(f"ONNX file not found: {path}; check the path or write it with export_onnx")
    options = ort.SessionOptions()
    if threads is not None:
        if not isinstance(threads, int) or isinstance(threads, bool) or threads < 1:
            raise PspZooError(f"threads must be a whole number >= 1, got {threads!r}")
        options.intra_op_num_threads = threads
    try:
        return ort.InferenceSession(path if isinstance(path, bytes) else str(path), options, providers=providers)
    except Exception as exc:  # onnxruntime's own error classes differ between versions
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise PspZooError(f"{path if not isinstance(path, bytes) else 'the model'} is not a loadable ONNX "
                          f"model ({first[:200]}); export it again") from None


class OnnxModel:
    """An exported ONNX file as a callable model: NCHW float tensor in, logits tensor out.

    Behaves like a PSPNet for psp-zoo's inference functions (whole, slide, ms+flip):
    ``num_classes`` and ``align_corners`` come from the file's metadata (or the keywords), and
    the logits are returned on the input's device. ``device='cuda'`` uses onnxruntime's CUDA
    provider; ``providers`` names them explicitly. ``threads``: onnxruntime's intra-op threads
    (default: one per physical core).
    """

    def __init__(self, path: Union[str, Path, bytes], *, device: Optional[str] = None,
                 providers: Optional[Sequence[str]] = None, num_classes: Optional[int] = None,
                 align_corners: Optional[bool] = None, threads: Optional[int] = None):
        ort = require("onnxruntime", "running an ONNX model")
        self.path = None if isinstance(path, bytes) else Path(path)
        self.session = _session(ort, path, _providers(ort, device, providers), threads)
        meta = self.session.get_modelmeta().custom_metadata_map
        classes = meta.get("psp_zoo.num_classes", "")
        self.num_classes = num_classes if num_classes is not None else (int(classes) if classes else None)
        self.align_corners = (meta.get("psp_zoo.align_corners") == "True") if align_corners is None \
            else bool(align_corners)
        self.input_name = self.session.get_inputs()[0].name
        self.output_name = self.session.get_outputs()[0].name

    @property
    def static_size(self) -> Optional[Tuple[int, int]]:
        """(H, W) of a graph exported with fixed shapes; None when height and width are free."""
        height, width = self.session.get_inputs()[0].shape[2:]
        return (height, width) if isinstance(height, int) and isinstance(width, int) else None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        array = x.detach().to("cpu", torch.float32).contiguous().numpy()
        out = self.session.run([self.output_name], {self.input_name: array})[0]
        return torch.from_numpy(out).to(x.device)

    forward = __call__

    def eval(self) -> "OnnxModel":
        return self

    def to(self, *_args: Any, **_kwargs: Any) -> "OnnxModel":
        return self  # the session's providers decide where it runs

    def parameters(self):
        return iter(())


def onnx_backend_info(session) -> Dict[str, Any]:
    """What ran the model, for results records: backend, onnxruntime version, providers in use."""
    ort = require("onnxruntime", "running an ONNX model")
    session = getattr(session, "session", session)
    return {"backend": "onnxruntime", "version": ort.__version__, "providers": list(session.get_providers())}


# ------------------------------------------------------------------------------------------------
# one entry point per format, for the command line


def verify_safetensors(path: Union[str, Path], model: nn.Module, seed: int = 0) -> VerifyReport:
    """Load the file into a copy of ``model`` with :func:`psp_zoo.load_checkpoint`; compare logits."""
    from .checkpoint import load_checkpoint

    loaded = copy.deepcopy(model).cpu()
    load_checkpoint(loaded, path)
    return _verify(loaded.eval(), model.cpu(), verify_sizes(DEFAULT_SIZE, dynamic=True)[1:], seed)


def export_file(model: nn.Module, path: Union[str, Path], format: str = "onnx", *,
                input_size: Optional[Sequence[int]] = None, dynamic: bool = True,
                opset: Optional[int] = None, entry: Optional[Any] = None) -> Path:
    """Write ``model`` in ``format`` (one of :data:`FORMATS`); static shapes exist only for ONNX."""
    if format == "onnx":
        return export_onnx(model, path, input_size=input_size, dynamic=dynamic, opset=opset, entry=entry)
    if not dynamic or opset is not None:
        raise PspZooError(f"fixed shapes and opset apply to ONNX files only, not to {format}")
    if format == "torchscript":
        return export_torchscript(model, path, input_size=input_size, entry=entry)
    if format == "safetensors":
        return export_safetensors(model, path, entry=entry)
    raise PspZooError(f"unknown export format {format!r}; choose one of: {', '.join(FORMATS)}")


def verify_file(path: Union[str, Path], model: nn.Module, format: str = "onnx", *,
                input_size: Optional[Sequence[int]] = None, entry: Optional[Any] = None) -> VerifyReport:
    """The check matching :func:`export_file`: exported vs PyTorch logits on random inputs."""
    size = input_size or default_input_size(entry)
    if format == "onnx":
        return verify_onnx(path, model, input_size=size)
    if format == "torchscript":
        return verify_torchscript(path, model, input_size=size)
    return verify_safetensors(path, model)


def check_format(format: str) -> None:
    """Refuse an unknown format, or one whose packages are missing, before any model is built."""
    if format not in FORMATS:
        raise PspZooError(f"unknown export format {format!r}; choose one of: {', '.join(FORMATS)}")
    if format == "onnx":
        require("onnx", "exporting to ONNX")
        require("onnxruntime", "exporting to ONNX")
    if format == "safetensors":
        require("safetensors.torch", "writing safetensors files")
