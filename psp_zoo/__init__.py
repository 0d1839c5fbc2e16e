"""psp-zoo: fetch, run and re-measure the published mmsegmentation PSPNet checkpoints."""
from .checkpoint import load_checkpoint, read_checkpoint
from .errors import (CheckpointError, DatasetError, DownloadError, ManifestError, PspZooError,
                     UnknownModelError)
from .factory import create_model
from .manifest import Checkpoint, Published, get_checkpoint, get_manifest, list_models, load_manifest
from .model import PSPNet
from .optimize import optimize

__version__ = "0.1.0"

__all__ = [
    "PSPNet", "Checkpoint", "Published", "create_model", "get_checkpoint", "get_manifest",
    "list_models", "load_checkpoint", "load_manifest", "optimize", "read_checkpoint",
    "PspZooError", "ManifestError", "UnknownModelError", "CheckpointError", "DownloadError", "DatasetError",
]
