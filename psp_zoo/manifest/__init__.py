"""The manifest: the checkpoints and datasets psp-zoo knows, as frozen records.

``entries.py`` (the records), ``schema.py`` (the fields and their validation), ``backbones.py`` (the
results tables' backbone names), ``loading.py`` (the built-in ``model_index.yml`` plus user manifests,
lookup by name). ``psp_zoo.manifest`` keeps the names it had as one module.
"""
from .loading import (  # the public names of the module this package replaced
    DATASETS,
    IGNORE_INDEX,
    LABEL_MAPS,
    Checkpoint,
    DatasetSpec,
    EvalSettings,
    Layout,
    Manifest,
    Published,
    get_checkpoint,
    get_manifest,
    list_models,
    load_manifest,
)

__all__ = ["DATASETS", "IGNORE_INDEX", "LABEL_MAPS", "Published", "EvalSettings", "Layout", "DatasetSpec",
           "Checkpoint", "Manifest", "load_manifest", "get_manifest", "get_checkpoint", "list_models"]
