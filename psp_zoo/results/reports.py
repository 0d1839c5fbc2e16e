"""Text views for people: the checkpoint list (``psp-zoo list``) and one result record
(``psp-zoo evaluate``, ``psp-zoo show``). The results tables are :mod:`psp_zoo.results.tables`."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional, Sequence, Union

import pandas as pd
import tabulate as tabulate_module

from ..errors import PspZooError, UnknownModelError
from ..hub.cache import cache_state
from ..manifest.loading import Manifest, get_manifest
from .records import ResultRecord

__all__ = ["checkpoint_frame", "render_checkpoints", "describe_run", "images_text", "per_class_text", "show_text",
           "undefined"]

ManifestArg = Union[None, str, Path, Sequence, Manifest]


# --------------------------------------------------------------------------------------------
# the checkpoint list (`psp-zoo list`)

LIST_COLUMNS = ("name", "dataset", "backbone", "crop", "schedule", "mIoU", "mIoU(ms+flip)", "Mem (GB)",
                "Inf time (fps)", "cache_state")


def checkpoint_frame(manifest: ManifestArg = None, *, dataset: Optional[str] = None, pattern: Optional[str] = None,
                     cache_dir: Union[None, str, Path] = None) -> pd.DataFrame:
    """One row per checkpoint: published numbers (of ``dataset`` for a cross-dataset one) and cache state."""
    manifest = manifest if isinstance(manifest, Manifest) else get_manifest(manifest)
    names = manifest.list(dataset=dataset, pattern=pattern)
    if not names:
        wanted = " and ".join([f"dataset {dataset!r}"] * (dataset is not None)
                              + [f"pattern {pattern!r}"] * (pattern is not None))
        raise PspZooError(f"no checkpoint matches {wanted}; run `psp-zoo list` to see every name")
    rows = []
    for name in names:
        entry = manifest.get(name)
        shown_on = dataset or entry.dataset  # a cross-dataset listing shows that dataset's numbers
        published = entry.published_on[shown_on]
        rows.append({
            "name": entry.name,
            "dataset": shown_on if shown_on == entry.dataset else f"{shown_on} (trained on {entry.dataset})",
            "backbone": entry.backbone, "crop": "x".join(map(str, entry.crop_size)), "schedule": entry.schedule,
            "mIoU": published.miou, "mIoU(ms+flip)": published.miou_ms_flip,
            "Mem (GB)": published.mem_gb, "Inf time (fps)": published.fps,
            "cache_state": cache_state(entry, cache_dir=cache_dir),
        })
    return pd.DataFrame(rows, columns=list(LIST_COLUMNS))


def render_checkpoints(frame: pd.DataFrame, fmt: str = "table") -> str:
    """:func:`checkpoint_frame` as a Markdown table for reading, or CSV / JSON for programs."""
    if fmt == "json":
        return frame.to_json(orient="records", indent=1) + "\n"
    if fmt == "csv":
        return frame.to_csv(index=False)
    shown = frame.astype(object)
    shown = shown.where(shown.notna(), None)  # '-' like the published table
    return tabulate_module.tabulate(shown, headers="keys", tablefmt="github", showindex=False,
                                    missingval="-") + "\n"


# --------------------------------------------------------------------------------------------
# one record (`psp-zoo evaluate`, `psp-zoo show`)


def undefined(value: Optional[float]) -> bool:
    """A number that is not there: None in a record, NaN straight from the metrics."""
    return value is None or value != value


def _number(value: Optional[float]) -> str:
    return "-" if undefined(value) else f"{value:.2f}"


def images_text(record: ResultRecord) -> str:
    """'500 images', or '10 of 500 images (--limit)' for a run limited to the first images."""
    if record.images.limited:
        return f"{record.images.count} of {record.images.available} images (--limit)"
    return f"{record.images.count} images"


def _ran_on(record: ResultRecord) -> str:
    device = record.environment.get("device_name", record.device_kind)
    if not record.backend:
        return device
    return f"{device}, {record.backend.get('backend')} {record.backend.get('version', '')}".rstrip()


def describe_run(record: ResultRecord) -> str:
    """The record's headline: checkpoint, dataset, images, passes, device and what ran the model."""
    passes = "+".join(label for label, m in (("single-scale", record.single_scale), ("ms+flip", record.ms_flip))
                      if m is not None)
    return f"{record.checkpoint} on {record.dataset} ({images_text(record)}, {passes}, {_ran_on(record)})"


def per_class_text(metrics) -> str:
    """Per-class IoU / Acc lines and the dataset-level scores, '-' for a class that never occurs."""
    number = lambda v: "     -" if v is None else f"{v:6.2f}"  # noqa: E731
    lines = [f"  {name:<24} IoU {number(v['IoU'])}  Acc {number(v['Acc'])}" for name, v in metrics.per_class.items()]
    lines.append(f"aAcc {number(metrics.aacc).strip()}  mIoU {number(metrics.miou).strip()}  "
                 f"mAcc {number(metrics.macc).strip()}")
    return "\n".join(lines) + "\n"


def show_text(record: ResultRecord, manifest: ManifestArg = None) -> str:
    """A results file for reading: per-class IoU and Acc of each pass, then the dataset-level
    scores beside the published mIoU where the manifest has the checkpoint."""
    passes = [(label, m) for label, m in (("single-scale", record.single_scale), ("ms+flip", record.ms_flip))
              if m is not None]
    if not passes:
        raise PspZooError(f"{record.source or record.checkpoint} holds no metrics (status {record.status}: "
                          f"{record.error or 'nothing was scored'})")
    lines = [f"{record.checkpoint} on {record.dataset} ({images_text(record)}, {_ran_on(record)}, "
             f"{record.precision}, {record.status})"]
    headers = ["class"] + [f"{what} {label}" for label, _ in passes for what in ("IoU", "Acc")]
    rows = [[name] + [_number(m.per_class.get(name, {}).get(what)) for _, m in passes for what in ("IoU", "Acc")]
            for name in passes[0][1].per_class]
    lines.append(tabulate_module.tabulate(rows, headers=headers, tablefmt="github", disable_numparse=True))
    published = _published_numbers(record.checkpoint, manifest)
    for label, metrics in passes:
        lines.append(f"{label:<13} aAcc {_number(metrics.aacc)}  mIoU {_number(metrics.miou)}  "
                     f"mAcc {_number(metrics.macc)}  published mIoU {_number(published.get(label))}")
    lines += _figure_lines(record, published)
    if not published:
        lines.append(f"(no published numbers: {record.checkpoint} is not in the manifest)")
    elif record.images.limited:
        lines.append(f"(only {images_text(record)} were scored; the published mIoU is over all "
                     f"{record.images.available}, so the two are not comparable)")
    return "\n".join(lines) + "\n"


def _figure_lines(record: ResultRecord, published: Dict[str, Optional[float]]) -> list:
    """fps (the published protocol, then psp-zoo's prepared model), memory, and failed steps."""
    lines = []
    figures = (("fps (model as loaded, as published)", record.speed, "speed", published.get("fps")),
               ("fps (psp-zoo prepared model)", record.fast_speed, "fast_speed", None))
    for label, speed, step, known in figures:
        if speed is not None or step in record.failed_steps:
            value = "failed" if speed is None else f"{speed.fps:.2f} ({speed.images_timed} timed, {speed.device_kind})"
            lines.append(f"{label:<36} {value}" + (f"  published {known:.2f} (V100)" if known else ""))
    if record.training_memory is not None or "training_memory" in record.failed_steps:
        value = "failed" if record.training_memory is None else \
            f"{record.training_memory.gb:.2f} GB ({record.training_memory.kind})"
        known = published.get("mem")
        lines.append(f"{'training memory':<36} {value}" + (f"  published {known:g} GB" if known else ""))
    lines += [f"measuring {step.replace('_', ' ')} failed: {error}" for step, error in record.failed_steps.items()]
    return lines


def _published_numbers(name: str, manifest: ManifestArg) -> Dict[str, Optional[float]]:
    manifest = manifest if isinstance(manifest, Manifest) else get_manifest(manifest)
    try:
        published = manifest.get(name).published
    except UnknownModelError:
        return {}
    return {"single-scale": published.miou, "ms+flip": published.miou_ms_flip, "fps": published.fps,
            "mem": published.mem_gb}
