"""ImageNet backbones as manifest entries (fetched, verified, loaded strictly) and mmcv's initialization."""
from __future__ import annotations

import hashlib
import math
import re

import pytest
import torch
import torchvision

from psp_zoo.errors import CheckpointError, PspZooError
from psp_zoo.hub.options import FetchOptions
from psp_zoo.manifest.loading import get_manifest
from psp_zoo.model import PSPNet
from psp_zoo.training.pretrained import backbone_entry, init_weights, load_backbone, load_pretrained_backbone
from psp_zoo.training.recipe import recipe_from_entry

TINY = {"num_classes": 4, "stem_channels": 8, "base_channels": 8, "channels": 16, "aux_channels": 8}


def _hashed(path):
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    target = path.with_name(f"{path.stem}-{digest[:8]}.pth")
    path.rename(target)
    return target, digest


def test_every_recipe_backbone_is_declared_and_fits_its_network():
    manifest = get_manifest()
    for name in manifest.backbones:
        entry = backbone_entry(name)
        assert re.search(r"-[0-9a-f]{8}\.pth$", entry.url), entry.url  # the hub checks the hash it names
    for checkpoint in manifest:
        pretrained = recipe_from_entry(checkpoint).pretrained
        if pretrained is None:  # the authors' entries: their ImageNet files have no URL (docs/authors_models.md)
            assert checkpoint.name.startswith("semseg_"), checkpoint.name
            continue
        backbone = backbone_entry(pretrained)
        assert (backbone.depth, backbone.deep_stem) == (checkpoint.depth, checkpoint.deep_stem), checkpoint.name
    assert backbone_entry("resnet50_rsb-a1").prefix == "backbone."
    with pytest.raises(PspZooError, match="unknown ImageNet backbone 'resnet34'; the manifest lists: resnet18_v1c"):
        backbone_entry("resnet34")


def test_a_torchvision_file_loads_strictly_and_its_classifier_is_listed(tmp_path):
    source = torchvision.models.resnet18(weights=None)
    torch.save(source.state_dict(), tmp_path / "resnet18.pth")
    model = PSPNet(depth=18, deep_stem=False, **TINY | {"stem_channels": 64, "base_channels": 64})
    unused = load_backbone(model.backbone, tmp_path / "resnet18.pth")
    assert unused == ["fc.bias", "fc.weight"]
    loaded = model.backbone.state_dict()
    for key, value in source.state_dict().items():
        if not key.startswith("fc."):
            assert torch.equal(loaded[key], value), key
    del_key = {k: v for k, v in source.state_dict().items() if k != "layer4.1.bn2.running_var"}
    torch.save(del_key, tmp_path / "broken.pth")
    with pytest.raises(CheckpointError, match="1 missing: layer4.1.bn2.running_var"):
        load_backbone(model.backbone, tmp_path / "broken.pth")


def test_a_manifest_backbone_is_fetched_verified_and_loaded_with_its_prefix(tmp_path):
    """An mmcls-style file (keys under backbone., a head.*) served from a file:// URL through the hub."""
    model = PSPNet(depth=50, **TINY)
    state = {f"backbone.{k}": torch.randn_like(v) if v.is_floating_point() else v
             for k, v in model.backbone.state_dict().items()}
    state["head.fc.weight"] = torch.zeros(3, 3)
    torch.save({"meta": {}, "state_dict": state}, tmp_path / "tiny_rsb.pth")
    path, digest = _hashed(tmp_path / "tiny_rsb.pth")
    manifest = tmp_path / "m.yml"
    manifest.write_text(f"backbones:\n  - {{name: tiny_rsb, depth: 50, stem: v1c, prefix: backbone., "
                        f"url: '{path.as_uri()}', sha256: {digest}}}\n")
    fetch = FetchOptions(manifest=str(manifest), cache_dir=str(tmp_path / "cache"))
    cached, unused = load_pretrained_backbone(model, "tiny_rsb", fetch)
    # verified, and read where it is: a file:// URL's file is never copied into the cache
    assert cached == path and not (tmp_path / "cache").exists() and unused == ["head.fc.weight"]
    assert torch.equal(model.backbone.stem[0].weight, state["backbone.stem.0.weight"])
    with pytest.raises(PspZooError, match="is a ResNet-50 V1c; the model is not"):
        load_pretrained_backbone(PSPNet(depth=18, **TINY), "tiny_rsb", fetch)


def test_mmcv_initialization():
    torch.manual_seed(0)
    model = init_weights(PSPNet(depth=50, num_classes=19))
    conv = model.decode_head.bottleneck.conv
    fan_out = conv.out_channels * conv.kernel_size[0] * conv.kernel_size[1]
    assert conv.weight.std().item() == pytest.approx(math.sqrt(2.0 / fan_out), rel=0.02)
    for head in (model.decode_head, model.auxiliary_head):
        assert head.conv_seg.weight.std().item() == pytest.approx(0.01, rel=0.1)
        assert torch.count_nonzero(head.conv_seg.bias) == 0
    bn = model.backbone.layer1[0].bn1
    assert torch.equal(bn.weight, torch.ones_like(bn.weight)) and torch.count_nonzero(bn.bias) == 0
