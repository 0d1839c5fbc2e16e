"""Where a number was measured: the device to run on, the CPU or GPU by name, and the versions.

Every results record carries :func:`environment_info`; a reproduced number means nothing without
the device and software that produced it (docs/reference.md, "Speed and memory as published").
"""
from __future__ import annotations

import platform
import subprocess
from pathlib import Path
from typing import Any, Dict, Optional, Union

import numpy as np
import torch

from ._version import __version__
from .errors import PspZooError

__all__ = ["usable_device", "cpu_name", "cpu_flags", "environment_info"]

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
