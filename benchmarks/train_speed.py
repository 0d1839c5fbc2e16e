"""One training iteration of PSPNet R-50-D8 at 512x1024, batch 2: a plain eager loop against psp-zoo's Trainer.

Every variant trains its own copy of the same randomly initialized network (mmcv's init) on the
same batch: "plain_eager" is the loop a user would write (forward, decode + 0.4 x auxiliary
cross-entropy, backward, SGD step); "trainer" is ``psp_zoo.Trainer.step`` (the same arithmetic,
lr set before the step); "trainer_channels_last" adds the channels-last memory format, and
"trainer_compile" (``--compile``) torch.compile on top. After a warm-up step each, round r runs
every variant once in a rotated order, and a variant's speed-up is the median over rounds of
plain_time[r] / variant_time[r], so load from other processes on a shared machine hits both
sides of each ratio. Peak memory is measured around the first (warm-up) step of each variant (CUDA
max_memory_allocated, or the CPU peak-RSS rise) during its first step.

    flock /tmp/psp-bench.lock python benchmarks/train_speed.py --rounds 3
    python benchmarks/train_speed.py --size 128x256 --rounds 2 --out-dir /tmp/ts   # a quick look

Writes benchmarks/results/train_speed_<device>_torch<version>.json and prints a table.

``--processes 2`` measures instead the row of a 2-process CPU job (gloo, one thread per process,
``--batch`` images per process): psp-zoo's Trainer, which runs the model inside torch's
DistributedDataParallel, against ``HandAveragedTrainer``, the baseline it replaced (issue 29: every
gradient copied into one flat tensor and all-reduced after the whole backward pass; it lives only
here). Both trainers are built in each process from the same weights and step on the same images;
round r runs both once in a rotated order (a barrier before each step), a step's time is the
slower process's, and the speed-up is the median over rounds of hand_time[r] / ddp_time[r]. Memory
is each process's peak-RSS rise during each timed step (median over rounds), so the baseline's
extra flat copy shows. Their weights after the rounds are compared, as a check that both trained
alike.

    flock /tmp/psp-bench.lock python benchmarks/train_speed.py --processes 2 --size 128x256 --batch 1 --rounds 5

Writes benchmarks/results/train_speed_2proc_<device>_torch<version>.json.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from tabulate import tabulate

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # benchmark the checkout this script lives in

from psp_zoo.distributed import Distributed  # noqa: E402
from psp_zoo.environment import cpu_flags, cpu_name, environment_info  # noqa: E402
from psp_zoo.evaluation.measure import PeakMemory  # noqa: E402
from psp_zoo.files import atomic_write  # noqa: E402
from psp_zoo.model import PSPNet  # noqa: E402
from psp_zoo.results.records import device_tag  # noqa: E402
from psp_zoo.training.pretrained import init_weights  # noqa: E402
from psp_zoo.training.recipe import recipe_for  # noqa: E402
from psp_zoo.training.trainer import Trainer  # noqa: E402

NAME = "pspnet_r50-d8_512x1024_40k_cityscapes"


def plain_step(model: PSPNet, optimizer: torch.optim.Optimizer) -> Callable[[torch.Tensor, torch.Tensor], float]:
    """The loop a user writes by hand (torchvision's references style), same loss and optimizer."""
    def step(images: torch.Tensor, labels: torch.Tensor) -> float:
        features = model.backbone(images)
        losses = []
        for head, weight in ((model.decode_head, 1.0), (model.auxiliary_head, 0.4)):
            logits = F.interpolate(head(features), size=labels.shape[-2:], mode="bilinear", align_corners=False)
            losses.append(weight * F.cross_entropy(logits, labels, ignore_index=255))
        loss = sum(losses)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss.item()
    return step


class HandAveragedTrainer(Trainer):
    """BASELINE ONLY, not psp-zoo's engine: the Trainer with the hand-written gradient averaging that
    DistributedDataParallel replaced (issue 29), for the 2-process row; build it with ``ddp=False``."""

    def _optimizer_step(self) -> None:
        params = [p for p in self.model.parameters() if p.requires_grad]
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= self.distributed.world_size
        offset = 0
        for param, grad in zip(params, grads):
            param.grad = flat[offset:offset + grad.numel()].view_as(grad).clone()
            offset += grad.numel()
        super()._optimizer_step()


def two_process_worker(rank: int, world_size: int, port: int, args: argparse.Namespace, out: str) -> None:
    """One process of the 2-process row: both trainers, interleaved timed steps, its numbers to ``out``."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        size = parse_size(args.size)
        torch.manual_seed(0)
        model = init_weights(PSPNet(depth=50, num_classes=19))
        generator = torch.Generator().manual_seed(1 + rank)
        images = torch.randn(args.batch, 3, *size, generator=generator)
        labels = torch.randint(0, 19, (args.batch, *size), generator=generator)
        labels[:, : size[0] // 8] = 255
        recipe, place, cpu = recipe_for(NAME), Distributed(rank, world_size), torch.device("cpu")
        trainers = {"ddp": Trainer(copy.deepcopy(model), recipe, device=cpu, distributed=place),
                    "hand_averaged": HandAveragedTrainer(copy.deepcopy(model), recipe, device=cpu, distributed=place,
                                                         ddp=False)}
        assert trainers["ddp"].engine is not None and trainers["hand_averaged"].engine is None
        times: Dict[str, List[float]] = {name: [] for name in trainers}
        memory: Dict[str, List[float]] = {name: [] for name in trainers}
        names = list(trainers)
        for name in names:  # warm-up
            trainers[name].step(images, labels)
        for r in range(args.rounds):
            for name in names[r % 2:] + names[:r % 2]:
                dist.barrier()
                with PeakMemory(cpu, above_baseline=True) as peak:
                    times[name].append(timed(trainers[name].step, images, labels, cpu))
                memory[name].append(peak.bytes / 2 ** 20 if peak.exact else float("nan"))
            if rank == 0:
                print(f"  round {r + 1}/{args.rounds}: " + ", ".join(f"{n} {times[n][-1]:.2f}s" for n in names),
                      flush=True)
        ddp_state, hand_state = (trainers[name].state_dict()["model"] for name in names)
        agreement = max(((ddp_state[k] - hand_state[k]).abs().max() / hand_state[k].abs().max().clamp(min=1e-12))
                        .item() for k in hand_state if hand_state[k].is_floating_point())
        Path(out, f"rank{rank}.json").write_text(json.dumps({"times": times, "memory": memory,
                                                             "max_rel_weight_diff": agreement}))
    finally:
        dist.destroy_process_group()


def measure_two_processes(args: argparse.Namespace) -> List[dict]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with tempfile.TemporaryDirectory() as out:
        mp.spawn(two_process_worker, args=(2, port, args, out), nprocs=2, join=True)
        ranks = [json.loads(Path(out, f"rank{r}.json").read_text()) for r in (0, 1)]
    job = {name: [max(a, b) for a, b in zip(ranks[0]["times"][name], ranks[1]["times"][name])]
           for name in ranks[0]["times"]}
    return [{"variant": name, "median_s": statistics.median(job[name]), "times_s": job[name],
             "speedup_vs_hand_averaged": statistics.median(h / t for h, t in zip(job["hand_averaged"], job[name])),
             "peak_memory_rise_mib_per_process": [statistics.median(rank["memory"][name]) for rank in ranks],
             "max_rel_weight_diff_ddp_vs_hand": ranks[0]["max_rel_weight_diff"]} for name in job]


def parse_size(text: str):
    return tuple(int(v) for v in text.lower().split("x"))


def variants(model: PSPNet, device: torch.device, compile_too: bool) -> Dict[str, Callable]:
    recipe = recipe_for(NAME)
    plain = copy.deepcopy(model).to(device).train()
    optimizer = torch.optim.SGD(plain.parameters(), lr=recipe.lr, momentum=recipe.momentum,
                                weight_decay=recipe.weight_decay)
    calls = {"plain_eager": plain_step(plain, optimizer)}
    calls["trainer"] = Trainer(copy.deepcopy(model), recipe, device=device).step
    calls["trainer_channels_last"] = Trainer(copy.deepcopy(model), recipe, device=device, channels_last=True).step
    if compile_too:
        calls["trainer_compile"] = Trainer(copy.deepcopy(model), recipe, device=device, channels_last=True,
                                           compile=True).step
    return calls


def timed(call: Callable, images: torch.Tensor, labels: torch.Tensor, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    call(images, labels)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def measure(calls: Dict[str, Callable], images, labels, device: torch.device, rounds: int) -> List[dict]:
    memory = {}
    for name, call in calls.items():  # the first step warms up (and compiles); its peak memory is recorded
        with PeakMemory(device, above_baseline=True) as peak:
            timed(call, images, labels, device)
        memory[name] = peak.bytes / 2 ** 20 if peak.exact else None
        print(f"  warmed up {name}", flush=True)
    times: Dict[str, List[float]] = {name: [] for name in calls}
    names = list(calls)
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            times[name].append(timed(calls[name], images, labels, device))
        print(f"  round {r + 1}/{rounds}: " + ", ".join(f"{n} {times[n][-1]:.2f}s" for n in names), flush=True)
    base = times["plain_eager"]
    return [{"variant": name, "median_s": statistics.median(times[name]), "times_s": times[name],
             "speedup_vs_plain": statistics.median(b / t for b, t in zip(base, times[name])),
             "peak_memory_mib": memory[name]} for name in names]


def environment(device: torch.device, size, batch: int) -> dict:
    return {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
        "cpu_flags": cpu_flags(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch": torch.__version__, "python": platform.python_version(), "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(), "load_average_1_5_15min": list(os.getloadavg()),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "model": "PSPNet R-50-D8, 19 classes, mmcv initialization (random), SGD lr 0.01 momentum 0.9 wd 5e-4",
        "input": f"batch {batch} x 3 x {size[0]} x {size[1]}",
        "note": "shared machine: other processes may have been running (see load average); interleaved rounds, "
                "median of per-round ratios",
    }


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--size", default="512x1024", help="crop HxW (default 512x1024, the Cityscapes crop)")
    parser.add_argument("--batch", type=int, default=2, help="images per step (default 2, one published GPU's)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--compile", action="store_true", help="also time the Trainer under torch.compile")
    parser.add_argument("--processes", type=int, choices=(1, 2), default=1,
                        help="2: the 2-process CPU row, DDP against the hand-written averaging (see above)")
    parser.add_argument("--out-dir", default=str(REPO / "benchmarks" / "results"))
    return parser.parse_args(argv)


def main_two_processes(args: argparse.Namespace) -> int:
    rows = measure_two_processes(args)
    size = parse_size(args.size)
    env = environment(torch.device("cpu"), size, args.batch)
    env.update(threads=1, processes=2, backend="gloo",
               input=f"2 processes x batch {args.batch} x 3 x {size[0]} x {size[1]}",
               note=env["note"] + "; a step's time is the slower process's; memory: peak-RSS rise during each "
                                  "timed step, median over rounds, per process")
    print(tabulate([[r["variant"], f"{r['median_s']:.2f}", f"{r['speedup_vs_hand_averaged']:.2f}x",
                     " / ".join(f"{m:.0f}" for m in r["peak_memory_rise_mib_per_process"])] for r in rows],
                   headers=["variant", "median s/iter", "vs hand_averaged", "peak rise MiB (rank 0 / 1)"]))
    print(f"weights after the rounds, DDP vs hand-averaged: {rows[0]['max_rel_weight_diff_ddp_vs_hand']:.1e} "
          f"of each tensor's scale at most")
    tag = device_tag(environment_info(torch.device("cpu")))
    stem = f"train_speed_2proc_{tag}_torch{torch.__version__.split('+')[0]}"
    path = Path(args.out_dir) / f"{stem}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, json.dumps({"environment": env, "results": rows}, indent=1))
    print(f"wrote {path}")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    if args.processes == 2:
        return main_two_processes(args)
    device = torch.device(args.device)
    size = parse_size(args.size)
    torch.manual_seed(0)
    model = init_weights(PSPNet(depth=50, num_classes=19))
    images = torch.randn(args.batch, 3, *size, device=device)
    labels = torch.randint(0, 19, (args.batch, *size), device=device)
    labels[:, : size[0] // 8] = 255
    rows = measure(variants(model, device, args.compile), images, labels, device, args.rounds)
    env = environment(device, size, args.batch)
    print(tabulate([[r["variant"], f"{r['median_s']:.2f}", f"{r['speedup_vs_plain']:.2f}x",
                     "-" if r["peak_memory_mib"] is None else f"{r['peak_memory_mib']:.0f}"] for r in rows],
                   headers=["variant", "median s/iter", "vs plain", "peak MiB"]))
    stem = f"train_speed_{device_tag(environment_info(device))}_torch{torch.__version__.split('+')[0]}"
    path = Path(args.out_dir) / f"{stem}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, json.dumps({"environment": env, "results": rows}, indent=1))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
