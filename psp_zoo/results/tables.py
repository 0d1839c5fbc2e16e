"""The published results tables, regenerated from the manifest, with reproduced numbers beside them.

Without results the Markdown output is the published table (same columns, order and number
formatting). With results, each measured cell reads ``published / reproduced (difference)``,
e.g. ``77.85 / 77.80 (-0.05)``; ``-`` marks a number that was not published or not measured.
Each row with results carries a label such as ``PSPNet [1]`` in the Method column, and the notes
under the table say which device, precision and software versions ``[1]`` stands for. A
checkpoint reproduced in several environments gets one row per environment, so numbers from
different devices or versions are never mixed. fps and Mem are only differenced between CUDA
runs: a CPU figure (labelled) is shown, but its difference from the V100 numbers is meaningless.
CSV and JSON carry the same rows with numbers in separate columns (``mIoU``,
``mIoU reproduced``, ``mIoU diff``...) for further processing.

"Inf time (fps)" is the published protocol: the model as loaded, timed as the reference times it.
psp-zoo's own figure (its prepared model: folded BN, channels-last, factorized head...) is a
column apart, "psp-zoo fps", in tables with results; it has no published counterpart. A figure
whose measuring step failed reads ``failed`` (the scores of that run are shown), with the error
in the notes.
"""
from __future__ import annotations

import dataclasses
import io
import json
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import pandas as pd
import tabulate as tabulate_module

from ..errors import PspZooError
from ..files import atomic_write
from ..manifest.loading import Checkpoint, Manifest, get_manifest
from ..optional import require
from .records import ResultRecord

__all__ = ["COLUMNS", "DatasetTable", "build_tables", "render", "summary", "update_readme", "plot",
           "MARKER_START", "MARKER_END"]

COLUMNS = ("Method", "Backbone", "Crop Size", "Lr schd", "Mem (GB)", "Inf time (fps)", "mIoU",
           "mIoU(ms+flip)", "download")
METRIC_COLUMNS = ("Mem (GB)", "Inf time (fps)", "mIoU", "mIoU(ms+flip)")
# Published by the PSPNet authors beside mIoU; in CSV and JSON (the Markdown keeps the published layout).
ACCURACY_COLUMNS = ("mAcc", "aAcc", "mAcc(ms+flip)", "aAcc(ms+flip)")
# Columns whose published separator is '---:'; the others are plain '---' (as published).
_COLON_COLUMNS = {"Lr schd", "mIoU", "mIoU(ms+flip)"}
_NUMERIC_COLUMNS = {"Lr schd", "psp-zoo fps", *METRIC_COLUMNS}
# Sections of datasets a checkpoint is only evaluated on (Dark Zurich, Nighttime Driving) publish mIoU only.
CROSS_COLUMNS = ("Method", "Backbone", "Training Dataset", "Test Dataset", "mIoU", "download")
MARKER_START = "<!-- psp-zoo:tables:start -->"
MARKER_END = "<!-- psp-zoo:tables:end -->"
CELL_NOTE = ("Cells with results read `published / reproduced (difference)`; Mem (GB) is the "
             "training peak; fps and Mem are differenced only for CUDA runs (published: V100, "
             "PyTorch 1.5, CUDA 10.1). Inf time (fps) times the model as loaded, as the reference does "
             "(one sliding window per call, labels copied back); psp-zoo fps times the same call on "
             "psp-zoo's prepared model (the precision and switches named in the note of its row).")
FAST_COLUMN = "psp-zoo fps"
#: the measuring step behind each figure (records.ResultRecord.failed_steps)
STEP_OF_COLUMN = {"Inf time (fps)": "speed", "Mem (GB)": "training_memory", FAST_COLUMN: "fast_speed"}
ManifestArg = Union[None, str, Path, Sequence, Manifest]


def _published_text(column: str, value: Optional[float]) -> str:
    """A published number formatted as the published README prints it."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if column == "Mem (GB)":
        return f"{value:g}"  # 6.1, 12
    return f"{value:.2f}"    # 9.68, 46.60


def _reproduced_value(record: ResultRecord, column: str) -> Optional[float]:
    if column in ("mIoU", "mAcc", "aAcc"):
        return getattr(record.single_scale, column.lower()) if record.single_scale else None
    if column in ("mIoU(ms+flip)", "mAcc(ms+flip)", "aAcc(ms+flip)"):
        return getattr(record.ms_flip, column[:4].lower()) if record.ms_flip else None
    if column == "Inf time (fps)":
        return record.speed.fps if record.speed else None
    return record.training_memory.gb if record.training_memory else None


def _comparable(record: ResultRecord, column: str) -> bool:
    """fps and memory compare with the V100 numbers only when measured on a GPU."""
    return column not in ("Mem (GB)", "Inf time (fps)") or record.device_kind == "cuda"


def _published_values(ckpt: Checkpoint, dataset: str) -> Dict[str, Optional[float]]:
    p = ckpt.published_on[dataset]
    return {"Mem (GB)": p.mem_gb, "Inf time (fps)": p.fps, "mIoU": p.miou, "mIoU(ms+flip)": p.miou_ms_flip,
            "mAcc": p.macc, "aAcc": p.aacc, "mAcc(ms+flip)": p.macc_ms_flip, "aAcc(ms+flip)": p.aacc_ms_flip}


# --------------------------------------------------------------------------------------------
# environments: what "[1]" under a table stands for


def _environment_key(record: ResultRecord) -> Tuple:
    env = record.environment
    gpu = record.device_kind == "cuda"
    limited = (record.images.count, record.images.available) if record.images.limited else None
    backend = None if record.backend is None else (record.backend.get("backend"), record.backend.get("version"),
                                                    tuple(record.backend.get("providers") or ()))
    return (env["device_kind"], env["device_name"], record.precision, tuple(record.optimizations),
            env["torch"], env.get("cuda") if gpu else None, env.get("cudnn") if gpu else None,
            env["psp_zoo"], limited, backend)


def _environment_text(records: Sequence[ResultRecord]) -> str:
    first = records[0]
    kind, name, precision, optimizations, torch_v, cuda, cudnn, version, limited, backend = _environment_key(first)
    parts = [f"{name} ({kind})", precision + "".join(f"+{o}" for o in optimizations), f"torch {torch_v}"]
    if backend is not None:
        parts[1:2] = [f"{backend[0]} {backend[1]} ({', '.join(backend[2])}), exported fp32"]
    if kind == "cuda":
        parts += [f"CUDA {cuda}", f"cuDNN {cudnn}"]
    parts.append(f"psp-zoo {version}")
    revisions = sorted({r.environment.get("git_revision") for r in records} - {None})
    if revisions:
        parts.append("git " + ", ".join(revisions))
    dates = sorted(r.date[:10] for r in records)
    parts.append(dates[0] if dates[0] == dates[-1] else f"{dates[0]} to {dates[-1]}")
    if limited:
        parts.append(f"only {limited[0]} of {limited[1]} images (--limit)")
    if kind == "cpu":
        parts.append("fps on CPU; Mem is cpu peak RSS, not comparable")
    few = sorted({(s.images_timed, s.warmup) for r in records for s in (r.speed, r.fast_speed) if s is not None
                  and (s.images_timed, s.warmup) != (195, 5)})
    if few:
        parts.append("fps from " + ", ".join(f"{n} timed image(s) after {w} warm-up" for n, w in few)
                     + " (published: 195 after 5)")
    return ", ".join(parts)


# --------------------------------------------------------------------------------------------
# frames


@dataclass
class DatasetTable:
    """One dataset's table: a frame with one row per (checkpoint, environment) and its notes."""

    dataset: str
    title: str
    frame: pd.DataFrame
    environments: Dict[str, str] = field(default_factory=dict)  # "[1]" -> description
    failures: List[str] = field(default_factory=list)
    not_measured: List[str] = field(default_factory=list)  # figures of complete rows whose step failed

    titles: Dict[str, str] = field(default_factory=dict)  # dataset key -> section title, for training sets

    @property
    def has_results(self) -> bool:
        return bool(self.environments)

    @property
    def is_cross_dataset(self) -> bool:
        """A section of checkpoints trained on another dataset (Dark Zurich, Nighttime Driving)."""
        return not self.frame.empty and bool((self.frame["Training Dataset"] != self.dataset).all())


def _row(ckpt: Checkpoint, dataset: str, record: Optional[ResultRecord], label: Optional[str]) -> dict:
    row = {"Dataset": dataset, "Training Dataset": ckpt.dataset, "Checkpoint": ckpt.name, "Method": ckpt.method,
           "Backbone": ckpt.backbone, "Crop Size": "x".join(map(str, ckpt.crop_size)),
           "Lr schd": ckpt.schedule}
    for column, published in _published_values(ckpt, dataset).items():
        reproduced = None if record is None else _reproduced_value(record, column)
        comparable = record is not None and _comparable(record, column)
        row[column] = published
        row[f"{column} reproduced"] = reproduced
        row[f"{column} diff"] = (reproduced - published
                                 if comparable and None not in (reproduced, published) else None)
    row["Inference mem (GB) reproduced"] = (record.inference_memory.gb
                                            if record is not None and record.inference_memory else None)
    row[f"{FAST_COLUMN} reproduced"] = record.fast_speed.fps if record is not None and record.fast_speed else None
    failed = record.failed_steps if record else None
    row["Failed steps"] = "; ".join(f"{k}: {v}" for k, v in failed.items()) if failed else None
    row.update({"model": ckpt.url, "log": ckpt.log_url, "download_page": ckpt.download_page, "Label": label,
                "Reproduced on": None, "Images": None if record is None else record.images.count})
    return row


def _table(manifest: Manifest, dataset: str, records: Sequence[ResultRecord]) -> DatasetTable:
    table = DatasetTable(dataset, manifest.datasets[dataset].title, pd.DataFrame(),
                         titles={key: spec.title for key, spec in manifest.datasets.items()})
    by_environment: Dict[Tuple, List[ResultRecord]] = {}
    for record in records:
        if record.status == "complete":
            by_environment.setdefault(_environment_key(record), []).append(record)
        else:
            table.failures.append(f"{record.checkpoint} failed on {record.environment['device_name']}: "
                                  f"{record.error or 'no reason recorded'}")
    labels = {key: f"[{i}]" for i, key in enumerate(sorted(by_environment, key=str), start=1)}
    for key, label in labels.items():
        table.environments[label] = _environment_text(by_environment[key])
    for record in records:
        for step, error in (record.failed_steps.items() if record.status == "complete" else ()):
            table.not_measured.append(f"{record.checkpoint} {labels[_environment_key(record)]}: "
                                      f"{step.replace('_', ' ')} failed: {error}")
    rows = []
    for ckpt in (c for c in manifest if dataset in c.datasets):
        mine = sorted((r for r in records if r.checkpoint == ckpt.name and r.status == "complete"
                       and r.dataset == dataset),
                      key=lambda r: labels[_environment_key(r)])
        for record in mine or [None]:
            label = None if record is None else labels[_environment_key(record)]
            row = _row(ckpt, dataset, record, label)
            row["Reproduced on"] = table.environments.get(label)
            rows.append(row)
    table.frame = pd.DataFrame(rows)
    return table


def build_tables(manifest: ManifestArg = None, results: Sequence[ResultRecord] = ()) -> List[DatasetTable]:
    """One table per dataset that has checkpoints, in manifest order, with ``results`` merged in."""
    manifest = manifest if isinstance(manifest, Manifest) else get_manifest(manifest)
    known = {c.name: c for c in manifest}
    usable = []
    for record in results:
        ckpt = known.get(record.checkpoint)
        if ckpt is None or record.dataset not in ckpt.datasets:
            warnings.warn(f"ignoring {record.source or record.checkpoint}: checkpoint "
                          f"{record.checkpoint!r} on {record.dataset!r} is not in the manifest; "
                          f"pass the manifest that defines it with --manifest", stacklevel=2)
            continue
        usable.append(record)
    datasets = [d for d in manifest.datasets if any(d in c.datasets for c in manifest)]
    return [_table(manifest, d, [r for r in usable if r.dataset == d]) for d in datasets]


# --------------------------------------------------------------------------------------------
# rendering


def _failed(row: pd.Series, column: str) -> bool:
    failed = row.get("Failed steps")
    return isinstance(failed, str) and f"{STEP_OF_COLUMN.get(column)}:" in failed


def _cell(row: pd.Series, column: str) -> str:
    published = _published_text(column, row[column])
    if not isinstance(row["Label"], str):  # no result for this row
        return published
    reproduced, diff = row[f"{column} reproduced"], row[f"{column} diff"]
    if reproduced is None or pd.isna(reproduced):
        return f"{published} / {'failed' if _failed(row, column) else '-'}"
    text = f"{published} / {reproduced:.2f}"
    return text if diff is None or pd.isna(diff) else f"{text} ({diff:+.2f})"


def _download(row: pd.Series) -> str:
    if not isinstance(row["model"], str):  # no URL: the page to download it from by hand
        return f"[model (by hand)]({row['download_page']})"
    cell = f"[model]({row['model']})"
    return cell if not isinstance(row["log"], str) else f"{cell} &#124; [log]({row['log']})"


def _fast_cell(row: pd.Series) -> str:
    value = row.get(f"{FAST_COLUMN} reproduced")
    if value is None or pd.isna(value):
        return "failed" if isinstance(row["Label"], str) and _failed(row, FAST_COLUMN) else "-"
    return f"{value:.2f}"


def _display_frame(table: DatasetTable) -> pd.DataFrame:
    """The frame as the README shows it: the published columns, cells already formatted; with
    psp-zoo's own fps in a column of its own where a row has one."""
    rows = []
    cross = table.is_cross_dataset
    fast = int(not cross and f"{FAST_COLUMN} reproduced" in table.frame and bool(
        table.frame[f"{FAST_COLUMN} reproduced"].notna().any() or table.frame["Failed steps"].notna().any()))
    for _, row in table.frame.iterrows():
        method = row["Method"] if not isinstance(row["Label"], str) else f"{row['Method']} {row['Label']}"
        if cross:  # a checkpoint trained elsewhere, scored here: the page's columns for such sections
            rows.append([method, row["Backbone"], table.titles[row["Training Dataset"]], table.title,
                         _cell(row, "mIoU"), _download(row)])
            continue
        cells = [method, row["Backbone"], row["Crop Size"], str(row["Lr schd"])]
        cells += [_cell(row, column) for column in METRIC_COLUMNS]
        rows.append(cells + [_fast_cell(row)] * fast + [_download(row)])
    columns = list(CROSS_COLUMNS if cross else COLUMNS)
    return pd.DataFrame(rows, columns=columns[:-1] + [FAST_COLUMN] * fast + columns[-1:])


def _markdown_table(display: pd.DataFrame) -> str:
    columns = list(display.columns)

    def separator(widths: Sequence[int], _aligns: Sequence[str]) -> str:
        return "|" + "|".join("-" * (w - 1) + ":" if c in _COLON_COLUMNS else "-" * w
                              for c, w in zip(columns, widths)) + "|"

    row_format = tabulate_module.DataRow("|", "|", "|")
    fmt = tabulate_module.TableFormat(lineabove=None, linebelowheader=separator, linebetweenrows=None,
                                      linebelow=None, headerrow=row_format, datarow=row_format,
                                      padding=1, with_header_hide=None)
    aligns = ["right" if c in _NUMERIC_COLUMNS else "left" for c in columns]
    return tabulate_module.tabulate(display.values.tolist(), headers=columns, tablefmt=fmt,
                                    colalign=aligns, disable_numparse=True)


def _markdown(tables: Sequence[DatasetTable]) -> str:
    sections = []
    for table in tables:
        parts = [f"### {table.title}", _markdown_table(_display_frame(table))]
        if table.has_results:
            notes = [CELL_NOTE] + [f"{label} {text}" for label, text in table.environments.items()]
            parts.append("\n".join(f"- {note}" for note in notes))
        if table.failures:
            parts.append("\n".join(f"- not reproduced: {failure}" for failure in table.failures))
        if table.not_measured:
            parts.append("\n".join(f"- not measured: {missing}" for missing in table.not_measured))
        sections.append("\n\n".join(parts))
    return "\n\n".join(sections) + "\n"


def _machine_frame(tables: Sequence[DatasetTable]) -> pd.DataFrame:
    frames = [t.frame for t in tables if not t.frame.empty]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def _json(tables: Sequence[DatasetTable]) -> str:
    def clean(frame: pd.DataFrame) -> list:
        records = frame.astype(object).where(frame.notna(), None).to_dict(orient="records")
        return [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()}
                for r in records]

    payload = [{"dataset": t.dataset, "title": t.title, "rows": clean(t.frame),
                "environments": t.environments, "failures": t.failures, "not_measured": t.not_measured}
               for t in tables]
    return json.dumps({"tables": payload}, indent=1) + "\n"


def render(tables: Sequence[DatasetTable], fmt: str = "md") -> str:
    """The tables as Markdown (published layout), CSV or JSON (numbers in separate columns)."""
    if fmt == "md":
        return _markdown(tables)
    if fmt == "csv":
        buffer = io.StringIO()
        _machine_frame(tables).to_csv(buffer, index=False)
        return buffer.getvalue()
    if fmt == "json":
        return _json(tables)
    raise PspZooError(f"unknown table format {fmt!r}; expected md, csv or json")


def summary(records: Sequence[ResultRecord], manifest: ManifestArg = None) -> str:
    """Published beside reproduced numbers for the checkpoints of ``records`` only (Markdown)."""
    names = {record.checkpoint for record in records}
    shown = []
    for table in build_tables(manifest, records):
        rows = table.frame[table.frame["Checkpoint"].isin(names)] if not table.frame.empty else table.frame
        if len(rows):
            shown.append(dataclasses.replace(table, frame=rows.reset_index(drop=True)))
    return render(shown, "md")


# --------------------------------------------------------------------------------------------
# README and plot


def update_readme(path: Union[str, Path], text: str) -> None:
    """Replace what lies between the psp-zoo marker comments of ``path``; nothing else changes."""
    path = Path(path)
    try:
        content = path.read_bytes().decode("utf-8")
    except OSError as exc:
        raise PspZooError(f"cannot read {path}: {exc.strerror or exc}") from None
    start, end = content.find(MARKER_START), content.find(MARKER_END)
    if start < 0 or end < 0 or end < start or content.count(MARKER_START) != 1 or content.count(MARKER_END) != 1:
        raise PspZooError(f"{path} needs exactly one '{MARKER_START}' line followed by one "
                          f"'{MARKER_END}' line; add them where the tables belong")
    head, tail = content[: start + len(MARKER_START)], content[end:]
    atomic_write(path, f"{head}\n\n{text.strip()}\n\n{tail}".encode("utf-8"))


_DATASET_MARKERS = ("o", "s", "^", "D", "v", "P")


def plot(results: Sequence[ResultRecord], path: Union[str, Path], *, manifest: ManifestArg = None) -> Path:
    """mIoU against fps for every checkpoint: published (filled) and reproduced (hollow, per device)."""
    require("matplotlib", "plot", purpose="plotting")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.ticker import FuncFormatter

    tables = build_tables(manifest, results)
    figure = Figure(figsize=(8, 5.5), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    legend = []
    devices: Dict[str, str] = {}
    for table, marker in zip(tables, _DATASET_MARKERS):
        legend.append(Line2D([], [], marker=marker, color="grey", linestyle="", label=table.title))
        for _, row in table.frame.iterrows():
            published = (row["Inf time (fps)"], row["mIoU"])
            if not pd.isna(published[0]) and not pd.isna(published[1]):
                axes.plot(*published, marker=marker, color="black", linestyle="")
            reproduced = (row["Inf time (fps) reproduced"], row["mIoU reproduced"])
            if isinstance(row["Label"], str) and not any(pd.isna(v) for v in reproduced):
                color = devices.setdefault(row["Reproduced on"], f"C{len(devices)}")
                axes.plot(*reproduced, marker=marker, color=color, markerfacecolor="none", linestyle="")
    legend.append(Line2D([], [], marker="o", color="black", linestyle="", label="published (V100)"))
    for text, color in devices.items():
        legend.append(Line2D([], [], marker="o", color=color, markerfacecolor="none", linestyle="",
                             label=f"reproduced: {text.split(',')[0]}"))
    axes.set(xscale="log", xlabel="inference speed (fps, log scale)", ylabel="mIoU (%)",
             title="PSPNet checkpoints: accuracy against speed")
    axes.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))  # 1, 10, not 10^0
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(handles=legend, fontsize="small")
    buffer = io.BytesIO()
    suffix = Path(path).suffix.lstrip(".").lower() or "png"
    try:
        figure.savefig(buffer, format=suffix)
    except ValueError as exc:
        raise PspZooError(f"cannot write plot {path}: {exc}") from None
    atomic_write(path, buffer.getvalue())
    return Path(path)
