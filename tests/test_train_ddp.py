"""Training on torch's DistributedDataParallel: it wraps the model whenever more than one process trains
(2 CPU processes under torchrun here), accumulation and a frozen backbone included, and the step is
the one of a single process with the whole batch; torch's SyncBatchNorm is the converter on CUDA."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from psp_zoo.distributed import Distributed
from psp_zoo.errors import PspZooError
from psp_zoo.model import PSPNet
from psp_zoo.training.freeze import FrozenBatchNorm2d
from psp_zoo.training.recipe import recipe_for
from psp_zoo.training.syncbn import SyncBatchNorm2d, convert_sync_batchnorm, sync_batchnorm_converter
from psp_zoo.training.trainer import Trainer

REPO = Path(__file__).resolve().parents[1]
CITYSCAPES = "pspnet_r50-d8_512x1024_40k_cityscapes"
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]

# One process of a 2-process job: 2 images each, in 2 accumulation chunks, backbone frozen, float64.
WORKER = '''
import sys, torch
from torch.nn.parallel import DistributedDataParallel
sys.path.insert(0, {tests!r})
from test_train_ddp import batch, tiny_trainer
from psp_zoo.distributed import Distributed
dist, device = Distributed.from_env(torch.device("cpu"))
trainer = tiny_trainer(dist, accumulation=2)
images, labels = batch()
for _ in range(2):
    trainer.step(images[2 * dist.rank:2 * dist.rank + 2], labels[2 * dist.rank:2 * dist.rank + 2])
ddp = trainer.engine
bucketed = ddp._get_ddp_logging_data()["num_parameter_tensors"]
torch.save({{"wrapped": isinstance(ddp, DistributedDataParallel), "bucketed": bucketed,
            "state": trainer.state_dict()["model"]}}, {out!r} + f"/rank{{dist.rank}}.pt")
dist.close()
'''


def tiny_trainer(distributed: Distributed = None, **kwargs) -> Trainer:
    """A narrow R-18-D8, the same weights in every process, frozen backbone, float64, no dropout."""
    torch.manual_seed(0)
    model = PSPNet(depth=18, num_classes=3, stem_channels=8, base_channels=8, channels=16, aux_channels=8)
    recipe = recipe_for(CITYSCAPES, max_iters=10, dropout=0.0, freeze_backbone=True)
    return Trainer(model, recipe, device="cpu", distributed=distributed, dtype=torch.float64, **kwargs)


def batch():
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(4, 3, 32, 32, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, 3, (4, 32, 32), generator=generator)
    labels[:, :4] = 255
    return images, labels


def test_two_processes_train_inside_ddp_with_a_frozen_backbone_as_one_process(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    script = tmp_path / "worker.py"
    script.write_text(WORKER.format(tests=str(REPO / "tests"), out=str(tmp_path)))
    done = subprocess.run([*TORCHRUN, str(script)], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert ranks[0]["wrapped"] and ranks[1]["wrapped"]
    # the one process: each accumulation chunk holds what the two processes' chunks hold together
    alone = tiny_trainer(accumulation=2)
    assert alone.engine is None
    images, labels = batch()
    order = [0, 2, 1, 3]
    start = {key: value.clone() for key, value in alone.model.state_dict().items()}
    for _ in range(2):
        alone.step(images[order], labels[order], samples=order)
    frozen = [p for p in alone.model.parameters() if not p.requires_grad]
    trained = [p for p in alone.model.parameters() if p.requires_grad]
    assert frozen and ranks[0]["bucketed"] == len(trained)  # DDP's buckets hold no frozen parameter
    assert any(isinstance(m, FrozenBatchNorm2d) for m in alone.model.backbone.modules())
    state = alone.state_dict()["model"]
    assert list(ranks[0]["state"]) == list(state)  # the plain model's keys, in the published order
    for key, value in state.items():
        # no buffer broadcast: the processes' SyncBN statistics agree bit for bit all the same
        assert torch.equal(ranks[0]["state"][key], ranks[1]["state"][key]), key
        if key.startswith("backbone."):
            assert torch.equal(ranks[0]["state"][key], start[key]), key  # frozen: weights and statistics
        elif value.is_floating_point():
            scale = value.abs().max().clamp(min=1e-12)
            assert ((ranks[0]["state"][key] - value).abs().max() / scale).item() <= 1e-9, key
        else:
            assert torch.equal(ranks[0]["state"][key], value), key
    assert any(not torch.equal(state[key], start[key]) for key in state if key.startswith("decode_head."))


@pytest.fixture
def one_process_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'group'}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _ddp_matches_plain(compile: bool) -> None:
    images, labels = batch()
    plain, wrapped = tiny_trainer(compile=compile), tiny_trainer(ddp=True, compile=compile)
    assert isinstance(wrapped.engine, DistributedDataParallel) and plain.engine is None
    for _ in range(2):
        plain.step(images[:2], labels[:2])
        wrapped.step(images[:2], labels[:2])
    plain_state, wrapped_state = plain.state_dict()["model"], wrapped.state_dict()["model"]
    assert list(plain_state) == list(wrapped_state)
    for key, value in plain_state.items():
        scale = value.abs().max().clamp(min=1e-12) if value.is_floating_point() else 1
        assert ((wrapped_state[key] - value).abs().max() / scale).item() <= 1e-12, key


def test_ddp_of_one_process_steps_as_the_plain_trainer(one_process_group):
    _ddp_matches_plain(compile=False)


@pytest.mark.compile
def test_compiled_ddp_of_one_process_steps_as_the_plain_compiled_trainer(one_process_group):
    _ddp_matches_plain(compile=True)


def test_ddp_without_a_process_group_says_how_to_get_one():
    assert not dist.is_initialized()
    with pytest.raises(PspZooError, match="needs a process group: run under torchrun"):
        tiny_trainer(ddp=True)


def test_torch_syncbatchnorm_converts_on_cuda_and_psp_zoos_on_cpu():
    assert sync_batchnorm_converter(torch.device("cuda")) == nn.SyncBatchNorm.convert_sync_batchnorm
    assert sync_batchnorm_converter(torch.device("cuda", 1)) == nn.SyncBatchNorm.convert_sync_batchnorm
    assert sync_batchnorm_converter(torch.device("cpu")) != nn.SyncBatchNorm.convert_sync_batchnorm
    model = convert_sync_batchnorm(nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)))
    assert isinstance(model[1], SyncBatchNorm2d) and list(model.state_dict()) == [
        "0.weight", "0.bias", "1.weight", "1.bias", "1.running_mean", "1.running_var", "1.num_batches_tracked"]


def _gpu_check(*args) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_train_check.py"), *map(str, args)],
                          capture_output=True, text=True, env=env, timeout=600)


def test_the_gpu_check_runs_its_variants_and_writes_its_record_in_a_dry_run(tmp_path):
    done = _gpu_check("--dry-run", "--out-dir", tmp_path, "--steps", "1")
    assert done.returncode == 0, done.stderr[-4000:]
    [path] = tmp_path.glob("gpu_train_check_cpu*_torch*.json")
    record = json.loads(path.read_text())
    environment = record["environment"]
    assert environment["device_kind"] == "cpu" and environment["dry_run"] is True
    assert environment["tf32"] == {"matmul": False, "cudnn": False}
    assert environment["recipe"] == CITYSCAPES and environment["input"] == "batch 2 x 3 x 32 x 64"
    rows = {row["variant"]: row for row in record["results"]}
    assert set(rows) == {"plain_fp32", "ddp1_fp32"}  # AMP needs CUDA: its rows only on a GPU
    assert all(row["median_ms"] > 0 and len(row["times_ms"]) == 1 and row["peak_memory_mib"] > 0
               for row in rows.values())


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
def test_the_gpu_check_without_cuda_says_so_and_writes_nothing(tmp_path):
    done = _gpu_check("--out-dir", tmp_path)
    assert done.returncode == 2 and "no CUDA device here" in done.stderr and "--dry-run" in done.stderr
    bad = _gpu_check("--dry-run", "--out-dir", tmp_path, "--size", "16")
    assert bad.returncode == 2 and "--size must be HxW" in bad.stderr
    assert list(tmp_path.iterdir()) == []
