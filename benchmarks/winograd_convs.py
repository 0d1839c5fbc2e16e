"""Direct 3x3 conv (oneDNN, channels-last) against psp-zoo's Winograd F(4x4, 3x3), one conv at a time.

The shapes are those of R-50-D8's 3x3 convs at a 512x1024 input (stem, each stage, the PSP
bottleneck's x part), which is where ``use_winograd``'s 256-channel threshold comes from.
Interleaved rounds: each round times every shape both ways; the ratio is the median over rounds
of direct_time / winograd_time, so load from other processes hits both sides of a ratio.

    python benchmarks/winograd_convs.py                 # 5 rounds, CPU
    python benchmarks/winograd_convs.py --rounds 3 --quick

Writes benchmarks/results/winograd_convs_<device>_torch<version>.json and prints a table.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import List, Optional

import torch
import torch.nn.functional as F
from tabulate import tabulate

sys.path.insert(0, str(Path(__file__).resolve().parent))
from speed import REPO, compare, environment, timed  # noqa: E402

from psp_zoo.files import atomic_write  # noqa: E402
from psp_zoo.model.winograd import winograd_conv2d, winograd_weight  # noqa: E402

# (in, out, height, width, dilation, where in R-50-D8 at 512x1024)
SHAPES = [
    (32, 32, 256, 512, 1, "stem conv2"),
    (32, 64, 256, 512, 1, "stem conv3"),
    (64, 64, 128, 256, 1, "layer1"),
    (128, 128, 64, 128, 1, "layer2"),
    (256, 256, 64, 128, 2, "layer3 (dilation 2)"),
    (512, 512, 64, 128, 4, "layer4 (dilation 4)"),
    (2048, 512, 64, 128, 1, "PSP bottleneck, x part"),
]


def measure(rounds: int, shapes: list) -> List[dict]:
    generator = torch.Generator().manual_seed(0)
    cases = []
    for c_in, c_out, height, width, dilation, where in shapes:
        x = torch.randn(1, c_in, height, width, generator=generator).contiguous(memory_format=torch.channels_last)
        weight = (torch.randn(c_out, c_in, 3, 3, generator=generator) / (3 * c_in ** 0.5)).contiguous(
            memory_format=torch.channels_last)
        bias = torch.randn(c_out, generator=generator)
        transformed = winograd_weight(weight)
        direct = lambda x=x, w=weight, b=bias, d=dilation: F.conv2d(x, w, b, padding=d, dilation=d)  # noqa: E731
        fast = lambda x=x, w=transformed, b=bias, d=dilation: winograd_conv2d(x, w, b, d)  # noqa: E731
        with torch.no_grad():
            ref, out = direct(), fast()
        cases.append({"shape": (c_in, c_out, height, width, dilation), "where": where, "calls": (direct, fast),
                      "max_rel_diff": compare(out, ref)["max_rel_diff"], "times": ([], [])})
    with torch.no_grad():
        for _ in range(rounds):
            for case in cases:
                for i, call in enumerate(case["calls"]):
                    case["times"][i].append(timed(call, torch.device("cpu"))[0])
    rows = []
    for case in cases:
        (c_in, c_out, height, width, dilation), (direct_t, fast_t) = case["shape"], case["times"]
        ratios = [a / b for a, b in zip(direct_t, fast_t)]
        gflop = 2 * c_in * c_out * 9 * height * width / 1e9
        rows.append({"conv": f"{c_in}->{c_out} {height}x{width} d{dilation}", "where": case["where"],
                     "direct_ms": 1e3 * statistics.median(direct_t), "winograd_ms": 1e3 * statistics.median(fast_t),
                     "speedup": statistics.median(ratios), "speedup_min": min(ratios), "speedup_max": max(ratios),
                     "direct_gflops": gflop / statistics.median(direct_t), "max_rel_diff": case["max_rel_diff"]})
    return rows


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="the shapes at a quarter of the area (smoke run)")
    parser.add_argument("--out-dir", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args(argv)
    shapes = [(a, b, h // 2, w // 2, d, where) for a, b, h, w, d, where in SHAPES] if args.quick else SHAPES
    rows = measure(args.rounds, shapes)
    env = environment(torch.device("cpu"), "interleaved rounds; ratio = median of per-round direct / winograd")
    print(tabulate(rows, headers="keys", floatfmt=".3g"))
    print(f"{env['device_name']} ({env['cpu_capability']}, flags {env['cpu_flags']}), torch {env['torch']}, "
          f"{env['threads']} threads")
    quick = "_quick" if args.quick else ""
    path = args.out_dir / f"winograd_convs_cpu_torch{torch.__version__.split('+')[0]}{quick}.json"
    args.out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(path, json.dumps({"environment": env, "rounds": args.rounds, "results": rows}, indent=1))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
