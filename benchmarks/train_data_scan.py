"""What the scan before a training run costs: ``psp-zoo dataset check`` against ``scan_for_training``.

Generates ``--pairs`` (default 3,000) 512x1024 image/label pairs in ADE20K's layout in a temporary
folder (``images/training/*.jpg``, ``annotations/training/*.png``, an empty validation split): a
few distinct smooth pictures and block labels, each written under many names, so that the folder
stays small on disk while every file is decoded as a real one is. Then, in interleaved rounds (the
order rotated each round, so load from other processes hits every side):

- ``check``: ``datasets.check.check_dataset`` (what ``psp-zoo dataset check`` reads and counts);
- ``scan_cold``: ``scan_for_training`` into a work dir without a record (a first start);
- ``scan_warm``: ``scan_for_training`` with the record a passed scan left (a resume).

Figures are medians over rounds; the ratios are medians of the per-round ratios to ``check``.

    flock /tmp/psp-bench.lock python benchmarks/train_data_scan.py            # 3 rounds
    python benchmarks/train_data_scan.py --pairs 100 --rounds 2 --out-dir /tmp/scan   # a quick look

Writes benchmarks/results/train_data_scan_<cpu>.json and prints a table.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import List, Optional

import cv2
import torch
from PIL import Image
from tabulate import tabulate

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # benchmark the checkout this script lives in

from train_pipeline_speed import smooth_sample  # noqa: E402  (beside this script)

from psp_zoo.datasets.check import SCAN_RECORD, check_dataset, scan_for_training  # noqa: E402
from psp_zoo.environment import cpu_flags, environment_info  # noqa: E402
from psp_zoo.files import atomic_write  # noqa: E402
from psp_zoo.results.records import device_tag  # noqa: E402

SIZE = (512, 1024)  # (h, w)
DISTINCT = 16  # distinct pictures; every file is one of them under its own name


def _pair(seed: int):
    """A smooth noisy picture (JPEG bytes) and a label of blocks of ADE20K's ids 0..150 (PNG bytes)."""
    return smooth_sample(SIZE, ".jpg", classes=151, seed=seed, params=(cv2.IMWRITE_JPEG_QUALITY, 90))


def write_dataset(root: Path, pairs: int) -> int:
    """``pairs`` training pairs under ``root`` (ADE20K's layout); returns the bytes written."""
    blobs = [_pair(seed) for seed in range(DISTINCT)]
    folders = [root / sub for sub in ("images/training", "annotations/training", "images/validation",
                                      "annotations/validation")]
    for folder in folders:
        folder.mkdir(parents=True, exist_ok=True)
    written = 0
    for index in range(pairs):
        jpg, png = blobs[index % DISTINCT]
        name = f"ADE_train_{index:08d}"
        (folders[0] / f"{name}.jpg").write_bytes(jpg)
        (folders[1] / f"{name}.png").write_bytes(png)
        written += len(jpg) + len(png)
    return written


def measure(root: Path, work: Path, rounds: int) -> dict:
    def check():
        problems = sum(len(c.problems()) for c in check_dataset("ade20k", root))
        assert problems == 0, problems

    def scan_cold():
        (work / SCAN_RECORD).unlink(missing_ok=True)
        scan_for_training("ade20k", root, work)

    def scan_warm():
        assert scan_for_training("ade20k", root, work) == 0

    calls = {"check": check, "scan_cold": scan_cold, "scan_warm": scan_warm}
    names = list(calls)
    times = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            if name == "scan_warm" and not (work / SCAN_RECORD).is_file():  # the record a passed scan leaves
                scan_for_training("ade20k", root, work)
            started = time.perf_counter()
            calls[name]()
            times[name].append(time.perf_counter() - started)
        print(f"  round {r + 1}/{rounds}: " + ", ".join(f"{n} {times[n][-1]:.2f}s" for n in names), flush=True)
    base = times["check"]
    return {name: {"median_s": statistics.median(times[name]), "times_s": times[name],
                   "ratio_to_check": statistics.median(t / b for t, b in zip(times[name], base))}
            for name in names}


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out-dir", default=str(REPO / "benchmarks" / "results"))
    return parser.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="psp-scan-") as tmp:
        root = Path(tmp) / "ADEChallengeData2016"
        began = time.perf_counter()
        size = write_dataset(root, args.pairs)
        print(f"wrote {args.pairs} pairs of {SIZE[1]}x{SIZE[0]} ({size / 2 ** 20:.0f} MiB) in "
              f"{time.perf_counter() - began:.0f}s", flush=True)
        results = measure(root, Path(tmp) / "work", args.rounds)
    env = {**environment_info("cpu"), "cpu_flags": cpu_flags(), "opencv": cv2.__version__,
           "pillow": Image.__version__, "threads_of_the_readers": min(8, os.cpu_count() or 1),
           "cpu_count": os.cpu_count(), "load_average_1_5_15min": list(os.getloadavg()),
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "data": f"{args.pairs} ADE20K-layout training pairs, {SIZE[1]}x{SIZE[0]} JPEG + PNG label "
                   f"({DISTINCT} distinct contents), empty validation split",
           "note": "shared machine: other processes may have been running (see load average); interleaved "
                   "rounds, median of per-round ratios"}
    print(tabulate([[name, f"{row['median_s']:.2f}", f"{row['ratio_to_check']:.3f}x"] for name, row in results.items()],
                   headers=["", "median s", "vs dataset check"]))
    path = Path(args.out_dir) / f"train_data_scan_{device_tag(environment_info('cpu'))}.json"
    atomic_write(path, json.dumps({"environment": env, "rounds": args.rounds, "pairs": args.pairs,
                                   "results": results}, indent=1))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    torch.set_num_threads(1)  # the readers are threads of their own; torch plays no part
    sys.exit(main())
