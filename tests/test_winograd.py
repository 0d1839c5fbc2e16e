"""Winograd F(4x4, 3x3) convs compute what F.conv2d computes, within fp32 rounding."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from psp_zoo import PSPNet, PspZooError, SpeedOptions
from psp_zoo.environment import cpu_flags
from psp_zoo.model.optimization import optimize
from psp_zoo.model.winograd import WinogradConv2d, use_winograd, winograd_conv2d, winograd_weight

from helpers import REPO, assert_close_to_scale, max_rel_diff, tiny_expected, tiny_model

# even, odd, not a multiple of the 4x4 tile or of the dilation, smaller than a tile, one pixel
SIZES = [(8, 8), (13, 11), (9, 14), (17, 23), (2, 3), (1, 1)]



@pytest.mark.parametrize("dilation", [1, 2, 4])
@pytest.mark.parametrize("size", SIZES)
def test_equals_the_direct_conv(size, dilation):
    generator = torch.Generator().manual_seed(hash((size, dilation)) % 2**31)
    x = torch.randn(2, 6, *size, generator=generator)
    weight, bias = torch.randn(7, 6, 3, 3, generator=generator), torch.randn(7, generator=generator)
    ref = F.conv2d(x, weight, bias, padding=dilation, dilation=dilation)
    out = winograd_conv2d(x, winograd_weight(weight), bias, dilation)
    assert out.shape == ref.shape
    assert max_rel_diff(out, ref) <= 1e-5
    # one band per tile row (large images are done in bands) gives the same result
    banded = winograd_conv2d(x, winograd_weight(weight), bias, dilation, band_tiles=1)
    assert_close_to_scale(banded, out, 1e-5)
    # the batch items stay apart: each one alone gives the same result
    assert_close_to_scale(winograd_conv2d(x[1:], winograd_weight(weight), bias, dilation), out[1:], 1e-5)


def test_wide_conv_and_memory_formats():
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(64, 48, 3, padding=2, dilation=2).eval()
    x = torch.randn(1, 64, 21, 30)
    with torch.no_grad():
        ref = conv(x)
        fast = WinogradConv2d(conv)
        for inp in (x, x.contiguous(memory_format=torch.channels_last)):
            out = fast(inp)
            assert max_rel_diff(out, ref) <= 1e-5
            assert out.is_contiguous(memory_format=torch.channels_last)  # NHWC, like the channels-last path


def test_conv_without_bias_and_the_source_conv_untouched():
    conv = torch.nn.Conv2d(5, 3, 3, padding=1, bias=False)
    weight = conv.weight.detach().clone()
    x = torch.randn(1, 5, 7, 9)
    with torch.no_grad():
        assert max_rel_diff(WinogradConv2d(conv)(x), conv(x)) <= 1e-5
    assert torch.equal(conv.weight, weight) and "dilation=1" in repr(WinogradConv2d(conv))


@pytest.mark.parametrize("conv", [
    torch.nn.Conv2d(4, 4, 3, stride=2, padding=1),  # strided
    torch.nn.Conv2d(4, 4, 1),  # 1x1
    torch.nn.Conv2d(4, 4, 3, padding=1, dilation=2),  # padding != dilation
    torch.nn.Conv2d(4, 4, 3, padding=1, groups=2),  # grouped
], ids=["stride2", "1x1", "padding", "groups"])
def test_refuses_what_it_does_not_compute(conv):
    with pytest.raises(PspZooError, match="3x3, stride-1, ungrouped conv with padding == dilation"):
        WinogradConv2d(conv)


def test_use_winograd_swaps_only_wide_convs():
    model = PSPNet(depth=18, num_classes=3, base_channels=32, stem_channels=16).eval()
    # R-18 widths x 1/2: layer4 is 256 wide; its first conv reads layer3's 128 channels
    assert use_winograd(model) == 3
    swapped = [name for name, m in model.named_modules() if isinstance(m, WinogradConv2d)]
    assert swapped == ["backbone.layer4.0.conv2", "backbone.layer4.1.conv1", "backbone.layer4.1.conv2"]
    assert use_winograd(PSPNet(depth=18, num_classes=3, base_channels=32).eval(), min_channels=1) > 3


@pytest.mark.parametrize("tag", ["r50", "r101"])
def test_every_3x3_by_winograd_matches_the_reference_fixtures(tag):
    """Every eligible conv of the tiny mmseg fixtures (stem, all stages, PSP bottleneck) swapped."""
    model = tiny_model(tag)
    case = tiny_expected(tag, False)
    x = case["whole_input"]
    with torch.no_grad():
        eager = model(x)
    fast = optimize(model)
    count = use_winograd(fast.model, min_channels=1)
    # 2 stem convs + every block's 3x3 but layer2's strided one + PSP bottleneck + auxiliary FCN conv
    assert count == {"r50": 19, "r101": 36}[tag] and isinstance(fast.model.decode_head.conv_x, WinogradConv2d)
    out = fast(x)
    assert max_rel_diff(out, eager) <= 1e-4
    assert torch.equal(out.argmax(1), eager.argmax(1))
    assert (out - case["whole_logits"]).abs().max() <= 1e-4


def test_optimize_applies_it_on_cpu_fp32_only():
    model = PSPNet(depth=18, num_classes=3, base_channels=32, stem_channels=16).eval()
    x = torch.randn(1, 3, 64, 80)
    with torch.no_grad():
        eager = model(x)
    fast = optimize(model)
    assert fast.optimizations["winograd"] and fast.optimizations["winograd_convs"] == 3
    assert max_rel_diff(fast(x), eager) <= 1e-4
    assert optimize(model, winograd=False).optimizations["winograd_convs"] == 0
    assert "winograd" in SpeedOptions().applied("cpu")
    assert "winograd" not in SpeedOptions().applied("cuda:0")  # cuDNN picks its own algorithms
    assert "winograd" not in SpeedOptions(precision="bf16").applied("cpu")
    assert "winograd" not in SpeedOptions(winograd=False).applied("cpu")


@pytest.mark.compile
def test_compiled_model_runs_winograd_eagerly_and_agrees():
    model = PSPNet(depth=18, num_classes=3, base_channels=32, stem_channels=16).eval()
    x = torch.randn(1, 3, 48, 64)
    with torch.no_grad():
        eager = model(x)
    fast = optimize(model, compile=True)
    assert fast.optimizations["winograd_convs"] == 3
    assert max_rel_diff(fast(x), eager) <= 1e-4


def test_per_conv_benchmark_runs_and_records(tmp_path):
    cmd = [sys.executable, str(REPO / "benchmarks" / "winograd_convs.py"), "--quick", "--rounds", "1",
           "--out-dir", str(tmp_path)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr
    (path,) = tmp_path.glob("winograd_convs_cpu_torch*_quick.json")
    results = json.loads(path.read_text())
    assert results["environment"]["cpu_flags"] == cpu_flags()
    assert [row["where"] for row in results["results"]][-1] == "PSP bottleneck, x part"
    assert all(row["max_rel_diff"] <= 1e-5 and row["speedup"] > 0 for row in results["results"])
