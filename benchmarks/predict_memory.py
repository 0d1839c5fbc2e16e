"""Peak memory of one `Predictor` call on a large photo: a random-weight full-width R-50-D8 with
150 classes (ADE20K's test settings) on a random H x W image, each run in a fresh process.

    python benchmarks/predict_memory.py [--size 3000x4000] [--ms-flip] [--tree PATH]

``--tree`` measures another checkout (e.g. one before a change) with this same script. Prints
one JSON line: peak resident set size of the whole process (ru_maxrss), RSS before the call,
seconds, CPU model, torch version. Memory is not timing: one round is the measurement.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, resource, sys, time
import numpy as np, torch
from psp_zoo import Predictor, create_model

height, width, ms_flip = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "1"
torch.manual_seed(0)
model = create_model("pspnet_r50-d8_512x512_80k_ade20k", pretrained=False, device="cpu")
predictor = Predictor.create(model, dataset="ade20k", ms_flip=ms_flip, device="cpu")
image = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
with open("/proc/self/statm") as statm:
    before = int(statm.read().split()[1]) * resource.getpagesize()
start = time.perf_counter()
labels = predictor(image)
seconds = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"peak_rss_gb": round(peak / 2 ** 30, 2), "rss_before_call_gb": round(before / 2 ** 30, 2),
                  "seconds": round(seconds, 1), "labels": list(labels.shape)}))
"""


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="3000x4000", help="HxW of the photo (default 3000x4000, 12 MP)")
    parser.add_argument("--ms-flip", action="store_true")
    parser.add_argument("--tree", type=Path, default=REPO, help="checkout whose psp_zoo is measured")
    args = parser.parse_args()
    height, width = (int(v) for v in args.size.lower().split("x"))
    env = dict(os.environ, PYTHONPATH=str(args.tree.resolve()))
    done = subprocess.run([sys.executable, "-c", CHILD, str(height), str(width), "1" if args.ms_flip else "0"],
                          env=env, cwd=str(args.tree.resolve()), capture_output=True, text=True)
    if done.returncode != 0:
        tail = done.stderr.strip().splitlines()[-1:] or [f"exit {done.returncode}"]
        result = {"failed": tail[0]}
    else:
        result = json.loads(done.stdout.strip().splitlines()[-1])
    import torch

    result.update(size=f"{height}x{width}", ms_flip=args.ms_flip, tree=str(args.tree), cpu=cpu_model(),
                  torch=torch.__version__, threads=torch.get_num_threads())
    print(json.dumps(result))
    return 0 if "failed" not in result else 1


if __name__ == "__main__":
    sys.exit(main())
