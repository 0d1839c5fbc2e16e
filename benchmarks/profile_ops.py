"""Per-op CPU time of one forward pass (torch.profiler), plain eager model against optimize() variants.

    python benchmarks/profile_ops.py                                   # R-50-D8 at 512x1024
    python benchmarks/profile_ops.py --variants fast_fp32,fast_fp32_nchw --top 12

Writes benchmarks/results/profile_<model>_<size>_torch<version>.json (top ops per variant, with
the CPU named and the load average) and prints one table per variant. One profiled call after a
warm-up call; for speed ratios use speed.py, whose interleaved rounds survive a shared machine.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import List, Optional

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from speed import REPO, WHOLE_VARIANTS, environment, parse_size, random_image, random_model  # noqa: E402

from psp_zoo.files import atomic_write  # noqa: E402
from psp_zoo.model.optimization import optimize  # noqa: E402


def top_ops(net, x: torch.Tensor, top: int, by_shape: bool = False) -> List[dict]:
    """The ``top`` ops by self CPU time; ``by_shape`` splits each op by its input shapes (which
    conv of the network it is) instead of adding all its calls together."""
    with torch.no_grad():
        net(x)  # warm-up (and compilation, for compiled variants)
        with profile(activities=[ProfilerActivity.CPU], record_shapes=by_shape) as prof:
            net(x)
    events = sorted(prof.key_averages(group_by_input_shape=by_shape), key=lambda e: e.self_cpu_time_total,
                    reverse=True)
    total = sum(e.self_cpu_time_total for e in events)
    label = (lambda e: f"{e.key} {e.input_shapes[:2]}") if by_shape else (lambda e: e.key)
    return [{"op": label(e), "calls": e.count, "self_ms": e.self_cpu_time_total / 1e3,
             "share": e.self_cpu_time_total / total} for e in events[:top]] + [
        {"op": "TOTAL", "calls": None, "self_ms": total / 1e3, "share": 1.0}]


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="r50")
    parser.add_argument("--size", type=parse_size, default=(512, 1024), metavar="HxW")
    parser.add_argument("--variants", default="fast_fp32_no_winograd,fast_fp32")
    parser.add_argument("--by-shape", action="store_true", help="one row per op and input shape")
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--out-dir", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args(argv)
    model = random_model(args.model, torch.device("cpu"))
    x = random_image(1, *args.size)
    report = {"environment": environment(torch.device("cpu"), "one profiled forward after one warm-up"),
              "model": args.model, "size": f"{args.size[0]}x{args.size[1]}", "profiles": {}}
    for name in ["eager", *args.variants.split(",")]:
        kwargs = WHOLE_VARIANTS[name]
        net = model if kwargs is None else optimize(model, **kwargs)
        rows = top_ops(net, x, args.top, args.by_shape)
        report["profiles"][name] = rows
        print(f"\n{name} (load average {os.getloadavg()[0]:.2f})")
        for row in rows:
            print(f"  {row['op'][:90]:<90} {row['calls'] or '':>5} {row['self_ms']:>10.1f} ms {row['share']:>6.1%}")
    stem = f"profile_{args.model}_{args.size[0]}x{args.size[1]}_torch{torch.__version__.split('+')[0]}"
    stem += "_by_shape" if args.by_shape else ""
    path = args.out_dir / f"{stem}.json"
    atomic_write(path, json.dumps(report, indent=1))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
