"""Labels for the user's own images: ``predictor.py`` (``Predictor``, ``predict``) and ``pictures.py``
(the output pictures and files). ``psp_zoo.prediction`` keeps the names it had as one module.

The names are loaded on first use (PEP 562): the command line imports ``pictures`` (torch-free) to
build its parser, and must not pay for ``predictor``'s torch.
"""
from __future__ import annotations

import importlib
from typing import Any, List

# the public names of the module this package replaced
__all__: List[str] = ["Predictor", "predict", "predict_files", "read_input_image", "expand_image_args",
                      "output_stems", "check_output_format", "IMAGE_EXTENSIONS", "OUTPUT_FORMATS"]


def __getattr__(name: str) -> Any:
    if name not in __all__:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(".predictor", __name__), name)
    globals()[name] = value
    return value
