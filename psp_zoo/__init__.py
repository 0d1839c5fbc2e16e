"""psp-zoo: fetch, run and re-measure the published mmsegmentation PSPNet checkpoints."""
from .checkpoint import load_checkpoint, read_checkpoint
from .errors import (CheckpointError, DatasetError, DownloadError, ManifestError, PspZooError,
                     UnknownModelError)
from .download import cache_dir, cache_state, cached_path, download, is_cached
from .factory import create_model
from .manifest import Checkpoint, Published, get_checkpoint, get_manifest, list_models, load_manifest
from .model import PSPNet

__version__ = "0.1.0"

__all__ = [
    "PSPNet", "Checkpoint", "Published", "create_model", "get_checkpoint", "get_manifest",
    "list_models", "load_checkpoint", "load_manifest", "read_checkpoint",
    "download", "cache_dir", "cached_path", "cache_state", "is_cached",
    "PspZooError", "ManifestError", "UnknownModelError", "CheckpointError", "DownloadError", "DatasetError",
]
