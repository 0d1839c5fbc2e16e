"""What the tests share besides fixtures: where the reference files are, the tiny checkpoints, a
results record to vary, and running the command line. conftest.py holds only pytest fixtures."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch

from psp_zoo.cli import main
from psp_zoo.deploy.verify import compare_outputs
from psp_zoo.model import PSPHead
from psp_zoo.results.records import ImageCount, MemoryUse, Metrics, ResultRecord, Speed

REPO = Path(__file__).resolve().parents[1]
# copies of the reference implementation's outputs (see tests/fixtures/mmseg/README.md): a plain
# clone runs its tests without anything beside it
FIXTURES = REPO / "tests" / "fixtures" / "mmseg"
REFERENCE = REPO / "tests" / "fixtures" / "reference"  # the published tables and family facts
TINY = ("r50", "r101")


def tiny_info(tag: str) -> dict:
    """index.json's record for a tiny fixture: checkpoint file name, sha256 and PSPNet config."""
    return json.loads((FIXTURES / "index.json").read_text())[tag]


def tiny_checkpoint_path(tag: str) -> Path:
    return FIXTURES / tiny_info(tag)["checkpoint"]


def write_tiny_ade_manifest(path: Path, test: str) -> Path:
    """A user manifest serving the tiny r50 fixture as an ADE20K entry (``test``: its YAML test settings)."""
    info = tiny_info("r50")
    path.write_text(
        "models:\n"
        "  - name: tiny_pspnet_r50-d8_ade20k\n"
        "    dataset: ade20k\n    depth: 50\n    crop_size: [64, 64]\n    schedule: 1\n"
        f"    weights: http://127.0.0.1:1/{info['checkpoint']}\n"
        f"    hash: \"{info['sha256'][:8]}\"\n"
        "    published: {}\n"
        f"    test: {test}\n"
        "    model: {num_classes: 5, stem_channels: 8, base_channels: 8, channels: 16, aux_channels: 8}\n")
    return path


def tiny_model(tag: str, align_corners: bool = False):
    from psp_zoo import PSPNet, load_checkpoint

    model = PSPNet(align_corners=align_corners, **tiny_info(tag)["config"]).eval()
    load_checkpoint(model, tiny_checkpoint_path(tag))
    return model


def tiny_expected(tag: str, align_corners: bool) -> dict:
    data = torch.load(FIXTURES / f"tiny_pspnet_{tag}-d8_expected.pt", weights_only=True)
    return data[f"align_corners_{align_corners}"]


def make_record(name="pspnet_r50-d8_512x1024_40k_cityscapes", dataset="cityscapes", *, miou=0.778,
                device_kind="cuda", device_name="NVIDIA H100 80GB HBM3", fps=9.5, mem_gb=6.3,
                ms_flip=0.791, torch_version="2.5.1", limit=None, count=500, status="complete"):
    env = {"device_kind": device_kind, "device_name": device_name, "torch": torch_version,
           "cuda": "12.4", "cudnn": "90100", "python": "3.11.7", "numpy": "2.0", "psp_zoo": "0.1.0",
           "git_revision": "abcdef123456", "platform": "Linux"}
    names = ["road", "sidewalk", "rare"]
    metrics = lambda m: Metrics.from_fractions(  # noqa: E731
        names, aacc=0.95, miou=m, macc=0.85, iou=[0.9, m, float("nan")], acc=[0.95, 0.8, float("nan")])
    mem_kind = "cuda max_memory_allocated" if device_kind == "cuda" else "cpu peak RSS"
    return ResultRecord(
        checkpoint=name, dataset=dataset, environment=env,
        images=ImageCount(count=count, available=500, limit=limit),
        settings={"mode": "whole", "img_scale": [2048, 1024]},
        single_scale=metrics(miou), ms_flip=None if ms_flip is None else metrics(ms_flip),
        speed=Speed(fps=fps, images_timed=195, warmup=5, device_kind=device_kind),
        training_memory=MemoryUse(gb=mem_gb, kind=mem_kind, detail="training"),
        inference_memory=MemoryUse(gb=1.5, kind=mem_kind, detail="inference"),
        status=status, error=None if status == "complete" else "CUDA out of memory",
        date="2025-06-01T12:00:00+00:00")


def run_cli(capsys, *argv):
    """``psp-zoo argv...`` in this process: (exit code, stdout, stderr)."""
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def one_line(err: str) -> str:
    """The only line of ``err`` (a mistake is said on one line)."""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


def max_rel_diff(out: torch.Tensor, ref: torch.Tensor) -> float:
    """max |out - ref| / max |ref|: psp_zoo's compare_outputs, the measure the exporter checks with."""
    return compare_outputs(ref, out).rel_diff


def assert_close_to_scale(out, ref, rel: float) -> None:
    """``out`` equals ``ref`` to ``rel`` of ref's largest magnitude (tensors or arrays, any shape).

    The suite's yardstick for float results: a tolerance relative to the values' scale, never an
    absolute constant that one CPU's summation order happens to meet.
    """
    out, ref = torch.as_tensor(out).detach().double(), torch.as_tensor(ref).detach().double()
    assert out.shape == ref.shape, (out.shape, ref.shape)
    scale = float(ref.abs().max()) if ref.numel() else 1.0
    diff = float((out - ref).abs().max()) if ref.numel() else 0.0
    assert diff <= rel * (scale or 1.0), (f"max |out - ref| = {diff:.3g}, {diff / (scale or 1.0):.3g} of the scale "
                                          f"{scale:.3g} (allowed {rel:g})")


def random_head(in_ch: int, channels: int, scales=(1, 2, 3, 6), align_corners=False, seed=0) -> PSPHead:
    """A narrow PSPHead with random weights and BN statistics far from the identity."""
    torch.manual_seed(seed)
    head = PSPHead(in_ch, channels, 5, scales, align_corners).eval()
    for module in head.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.normal_()
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.normal_()
            module.bias.data.normal_()
    return head


def load_speed_script():
    """benchmarks/speed.py as a module (it is a script, not part of the package)."""
    spec = importlib.util.spec_from_file_location("speed_benchmark", REPO / "benchmarks" / "speed.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
