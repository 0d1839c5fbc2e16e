"""torchrun: 2 CPU processes x 1 image step like 1 process x 2 images (SyncBN, DDP's averaged gradients, dropout
drawn per sample); rank 0 alone speaks, and nothing is written before every check has passed."""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from psp_zoo import testing
from psp_zoo.testing import write_shapes_ade20k, write_tiny_checkpoint

REPO = Path(__file__).resolve().parents[1]
NAME = "shapes_pspnet_r50-d8_64x64_ade20k"
# R-50 layout at tiny widths: SyncBN in every kind of block; dropout on (the heads' 0.1), drawn per sample
MANIFEST = f"""models:
  - name: {NAME}
    dataset: ade20k
    backbone: R-50-D8
    crop_size: [64, 64]
    schedule: 100
    weights: http://127.0.0.1:1/{NAME}-00000000.pth
    published: {{}}
    test: {{img_scale: [64, 64]}}
    model: {{num_classes: 4, stem_channels: 8, base_channels: 8, channels: 16, aux_channels: 8}}
    train: {{img_scale: [64, 64], pretrained: null, dropout: 0.1, max_iters: 3, checkpoint_interval: 3,
            eval_interval: 3}}
"""


TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def _psp_zoo(launcher: list, *args) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run([*launcher, "-m", "psp_zoo", *map(str, args)], capture_output=True, text=True, env=env,
                          timeout=600)


def _train(root: Path, work_dir: Path, launcher: list, batch: int, gpus: int) -> dict:
    done = _psp_zoo(launcher, "train", NAME, "--data-root", root, "--work-dir", work_dir, "--manifest",
                    root / "manifest.yml", "--num-workers", "0", "--device", "cpu", "--batch-size", batch,
                    "--gpus", gpus, "--float64")
    assert done.returncode == 0, done.stderr[-4000:]
    return torch.load(work_dir / "iter_3.pth", weights_only=True)


def test_two_processes_of_one_image_equal_one_process_of_two(tmp_path):
    """In float64 with dropout on: a few float32 steps of a small PSPNet amplify rounding (one process
    on 1 or 2 threads ends 3 steps with some BN biases 30% apart), so float32 cannot show an equality.
    Dropout keyed by the process instead of the sample put them 3.8e-3 apart after one iteration."""
    write_shapes_ade20k(tmp_path / "ADEChallengeData2016", train=6, val=2, seed=2)
    (tmp_path / "manifest.yml").write_text(MANIFEST)
    two = _train(tmp_path, tmp_path / "two", TORCHRUN, batch=1, gpus=2)
    one = _train(tmp_path, tmp_path / "one", [sys.executable], batch=2, gpus=1)
    assert two["meta"]["psp_zoo"]["world_size"] == 2 and one["meta"]["psp_zoo"]["world_size"] == 1
    assert two["state_dict"].keys() == one["state_dict"].keys()
    moved = 0
    for key, alone in one["state_dict"].items():
        shared = two["state_dict"][key]
        if not alone.is_floating_point():
            assert torch.equal(shared, alone), key
            continue
        scale = alone.abs().max().clamp(min=1e-12)
        # through DistributedDataParallel float64 gives 2.4e-11 at most (a pyramid pooling BN's running_var);
        # dropout keyed by the process put them 1.7 apart here
        assert ((shared - alone).abs().max() / scale).item() <= 1e-9, key
    # the weights did move: the comparison is between trained states, not two copies of the start
    first = torch.load(tmp_path / "one" / "iter_3.pth", weights_only=True)["optimizer"]["state"]
    moved = sum(int(state["momentum_buffer"].abs().max() > 0) for state in first.values())
    assert moved > 100


def _descendants(pid: int) -> list:
    """The processes ``pid`` started, and theirs (Linux's /proc)."""
    children = [int(child) for task in Path(f"/proc/{pid}/task").glob("*")
                for child in (task / "children").read_text().split()]
    return [grandchild for child in children for grandchild in (child, *_descendants(child))]


def test_a_killed_torchrun_job_resumes_bit_identical(tmp_path):
    """Under DistributedDataParallel, a 2-process run killed after its first checkpoint and started again
    ends with the weights and momenta of an uninterrupted one, bit for bit."""
    write_shapes_ade20k(tmp_path / "ADEChallengeData2016", train=6, val=2, seed=2)
    (tmp_path / "manifest.yml").write_text(MANIFEST)

    def command(work_dir: Path) -> list:
        return [*TORCHRUN, "-m", "psp_zoo", "train", NAME, "--data-root", str(tmp_path), "--work-dir", str(work_dir),
                "--manifest", str(tmp_path / "manifest.yml"), "--num-workers", "0", "--device", "cpu",
                "--batch-size", "1", "--gpus", "2", "--max-iters", "6", "--checkpoint-interval", "2",
                "--eval-interval", "6"]

    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    straight = subprocess.run(command(tmp_path / "straight"), capture_output=True, text=True, env=env, timeout=600)
    assert straight.returncode == 0, straight.stderr[-4000:]
    killed = subprocess.Popen(command(tmp_path / "killed"), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              text=True, env=env)
    began = time.monotonic()
    while not (tmp_path / "killed" / "iter_2.pth").exists():
        assert killed.poll() is None, killed.stderr.read()[-4000:]
        assert time.monotonic() - began < 300, "iter_2.pth never appeared"
        time.sleep(0.05)
    for pid in [*_descendants(killed.pid), killed.pid]:  # the workers (in sessions of their own), the launcher
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    killed.wait(60)
    assert not (tmp_path / "killed" / "iter_6.pth").exists()
    resumed = subprocess.run(command(tmp_path / "killed"), capture_output=True, text=True, env=env, timeout=600)
    assert resumed.returncode == 0 and "resumed at iteration" in resumed.stderr, resumed.stderr[-4000:]
    one, two = (torch.load(tmp_path / run / "iter_6.pth", weights_only=True) for run in ("straight", "killed"))
    assert list(one["state_dict"]) == list(two["state_dict"])
    for key, value in one["state_dict"].items():
        assert torch.equal(value, two["state_dict"][key]), key
    for index, state in one["optimizer"]["state"].items():
        assert torch.equal(state["momentum_buffer"], two["optimizer"]["state"][index]["momentum_buffer"]), index


@pytest.fixture(scope="module")
def finetuning(tmp_path_factory):
    """A 5-class tiny R-18-D8 file to fine-tune from, and the generated 3-class shapes dataset (8 images)."""
    folder = tmp_path_factory.mktemp("finetune")
    data = testing.write_example_dataset(folder / "data", train=8, val=2)
    source = write_tiny_checkpoint(folder / "published", "tiny_pspnet_r18-d8", num_classes=5, depth=18,
                                   stamp="20260101_000000")
    manifest = testing.write_example_manifest(folder / "user.yml")
    return ("train", "--from", source, "--dataset", "shapes", "--name", "res_pspnet", "--data-root", data,
            "--manifest", manifest, "--num-workers", "0", "--device", "cpu", "--crop-size", "64")


def _one_error(stderr: str, text: str) -> None:
    errors = [line for line in stderr.splitlines() if "psp-zoo train: error:" in line]
    assert len(errors) == 1 and text in errors[0], stderr[-4000:]


def test_gpus_not_divisible_by_the_processes_is_said_once_before_anything_is_written(finetuning, tmp_path):
    work = tmp_path / "work"
    done = _psp_zoo(TORCHRUN, *finetuning, "--work-dir", work, "--max-iters", "2", "--batch-size", "1", "--gpus", "3")
    assert done.returncode != 0
    _one_error(done.stderr, "the recipe's 3 GPUs x 1 images cannot be split over 2 processes")
    assert not work.exists() or list(work.iterdir()) == []  # no init/, no checkpoint, no log


def test_a_batch_larger_than_the_dataset_names_the_total_before_anything_is_written(finetuning, tmp_path):
    work = tmp_path / "work"
    done = _psp_zoo([sys.executable], *finetuning, "--work-dir", work, "--max-iters", "2", "--batch-size", "3",
                    "--gpus", "4")
    assert done.returncode == 2
    _one_error(done.stderr, "fewer than one total batch of 12 (3 images x 4 GPUs)")
    assert not work.exists() or list(work.iterdir()) == []


def test_under_torchrun_rank_0_alone_reports(finetuning, tmp_path):
    done = _psp_zoo(TORCHRUN, *finetuning, "--work-dir", tmp_path / "work", "--max-iters", "2", "--batch-size", "1",
                    "--gpus", "2", "--eval-interval", "2")
    assert done.returncode == 0, done.stderr[-4000:]
    reports = [line for line in done.stdout.splitlines() if line.startswith("res_pspnet: ")]
    assert len(reports) == 1 and "None" not in reports[0], done.stdout
    assert done.stderr.count("total batch 2 = 1 images x 2 process(es)") == 1, done.stderr[-4000:]
