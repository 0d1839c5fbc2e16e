"""Reading published checkpoint files safely and strictly into a model.

Checkpoints are untrusted input: they are always read with ``torch.load(weights_only=True)``.
The only globals allowed beyond torch's own are the numpy scalar/array types that files written
by older mmcv carry in ``meta`` (a palette, a best score); anything else is refused.
"""
from __future__ import annotations

import pickle
import re
from collections import OrderedDict
from pathlib import Path
from typing import Mapping, Optional, Tuple, Union

import numpy as np
import torch
from torch import nn

from ..errors import CheckpointError

__all__ = ["load_checkpoint", "read_checkpoint", "read_safetensors", "load_checkpoint_file", "checkpoint_parts",
           "SEMSEG_NAMES", "semseg_name", "is_semseg_layout", "to_semseg_names"]

_SHOW = 5  # mismatches named in an error message


def _numpy_globals() -> list:
    """numpy types that old mmcv ``meta`` dicts contain, under both numpy 1.x and 2.x paths."""
    found = [np.dtype, np.ndarray]
    for module_name in ("numpy._core.multiarray", "numpy.core.multiarray"):
        try:
            module = __import__(module_name, fromlist=["scalar", "_reconstruct"])
        except ImportError:
            continue
        found += [getattr(module, "scalar"), getattr(module, "_reconstruct")]
        break
    found += [getattr(np.dtypes, n) for n in dir(np.dtypes) if n.endswith("DType")]
    return found


def _check_readable(path: Path) -> None:
    """A missing path, a folder or an unreadable file is said as such, not as a broken download."""
    if path.is_dir():
        raise CheckpointError(f"{path} is a folder, not a checkpoint file; pass the path of the weights file")
    if not path.is_file():
        raise CheckpointError(f"checkpoint file not found: {path}; check the path",
                              cli_hint="or run `psp-zoo get NAME` to download a published one")
    try:  # a file we may not open is not a broken download: do not tell the user to delete it
        open(path, "rb").close()
    except OSError as exc:
        raise CheckpointError(f"cannot read checkpoint {path}: {exc.strerror or exc}; check its permissions") from None


def _corrupt(path: Path) -> str:
    # torch's own text (zip internals, advice meant for its developers) helps no one here
    return f"{path} is truncated or corrupt, not a readable PyTorch checkpoint; delete it and download it again"


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def _refused_global(exc: BaseException) -> str:
    """The global the safe unpickler refused, from torch's message, without its terminal colours."""
    text = _ANSI.sub("", str(exc))
    found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
    if found:
        return f"it refers to {found.group(1)}"
    first = next((line.strip() for line in text.splitlines() if line.strip()), type(exc).__name__)
    return first[:160]


def read_checkpoint(path: Union[str, Path]) -> Tuple["OrderedDict[str, torch.Tensor]", dict]:
    """Return ``(state_dict, meta)`` from a published file, without ever unpickling arbitrary code.

    Accepts ``{'meta': ..., 'state_dict': ...}`` (other top-level fields, such as the PSPNet authors'
    ``epoch`` and ``optimizer``, are ignored), a bare state dict, and ``module.``-prefixed keys.
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        _check_readable(path)
        return read_safetensors(path)
    return checkpoint_parts(load_checkpoint_file(path), path)


def load_checkpoint_file(path: Union[str, Path]) -> object:
    """The object a ``.pth`` file holds, unpickled safely (``weights_only=True``, never a fallback)."""
    path = Path(path)
    _check_readable(path)
    try:
        with torch.serialization.safe_globals(_numpy_globals()):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "global" in str(exc).lower() or "weights_only" in str(exc):
            raise CheckpointError(
                f"refused to load {path}: it needs arbitrary unpickling, which could run code "
                f"({_refused_global(exc)}). psp-zoo loads weights only; re-save the file as a plain "
                f"state dict from code you trust"
            ) from None
        raise CheckpointError(_corrupt(path)) from None
    except Exception:  # any other failure of the (safe) unpickler: truncated or foreign bytes
        raise CheckpointError(_corrupt(path)) from None
    return obj


def checkpoint_parts(obj: object, path: Union[str, Path]) -> Tuple["OrderedDict[str, torch.Tensor]", dict]:
    """``(state_dict, meta)`` of what ``load_checkpoint_file(path)`` returned (see ``read_checkpoint``)."""
    if isinstance(obj, Mapping) and "state_dict" in obj:
        state_dict, meta = obj["state_dict"], obj.get("meta") or {}
    else:
        state_dict, meta = obj, {}
    if not isinstance(state_dict, Mapping) or not state_dict or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state_dict.items()
    ):
        raise CheckpointError(f"{path} holds no state dict of tensors; expected mmseg's "
                              f"{{'meta', 'state_dict'}} format or a plain state dict")
    if all(k.startswith("module.") for k in state_dict):
        state_dict = OrderedDict((k[len("module."):], v) for k, v in state_dict.items())
    return OrderedDict(state_dict), dict(meta) if isinstance(meta, Mapping) else {}


def read_safetensors(path: Union[str, Path]) -> Tuple["OrderedDict[str, torch.Tensor]", dict]:
    """``(state_dict, meta)`` from a ``.safetensors`` file: plain tensors, no code can run by design.

    ``meta`` is the file's string metadata (what ``psp_zoo.export_safetensors`` recorded).
    """
    try:
        from safetensors import SafetensorError, safe_open
    except ImportError:
        raise CheckpointError(f"reading {Path(path).name} needs the safetensors package, which is not "
                              f"installed; install it with: pip install 'psp-zoo[safetensors]'") from None
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            state_dict = OrderedDict((key, handle.get_tensor(key)) for key in handle.keys())
            meta = dict(handle.metadata() or {})
    except (SafetensorError, OSError, ValueError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise CheckpointError(f"{path} is not a readable safetensors file ({first[:160]}); "
                              f"write it again or download it again") from None
    if not state_dict:
        raise CheckpointError(f"{path} holds no tensors; expected a PSPNet state dict")
    return state_dict, meta


# --------------------------------------------------------------------------------------------
# the PSPNet authors' files (hszhao/semseg): their module names for psp-zoo's tensors

#: psp-zoo's key prefix -> the authors' (model/pspnet.py: ``layer0`` is the deep stem's Sequential
#: with the same indices, ``ppm.features.{i}`` pool / conv / BN / ReLU, ``cls`` and ``aux`` conv / BN
#: / ReLU / Dropout2d / conv). The rest of a key (``weight``, ``bn2.running_var``...) is the same.
SEMSEG_NAMES = (
    (r"backbone\.stem\.", "layer0."),
    (r"backbone\.(layer[1-4])\.", r"\1."),
    (r"decode_head\.psp_modules\.(\d+)\.1\.conv\.", r"ppm.features.\1.1."),
    (r"decode_head\.psp_modules\.(\d+)\.1\.bn\.", r"ppm.features.\1.2."),
    (r"decode_head\.bottleneck\.conv\.", "cls.0."),
    (r"decode_head\.bottleneck\.bn\.", "cls.1."),
    (r"decode_head\.conv_seg\.", "cls.4."),
    (r"auxiliary_head\.convs\.0\.conv\.", "aux.0."),
    (r"auxiliary_head\.convs\.0\.bn\.", "aux.1."),
    (r"auxiliary_head\.conv_seg\.", "aux.4."),
)
_SEMSEG_RULES = tuple((re.compile(pattern), repl) for pattern, repl in SEMSEG_NAMES)
_SEMSEG_TOP = re.compile(r"^(layer[0-4]|ppm|cls|aux)\.")


def semseg_name(key: str) -> Optional[str]:
    """The PSPNet authors' name of psp-zoo's state-dict key, or None where their network has none."""
    for pattern, repl in _SEMSEG_RULES:
        if pattern.match(key):
            return pattern.sub(repl, key, count=1)
    return None


def is_semseg_layout(state_dict: Mapping[str, torch.Tensor]) -> bool:
    """True for a state dict in the authors' names (``layer0..4``, ``ppm``, ``cls``, ``aux``)."""
    return bool(state_dict) and all(_SEMSEG_TOP.match(key) for key in state_dict)


def to_semseg_names(state_dict: Mapping[str, torch.Tensor]) -> "OrderedDict[str, torch.Tensor]":
    """psp-zoo's state dict of the authors' network under the authors' names (for writing their format)."""
    renamed = OrderedDict()
    for key, value in state_dict.items():
        name = semseg_name(key)
        if name is None:
            raise CheckpointError(f"{key} has no counterpart in the PSPNet authors' network; build the model "
                                  f"with their family (deep stem, 128 stem channels)")
        renamed[name] = value
    return renamed


def _from_semseg_names(model: nn.Module, state_dict: Mapping[str, torch.Tensor],
                       path: Path) -> "OrderedDict[str, torch.Tensor]":
    """The authors' state dict under psp-zoo's names, exactly and strictly: every key of the file must
    be one of the model's under its authors' name and vice versa; mismatches are named as the file names them."""
    ours = {name: key for key in model.state_dict() for name in [semseg_name(key)] if name is not None}
    expected = OrderedDict((name, model.state_dict()[key]) for name, key in ours.items())
    unnamed = [key for key in model.state_dict() if semseg_name(key) is None]
    problems = _mismatches(expected, state_dict)
    if unnamed:
        problems.append(f"the model has {len(unnamed)} key(s) the authors' network lacks: "
                        f"{', '.join(unnamed[:_SHOW])}")
    if problems:
        raise CheckpointError(
            f"{path.name} (the PSPNet authors' layout) does not fit {type(model).__name__}: {'; '.join(problems)}. "
            f"Check that the model is their network (family 'semseg') with the file's depth and num_classes")
    return OrderedDict((ours[name], value) for name, value in state_dict.items())


def _mismatches(expected: Mapping[str, torch.Tensor], state_dict: Mapping[str, torch.Tensor]) -> list:
    problems = []
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    shapes = [
        f"{k} {tuple(state_dict[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items() if k in state_dict and state_dict[k].shape != v.shape
    ]
    for label, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes)):
        if items:
            more = f" (+{len(items) - _SHOW} more)" if len(items) > _SHOW else ""
            problems.append(f"{len(items)} {label}: {', '.join(items[:_SHOW])}{more}")
    return problems


def load_checkpoint(model: nn.Module, path: Union[str, Path]) -> dict:
    """Load a published file into ``model`` strictly (every key and shape must match); return meta.

    A file of the PSPNet authors (``{'epoch', 'state_dict', 'optimizer'}``, keys ``module.layer0...``)
    is read the same way (``optimizer`` ignored, DDP's ``module.`` stripped) and its keys are mapped
    onto the model's one by one (:data:`SEMSEG_NAMES`): nothing unexpected, nothing missing.
    """
    state_dict, meta = read_checkpoint(path)
    if is_semseg_layout(state_dict):
        state_dict = _from_semseg_names(model, state_dict, Path(path))
    problems = _mismatches(model.state_dict(), state_dict)
    if problems:
        raise CheckpointError(
            f"{Path(path).name} does not fit {type(model).__name__}: {'; '.join(problems)}. "
            f"Check that the checkpoint's depth, widths and num_classes match the model"
        )
    model.load_state_dict(_in_model_dtypes(model, state_dict), strict=True)
    return meta


def _in_model_dtypes(model: nn.Module,
                     state_dict: Mapping[str, torch.Tensor]) -> "OrderedDict[str, torch.Tensor]":
    """Cast floating tensors to the model's dtype: fp16-trained files hold half tensors.

    half -> float32 is exact (every half value is a float32 value), so an fp32 model holds exactly
    the published weights. Non-floating entries (BN's ``num_batches_tracked``) pass unchanged.
    """
    expected = {k: v.dtype for k, v in model.state_dict().items()}
    return OrderedDict(
        (k, v.to(expected[k]) if v.is_floating_point() and expected[k].is_floating_point else v)
        for k, v in state_dict.items()
    )
