"""ONNX export of a full-size PSPNet: export time, file size, accuracy and onnxruntime vs PyTorch speed.

The model is speed.py's R-50-D8 (19 classes, random weights with calibrated BN). It is exported
once with dynamic shapes, compared with the eager model at two sizes, then psp-zoo's default
fp32 fast path (``psp_zoo.optimize``) and the onnxruntime session are timed interleaved on the
same input: round r calls both (order alternating), the speed ratio is the median over rounds of
torch_time[r] / onnxruntime_time[r], so load from other processes hits both sides of each ratio.

    python benchmarks/onnx_speed.py                       # 512x1024, 5 rounds
    python benchmarks/onnx_speed.py --size 256x512 --rounds 3

Writes benchmarks/results/onnx_cpu_torch<version>.json and prints a summary.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from speed import environment, parse_size, random_image, random_model, timed  # noqa: E402

from psp_zoo.deploy.export import export_onnx  # noqa: E402
from psp_zoo.deploy.runtime import OnnxModel, onnx_backend_info  # noqa: E402
from psp_zoo.deploy.verify import compare_outputs  # noqa: E402
from psp_zoo.optimization import optimize  # noqa: E402
from psp_zoo.files import atomic_write  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=parse_size, default=(512, 1024))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out-dir", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args(argv)
    cpu = torch.device("cpu")
    model = random_model("r50", cpu)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "r50.onnx"
        start = time.perf_counter()
        export_onnx(model, path, input_size=args.size)
        export_s = time.perf_counter() - start
        size_mib = path.stat().st_size / 2**20
        runner = OnnxModel(path)
        x = random_image(1, *args.size, generator=torch.Generator().manual_seed(1))
        checks = []
        for shape in ((1, 3, *args.size), (1, 3, 97, 131)):
            inp = random_image(*shape[:1], *shape[2:], generator=torch.Generator().manual_seed(2))
            with torch.no_grad():
                reference = model(inp)
            result = compare_outputs(reference, runner(inp))
            checks.append({"shape": list(shape), "max_rel_diff": result.rel_diff, "argmax_agreement": result.agreement})
            print(result.line(), flush=True)
        fast = optimize(model)
        calls = {"torch_fast_path": lambda: fast(x), "onnxruntime": lambda: runner(x)}
        for call in calls.values():  # warm-up
            call()
        times = {name: [] for name in calls}
        for r in range(args.rounds):
            for name in (list(calls) if r % 2 == 0 else list(calls)[::-1]):
                times[name].append(timed(calls[name], cpu)[0])
            print(f"round {r + 1}: " + ", ".join(f"{n} {times[n][-1]:.2f} s" for n in calls), flush=True)
        ratios = [a / b for a, b in zip(times["torch_fast_path"], times["onnxruntime"])]
        record = {
            "model": "R-50-D8, 19 classes", "input": list(args.size), "export_s": export_s,
            "onnx_file_mib": size_mib, "checks": checks, "rounds": args.rounds,
            "median_s": {n: statistics.median(t) for n, t in times.items()},
            "onnxruntime_speedup_over_torch": statistics.median(ratios),
            "speedup_min_max": [min(ratios), max(ratios)], "backend": onnx_backend_info(runner),
            "env": environment(cpu, "ONNX export benchmark"),
        }
    out = args.out_dir / f"onnx_cpu_torch{torch.__version__.split('+')[0]}.json"
    atomic_write(out, json.dumps(record, indent=1) + "\n")
    print(json.dumps({k: v for k, v in record.items() if k != "env"}, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
