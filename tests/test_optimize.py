"""psp_zoo.optimize: the fast paths compute what the eager model computes, on the tiny fixtures."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from psp_zoo import PspZooError
from psp_zoo.model.optimization import cpu_supports_bf16, fold_batchnorm, optimize

from helpers import REPO, TINY, max_rel_diff, tiny_expected, tiny_model


@pytest.fixture(scope="module", params=TINY)
def tag(request) -> str:
    return request.param


@pytest.mark.parametrize("align_corners", [False, True])
def test_fp32_fast_path_matches_eager_and_reference(tag, align_corners):
    model = tiny_model(tag, align_corners)
    case = tiny_expected(tag, align_corners)
    x = case["whole_input"]
    with torch.no_grad():
        eager = model(x)
    fast = optimize(model)
    assert fast.optimizations["factorize_head"]  # the default fast path includes the factorized head
    out = fast(x)
    assert max_rel_diff(out, eager) <= 1e-4
    assert torch.equal(out.argmax(1), eager.argmax(1))
    assert (out - case["whole_logits"]).abs().max() <= 1e-4  # the mmseg fixture's tolerance
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fast.modules())
    assert fast.optimizations["folded_bn"] == sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())


def test_output_is_plain_nchw_float32_and_keeps_model_interface():
    model = tiny_model("r50", align_corners=True)
    fast = optimize(model)
    out = fast(torch.randn(2, 3, 40, 56))
    assert out.shape == (2, 5, 40, 56) and out.dtype == torch.float32
    assert out.is_contiguous()  # NCHW-contiguous, not channels-last, whatever ran inside
    assert (fast.num_classes, fast.align_corners) == (5, True)
    assert fast.optimizations == {
        "precision": "fp32", "fuse_bn": True, "folded_bn": 61, "channels_last": True, "compile": False,
        "freezing": False, "factorize_head": True, "device": "cpu", "torch": torch.__version__,
        # the fixtures are too narrow for Winograd to pay (tests/test_winograd.py swaps them anyway)
        "winograd": False, "winograd_convs": 0,
    }
    # The folded weights appear once in the state dict, under the wrapped model's names.
    assert all(key.startswith("model.") for key in fast.state_dict())


def test_caller_model_is_untouched():
    model = tiny_model("r50")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimize(model, fuse_bn=True, channels_last=True)
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.is_contiguous() for p in model.parameters())  # still NCHW weights
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules()) == 61


def test_each_optimization_can_be_turned_off(tag):
    model = tiny_model(tag)
    x = tiny_expected(tag, False)["whole_input"]
    with torch.no_grad():
        eager = model(x)
    plain = optimize(model, fuse_bn=False, channels_last=False, factorize_head=False)
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in plain.modules())
    assert plain.optimizations["folded_bn"] == 0
    assert max_rel_diff(plain(x), eager) <= 1e-6


def test_training_mode_batchnorm_is_not_folded():
    model = tiny_model("r50").train()
    assert fold_batchnorm(model) == 0  # batch statistics cannot be folded into constant weights


@pytest.mark.skipif(not cpu_supports_bf16(), reason="this CPU has no native bf16 (AVX512-BF16/AMX)")
def test_bf16_agrees_with_eager_on_argmax(tag):
    model = tiny_model(tag)
    x = tiny_expected(tag, False)["whole_input"]
    with torch.no_grad():
        eager = model(x)
    out = optimize(model, precision="bf16")(x)
    assert out.dtype == torch.float32
    assert (out.argmax(1) == eager.argmax(1)).float().mean() >= 0.99
    assert max_rel_diff(out, eager) < 5e-2  # bf16 rounding, not a different function


@pytest.mark.compile
def test_compile_matches_eager():
    model = tiny_model("r50")
    x = tiny_expected("r50", False)["whole_input"]
    with torch.no_grad():
        eager = model(x)
    fast = optimize(model, compile=True)
    assert fast.optimizations["compile"] and fast.optimizations["freezing"]
    assert max_rel_diff(fast(x), eager) <= 1e-4


@pytest.mark.parametrize("kwargs, message", [
    (dict(precision="int8"), "choose one of: fp32, bf16, fp16"),
    (dict(precision="fp16"), "needs a CUDA device"),
    (dict(channels_last="yes"), "channels_last must be True or False"),
])
def test_bad_arguments_raise(kwargs, message):
    with pytest.raises(PspZooError, match=message):
        optimize(tiny_model("r50"), **kwargs)


def test_speed_benchmark_runs_end_to_end(tmp_path):
    cmd = [sys.executable, str(REPO / "benchmarks" / "speed.py"), "--tiny", "--no-compile",
           "--out-dir", str(tmp_path)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr
    stem = f"speed_cpu_torch{torch.__version__.split('+')[0]}"
    results = json.loads((tmp_path / f"{stem}.json").read_text())
    assert results["environment"]["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    rows = {(r["case"], r["variant"]): r for r in results["results"]}
    assert rows[("whole", "eager")]["speedup"] == 1.0
    assert rows[("whole", "fast_fp32")]["max_rel_diff"] <= 1e-4
    assert rows[("slide", "fast_fp32_batched")]["max_rel_diff"] <= 1e-4  # batching changes no logits
    assert (tmp_path / f"{stem}.csv").read_text().startswith("model,case,size,variant")
    assert "speedup" in done.stdout
