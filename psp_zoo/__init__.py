"""psp-zoo: fetch, run and re-measure the published mmsegmentation PSPNet checkpoints.

The public API is imported on first use (PEP 562), so ``import psp_zoo`` and the command line's
``--help``, ``list`` and ``info`` do not pay for importing torch.
"""
from __future__ import annotations

import importlib
from typing import Any, Dict, List

from ._version import __version__

# public name -> the module that defines it (pipeline order)
_API: Dict[str, str] = {
    "PspZooError": "errors", "ManifestError": "errors", "UnknownModelError": "errors",
    "CheckpointError": "errors", "DownloadError": "errors", "DatasetError": "errors", "ResultsError": "errors",
    "Checkpoint": "manifest", "Published": "manifest", "DatasetSpec": "manifest", "EvalSettings": "manifest",
    "get_checkpoint": "manifest", "get_manifest": "manifest", "list_models": "manifest",
    "load_manifest": "manifest",
    "FetchOptions": "options", "SpeedOptions": "options",
    "download": "hub", "cache_dir": "hub", "cached_path": "hub", "cache_state": "hub",
    "is_cached": "hub",
    "PSPNet": "model",
    "load_checkpoint": "checkpoint", "read_checkpoint": "checkpoint",
    "create_model": "factory", "resolve": "factory",
    "SegmentationDataset": "datasets", "make_loader": "datasets", "classes": "datasets", "palette": "datasets",
    "rescale_size": "transforms", "ms_flip_scales": "transforms",
    "whole_inference": "inference", "slide_inference": "inference", "ms_flip_inference": "inference",
    "predict_probs": "inference",
    "optimize": "optimization",
    "ConfusionMatrix": "metrics",
    "ResultRecord": "records", "Metrics": "records", "read_result": "records", "read_results": "records",
    "write_result": "records",
    "evaluate": "evaluation", "reproduce": "reproduction",
    "predict": "prediction", "Predictor": "prediction",
    "export_onnx": "deploy.export", "verify_onnx": "deploy.verify", "OnnxModel": "deploy.runtime",
    "Recipe": "training.recipe", "recipe_for": "training.recipe", "Trainer": "training.trainer",
    "train": "training.loop", "TrainResult": "training.loop", "RunOptions": "training.loop",
}

__all__: List[str] = ["__version__", *_API]


def __getattr__(name: str) -> Any:
    module = _API.get(name)
    if module is None:
        raise AttributeError(f"module 'psp_zoo' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # the next access is a plain attribute
    return value


def __dir__() -> List[str]:
    return sorted(set(globals()) | set(__all__))
