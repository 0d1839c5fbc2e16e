"""The run's log in mmseg 0.x's ``<timestamp>.log.json`` format, which ``psp_zoo.results.published_logs`` reads back.

One JSON object a line: first the run's metadata (``env_info``, ``config``, ``seed``, ``exp_name``),
then every ``log_interval`` iterations a train line (``mode``, ``epoch``, ``iter``, ``lr``, ``memory``
on CUDA, ``data_time``, the loss parts, ``loss``, ``time``: means over the interval, floats rounded
to 5 decimals; no train line at an evaluation iteration, as mmcv's runner), and a val line at each
validation (``aAcc``, ``mIoU``, ``mAcc``, ``IoU.<class>``, ``Acc.<class>`` as fractions rounded to 4
decimals; ``iter`` is the number of validation steps, mmcv's quirk, and ``train_iter``, psp-zoo's
addition, the training iteration validated, which ``psp_zoo.results.published_logs`` places it at).
Only one process of a torchrun job writes. Lines are appended and flushed one at a time, so a
killed run's log ends with its last complete line.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Dict, Mapping, Optional, Sequence, Union

__all__ = ["TrainLog", "IntervalMeans", "log_file_name"]


def log_file_name(started: Optional[float] = None) -> str:
    """mmcv's name for a run's log: ``YYYYmmdd_HHMMSS.log.json`` (local time of the start)."""
    return time.strftime("%Y%m%d_%H%M%S", time.localtime(started or time.time())) + ".log.json"


def _round(value: float, digits: int) -> float:
    return value if math.isnan(value) else round(float(value), digits)


class IntervalMeans:
    """Means of the logged values over the iterations since the last train line."""

    def __init__(self):
        self._sums: Dict[str, float] = {}
        self._count = 0

    def add(self, values: Mapping[str, float]) -> None:
        for key, value in values.items():
            self._sums[key] = self._sums.get(key, 0.0) + float(value)
        self._count += 1

    def take(self) -> Dict[str, float]:
        """The means, and a fresh start."""
        means = {key: total / max(self._count, 1) for key, total in self._sums.items()}
        self._sums, self._count = {}, 0
        return means


class TrainLog:
    """Appends mmseg-format lines to ``path``; a no-op writer (``path=None``) on the other processes."""

    def __init__(self, path: Union[None, str, Path]):
        self.path = Path(path) if path is not None else None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def _write(self, record: Mapping) -> None:
        if self.path is None:
            return
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
            handle.flush()

    def meta(self, *, env_info: str, config: str, seed: int, exp_name: str, batch: str = "", extended: str = "",
             shortened: str = "") -> None:
        """The first line; psp-zoo's additions: ``batch`` says how the total batch was made, ``extended`` /
        ``shortened`` how a resumed run's max_iters changed."""
        record = {"env_info": env_info, "config": config, "seed": seed, "exp_name": exp_name}
        notes = {"batch": batch, "extended": extended, "shortened": shortened}
        self._write({**record, **{key: value for key, value in notes.items() if value}})

    def train(self, *, epoch: int, iteration: int, lr: float, means: Mapping[str, float],
              memory_mb: Optional[int] = None) -> None:
        """A train line; ``means`` holds ``data_time``, ``time`` and the loss parts."""
        record: Dict[str, object] = {"mode": "train", "epoch": epoch, "iter": iteration, "lr": _round(lr, 9)}
        if memory_mb is not None:
            record["memory"] = int(memory_mb)
        record["data_time"] = _round(means.get("data_time", 0.0), 5)
        for key in ("decode.loss_ce", "decode.acc_seg", "aux.loss_ce", "aux.acc_seg", "loss"):
            if key in means:
                record[key] = _round(means[key], 5)
        record["time"] = _round(means.get("time", 0.0), 5)
        self._write(record)

    def val(self, *, epoch: int, steps: int, iteration: int, lr: float, aacc: float, miou: float, macc: float,
            class_names: Sequence[str], iou: Sequence[float], acc: Sequence[float]) -> None:
        """A val line at training iteration ``iteration`` after ``steps`` validation steps; metrics as
        fractions (NaN for a class with no pixels, as mmseg writes it)."""
        record: Dict[str, object] = {"mode": "val", "epoch": epoch, "iter": steps, "train_iter": iteration,
                                     "lr": _round(lr, 9),
                                     "aAcc": _round(aacc, 4), "mIoU": _round(miou, 4), "mAcc": _round(macc, 4)}
        for name, value in zip(class_names, iou):
            record[f"IoU.{name}"] = _round(value, 4)
        for name, value in zip(class_names, acc):
            record[f"Acc.{name}"] = _round(value, 4)
        self._write(record)

