"""psp-zoo: fetch, run and re-measure the published mmsegmentation PSPNet checkpoints."""
from .checkpoint import load_checkpoint, read_checkpoint
from .datasets import SegmentationDataset, classes, make_loader, palette
from .errors import (CheckpointError, DatasetError, DownloadError, ManifestError, PspZooError,
                     UnknownModelError)
from .download import cache_dir, cache_state, cached_path, download, is_cached
from .evaluate import evaluate
from .export import OnnxModel, export_onnx, verify_onnx
from .factory import create_model
from .inference import ms_flip_inference, predict_probs, slide_inference, whole_inference
from .manifest import Checkpoint, Published, get_checkpoint, get_manifest, list_models, load_manifest
from .metrics import ConfusionMatrix
from .model import PSPNet
from .optimize import optimize
from .prediction import Predictor, predict
from .transforms import ms_flip_scales, rescale_size

__version__ = "0.1.0"

__all__ = [
    "PSPNet", "Checkpoint", "Published", "create_model", "get_checkpoint", "get_manifest",
    "list_models", "load_checkpoint", "load_manifest", "read_checkpoint",
    "download", "cache_dir", "cached_path", "cache_state", "is_cached",
    "evaluate", "whole_inference", "slide_inference", "ms_flip_inference", "predict_probs",
    "ConfusionMatrix", "SegmentationDataset", "make_loader", "classes", "palette", "rescale_size",
    "ms_flip_scales", "predict", "Predictor", "optimize", "export_onnx", "verify_onnx", "OnnxModel",
    "PspZooError", "ManifestError", "UnknownModelError", "CheckpointError", "DownloadError", "DatasetError",
]
