"""The optional dependencies, imported on first use with one message when they are missing.

Each optional module comes with a pip extra of psp-zoo: ``onnx`` (onnx, onnxruntime),
``safetensors`` and ``plot`` (matplotlib). :func:`require` is the only place that imports them
by name, so every command says the same thing about a missing one.
"""
from __future__ import annotations

import importlib
from types import ModuleType

from .errors import PspZooError

__all__ = ["require"]


def require(module: str, extra: str, *, purpose: str = "this") -> ModuleType:
    """Import ``module`` (e.g. 'onnxruntime'), or say that ``python -m pip install 'psp-zoo[extra]'`` brings it.

    ``purpose`` names what needed it ('exporting to ONNX', 'plotting') in the message.
    """
    try:
        return importlib.import_module(module)
    except ImportError:
        raise PspZooError(f"{purpose} needs {module.split('.')[0]}, which is not installed; install it with "
                          f"`python -m pip install 'psp-zoo[{extra}]'`") from None
