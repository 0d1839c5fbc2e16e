"""PSPNet numerics against mmsegmentation's outputs, and the full-size state-dict layout."""
from __future__ import annotations

import re

import pytest
import torch

from psp_zoo import PSPNet

from helpers import FIXTURES, TINY, assert_close_to_scale, tiny_expected, tiny_model

TOL = 2e-5  # of the reference logits' largest magnitude (~4 here)


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
    assert_close_to_scale(logits, expected["whole_logits"], TOL)
    assert len(features) == len(expected["backbone_features"]) == 4
    for ours, ref in zip(features, expected["backbone_features"]):
        assert ours.shape == ref.shape
        assert_close_to_scale(ours, ref, TOL)
    assert_close_to_scale(aux, expected["aux_logits"], TOL)


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


# ---------------------------------------------------------------------------------------------
# every backbone variant of the published family

from psp_zoo import PspZooError  # noqa: E402
from psp_zoo.model import BasicBlock, backbone_kwargs  # noqa: E402

DEPTHS = (18, 50, 101)
STEMS = {"V1c": True, "V1b": False}
NARROW = dict(stem_channels=8, base_channels=8, channels=16, aux_channels=8, num_classes=5)

# the results-table backbone names and what they build (R-18: the configs' 128/64 head widths)
BACKBONE_NAMES = {
    "R-18-D8": dict(depth=18, deep_stem=True, output_stride=8, channels=128, aux_channels=64),
    "R-18b-D8": dict(depth=18, deep_stem=False, output_stride=8, channels=128, aux_channels=64),
    "R-50-D8": dict(depth=50, deep_stem=True, output_stride=8),
    "R-50b-D8": dict(depth=50, deep_stem=False, output_stride=8),
    "R-50b-D8 rsb": dict(depth=50, deep_stem=False, output_stride=8),
    "R-50-D32": dict(depth=50, deep_stem=True, output_stride=32),
    "R-50b-D32": dict(depth=50, deep_stem=False, output_stride=32),
    "R-50b-D32 rsb": dict(depth=50, deep_stem=False, output_stride=32),
    "R-101-D8": dict(depth=101, deep_stem=True, output_stride=8),
    "R-101b-D8": dict(depth=101, deep_stem=False, output_stride=8),
}


def _layout(tag: str) -> dict:
    layout = {}
    for line in (FIXTURES / f"pspnet_{tag}_state_dict_keys.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            key, shape, dtype = line.split("\t")
            layout[key] = (tuple(int(s) for s in re.findall(r"\d+", shape)), dtype)
    return layout


@pytest.mark.parametrize("name,expected", sorted(BACKBONE_NAMES.items()))
def test_backbone_names_parse(name, expected):
    assert backbone_kwargs(name) == expected


@pytest.mark.parametrize("bad", ["R-34-D8", "R-50-D16", "r-50-d8", "R50-D8", "R-50c-D8", "", "R-50-D8 rsb x",
                                 "ResNet-50", "R-50b-D8-rsb"])
def test_unknown_backbone_names_are_refused_with_the_valid_forms(bad):
    with pytest.raises(PspZooError) as info:
        backbone_kwargs(bad)
    assert isinstance(info.value, ValueError)
    assert repr(bad) in str(info.value) and "R-<depth>[b]-D<stride>[ rsb]" in str(info.value)


def test_unpublished_depth_or_stride_is_refused():
    with pytest.raises(ValueError, match=r"depth must be one of \[18, 50, 101\].*got 34"):
        PSPNet(depth=34, num_classes=19)
    with pytest.raises(ValueError, match=r"output_stride must be one of \[8, 32\].*got 16"):
        PSPNet(depth=50, num_classes=19, output_stride=16)


@pytest.mark.parametrize("tag,backbone", [
    ("r18-d8", "R-18-D8"), ("r18b-d8", "R-18b-D8"), ("r50-d8", "R-50-D8"), ("r50b-d8", "R-50b-D8"),
    ("r101-d8", "R-101-D8"), ("r50-d8", "R-50-D32"), ("r50b-d8", "R-50b-D32"), ("r18-d8", "R-18-D32"),
    ("r101-d8", "R-101b-D8"),
])
def test_every_variant_has_the_published_keys_and_shapes(tag, backbone):
    """D32 twins share the D8 layout; R-101b is R-101 with R-50b's stem (checked key by key)."""
    with torch.device("meta"):
        model = PSPNet(num_classes=19, **backbone_kwargs(backbone))
    ours = {k: (tuple(v.shape), str(v.dtype).replace("torch.", "")) for k, v in model.state_dict().items()}
    published = _layout(tag)
    if backbone == "R-101b-D8":  # no fixture of its own: the V1b stem of R-50b on R-101's stages
        v1b = _layout("r50b-d8")
        published = {k: v for k, v in published.items() if not k.startswith("backbone.stem.")}
        published.update({k: v for k, v in v1b.items() if k.startswith(("backbone.conv1.", "backbone.bn1."))})
    assert ours == published


def test_v1b_and_v1c_stems_differ_only_in_the_stem():
    v1c, v1b = _layout("r50-d8"), _layout("r50b-d8")
    assert {k for k in v1c if not k.startswith("backbone.stem.")} == {
        k for k in v1b if not k.startswith(("backbone.conv1.", "backbone.bn1."))}


# What mmseg 0.30.0's ResNet/ResLayer compute, read from its code: per stage, (stride of block 0,
# dilation of block 0, dilation of the other blocks). ResLayer halves the first block's dilation
# whenever it is > 1 (contract_dilation=True in the PSPNet configs), stride 2 or not.
STAGES = {
    8: [(1, 1, 1), (2, 1, 1), (1, 1, 2), (1, 2, 4)],
    32: [(1, 1, 1), (2, 1, 1), (2, 1, 2), (2, 2, 4)],
}
BLOCKS = {18: (2, 2, 2, 2), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}


def _geometry(conv) -> tuple:
    return conv.kernel_size[0], conv.stride[0], conv.dilation[0], conv.padding[0]


def _expected_block(depth: int, stride: int, dilation: int) -> dict:
    if depth == 18:  # mmseg BasicBlock: stride and dilation on conv1 (padding = dilation); conv2 plain
        return {"conv1": (3, stride, dilation, dilation), "conv2": (3, 1, 1, 1)}
    # Bottleneck, style='pytorch': stride on the 3x3 conv2, which pads by its dilation
    return {"conv1": (1, 1, 1, 0), "conv2": (3, stride, dilation, dilation), "conv3": (1, 1, 1, 0)}


@pytest.mark.parametrize("output_stride", [8, 32])
@pytest.mark.parametrize("stem", sorted(STEMS))
@pytest.mark.parametrize("depth", DEPTHS)
def test_conv_strides_dilations_and_paddings_match_mmseg(depth, stem, output_stride):
    with torch.device("meta"):
        backbone = PSPNet(depth=depth, num_classes=19, deep_stem=STEMS[stem], output_stride=output_stride).backbone
    if STEMS[stem]:
        assert [_geometry(backbone.stem[i]) for i in (0, 3, 6)] == [(3, 2, 1, 1), (3, 1, 1, 1), (3, 1, 1, 1)]
        assert not hasattr(backbone, "conv1")
    else:
        assert _geometry(backbone.conv1) == (7, 2, 1, 3) and not hasattr(backbone, "stem")
    pool = backbone.maxpool
    assert (pool.kernel_size, pool.stride, pool.padding) == (3, 2, 1)
    expansion = 1 if depth == 18 else 4
    for i, ((stride, first, rest), count) in enumerate(zip(STAGES[output_stride], BLOCKS[depth])):
        layer = getattr(backbone, f"layer{i + 1}")
        assert len(layer) == count
        for j, block in enumerate(layer):
            geometry = {n: _geometry(getattr(block, n)) for n in ("conv1", "conv2", "conv3") if hasattr(block, n)}
            assert geometry == _expected_block(depth, stride if j == 0 else 1, first if j == 0 else rest), (i, j)
            # a projection shortcut only where the shape changes: never in R-18's first stage
            has_projection = j == 0 and (stride != 1 or i > 0 or expansion != 1)
            assert (block.downsample is not None) == has_projection, (i, j)
            if block.downsample is not None:
                assert _geometry(block.downsample[0]) == (1, stride, 1, 0)


def test_basic_block_dilates_only_its_first_conv():
    """torchvision's BasicBlock refuses dilation; the published R-18 dilates conv1 alone."""
    block = BasicBlock(8, 8, dilation=4)
    assert (block.conv1.dilation, block.conv1.padding) == ((4, 4), (4, 4))
    assert (block.conv2.dilation, block.conv2.padding) == ((1, 1), (1, 1))
    torch.manual_seed(0)
    x = torch.randn(1, 8, 11, 13)
    block.eval()
    with torch.no_grad():
        out = block(x)
        manual = torch.relu(x + block.bn2(torch.nn.functional.conv2d(
            torch.relu(block.bn1(torch.nn.functional.conv2d(x, block.conv1.weight, padding=4, dilation=4))),
            block.conv2.weight, padding=1)))
    assert torch.equal(out, manual)


def _ceil_halvings(size: int, times: int) -> int:
    for _ in range(times):
        size = -(-size // 2)
    return size


@pytest.mark.parametrize("output_stride,strides", [(8, (4, 8, 8, 8)), (32, (4, 8, 16, 32))])
@pytest.mark.parametrize("stem", sorted(STEMS))
@pytest.mark.parametrize("depth", DEPTHS)
def test_narrow_variants_run_at_odd_sizes(depth, stem, output_stride, strides):
    torch.manual_seed(0)
    model = PSPNet(depth=depth, deep_stem=STEMS[stem], output_stride=output_stride, **NARROW).eval()
    x = torch.randn(1, 3, 45, 71)
    with torch.no_grad():
        features = model.extract_features(x)
        logits = model(x)
        aux = model.auxiliary_head(features)
    expansion = 1 if depth == 18 else 4
    for i, (feature, stride) in enumerate(zip(features, strides)):
        halvings = stride.bit_length() - 1  # every stride-2 conv/pool maps n to ceil(n / 2)
        assert feature.shape == (1, 8 * 2**i * expansion, _ceil_halvings(45, halvings), _ceil_halvings(71, halvings))
    assert logits.shape == (1, 5, 45, 71) and torch.isfinite(logits).all()
    assert aux.shape[2:] == features[2].shape[2:]
