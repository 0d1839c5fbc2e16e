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
    "PspZooError": "errors", "ManifestError": "errors", "UnknownModelError": "errors", "CheckpointError": "errors",
    "DownloadError": "errors", "DatasetError": "errors", "ResultsError": "errors",
    "Checkpoint": "manifest.loading", "Published": "manifest.loading", "DatasetSpec": "manifest.loading",
    "EvalSettings": "manifest.loading", "get_checkpoint": "manifest.loading", "get_manifest": "manifest.loading",
    "list_models": "manifest.loading", "load_manifest": "manifest.loading",
    "FetchOptions": "hub.options", "SpeedOptions": "hub.options",
    "download": "hub.cache", "cache_dir": "hub.cache", "cached_path": "hub.cache", "cache_state": "hub.cache",
    "is_cached": "hub.cache",
    "PSPNet": "model",
    "load_checkpoint": "model.checkpoint", "read_checkpoint": "model.checkpoint",
    "create_model": "model.factory", "resolve": "model.factory",
    "SegmentationDataset": "datasets.readers", "make_loader": "datasets.readers", "classes": "datasets.readers",
    "palette": "datasets.readers",
    "rescale_size": "datasets.transforms", "ms_flip_scales": "datasets.transforms",
    "whole_inference": "evaluation.inference", "slide_inference": "evaluation.inference",
    "ms_flip_inference": "evaluation.inference", "predict_probs": "evaluation.inference",
    "optimize": "model.optimization",
    "ConfusionMatrix": "evaluation.metrics",
    "ResultRecord": "results.records", "Metrics": "results.records", "read_result": "results.records",
    "read_results": "results.records", "write_result": "results.records",
    "evaluate": "evaluation.evaluator",
    "reproduce": "evaluation.reproduction",
    "predict": "prediction.predictor", "Predictor": "prediction.predictor",
    "export_onnx": "deploy.export",
    "verify_onnx": "deploy.verify",
    "OnnxModel": "deploy.runtime",
    "Recipe": "training.recipe", "recipe_for": "training.recipe",
    "Trainer": "training.trainer",
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
