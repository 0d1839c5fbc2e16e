"""The training check for a lent GPU: a few steps of the R-50-D8 Cityscapes recipe, with and without DDP.

PSPNet R-50-D8, 19 classes, mmcv's random initialization, the recipe of
pspnet_r50-d8_512x1024_40k_cityscapes (SGD lr 0.01, momentum 0.9, wd 5e-4), random 512x1024 crops,
batch 2 (one published GPU's), on one GPU. Four variants: psp-zoo's Trainer as one process trains
("plain": no wrapper) and inside torch's DistributedDataParallel with a one-process NCCL group
("ddp1": what each process of a torchrun job runs, so its cost over plain is the wrapper's), each
in fp32 with TF32 off and with ``--amp`` (fp16 autocast, dynamic loss scale). Peak memory is each
variant's alone: built, one warm-up step, then ``max_memory_allocated`` over one step (the published
table's "Mem (GB)" kind), the variant freed before the next. Time: all four built, a warm-up step
each, then ``--steps`` rounds each running every variant once in a rotated order; the median.

    python benchmarks/gpu_train_check.py                     # on the lent GPU, about a minute
    python benchmarks/gpu_train_check.py --dry-run --out-dir /tmp/check   # CPU, tiny network and size

Writes benchmarks/results/gpu_train_check_<device>_torch<version>.json and prints a table. Without
CUDA it says so and exits 2; ``--dry-run`` runs the same code on the CPU (a narrow network at
32x64, fp32 only, a gloo group) so the parts that need no GPU can be checked anywhere.
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import socket
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch
import torch.distributed as dist

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # check the checkout this script lives in

from psp_zoo.distributed import Distributed  # noqa: E402
from psp_zoo.environment import environment_info  # noqa: E402
from psp_zoo.evaluation.measure import PeakMemory  # noqa: E402
from psp_zoo.files import atomic_write  # noqa: E402
from psp_zoo.model import PSPNet  # noqa: E402
from psp_zoo.results.records import device_tag  # noqa: E402
from psp_zoo.training.pretrained import init_weights  # noqa: E402
from psp_zoo.training.recipe import recipe_for  # noqa: E402
from psp_zoo.training.trainer import Trainer  # noqa: E402

NAME = "pspnet_r50-d8_512x1024_40k_cityscapes"
TINY = {"stem_channels": 8, "base_channels": 8, "channels": 16, "aux_channels": 8}


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default=None, help="crop HxW (default 512x1024, the recipe's; 32x64 dry)")
    parser.add_argument("--batch", type=int, default=2, help="images per step (default 2, one published GPU's)")
    parser.add_argument("--steps", type=int, default=5, help="timed rounds after the warm-up (default 5)")
    parser.add_argument("--dry-run", action="store_true",
                        help="on the CPU: a narrow network at a tiny size, fp32 only; needs --out-dir")
    parser.add_argument("--out-dir", default=None, help="where the record goes (default benchmarks/results)")
    args = parser.parse_args(argv)
    if args.dry_run and args.out_dir is None:
        parser.error("--dry-run needs --out-dir: its CPU record does not belong in benchmarks/results")
    try:
        args.size = tuple(int(v) for v in (args.size or ("32x64" if args.dry_run else "512x1024")).lower().split("x"))
        if len(args.size) != 2 or min(args.size) < 32:
            raise ValueError
    except ValueError:
        parser.error(f"--size must be HxW, both at least 32, like 512x1024; got {args.size!r}")
    if args.batch < 1 or args.steps < 1:
        parser.error("--batch and --steps must be at least 1")
    return args


def variants(model: PSPNet, device: torch.device, amp_too: bool) -> Dict[str, Callable[[], Trainer]]:
    """Name -> a function building that variant's Trainer from its own copy of ``model``."""
    recipe = recipe_for(NAME)
    one = Distributed(rank=0, world_size=1)
    builders = {"plain_fp32": lambda: Trainer(copy.deepcopy(model), recipe, device=device, amp=False),
                "ddp1_fp32": lambda: Trainer(copy.deepcopy(model), recipe, device=device, amp=False,
                                             distributed=one, ddp=True)}
    if amp_too:
        builders["plain_amp"] = lambda: Trainer(copy.deepcopy(model), recipe, device=device, amp=True)
        builders["ddp1_amp"] = lambda: Trainer(copy.deepcopy(model), recipe, device=device, amp=True,
                                               distributed=one, ddp=True)
    return builders


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(trainer: Trainer, images: torch.Tensor, labels: torch.Tensor, device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    trainer.step(images, labels)
    _sync(device)
    return time.perf_counter() - start


def measure(builders: Dict[str, Callable[[], Trainer]], images, labels, device: torch.device,
            steps: int) -> List[dict]:
    memory: Dict[str, Optional[float]] = {}
    for name, build in builders.items():  # each alone: memory comparable to the published table's
        trainer = build()
        trainer.step(images, labels)
        with PeakMemory(device, above_baseline=False) as peak:
            trainer.step(images, labels)
        memory[name] = peak.bytes / 2 ** 20 if peak.exact else None
        del trainer
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    trainers = {name: build() for name, build in builders.items()}
    for trainer in trainers.values():
        trainer.step(images, labels)
    times: Dict[str, List[float]] = {name: [] for name in trainers}
    names = list(trainers)
    for r in range(steps):
        for name in names[r % len(names):] + names[:r % len(names)]:
            times[name].append(_timed(trainers[name], images, labels, device))
        print(f"  round {r + 1}/{steps}: " + ", ".join(f"{n} {times[n][-1] * 1000:.0f} ms" for n in names),
              flush=True)
    plain = {name: times[name.replace("ddp1", "plain")] for name in names}
    return [{"variant": name, "median_ms": 1000 * statistics.median(times[name]),
             "times_ms": [1000 * t for t in times[name]],
             "vs_plain_same_precision": statistics.median(p / t for p, t in zip(plain[name], times[name])),
             "peak_memory_mib": memory[name]} for name in names]


def record(rows: List[dict], args: argparse.Namespace, device: torch.device) -> dict:
    environment = environment_info(device)
    environment.update(
        tf32={"matmul": torch.backends.cuda.matmul.allow_tf32, "cudnn": torch.backends.cudnn.allow_tf32},
        model="PSPNet R-50-D8" + (" (narrow: dry run)" if args.dry_run else "") + ", 19 classes, mmcv init",
        recipe=NAME, input=f"batch {args.batch} x 3 x {args.size[0]} x {args.size[1]}", steps=args.steps,
        memory="max_memory_allocated over one step, each variant alone" if device.type == "cuda"
        else "peak-RSS over one step, each variant alone", dry_run=args.dry_run)
    return {"environment": environment, "results": rows}


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_train_check: error: no CUDA device here; run it on a GPU machine, or add --dry-run --out-dir DIR "
              "to check the script on the CPU", file=sys.stderr)
        return 2
    device = torch.device("cpu" if args.dry_run else "cuda")
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32: TF32 off for the fp32 rows
    torch.backends.cudnn.allow_tf32 = False
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    dist.init_process_group("gloo" if args.dry_run else "nccl", init_method=f"tcp://127.0.0.1:{port}",
                            rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        model = init_weights(PSPNet(depth=50, num_classes=19, **(TINY if args.dry_run else {})))
        images = torch.randn(args.batch, 3, *args.size, device=device)
        labels = torch.randint(0, 19, (args.batch, *args.size), device=device)
        labels[:, : args.size[0] // 8] = 255
        rows = measure(variants(model, device, amp_too=not args.dry_run), images, labels, device, args.steps)
    finally:
        dist.destroy_process_group()
    print(f"{'variant':<12} {'median ms':>10} {'vs plain':>9} {'peak MiB':>9}")
    for row in rows:
        memory = "-" if row["peak_memory_mib"] is None else f"{row['peak_memory_mib']:.0f}"
        print(f"{row['variant']:<12} {row['median_ms']:>10.1f} {row['vs_plain_same_precision']:>8.2f}x {memory:>9}")
    out = record(rows, args, device)
    tag = device_tag(out["environment"])
    path = Path(args.out_dir or REPO / "benchmarks" / "results") / \
        f"gpu_train_check_{tag}_torch{torch.__version__.split('+')[0]}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, json.dumps(out, indent=1))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
