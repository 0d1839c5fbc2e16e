"""Loading published files: strict, weights-only, with clear errors for anything else."""
from __future__ import annotations

import os
import pickle
from collections import OrderedDict

import numpy as np
import pytest
import torch

from psp_zoo import CheckpointError, PSPNet, create_model, load_checkpoint, read_checkpoint

from helpers import tiny_checkpoint_path, tiny_info


def _tiny(tag="r50", **kw):
    return PSPNet(**{**tiny_info(tag)["config"], **kw})


def test_loads_meta_and_returns_it():
    meta = load_checkpoint(_tiny(), tiny_checkpoint_path("r50"))
    assert meta["CLASSES"] == ("road", "car", "sky", "tree", "person")
    assert meta["mmseg_version"] == "1.2.2"


@pytest.mark.parametrize("wrap", ["bare", "module", "meta_with_numpy"])
def test_accepts_published_variants(tmp_path, wrap):
    state_dict, _ = read_checkpoint(tiny_checkpoint_path("r50"))
    if wrap == "bare":
        obj = state_dict
    elif wrap == "module":
        obj = {"state_dict": OrderedDict(("module." + k, v) for k, v in state_dict.items())}
    else:  # older mmcv: numpy scalars and arrays inside meta
        obj = {"meta": {"PALETTE": np.array([[1, 2, 3]], dtype=np.uint8), "best": np.float64(0.5),
                        "iter": np.int64(7)}, "state_dict": state_dict}
    path = tmp_path / "variant.pth"
    torch.save(obj, path)
    model = _tiny()
    meta = load_checkpoint(model, path)
    for k, v in model.state_dict().items():
        assert torch.equal(v, state_dict[k])
    if wrap == "meta_with_numpy":
        assert meta["best"] == 0.5 and meta["PALETTE"].tolist() == [[1, 2, 3]]


def test_mismatched_keys_name_the_first_few(tmp_path):
    state_dict, _ = read_checkpoint(tiny_checkpoint_path("r50"))
    state_dict.pop("decode_head.conv_seg.bias")
    state_dict["decode_head.extra.weight"] = torch.zeros(1)
    path = tmp_path / "broken.pth"
    torch.save({"state_dict": state_dict}, path)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(_tiny(), path)
    message = str(info.value)
    assert "1 missing: decode_head.conv_seg.bias" in message
    assert "1 unexpected: decode_head.extra.weight" in message


def test_wrong_architecture_reports_shapes():
    with pytest.raises(CheckpointError,
                       match=r"shape mismatch: .*conv_seg.weight \(5, 16, 1, 1\) vs model \(7, 16, 1, 1\)"):
        load_checkpoint(_tiny(num_classes=7), tiny_checkpoint_path("r50"))
    with pytest.raises(CheckpointError, match="missing"):
        load_checkpoint(_tiny(depth=101), tiny_checkpoint_path("r50"))


def test_truncated_and_foreign_files_are_refused(tmp_path):
    data = tiny_checkpoint_path("r50").read_bytes()
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint"):
        load_checkpoint(_tiny(), truncated)
    text = tmp_path / "notes.pth"
    text.write_text("this is not a checkpoint\n")
    with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint"):
        load_checkpoint(_tiny(), text)
    tensor_list = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], tensor_list)
    with pytest.raises(CheckpointError, match="no state dict"):
        load_checkpoint(_tiny(), tensor_list)
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(_tiny(), tmp_path / "absent.pth")


class _Payload:
    """Unpickling this would create a file: proof that code ran."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.makedirs, (self.marker,))


def test_malicious_pickle_is_refused_and_nothing_runs(tmp_path):
    marker = tmp_path / "pwned"
    state_dict, _ = read_checkpoint(tiny_checkpoint_path("r50"))
    path = tmp_path / "evil.pth"
    torch.save({"meta": {"hook": _Payload(str(marker))}, "state_dict": state_dict}, path)
    with pytest.raises(CheckpointError, match="arbitrary unpickling"):
        load_checkpoint(_tiny(), path)
    assert not marker.exists()
    # the same payload as a legacy (non-zip) pickle file
    legacy = tmp_path / "evil_legacy.pth"
    torch.save({"state_dict": state_dict, "x": _Payload(str(marker))}, legacy,
               _use_new_zipfile_serialization=False)
    with pytest.raises(CheckpointError):
        load_checkpoint(_tiny(), legacy)
    assert not marker.exists()
    # and the payload really would run if unpickled in full
    with open(path, "rb"):
        pass
    pickle.loads(pickle.dumps(_Payload(str(marker))))
    assert marker.exists()


def test_create_model_from_local_checkpoint(tmp_path):
    manifest = tmp_path / "m.yml"
    manifest.write_text(f"""
models:
  - name: tiny_r50
    dataset: cityscapes
    depth: 50
    crop_size: [64, 64]
    schedule: 10
    weights: file://{tiny_checkpoint_path('r50')}
    hash: "5c6bb156"
    published: {{}}
    model: {{num_classes: 5, stem_channels: 8, base_channels: 8, channels: 16, aux_channels: 8}}
""")
    model = create_model("tiny_r50", checkpoint=tiny_checkpoint_path("r50"), manifest=str(manifest))
    assert not model.training
    assert model.num_classes == 5 and not hasattr(model, "checkpoint_entry")  # nothing hung on the module
    unloaded = create_model("tiny_r50", pretrained=False, manifest=str(manifest))
    assert not torch.equal(unloaded.decode_head.conv_seg.weight, model.decode_head.conv_seg.weight)


def test_a_file_that_cannot_be_opened_is_not_called_corrupt(tmp_path, monkeypatch):
    import builtins

    path = tmp_path / "private.pth"
    path.write_bytes(tiny_checkpoint_path("r50").read_bytes())
    real_open = builtins.open

    def no_permission(file, *args, **kwargs):  # what a file owned by another user does (tests run as root)
        if str(file) == str(path):
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", no_permission)
    with pytest.raises(CheckpointError, match=r"cannot read checkpoint .*private\.pth: Permission denied; check its"):
        load_checkpoint(_tiny(), path)


def _randomized_narrow(**variant) -> PSPNet:
    torch.manual_seed(0)
    model = PSPNet(num_classes=5, stem_channels=8, base_channels=8, channels=16, aux_channels=8, **variant)
    for module in model.modules():  # non-trivial BN statistics, so a lossy cast would show
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.normal_()
            module.running_var.uniform_(0.5, 2.0)
            module.num_batches_tracked.fill_(1234)
    return model.eval()


@pytest.mark.parametrize("bn_in_fp32", [False, True])
def test_fp16_checkpoint_loads_exactly_into_an_fp32_model(tmp_path, bn_in_fp32):
    """The fp16-trained checkpoint may hold half tensors (all of them, or all but BatchNorm's)."""
    source = _randomized_narrow(depth=18, deep_stem=False, output_stride=32)
    bn_keys = {f"{name}.{p}" for name, m in source.named_modules() if isinstance(m, torch.nn.BatchNorm2d)
               for p in ("weight", "bias", "running_mean", "running_var")}
    published = OrderedDict(
        (k, v.half() if v.is_floating_point() and not (bn_in_fp32 and k in bn_keys) else v)
        for k, v in source.state_dict().items()
    )
    path = tmp_path / "pspnet_fp16.pth"
    torch.save({"meta": {"fp16": {"loss_scale": 512.0}}, "state_dict": published}, path)
    assert read_checkpoint(path)[0]["decode_head.conv_seg.weight"].dtype == torch.float16

    model = _randomized_narrow(depth=18, deep_stem=False, output_stride=32)
    model.apply(lambda m: torch.nn.init.zeros_(m.weight) if isinstance(m, torch.nn.Conv2d) else None)
    meta = load_checkpoint(model, path)
    assert meta == {"fp16": {"loss_scale": 512.0}}
    loaded = model.state_dict()
    assert loaded.keys() == published.keys()
    for key, value in loaded.items():
        if key.endswith("num_batches_tracked"):
            assert value.dtype == torch.int64 and value.item() == 1234
        else:  # half -> float32 is exact: the model holds precisely the published numbers
            assert value.dtype == torch.float32, key
            assert torch.equal(value, published[key].float()), key
    assert (published["backbone.conv1.weight"].float() != source.state_dict()["backbone.conv1.weight"]).any()
    with torch.no_grad():
        logits = model(torch.randn(1, 3, 33, 47))
    assert logits.dtype == torch.float32 and logits.shape == (1, 5, 33, 47) and torch.isfinite(logits).all()


def test_fp32_checkpoint_loads_into_a_half_model(tmp_path):
    """A model converted to half before loading receives the weights in its own dtype."""
    source = _randomized_narrow(depth=50, deep_stem=True, output_stride=8)
    path = tmp_path / "pspnet_fp32.pth"
    torch.save({"meta": {}, "state_dict": source.state_dict()}, path)
    model = _randomized_narrow(depth=50, deep_stem=True, output_stride=8).half()
    load_checkpoint(model, path)
    for key, value in model.state_dict().items():
        expected = source.state_dict()[key]
        assert torch.equal(value, expected.half() if expected.is_floating_point() else expected), key
