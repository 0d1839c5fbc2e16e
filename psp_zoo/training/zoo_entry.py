"""A fine-tuned checkpoint as a manifest entry: ``work_dir/model_index.yml``, self-contained.

The best checkpoint of the run (or its last, when nothing was validated) is written once more in
the published form (``{'meta', 'state_dict'}``, the optimizer dropped as mmseg's
``publish_model.py`` drops it) under a name psp-zoo's loader accepts as it is:
``<name>_<YYYYmmdd_HHMMSS>-<first 8 hex of its SHA-256>.pth``. The manifest beside it declares the
dataset (the full declaration, so the work dir needs no other manifest) and one entry: name, file
URL, hash prefix and full SHA-256, dataset, backbone and widths, crop, schedule (the iterations
run), test settings, the training recipe, the measured validation mIoU as its published number,
and the checkpoint it was fine-tuned from. ``psp-zoo evaluate / predict / export / reproduce /
tables / info NAME --manifest work_dir/model_index.yml`` then take it by name.
"""
from __future__ import annotations

import datetime
import hashlib
import io
import math
import urllib.parse
from dataclasses import asdict
from pathlib import Path
from typing import Optional, Sequence, Tuple

import torch
import yaml

from ..files import atomic_write
from ..manifest.loading import DatasetSpec, Layout, user_manifest_paths
from ..model.checkpoint import read_checkpoint

__all__ = ["dataset_declaration", "manifest_paths", "write_run_manifest", "write_zoo_manifest",
           "published_entry"]

_LAYOUT_FIELDS = ("images", "labels", "image_suffix", "label_suffix", "split", "fallback_label_suffix", "label_map")
_HEADER = ("# psp-zoo manifest written by a fine-tuning run: its dataset's declaration and the fine-tuned\n"
           "# checkpoint as an entry. Use it with --manifest (or $PSP_ZOO_MANIFEST), e.g.\n"
           "#   psp-zoo evaluate {name} --manifest {path} --data-root DIR\n")


def manifest_paths(manifest) -> Tuple[str, ...]:
    """The user manifests in force (``manifest``, else ``$PSP_ZOO_MANIFEST``) as a tuple of paths."""
    return user_manifest_paths(manifest)


def _layout(layout: Layout) -> dict:
    return {key: getattr(layout, key) for key in _LAYOUT_FIELDS if getattr(layout, key) is not None}


def dataset_declaration(spec: DatasetSpec) -> dict:
    """``spec`` as a manifest ``datasets:`` entry that reads back to the same declaration."""
    test = {key: list(v) if isinstance(v, tuple) else v for key, v in asdict(spec.test).items() if v is not None}
    layout = {"folders": list(spec.layout.folders), **_layout(spec.layout)}
    if spec.layout.train:
        layout["train"] = [_layout(part) for part in spec.layout.train]
    declaration = {
        "title": spec.title, "num_classes": spec.num_classes, "classes": list(spec.classes),
        "palette": [list(colour) for colour in spec.palette], "img_scale": list(spec.img_scale),
        "reduce_zero_label": spec.reduce_zero_label, "ignore_index": spec.ignore_index,
        "train_images_per_gpu": spec.train_images_per_gpu, "test": test, "layout": layout,
    }
    if spec.train:
        declaration["train"] = {k: list(v) if isinstance(v, tuple) else v for k, v in dict(spec.train).items()}
    return declaration


def _dump(path: Path, header: str, datasets: dict, models: Sequence[dict]) -> Path:
    data = {"version": 1, "datasets": datasets, "models": list(models)}
    return atomic_write(path, header + yaml.safe_dump(data, sort_keys=False, width=120, default_flow_style=None))


def write_run_manifest(path: Path, spec: DatasetSpec, entry: dict) -> Path:
    """The manifest a fine-tuning run trains from: the dataset and the entry whose weights start it."""
    datasets = {} if spec.source == "model_index.yml" else {spec.key: dataset_declaration(spec)}
    return _dump(path, "# the entry a fine-tuning run trains (its weights: the starting weights)\n", datasets, [entry])


def _publish(work_dir: Path, name: str, checkpoint: Path, finetuned: dict) -> Tuple[Path, str]:
    """``checkpoint`` without its optimizer, as ``<name>_<stamp>-<sha8>.pth``; (path, full SHA-256).
    Its meta also says where the fine-tune started and what it re-initialized (``psp_zoo_finetune``)."""
    state_dict, meta = read_checkpoint(checkpoint)
    buffer = io.BytesIO()
    torch.save({"meta": dict(meta, psp_zoo_finetune=finetuned), "state_dict": state_dict}, buffer)
    data = buffer.getvalue()
    digest = hashlib.sha256(data).hexdigest()
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d_%H%M%S")
    path = work_dir / f"{name}_{stamp}-{digest[:8]}.pth"
    for old in work_dir.glob(f"{name}_????????_??????-????????.pth"):  # an earlier publication of this run
        old.unlink()
    return atomic_write(path, data), digest


def write_zoo_manifest(work_dir: Path, name: str, result, spec: DatasetSpec, manifest: Sequence[str],
                       source: dict, reinitialized: Sequence[str]) -> Tuple[Path, Optional[float]]:
    """Publish the run's best (else last) checkpoint and write ``work_dir/model_index.yml``.

    ``manifest``: the manifests the run read (its own entry in the last); ``source``: the
    ``finetuned_from`` record; ``reinitialized``: the layers that did not start from it. Returns the
    published file and the mIoU it claims (percent)."""
    work_dir = Path(work_dir)
    run_entry = yaml.safe_load(Path(manifest[-1]).read_text())["models"][0]
    finetuned = {"source": dict(source), "reinitialized": list(reinitialized)}
    weights, digest = _publish(work_dir, name, result.best or result.checkpoint, finetuned)
    miou = result.best_miou if result.best is not None else None
    miou = None if miou is None or not math.isfinite(miou) or miou <= 0 else round(float(miou), 2)
    recipe = result.recipe
    entry = dict(run_entry, weights=weights.resolve().as_uri(), hash=digest[:8], sha256=digest,
                 crop_size=list(recipe.crop_size), schedule=recipe.max_iters,
                 published={"mIoU": miou} if miou is not None else {}, train=recipe.settings(),
                 finetuned_from=dict(source))
    datasets = {} if spec.source == "model_index.yml" else {spec.key: dataset_declaration(spec)}
    path = work_dir / "model_index.yml"
    _dump(path, _HEADER.format(name=name, path=path), datasets, [entry])
    return weights, miou


def published_entry(work_dir: Path, name: str) -> Optional[Tuple[Path, Optional[float]]]:
    """The weights file and mIoU that ``work_dir/model_index.yml`` publishes for ``name``; None when it
    publishes nothing there yet (or its file is gone)."""
    path = Path(work_dir) / "model_index.yml"
    if not path.is_file():
        return None
    entries = [entry for entry in yaml.safe_load(path.read_text()).get("models") or [] if entry.get("name") == name]
    if not entries:
        return None
    weights = Path(work_dir) / Path(urllib.parse.urlparse(entries[0]["weights"]).path).name
    return (weights, (entries[0].get("published") or {}).get("mIoU")) if weights.is_file() else None
