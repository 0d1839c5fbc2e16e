"""The PSPNet authors' network (hszhao/semseg) as a PSPNet variant: their files load strictly, the
logits are those of an independent re-statement of their network, and the fast path, export and
a saved state dict work on it as on mmseg's."""
from __future__ import annotations

import copy
import io
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from psp_zoo import PSPNet, create_model, load_checkpoint, optimize
from psp_zoo.errors import CheckpointError
from psp_zoo.manifest.backbones import FAMILIES
from psp_zoo.model.checkpoint import is_semseg_layout, semseg_name
from psp_zoo.model.winograd import WinogradConv2d, use_winograd
from psp_zoo.testing import (
    TINY_SEMSEG_ARCH,
    calibrate_batchnorm,
    tiny_semseg_model,
    write_manifest,
    write_semseg_checkpoint,
)

from helpers import assert_close_to_scale, max_rel_diff

NUM_CLASSES = 7


# --------------------------------------------------------------------------------------------
# their network, re-stated from model/pspnet.py and model/resnet.py (narrow widths, same layout)


class TheirBottleneck(nn.Module):
    """torchvision's bottleneck as their resnet.py has it: the stride on the 3x3 conv2."""

    expansion = 4

    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        residual = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.relu(self.bn3(self.conv3(out)) + residual)


class TheirPSPNet(nn.Module):
    """Their PSPNet at ``stem`` / ``base`` widths: deep base (3x3 convs stem/2, stem/2, stem), layers
    made with strides 1, 2, 2, 2, then every conv2 of layer3 set to dilation 2 and of layer4 to 4,
    stride 1, the downsample convs to stride 1; PPM of fea/4 per bin, cls 3x3 -> fea/4 -> classes,
    aux on layer3; output resized to (H - 1) / 8 * 8 + 1 with align_corners=True."""

    def __init__(self, blocks=(3, 4, 6, 3), classes=NUM_CLASSES, stem=16, base=8, bins=(1, 2, 3, 6)):
        super().__init__()
        conv1 = nn.Conv2d(3, stem // 2, 3, stride=2, padding=1, bias=False)
        conv2 = nn.Conv2d(stem // 2, stem // 2, 3, padding=1, bias=False)
        conv3 = nn.Conv2d(stem // 2, stem, 3, padding=1, bias=False)
        self.layer0 = nn.Sequential(conv1, nn.BatchNorm2d(stem // 2), nn.ReLU(inplace=True),
                                    conv2, nn.BatchNorm2d(stem // 2), nn.ReLU(inplace=True),
                                    conv3, nn.BatchNorm2d(stem), nn.ReLU(inplace=True),
                                    nn.MaxPool2d(3, stride=2, padding=1))
        self.inplanes = stem
        self.layer1 = self._make_layer(base, blocks[0])
        self.layer2 = self._make_layer(base * 2, blocks[1], stride=2)
        self.layer3 = self._make_layer(base * 4, blocks[2], stride=2)
        self.layer4 = self._make_layer(base * 8, blocks[3], stride=2)
        for layer, d in ((self.layer3, 2), (self.layer4, 4)):
            for n, m in layer.named_modules():
                if "conv2" in n:
                    m.dilation, m.padding, m.stride = (d, d), (d, d), (1, 1)
                elif "downsample.0" in n:
                    m.stride = (1, 1)
        fea = base * 8 * 4
        reduction = fea // len(bins)
        self.ppm = nn.Module()
        self.ppm.features = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(b), nn.Conv2d(fea, reduction, 1, bias=False),
                          nn.BatchNorm2d(reduction), nn.ReLU(inplace=True)) for b in bins)
        self.cls = nn.Sequential(nn.Conv2d(fea * 2, reduction, 3, padding=1, bias=False),
                                 nn.BatchNorm2d(reduction), nn.ReLU(inplace=True), nn.Dropout2d(0.1),
                                 nn.Conv2d(reduction, classes, 1))
        self.aux = nn.Sequential(nn.Conv2d(fea // 2, fea // 8, 3, padding=1, bias=False),
                                 nn.BatchNorm2d(fea // 8), nn.ReLU(inplace=True), nn.Dropout2d(0.1),
                                 nn.Conv2d(fea // 8, classes, 1))

    def _make_layer(self, planes, blocks, stride=1):
        downsample = None
        if stride != 1 or self.inplanes != planes * 4:
            downsample = nn.Sequential(nn.Conv2d(self.inplanes, planes * 4, 1, stride=stride, bias=False),
                                       nn.BatchNorm2d(planes * 4))
        layers = [TheirBottleneck(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * 4
        layers += [TheirBottleneck(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x):
        h, w = (x.shape[2] - 1) // 8 * 8 + 1, (x.shape[3] - 1) // 8 * 8 + 1
        x = self.layer4(self.layer3(self.layer2(self.layer1(self.layer0(x)))))
        size = x.shape[2:]
        x = torch.cat([x] + [F.interpolate(f(x), size, mode="bilinear", align_corners=True)
                             for f in self.ppm.features], 1)
        return F.interpolate(self.cls(x), size=(h, w), mode="bilinear", align_corners=True)


def their_model(seed=0, blocks=(3, 4, 6, 3)) -> TheirPSPNet:
    torch.manual_seed(seed)
    model = TheirPSPNet(blocks)
    calibrate_batchnorm(model, [torch.randn(2, 3, 65, 65) for _ in range(2)])
    for block in (m for m in model.modules() if isinstance(m, TheirBottleneck)):
        block.bn3.weight.data.mul_(0.2)  # small residual branches, as trained: a random deep net is chaotic
    return model


def save_their_format(model: nn.Module, path, *, extra=None, drop=()) -> None:
    """As their train.py saves: {'epoch', 'state_dict' (DDP's module. prefix), 'optimizer'}."""
    state = OrderedDict((f"module.{k}", v.clone()) for k, v in model.state_dict().items() if k not in drop)
    state.update(extra or {})
    trained = copy.deepcopy(model).train()  # the caller's model stays as it is
    optimizer = torch.optim.SGD(trained.parameters(), lr=1e-6, momentum=0.9, weight_decay=1e-4)
    trained(torch.randn(2, 3, 33, 33)).mean().backward()
    optimizer.step()  # momentum buffers in the optimizer state, as in a real file
    torch.save({"epoch": 100, "state_dict": state, "optimizer": optimizer.state_dict()}, path)


def semseg_variant(num_classes=NUM_CLASSES, depth=50) -> PSPNet:
    return PSPNet(depth=depth, num_classes=num_classes, align_corners=True,
                  **{**FAMILIES["semseg"], **TINY_SEMSEG_ARCH}).eval()


@pytest.fixture(scope="module")
def their_file(tmp_path_factory):
    torch.manual_seed(0)
    model = their_model()
    path = tmp_path_factory.mktemp("semseg") / "train_epoch_100.pth"
    save_their_format(model, path)
    model.load_state_dict({k[len("module."):]: v for k, v in torch.load(path, weights_only=True)["state_dict"].items()})
    return model.eval(), path


# --------------------------------------------------------------------------------------------
# the network and its loading


def test_their_file_loads_and_gives_their_logits(their_file):
    theirs, path = their_file
    model = semseg_variant()
    load_checkpoint(model, path)
    x = torch.randn(2, 3, 57, 73)  # (H - 1) % 8 == 0, as their protocol feeds it
    with torch.no_grad():
        expected, got = theirs(x), model(x)
    assert got.shape == expected.shape == (2, NUM_CLASSES, 57, 73)
    assert_close_to_scale(got, expected, 1e-5)
    # the aux head is loaded too: their aux on layer3 equals psp-zoo's auxiliary head
    with torch.no_grad():
        c3 = theirs.layer3(theirs.layer2(theirs.layer1(theirs.layer0(x))))
        assert_close_to_scale(model.auxiliary_head(model.extract_features(x)), theirs.aux(c3), 1e-5)


def test_the_authors_layout_differs_from_mmsegs_where_it_should():
    """No contract dilation (every block at 2 / 4), a 128-channel deep stem at full width."""
    ours, mmseg = semseg_variant(), PSPNet(depth=50, num_classes=3, **{k: v for k, v in TINY_SEMSEG_ARCH.items()})
    assert [b.conv2.dilation for b in ours.backbone.layer3] == [(2, 2)] * 6
    assert [b.conv2.dilation for b in ours.backbone.layer4] == [(4, 4)] * 3
    assert mmseg.backbone.layer4[0].conv2.dilation == (2, 2)  # mmseg's contract_dilation, unchanged
    full = PSPNet(depth=50, num_classes=150, align_corners=True, **FAMILIES["semseg"])
    assert [full.backbone.stem[i].out_channels for i in (0, 3, 6)] == [64, 64, 128]
    assert full.backbone.layer1[0].conv1.in_channels == 128


def test_a_wrong_key_map_would_change_the_logits(their_file):
    """The check above can fail: their network with contracted dilation (mmseg's) gives other logits."""
    theirs, path = their_file
    contracted = PSPNet(depth=50, num_classes=NUM_CLASSES, align_corners=True,
                        **{**TINY_SEMSEG_ARCH, "stem_channels": 16})
    load_checkpoint(contracted, path)  # same keys and shapes: only the dilation differs
    x = torch.randn(1, 3, 57, 73)
    with torch.no_grad():
        assert max_rel_diff(contracted.eval()(x), theirs(x)) > 1e-2


def test_the_key_map_is_exact_and_covers_their_whole_network():
    theirs = their_model(blocks=(3, 4, 23, 3))  # R-101's layout
    model = PSPNet(depth=101, num_classes=NUM_CLASSES, align_corners=True, **{**FAMILIES["semseg"], **TINY_SEMSEG_ARCH})
    names = [semseg_name(k) for k in model.state_dict()]
    assert sorted(names) == sorted(theirs.state_dict())  # one to one, nothing left over
    assert semseg_name("decode_head.psp_modules.2.1.bn.running_var") == "ppm.features.2.2.running_var"
    assert semseg_name("backbone.stem.6.weight") == "layer0.6.weight"
    assert semseg_name("auxiliary_head.conv_seg.bias") == "aux.4.bias"
    assert is_semseg_layout(theirs.state_dict()) and not is_semseg_layout(model.state_dict())


def test_unexpected_missing_and_misshapen_keys_are_refused_by_their_names(their_file, tmp_path):
    theirs, _ = their_file
    extra = tmp_path / "extra.pth"
    save_their_format(theirs, extra, extra={"module.cls.2.weight": torch.zeros(3)})
    with pytest.raises(CheckpointError, match=r"1 unexpected: cls\.2\.weight"):
        load_checkpoint(semseg_variant(), extra)
    missing = tmp_path / "missing.pth"
    save_their_format(theirs, missing, drop=("ppm.features.2.2.running_var",))
    with pytest.raises(CheckpointError, match=r"1 missing: ppm\.features\.2\.2\.running_var"):
        load_checkpoint(semseg_variant(), missing)
    with pytest.raises(CheckpointError,
                       match=r"shape mismatch: cls\.4\.weight \(7, 64, 1, 1\) vs model \(3, 64, 1, 1\)"):
        load_checkpoint(semseg_variant(num_classes=3), _saved(theirs, tmp_path / "ok.pth"))
    model = semseg_variant()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError):
        load_checkpoint(model, extra)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # nothing half-loaded


def test_a_v1b_model_is_told_the_file_is_the_authors(their_file):
    _, path = their_file
    v1b = PSPNet(depth=50, num_classes=NUM_CLASSES, deep_stem=False, **TINY_SEMSEG_ARCH)
    with pytest.raises(CheckpointError, match=r"PSPNet authors' layout.*backbone\.conv1\.weight.*family 'semseg'"):
        load_checkpoint(v1b, path)


def _saved(model, path):
    save_their_format(model, path)
    return path


def test_the_optimizer_is_never_unpickled_as_code(their_file, tmp_path):
    """weights_only=True: a file whose 'optimizer' holds an object is refused, not run."""
    theirs, _ = their_file
    path = tmp_path / "evil.pth"
    state = OrderedDict((f"module.{k}", v) for k, v in theirs.state_dict().items())
    torch.save({"epoch": 1, "state_dict": state, "optimizer": io.BytesIO(b"x")}, path)
    with pytest.raises(CheckpointError, match="refused to load"):
        load_checkpoint(semseg_variant(), path)


def test_what_psp_zoo_saves_for_their_network_loads_back(their_file, tmp_path):
    theirs, path = their_file
    model = semseg_variant()
    load_checkpoint(model, path)
    saved = tmp_path / "saved.pth"
    torch.save({"meta": {}, "state_dict": model.state_dict()}, saved)
    again = semseg_variant()
    load_checkpoint(again, saved)
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in model.state_dict().items())
    pytest.importorskip("safetensors")
    from psp_zoo.deploy import export

    exported = export.export_safetensors(model, tmp_path / "semseg.safetensors")
    from_safetensors = semseg_variant()
    load_checkpoint(from_safetensors, exported)
    assert all(torch.equal(v, from_safetensors.state_dict()[k]) for k, v in model.state_dict().items())
    # and testing.write_semseg_checkpoint writes their format from psp-zoo's model, which loads back
    tiny = tiny_semseg_model(num_classes=NUM_CLASSES)
    restated = TheirPSPNet()
    their_keys = torch.load(write_semseg_checkpoint(tmp_path / "w.pth", tiny), weights_only=True)["state_dict"]
    restated.load_state_dict({k[len("module."):]: v for k, v in their_keys.items()}, strict=True)
    x = torch.randn(1, 3, 41, 49)
    with torch.no_grad():
        assert_close_to_scale(tiny(x), restated.eval()(x), 1e-5)


def test_create_model_builds_the_entry_and_loads_their_file(their_file, tmp_path):
    theirs, path = their_file
    manifest = write_manifest(tmp_path / "tiny.yml", [
        {"name": "semseg_pspnet50_voc2012", "model": {**TINY_SEMSEG_ARCH, "num_classes": NUM_CLASSES}}])
    model = create_model("semseg_pspnet50_voc2012", checkpoint=path, manifest=str(manifest))
    assert (model.align_corners, model.num_classes) == (True, NUM_CLASSES)
    x = torch.randn(1, 3, 49, 57)
    with torch.no_grad():
        assert_close_to_scale(model(x), theirs(x), 1e-5)


# --------------------------------------------------------------------------------------------
# fast path and export on the variant, as exact as on mmseg's


@pytest.fixture
def loaded(their_file, single_thread):
    theirs, path = their_file
    model = semseg_variant()
    load_checkpoint(model, path)
    return theirs, model


def test_fast_path_is_exact_on_their_network(loaded):
    theirs, model = loaded
    x = torch.randn(1, 3, 57, 73)
    with torch.no_grad():
        reference = theirs(x)
    fast = optimize(model)
    assert fast.optimizations["factorize_head"] and fast.optimizations["folded_bn"] > 0
    out = fast(x)
    assert_close_to_scale(out, reference, 1e-4)
    assert torch.equal(out.argmax(1), reference.argmax(1))
    # Winograd on every 3x3 (the tiny widths are below the default 256-channel threshold),
    # the dilated ones of every layer3/layer4 block included
    swapped = use_winograd(fast.model, min_channels=1)
    assert swapped >= 1 + 6 + 3 and isinstance(fast.model.backbone.layer3[0].conv2, WinogradConv2d)
    assert fast.model.backbone.layer3[0].conv2.dilation == 2 and fast.model.backbone.layer4[0].conv2.dilation == 4
    assert_close_to_scale(fast(x), reference, 1e-4)


def test_onnx_export_is_exact_on_their_network(loaded, tmp_path):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from psp_zoo.deploy import export, runtime, verify

    theirs, model = loaded
    path = export.export_onnx(model, tmp_path / "semseg.onnx", input_size=(65, 65))
    session = runtime.OnnxModel(path, threads=1)
    for size in ((65, 65), (57, 81)):
        x = torch.randn(1, 3, *size)
        with torch.no_grad():
            reference = theirs(x)
        result = verify.compare_outputs(reference, session(x))
        assert result.rel_diff <= 1e-4 and result.agreement >= 0.9999, result.line()
