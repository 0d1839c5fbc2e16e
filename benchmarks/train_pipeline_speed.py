"""What one loader worker costs per training sample at the published sizes: decoding and the transform.

Cases: a Cityscapes-sized PNG (1024 x 2048, img_scale (2048, 1024), crop 512 x 1024) and an
ADE20K-sized JPEG (512 x 683, img_scale (2048, 512), crop 512 x 512), synthetic content (smooth
colour fields with noise, a label of blocks of 19 classes). Each round decodes and transforms one
sample per case with a new key (a new resize ratio, crop and photometric draws); figures are medians
over rounds. It also times the 75% rule's class count on a crop-sized label both ways (mmseg's
``np.unique`` and psp-zoo's ``bincount``, the same verdicts), interleaved, as a median ratio.

    python benchmarks/train_pipeline_speed.py              # 30 rounds
    python benchmarks/train_pipeline_speed.py --rounds 5

Writes benchmarks/results/train_pipeline_cpu.json and prints a table. Samples per second per worker
is 1000 / total ms; a run needs (images per iteration) x (iterations per second) of them.
"""
from __future__ import annotations

import argparse
import datetime
import io
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import List, Optional

import cv2
import numpy as np
import torch
from PIL import Image
from tabulate import tabulate

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # benchmark the checkout this script lives in

from psp_zoo.environment import cpu_flags, cpu_name  # noqa: E402
from psp_zoo.files import atomic_write  # noqa: E402
from psp_zoo.training.pipeline import TrainTransform, sample_rng  # noqa: E402

CASES = [  # name, (h, w), encoding, img_scale, crop
    ("cityscapes 1024x2048 png", (1024, 2048), ".png", (2048, 1024), (512, 1024)),
    ("ade20k 512x683 jpg", (512, 683), ".jpg", (2048, 512), (512, 512)),
]


def smooth_sample(size, suffix, classes=19, seed=0, params=()):
    """A smooth noisy picture encoded as ``suffix`` and a PNG label of blocks of ids 0..classes-1 (bytes each):
    compressible like a photograph and its annotation, so a large generated set stays small on disk."""
    rng = np.random.default_rng(seed)
    h, w = size
    smooth = cv2.resize(rng.integers(0, 256, (h // 32, w // 32, 3), dtype=np.uint8), (w, h))
    image = np.clip(smooth + rng.normal(0, 6, smooth.shape), 0, 255).astype(np.uint8)
    label = cv2.resize(rng.integers(0, classes, (h // 64, w // 64), dtype=np.uint8), (w, h),
                       interpolation=cv2.INTER_NEAREST)
    png = io.BytesIO()
    Image.fromarray(label).save(png, format="PNG")
    return cv2.imencode(suffix, image, list(params))[1].tobytes(), png.getvalue()


def _ms(call) -> float:
    start = time.perf_counter()
    call()
    return 1e3 * (time.perf_counter() - start)


def measure(rounds: int) -> List[dict]:
    rows = []
    for name, size, suffix, img_scale, crop in CASES:
        image_bytes, label_bytes = smooth_sample(size, suffix)
        transform = TrainTransform(crop_size=crop, img_scale=img_scale)
        image = cv2.imdecode(image_bytes, cv2.IMREAD_COLOR)
        label = np.array(Image.open(io.BytesIO(label_bytes)))
        crop_label = label[: crop[0], : crop[1]]
        times = {"decode_image_ms": [], "decode_label_ms": [], "transform_ms": []}
        ratios = []
        for r in range(rounds):
            times["decode_image_ms"].append(_ms(lambda: cv2.imdecode(image_bytes, cv2.IMREAD_COLOR)))
            times["decode_label_ms"].append(_ms(lambda: np.array(Image.open(io.BytesIO(label_bytes)))))
            times["transform_ms"].append(_ms(lambda: transform(image, label, sample_rng(0, r, 0))))
            unique = _ms(lambda: np.unique(crop_label, return_counts=True))
            ratios.append(unique / _ms(lambda: np.bincount(crop_label.ravel(), minlength=256)))
        row = {"case": name, **{key: statistics.median(values) for key, values in times.items()}}
        row["total_ms"] = sum(row[key] for key in times)
        row["samples_per_s_per_worker"] = 1e3 / row["total_ms"]
        row["class_count_unique_over_bincount"] = statistics.median(ratios)
        rows.append(row)
    return rows


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--out-dir", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args(argv)
    cv2.setNumThreads(1)  # as in a loader worker
    rows = measure(args.rounds)
    env = {"device_name": cpu_name(), "cpu_flags": cpu_flags(), "cpu_count": os.cpu_count(),
           "load_average_1_5_15min": list(os.getloadavg()),  # other processes sharing the machine
           "python": platform.python_version(), "numpy": np.__version__, "opencv": cv2.__version__,
           "pillow": Image.__version__, "torch": torch.__version__, "opencv_threads": 1,
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "note": "medians over rounds; synthetic images; other processes may share the machine"}
    print(tabulate(rows, headers="keys", floatfmt=".3g"))
    print(f"{env['device_name']} (flags {env['cpu_flags']}), numpy {np.__version__}, OpenCV {cv2.__version__}")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    path = args.out_dir / "train_pipeline_cpu.json"
    atomic_write(path, json.dumps({"environment": env, "rounds": args.rounds, "results": rows}, indent=1))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
