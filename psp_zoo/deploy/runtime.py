"""Running an exported ONNX file with onnxruntime: :class:`OnnxModel` behaves like a PSPNet
for psp-zoo's inference functions (whole, slide, ms+flip). It does not import the exporter."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch

from ..errors import PspZooError
from ..optional import require

__all__ = ["OnnxModel", "onnx_backend_info"]


def _onnxruntime():
    return require("onnxruntime", "onnx", purpose="running an ONNX model")


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


def _session(ort, path: Union[str, Path, bytes], providers: List[str], threads: Optional[int], spinning: bool):
    if isinstance(path, (str, Path)) and not Path(path).is_file():
        raise PspZooError(f"ONNX file not found: {path}; check the path or write it with export_onnx")
    options = ort.SessionOptions()
    if threads is not None:
        if not isinstance(threads, int) or isinstance(threads, bool) or threads < 1:
            raise PspZooError(f"threads must be a whole number >= 1, got {threads!r}")
        options.intra_op_num_threads = threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
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
    (default: one per physical core). ``spinning``: whether idle threads busy-wait for the next
    operator (onnxruntime's own default); off here, because spinning threads keep the cores busy
    after each run, away from data loading and whatever runs next.
    """

    def __init__(self, path: Union[str, Path, bytes], *, device: Optional[str] = None,
                 providers: Optional[Sequence[str]] = None, num_classes: Optional[int] = None,
                 align_corners: Optional[bool] = None, threads: Optional[int] = None, spinning: bool = False):
        ort = _onnxruntime()
        self.path = None if isinstance(path, bytes) else Path(path)
        self.threads, self.spinning = threads, bool(spinning)
        self.session = _session(ort, path, _providers(ort, device, providers), threads, self.spinning)
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
    ort = _onnxruntime()
    session = getattr(session, "session", session)
    return {"backend": "onnxruntime", "version": ort.__version__, "providers": list(session.get_providers())}

