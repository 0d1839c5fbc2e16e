"""Scoring a model the way the tables were measured: ``inference.py`` (whole / slide / ms+flip),
``semseg_inference.py`` (the PSPNet authors' test protocol, and the protocol an entry's test mode picks),
``metrics.py`` (the confusion matrix), ``resume.py``, ``scoring.py`` (the one scoring loop), ``measure.py``
(speed and memory), ``evaluator.py`` (``evaluate``), ``reproduction.py`` (``reproduce``).
``psp_zoo.evaluation`` keeps the names it had as one module.
"""
from .evaluator import (  # the public names of the module this package replaced
    evaluate,
    recorded_settings,
)

__all__ = ["evaluate", "recorded_settings"]
