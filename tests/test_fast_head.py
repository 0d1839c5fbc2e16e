"""FactorizedPSPHead computes PSPHead's logits without upsampling the pyramid, within rounding."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from psp_zoo import PspZooError
from psp_zoo.model import PSPHead
from psp_zoo.model.fast_head import FactorizedPSPHead, factorize_psp_head, interpolation_matrix
from psp_zoo.model.optimization import fold_batchnorm, optimize

from helpers import max_rel_diff, random_head, tiny_model

SIZES = [(8, 8), (9, 13), (13, 6), (5, 4), (2, 3), (1, 1)]  # even, odd, smaller than a pool scale


def run(head, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return head([None, None, None, x])


@pytest.mark.parametrize("align_corners", [False, True])
@pytest.mark.parametrize("size", SIZES)
def test_equals_plain_head_for_every_size(size, align_corners):
    head = random_head(24, 8, align_corners=align_corners)
    x = torch.randn(2, 24, *size)
    ref = run(head, x)
    assert max_rel_diff(run(FactorizedPSPHead(head), x), ref) <= 1e-5
    fold_batchnorm(head)  # the fast path builds it from the folded head
    assert max_rel_diff(run(FactorizedPSPHead(head), x), ref) <= 1e-5


@pytest.mark.parametrize("align_corners", [False, True])
@pytest.mark.parametrize("scale", [1, 2, 3, 6])
def test_each_pool_scale_alone(scale, align_corners):
    # one branch per head: a wrong block for any one scale cannot hide behind the others
    head = random_head(16, 8, scales=(scale,), align_corners=align_corners, seed=scale)
    for size in [(7, 11), (scale, scale), (3, 2)]:
        x = torch.randn(3, 16, *size)
        assert max_rel_diff(run(FactorizedPSPHead(head), x), run(head, x)) <= 1e-5


def test_r18_head_widths_and_channels_last():
    head = random_head(512, 128)  # the R-18 heads: in 512, channels 128
    fold_batchnorm(head)
    x = torch.randn(2, 512, 9, 12)
    ref = run(head, x)
    fast = FactorizedPSPHead(head).to(memory_format=torch.channels_last)
    out = run(fast, x.contiguous(memory_format=torch.channels_last))
    assert max_rel_diff(out, ref) <= 1e-5


def test_interpolation_matrix_is_pytorch_resize():
    for align_corners in (False, True):
        for scale, size in [(6, 13), (3, 64), (6, 4), (2, 1)]:
            p = torch.randn(scale, scale, dtype=torch.float64)
            a_h = interpolation_matrix(size, scale, align_corners, torch.device("cpu"), torch.float64)
            a_w = interpolation_matrix(size + 3, scale, align_corners, torch.device("cpu"), torch.float64)
            ref = F.interpolate(p[None, None], size=(size, size + 3), mode="bilinear", align_corners=align_corners)
            assert torch.allclose(a_h @ p @ a_w.t(), ref[0, 0], atol=1e-12)


def test_source_head_and_user_model_are_untouched():
    head = random_head(16, 8)
    before = {k: v.clone() for k, v in head.state_dict().items()}
    FactorizedPSPHead(head)
    assert all(torch.equal(before[k], v) for k, v in head.state_dict().items())
    model = tiny_model("r50")
    keys = list(model.state_dict())
    fast = optimize(model)
    assert isinstance(fast.model.decode_head, FactorizedPSPHead) and fast.optimizations["factorize_head"]
    assert list(model.state_dict()) == keys and isinstance(model.decode_head, PSPHead)


def test_unsupported_heads_are_refused_or_left_alone():
    head = random_head(16, 8)
    head.bottleneck.conv.padding = (2, 2)
    with pytest.raises(PspZooError, match="3x3, padding-1 bottleneck"):
        FactorizedPSPHead(head)
    training = random_head(16, 8).train()
    with pytest.raises(PspZooError, match="eval mode"):
        FactorizedPSPHead(training)
    assert factorize_psp_head(torch.nn.Conv2d(3, 3, 1)) is False  # no PSP decode head: nothing to do


def test_bf16_autocast_rounds_like_the_plain_head():
    head = random_head(32, 16)
    x = torch.randn(2, 32, 9, 13)
    ref = run(head, x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = run(FactorizedPSPHead(head), x)
    assert max_rel_diff(out.float(), ref) < 3e-2  # bf16 rounding, not a different function


# The whole default fast path (factorized head included) against the fixtures: test_optimize.py.


@pytest.mark.compile
def test_compiled_factorized_head_matches_plain_head():
    head = random_head(16, 8, align_corners=True)
    fold_batchnorm(head)
    compiled = torch.compile(FactorizedPSPHead(head), backend="inductor")
    for size in [(9, 13), (4, 5)]:  # a second size recompiles with its own interpolation matrices
        x = torch.randn(2, 16, *size)
        assert max_rel_diff(run(compiled, x), run(head, x)) <= 1e-5
