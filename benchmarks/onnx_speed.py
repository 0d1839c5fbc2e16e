"""Deployed PSPNet speed on the CPU: PyTorch eager and fast path vs onnxruntime (and OpenVINO) on both exports.

The model is speed.py's R-50-D8 (19 classes, random weights with calibrated BN), exported twice
with dynamic shapes: the default graph (the factorized PSP head, ``export_onnx(model, path)``)
and the ``plain_head=True`` graph (the bottleneck conv over the upsampled pyramid). Timed, on
the same input, in interleaved rounds:

- ``eager``: the model as loaded (``model(x)`` under no_grad), the reference for every ratio;
- ``fast_path``: ``psp_zoo.optimize(model)`` (BN folded, factorized head, Winograd, channels-last);
- ``ort_plain`` / ``ort_factorized``: onnxruntime sessions on the two files;
- ``openvino_plain`` / ``openvino_factorized``: OpenVINO's CPU plugin in f32 (when installed).

Every runtime gets the same thread count (torch's, or ``--threads``); onnxruntime's idle
threads do not spin (``session.intra_op.allow_spinning`` = 0): spinning threads keep the cores
busy after a run and slow whatever is timed next. Each round runs every runtime once, starting
one further along the list each round, so load from other processes (a shared machine) falls on
all of them; a ratio is the median over rounds of eager_time[r] / time[r], with its range.

    flock /tmp/psp-bench.lock python benchmarks/onnx_speed.py               # 512x1024, 7 rounds
    flock /tmp/psp-bench.lock python benchmarks/onnx_speed.py --size 256x512 --rounds 3

Writes benchmarks/results/onnx_cpu_torch<version>.json and prints the table.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch
from tabulate import tabulate

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from speed import environment, parse_size, random_image, random_model, timed  # noqa: E402

from psp_zoo.deploy.export import export_onnx  # noqa: E402
from psp_zoo.deploy.verify import compare_outputs  # noqa: E402
from psp_zoo.files import atomic_write  # noqa: E402
from psp_zoo.model.optimization import optimize  # noqa: E402

ODD_SIZE = (97, 131)  # checked besides the timed size: pooled at 13 x 17, no pool scale divides it
MUST_SHOW = {"ort_factorized_over_eager": 1.4, "ort_factorized_over_ort_plain": 1.1}


def ort_runner(path: Path, threads: int) -> Callable[[torch.Tensor], torch.Tensor]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return lambda x: torch.from_numpy(session.run(None, {"input": x.numpy()})[0])


def openvino_runner(path: Path, threads: int) -> Optional[Callable[[torch.Tensor], torch.Tensor]]:
    try:
        import openvino as ov
    except ImportError:
        return None
    config = {"INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY"}
    compiled = ov.Core().compile_model(str(path), "CPU", config)
    return lambda x: torch.from_numpy(compiled(x.numpy())[0].copy())


def versions() -> Dict[str, str]:
    found = {"torch": torch.__version__}
    for name in ("onnx", "onnxruntime", "openvino"):
        try:
            found[name] = __import__(name).__version__
        except ImportError:
            pass
    return found


def runtimes(model: torch.nn.Module, files: Dict[str, Path], threads: int) -> Dict[str, Callable]:
    """name -> callable(x) -> logits, for every runtime available here."""
    fast = optimize(model)
    calls = {"eager": model, "fast_path": fast, "ort_plain": ort_runner(files["plain"], threads),
             "ort_factorized": ort_runner(files["factorized"], threads)}
    for kind in ("plain", "factorized"):
        runner = openvino_runner(files[kind], threads)
        if runner is not None:
            calls[f"openvino_{kind}"] = runner
    return calls


def check(calls: Dict[str, Callable], model: torch.nn.Module, size) -> List[dict]:
    """Every runtime's logits against the eager model's, at the timed size and an odd one."""
    rows = []
    for shape in (size, ODD_SIZE):
        x = random_image(1, *shape, generator=torch.Generator().manual_seed(2))
        with torch.no_grad():
            reference = model(x)
            for name, call in calls.items():
                if name != "eager":
                    result = compare_outputs(reference, call(x))
                    rows.append({"runtime": name, "shape": list(x.shape), "max_rel_diff": result.rel_diff,
                                 "argmax_agreement": result.agreement})
                    print(f"{name:>20} {result.line()}", flush=True)
    return rows


def interleaved(calls: Dict[str, Callable], x: torch.Tensor, rounds: int) -> Dict[str, List[float]]:
    names = list(calls)
    times: Dict[str, List[float]] = {name: [] for name in names}
    with torch.no_grad():
        for name in names:  # warm-up: first-call allocations and plugin compilation
            calls[name](x)
        for r in range(rounds):
            for name in names[r % len(names):] + names[:r % len(names)]:
                times[name].append(timed(lambda: calls[name](x), torch.device("cpu"))[0])
            print(f"round {r + 1}: " + ", ".join(f"{n} {times[n][-1]:.2f} s" for n in names), flush=True)
    return times


def ratios(times: Dict[str, List[float]]) -> Dict[str, dict]:
    """Per-round ratios (reference time / runtime time): median and range over the rounds."""
    def summary(reference: List[float], other: List[float]) -> dict:
        values = [a / b for a, b in zip(reference, other)]
        return {"median": statistics.median(values), "min": min(values), "max": max(values)}

    out = {f"{name}_over_eager": summary(times["eager"], t) for name, t in times.items() if name != "eager"}
    out["ort_factorized_over_ort_plain"] = summary(times["ort_plain"], times["ort_factorized"])
    if "openvino_factorized" in times:
        out["openvino_factorized_over_openvino_plain"] = summary(times["openvino_plain"], times["openvino_factorized"])
    return out


def export_both(model: torch.nn.Module, folder: Path, size) -> Dict[str, dict]:
    files = {}
    for kind, plain in (("plain", True), ("factorized", False)):
        start = time.perf_counter()
        path = export_onnx(model, folder / f"r50_{kind}.onnx", input_size=(64, 128), plain_head=plain)
        files[kind] = {"path": path, "export_s": time.perf_counter() - start,
                       "mib": path.stat().st_size / 2**20}
    return files


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=parse_size, default=(512, 1024))
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=None, help="default: torch.get_num_threads()")
    parser.add_argument("--out-dir", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args(argv)
    threads = args.threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    model = random_model("r50", torch.device("cpu")).eval()
    with tempfile.TemporaryDirectory() as tmp:
        files = export_both(model, Path(tmp), args.size)
        calls = runtimes(model, {kind: f["path"] for kind, f in files.items()}, threads)
        checks = check(calls, model, args.size)
        x = random_image(1, *args.size, generator=torch.Generator().manual_seed(1))
        times = interleaved(calls, x, args.rounds)
    summary = ratios(times)
    record = {
        "model": "R-50-D8, 19 classes", "input": list(args.size), "rounds": args.rounds, "threads": threads,
        "onnxruntime_session": {"intra_op_num_threads": threads, "session.intra_op.allow_spinning": "0",
                                "graph_optimization_level": "ORT_ENABLE_ALL (default)"},
        "openvino_config": {"INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": "f32",
                            "PERFORMANCE_HINT": "LATENCY"} if "openvino_plain" in calls else None,
        "exports": {kind: {"export_s": f["export_s"], "mib": f["mib"]} for kind, f in files.items()},
        "checks": checks, "median_s": {n: statistics.median(t) for n, t in times.items()},
        "min_max_s": {n: [min(t), max(t)] for n, t in times.items()}, "ratios": summary,
        "must_show": {key: {"target": target, "median": summary[key]["median"],
                            "met": summary[key]["median"] >= target} for key, target in MUST_SHOW.items()},
        "versions": versions(),
        "env": environment(torch.device("cpu"), "ONNX deploy benchmark; a shared VM: other processes "
                                                "may have been running (see load_average)"),
    }
    out = args.out_dir / f"onnx_cpu_torch{torch.__version__.split('+')[0]}.json"
    atomic_write(out, json.dumps(record, indent=1) + "\n")
    rows = [[name, f"{record['median_s'][name]:.3f}",
             *([f"{summary[name + '_over_eager'][k]:.2f}" for k in ("median", "min", "max")]
               if name != "eager" else ["1.00", "", ""])] for name in times]
    print(tabulate(rows, headers=["runtime", "median s", "x eager", "min", "max"]))
    for key, value in record["must_show"].items():
        print(f"{key}: {value['median']:.2f} (target {value['target']}, {'met' if value['met'] else 'NOT met'})")
    print(f"{record['env']['device_name']}, flags {record['env']['cpu_flags']}, {threads} threads; wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
