"""Wall time of the fine-tuning walk-through (docs/finetune.md) on its small example, on this machine.

    flock /tmp/psp-bench.lock python benchmarks/finetune_example.py [--iterations 300] [--rounds 1]

Generates the shapes dataset (psp_zoo.testing.write_example_dataset: 64 training and 8 validation images of 96x96),
a 5-class tiny-width R-18-D8 checkpoint in the published format (psp_zoo.testing; the offline
stand-in for a published file), then times each command of the walk-through as a user runs it
(a fresh ``psp-zoo`` process each): ``dataset check``, ``train --from`` (a few hundred iterations,
batch 4, 64x64 crops, one process), ``evaluate``, ``predict`` and ``export --verify`` by name.
With several rounds the median of each step is kept. Prints and records
benchmarks/results/finetune_example_cpu_torch<version>.json with the CPU model, its vector flags and
the versions. Other processes may share the machine: the times are what one run took, not a bound.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from psp_zoo import testing  # noqa: E402  (the generator of the example)
from psp_zoo.environment import cpu_flags, cpu_name, environment_info  # noqa: E402
from psp_zoo.testing import TINY_ARCH, write_tiny_checkpoint  # noqa: E402

NAME = "shapes_pspnet"


def _source(folder: Path) -> dict:
    path = write_tiny_checkpoint(folder / "published", "tiny_pspnet_r18-d8", num_classes=5, depth=18,
                                 stamp="20260101_000000")
    return {"name": "tiny_pspnet_r18-d8_cityscapes", "dataset": "cityscapes", "depth": 18, "crop_size": [64, 64],
            "schedule": 1000, "weights": path.as_uri(), "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
            "published": {}, "model": dict(TINY_ARCH, num_classes=5)}


def _steps(folder: Path, iterations: int) -> dict:
    data, work = folder / "shapes", folder / "work"
    user = ("--manifest", str(folder / "shapes.yml"), "--cache-dir", str(folder / "cache"))
    by_name = ("--manifest", str(work / "model_index.yml"), "--cache-dir", str(folder / "cache"))
    return {
        "dataset check": ["dataset", "check", str(data), "--dataset", "shapes", *user[:2]],
        "train --from": ["train", "--from", "tiny_pspnet_r18-d8_cityscapes", "--dataset", "shapes", "--name", NAME,
                         "--data-root", str(data), "--work-dir", str(work), "--max-iters", str(iterations),
                         "--lr", "0.05", "--batch-size", "4", "--gpus", "1", "--num-workers", "0", *user],
        "evaluate": ["evaluate", NAME, "--data-root", str(data), "--num-workers", "0", *by_name],
        "predict": ["predict", NAME, str(data / "images" / "val"), "--out", str(folder / "predictions"), *by_name],
        "export --verify": ["export", NAME, "--out", str(folder / "shapes.onnx"), "--verify", *by_name],
    }


def one_round(iterations: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        testing.write_example_dataset(folder / "shapes", train=64, val=8)
        spec = testing.example_declaration(train=testing.EXAMPLE_TRAIN)
        testing.write_example_manifest(folder / "shapes.yml", spec=spec, models=[_source(folder)])
        times, miou = {}, None
        for step, argv in _steps(folder, iterations).items():
            start = time.perf_counter()
            run = subprocess.run([sys.executable, "-m", "psp_zoo", *argv], capture_output=True, text=True,
                                 env=dict(os.environ, PYTHONPATH=str(REPO)))
            times[step] = round(time.perf_counter() - start, 1)
            if run.returncode != 0:
                raise SystemExit(f"{step} failed ({run.returncode}):\n{run.stdout[-2000:]}{run.stderr[-2000:]}")
            if step == "evaluate":
                miou = float(run.stdout.split("mIoU")[1].split()[0].strip(":="))
        return {"seconds": times, "miou": miou}


def published_width_step(steps: int = 5) -> float:
    """Median seconds of one training step (batch 4, 64x64 crops) of the published R-18-D8's widths,
    3 classes, random weights: what the walk-through's run with the real published file costs per iteration."""
    import torch

    from psp_zoo.model import PSPNet
    from psp_zoo.training.recipe import Recipe
    from psp_zoo.training.trainer import Trainer

    torch.manual_seed(0)
    recipe = Recipe(name="shapes", dataset="shapes", num_classes=3, img_scale=(96, 96), crop_size=(64, 64),
                    batch_size=4, gpus=1, pretrained=None, max_iters=300, lr=0.05)
    trainer = Trainer(PSPNet(depth=18, num_classes=3), recipe, device="cpu")
    images, labels = torch.randn(4, 3, 64, 64), torch.randint(0, 3, (4, 64, 64))
    trainer.step(images, labels)  # warm-up
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        trainer.step(images, labels)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args()
    rounds = [one_round(args.iterations) for _ in range(args.rounds)]
    env = environment_info("cpu")
    result = {
        "what": "docs/finetune.md walk-through on the generated shapes example, one process, each command a "
                "fresh psp-zoo process; median over rounds; other processes may have shared the machine",
        "iterations": args.iterations, "rounds": len(rounds),
        "seconds": {step: statistics.median(r["seconds"][step] for r in rounds) for step in rounds[0]["seconds"]},
        "miou": [r["miou"] for r in rounds],
        "published_r18_width_step_seconds": round(published_width_step(), 3),
        "cpu": cpu_name(), "cpu_flags": cpu_flags(), "cpu_threads": os.cpu_count(), "environment": env,
    }
    print(json.dumps(result, indent=1))
    out = REPO / "benchmarks" / "results" / f"finetune_example_cpu_torch{env['torch'].split('+')[0]}.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"recorded {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
