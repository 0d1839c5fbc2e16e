"""Where a number was measured: the device to run on, the CPU or GPU by name, and the versions.

Every results record carries :func:`environment_info`; a reproduced number means nothing without
the device and software that produced it (docs/reference.md, "Speed and memory as published").
"""
from __future__ import annotations

import contextlib
import platform
import subprocess
from pathlib import Path
from typing import Any, Dict, Iterator, Optional, Union

import numpy as np
import torch

from ._version import __version__
from .errors import PspZooError

__all__ = ["usable_device", "cpu_name", "cpu_flags", "environment_info", "float32_flags", "exact_float32",
           "exact_float32_flags", "on_device"]

DeviceLike = Union[None, str, torch.device]


def usable_device(device: DeviceLike = None) -> torch.device:
    """``device`` as a torch.device that works here (None: CUDA when available, else the CPU).

    A misspelt or absent device (``cuda`` on a machine without one, ``cuda:7`` of two) raises
    PspZooError saying so, instead of a RuntimeError from deep inside torch.
    """
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        raise PspZooError(f"unknown device {str(device)!r}; use cpu, cuda or cuda:N") from None
    reason = _unusable_reason(parsed)
    if reason is None:
        return parsed
    raise PspZooError(f"device {str(device)!r} is not usable here ({reason}); use the cpu, or a "
                      f"device that the selftest lists")


def _unusable_reason(device: torch.device) -> Optional[str]:
    if device.type not in ("cpu", "cuda"):
        return "psp-zoo runs on cpu and cuda devices"
    if device.type == "cuda" and not torch.cuda.is_available():
        return "no CUDA device is available to this torch"
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        return f"there are {torch.cuda.device_count()} CUDA devices, numbered from 0"
    try:
        torch.empty(0, device=device)  # the one check that covers every other kind of device
        return None
    except (RuntimeError, AssertionError) as exc:
        text = str(exc).strip()
        return text.split(". ")[0].splitlines()[0] if text else type(exc).__name__


def float32_flags() -> Dict[str, Any]:
    """The switches that decide whether float32 matmuls and convolutions are really float32.

    On Ampere and later GPUs, TF32 (``allow_tf32``) rounds the inputs of matmuls / convolutions
    to 10 mantissa bits: cuDNN convolutions use it by default, so "fp32" would not be fp32.
    """
    return {"cuda_matmul_allow_tf32": bool(torch.backends.cuda.matmul.allow_tf32),
            "cudnn_allow_tf32": bool(torch.backends.cudnn.allow_tf32),
            "float32_matmul_precision": _matmul_precision()}


def _matmul_precision() -> Optional[str]:
    try:
        return torch.get_float32_matmul_precision()
    except RuntimeError:  # torch >= 2.9 refuses to answer after a mix of its old and new switches
        return None


@contextlib.contextmanager
def exact_float32() -> Iterator[Dict[str, Any]]:
    """TF32 off (matmul, cuDNN, ``float32_matmul_precision('highest')``) inside the block, as on the
    V100 of the published numbers; the previous settings are restored afterwards. Yields the
    flags in effect, which results records state."""
    matmul, cudnn, precision = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
                                _matmul_precision())
    torch.set_float32_matmul_precision("highest")  # turns cuda.matmul.allow_tf32 off with it
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield float32_flags()
    finally:
        if precision is not None:
            torch.set_float32_matmul_precision(precision)  # restores allow_tf32 with it
        if torch.backends.cuda.matmul.allow_tf32 != matmul:
            torch.backends.cuda.matmul.allow_tf32 = matmul
        torch.backends.cudnn.allow_tf32 = cudnn


def exact_float32_flags() -> Dict[str, Any]:
    """The flags :func:`exact_float32` puts in effect on this torch, as records state them."""
    with exact_float32() as flags:
        return flags


def on_device(device: DeviceLike) -> contextlib.AbstractContextManager:
    """``device`` made the current CUDA device inside the block (a no-op for the CPU), so that
    whatever uses "the current device" (pinned memory, streams, a DataLoader's pinning thread)
    lands on it and not on GPU 0."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _cpuinfo_field(name: str) -> Optional[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(name):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_name() -> str:
    """The processor's model name (from /proc/cpuinfo on Linux)."""
    return _cpuinfo_field("model name") or platform.processor() or platform.machine() or "cpu"


def cpu_flags() -> Dict[str, bool]:
    """The vector extensions that decide CPU speed: AVX2, AVX-512, AMX, native bf16."""
    flags = set((_cpuinfo_field("flags") or "").split())
    return {"avx2": "avx2" in flags, "avx512": "avx512f" in flags,
            "amx": bool({"amx_tile", "amx_bf16"} & flags),
            "native_bf16": bool({"avx512_bf16", "amx_bf16"} & flags)}


def _git_revision() -> Optional[str]:
    """The checkout's commit (``+dirty`` with local edits), or None for an installed package."""
    root = Path(__file__).resolve().parents[1]

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
    try:
        # only psp-zoo's own repository counts, not one that happens to contain site-packages
        if Path(git("rev-parse", "--show-toplevel")).resolve() != root:
            return None
        dirty = git("status", "--porcelain", "--untracked-files=no")
        return git("rev-parse", "--short=12", "HEAD") + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def environment_info(device: DeviceLike = "cpu") -> Dict[str, Any]:
    """Device and software versions that produced a number; nothing identifying the host."""
    device = torch.device(device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    elif device.type == "cpu":
        name, cudnn = cpu_name(), None
    else:
        raise PspZooError(f"unsupported device {str(device)!r}; use 'cpu' or 'cuda[:N]'")
    return {
        "device_kind": device.type,
        "device_name": name,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": None if cudnn is None else str(cudnn),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "psp_zoo": __version__,
        "git_revision": _git_revision(),
        "platform": platform.platform(),
    }
