"""PSPNet numerics against mmsegmentation's outputs, and the full-size state-dict layout."""
from __future__ import annotations

import re

import pytest
import torch

from psp_zoo import PSPNet

from conftest import FIXTURES, TINY, tiny_expected, tiny_model

TOL = 1e-4


@pytest.mark.parametrize("tag", TINY)
@pytest.mark.parametrize("align_corners", [False, True])
def test_tiny_model_matches_reference(tag, align_corners):
    model = tiny_model(tag, align_corners)
    expected = tiny_expected(tag, align_corners)
    x = expected["whole_input"]
    with torch.no_grad():
        logits = model(x)
        features = model.extract_features(x)
        aux = model.auxiliary_head(features)
    assert logits.shape == expected["whole_logits"].shape
    assert (logits - expected["whole_logits"]).abs().max().item() <= TOL
    assert len(features) == len(expected["backbone_features"]) == 4
    for ours, ref in zip(features, expected["backbone_features"]):
        assert ours.shape == ref.shape
        assert (ours - ref).abs().max().item() <= TOL
    assert (aux - expected["aux_logits"]).abs().max().item() <= TOL


def test_align_corners_changes_the_output():
    """The fixture differs between the two settings, so the flag must reach every resize."""
    a, b = tiny_expected("r50", False), tiny_expected("r50", True)
    assert (a["whole_logits"] - b["whole_logits"]).abs().max() > 1e-3
    model = tiny_model("r50", align_corners=False)
    with torch.no_grad():
        out = model(b["whole_input"])
    assert (out - b["whole_logits"]).abs().max() > 1e-3


def _published_layout(depth: int) -> dict:
    layout = {}
    for line in (FIXTURES / f"pspnet_r{depth}-d8_state_dict_keys.txt").read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        key, shape, dtype = line.split("\t")
        layout[key] = (tuple(int(s) for s in re.findall(r"\d+", shape)), dtype)
    return layout


@pytest.mark.parametrize("depth,count", [(50, 370), (101, 676)])
def test_full_size_state_dict_has_published_keys_and_shapes(depth, count):
    with torch.device("meta"):  # no memory for 50M parameters; only names and shapes matter
        model = PSPNet(depth=depth, num_classes=19)
    ours = {k: (tuple(v.shape), str(v.dtype).replace("torch.", "")) for k, v in model.state_dict().items()}
    published = _published_layout(depth)
    assert len(published) == count
    assert ours == published


def test_full_size_forward_at_small_input():
    torch.manual_seed(0)
    model = PSPNet(depth=50, num_classes=19).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 67, 91))
    assert out.shape == (1, 19, 67, 91)
    assert torch.isfinite(out).all()
