"""The factorized PSP head inside the exported ONNX graph: one dynamic file, the logits of the model as loaded."""
from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F

from psp_zoo import PspZooError, SegmentationDataset
from psp_zoo.cli import main
from psp_zoo.deploy.onnx_head import OnnxPSPHead, bilinear_operator, use_onnx_head
from psp_zoo.evaluation.inference import slide_inference
from psp_zoo.evaluation.scoring import score
from psp_zoo.manifest.loading import EvalSettings as Settings
from psp_zoo.model.optimization import fold_batchnorm

import minidata
from helpers import max_rel_diff, random_head, tiny_checkpoint_path, tiny_expected, tiny_model
from hub_server import write_manifest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from psp_zoo.deploy import export, runtime  # noqa: E402  (after the skips)

TRACE_SIZE = (64, 64)


@pytest.fixture(autouse=True)
def _one_thread(single_thread):
    """torch on one thread (conftest's single_thread); onnxruntime sessions get threads=1 below."""


def write_factorized(model: torch.nn.Module, path):
    """The model exported with the default (factorized) head, dynamic shapes."""
    export.export_onnx(model, path, input_size=TRACE_SIZE)
    assert {p.key: p.value for p in onnx.load(str(path)).metadata_props}["psp_zoo.head"] == "factorized"
    return path


@pytest.fixture(scope="module", params=[("r50", False), ("r50", True), ("r101", False), ("r101", True)],
                ids=lambda p: f"{p[0]}-align_corners={p[1]}")
def exported(request, tmp_path_factory):
    """(tag, model as loaded, path of its factorized dynamic ONNX export), one file per model."""
    tag, align_corners = request.param
    model = tiny_model(tag, align_corners=align_corners)
    return tag, model, write_factorized(model, tmp_path_factory.mktemp("onnx_head") / f"{tag}.onnx")


# ------------------------------------------------------------------------------------------------
# the pieces built from the runtime shape


@pytest.mark.parametrize("align_corners", [False, True])
def test_bilinear_operator_is_pytorchs_bit_for_bit(align_corners):
    like = torch.zeros(1)
    for scale in (1, 2, 3, 5, 6, 8):
        eye = torch.eye(scale).reshape(scale, 1, scale, 1)
        for size in range(1, 140):
            expected = F.interpolate(eye, size=(size, 1), mode="bilinear", align_corners=align_corners)
            got = bilinear_operator(size, scale, align_corners, like)
            assert torch.equal(got, expected.reshape(scale, size).t()), (scale, size)


@pytest.mark.parametrize("scales, channels", [((1, 2, 3, 6), 8), ((1, 3, 4, 8), 12), ((2, 5), 6), ((6,), 4)])
@pytest.mark.parametrize("align_corners", [False, True])
def test_eager_head_equals_plain_head_for_any_scales_and_width(scales, channels, align_corners):
    head = random_head(16, channels, scales, align_corners, seed=len(scales) + channels)
    inputs = [torch.randn(2, 16, *size) for size in ((9, 13), (5, 4), (8, 8), (1, 1), (2, 17))]
    with torch.no_grad():
        references = [head([None, None, None, x]) for x in inputs]
        unfolded = [OnnxPSPHead(head)([None, None, None, x]) for x in inputs]
    assert isinstance(head.psp_modules[0][0], torch.nn.AdaptiveAvgPool2d)  # the source is left as it was
    assert isinstance(head.bottleneck.bn, torch.nn.BatchNorm2d)
    fold_batchnorm(head)  # the exporter builds it from the folded head
    with torch.no_grad():
        folded = [OnnxPSPHead(head)([None, None, None, x]) for x in inputs]
    for reference, got, got_folded in zip(references, unfolded, folded):
        assert max_rel_diff(got, reference) <= 1e-5 and max_rel_diff(got_folded, reference) <= 1e-5


def test_swap_only_replaces_a_psp_head():
    model = tiny_model("r50")
    assert use_onnx_head(model) and isinstance(model.decode_head, OnnxPSPHead)
    assert not use_onnx_head(torch.nn.Sequential(torch.nn.Conv2d(3, 3, 1)))


# ------------------------------------------------------------------------------------------------
# the exported graph


def test_the_graph_holds_no_upsampled_pyramid(exported):
    """One Resize (the logits to the input size) and no bottleneck conv over the concatenated pyramid."""
    _, model, path = exported
    graph = onnx.load(str(path)).graph
    assert [node.op_type for node in graph.node].count("Resize") == 1
    head = model.decode_head
    wide = head.bottleneck.conv.in_channels  # x plus every upsampled branch
    conv_inputs = {init.name: list(init.dims) for init in graph.initializer if len(init.dims) == 4}
    assert all(dims[1] != wide for dims in conv_inputs.values())
    assert any(dims[1] == wide - len(head.psp_modules) * head.bottleneck.conv.out_channels
               for dims in conv_inputs.values())


def test_one_file_two_sizes_within_1e4_of_the_model_as_loaded(exported):
    """97 x 131 (the reference's logits) and 37 x 29: odd, pooled at 5 x 4, below the 6 x 6 grid."""
    tag, model, path = exported
    runner = runtime.OnnxModel(path, threads=1)
    assert runner.static_size is None and runner.align_corners is model.align_corners
    expected = tiny_expected(tag, model.align_corners)
    assert max_rel_diff(runner(expected["whole_input"]), expected["whole_logits"]) <= 1e-4
    x = torch.randn(2, 3, 37, 29, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert model.backbone(x)[3].shape[2:] == (5, 4)
        reference = model(x)
    assert max_rel_diff(runner(x), reference) <= 1e-4


def test_identical_argmax_on_the_fixtures(exported):
    tag, model, path = exported
    runner = runtime.OnnxModel(path, threads=1)
    expected = tiny_expected(tag, model.align_corners)
    assert torch.equal(runner(expected["whole_input"]).argmax(1), expected["whole_logits"].argmax(1))
    slide = slide_inference(runner, expected["slide_input"], expected["slide_crop"], expected["slide_stride"],
                            batch_size=3)
    assert torch.equal(slide.argmax(1), expected["slide_logits"].argmax(1))


def test_a_broken_operator_is_caught(tmp_path, monkeypatch):
    """The checks above can fail: align_corners ignored in the graph moves the logits far beyond 1e-4."""
    from psp_zoo.deploy import onnx_head

    model = tiny_model("r50", align_corners=True)
    wrong = onnx_head.bilinear_operator
    monkeypatch.setattr(onnx_head, "bilinear_operator", lambda size, scale, _ac, like: wrong(size, scale, False, like))
    runner = runtime.OnnxModel(write_factorized(model, tmp_path / "wrong.onnx"), threads=1)
    expected = tiny_expected("r50", True)
    assert max_rel_diff(runner(expected["whole_input"]), expected["whole_logits"]) > 1e-4


# ------------------------------------------------------------------------------------------------
# scoring through onnxruntime


@pytest.mark.parametrize("mode", ["whole", "slide"])
def test_confusion_matrix_through_the_factorized_file_equals_pytorch(tmp_path, mode):
    model = tiny_model("r50")
    path = write_factorized(model, tmp_path / "tiny.onnx")
    minidata.write_cityscapes(tmp_path / "cityscapes")
    slide = dict(crop_size=(17, 17), stride=(11, 11)) if mode == "slide" else {}
    settings = Settings(mode=mode, img_scale=(64, 32), align_corners=False, **slide)
    matrices = []
    for runner in (model, runtime.OnnxModel(path, threads=1)):
        data = SegmentationDataset("cityscapes", tmp_path / "cityscapes", img_scales=[(64, 32)])
        matrices.append(score(runner, data, settings, 5, ms_flip=False, device=torch.device("cpu"),
                              num_workers=0, show=False).matrix)
    assert matrices[0].sum() > 0 and torch.equal(matrices[0], matrices[1])


def _cli_export(tmp_path, out, *extra) -> int:
    manifest = write_manifest(tmp_path / "m.yml", "http://127.0.0.1:9")  # unreachable: nothing fetched
    return main(["export", "tiny_r50", "--manifest", str(manifest), "--checkpoint", str(tiny_checkpoint_path("r50")),
                 "--input-size", "64", "64", "--out", str(out), *extra])


@pytest.mark.parametrize("mode", ["whole", "slide"])
def test_evaluate_onnx_on_the_default_export_gives_the_pytorch_record(tmp_path, mode, caplog):
    """``psp-zoo export`` (factorized by default), then ``evaluate(..., onnx=FILE)``: the scores of
    the model as loaded, and the session's threads as asked, in the record and in a log line."""
    from psp_zoo import evaluate

    path = tmp_path / "tiny.onnx"
    assert _cli_export(tmp_path, path) == 0
    assert {p.key: p.value for p in onnx.load(str(path)).metadata_props}["psp_zoo.head"] == "factorized"
    minidata.write_cityscapes(tmp_path / "cityscapes")
    slide = dict(mode="slide", crop_size=(17, 17), stride=(11, 11)) if mode == "slide" else {}
    common = dict(manifest=str(tmp_path / "m.yml"), device="cpu", num_workers=0, progress=False,
                  img_scale=(64, 32), **slide)
    with caplog.at_level(logging.INFO, logger="psp_zoo"):
        through_onnx = evaluate("tiny_r50", tmp_path / "cityscapes", onnx=path, threads=1, **common)
    through_torch = evaluate("tiny_r50", tmp_path / "cityscapes", checkpoint=tiny_checkpoint_path("r50"),
                             fuse_bn=False, factorize_head=False, winograd=False, channels_last=False, **common)
    assert through_onnx.single_scale == through_torch.single_scale and through_onnx.images.count == 3
    assert through_onnx.backend["backend"] == "onnxruntime"
    assert through_onnx.backend["threads"] == 1 and through_onnx.backend["spinning"] is False
    assert "on 1 intra-op thread(s), idle threads not spinning" in caplog.text


def test_onnx_sessions_take_torchs_thread_count_unless_told(tmp_path):
    from psp_zoo import evaluate

    path = write_factorized(tiny_model("r50"), tmp_path / "tiny.onnx")
    minidata.write_cityscapes(tmp_path / "cityscapes")
    manifest = write_manifest(tmp_path / "m.yml", "http://127.0.0.1:9")
    common = dict(manifest=str(manifest), device="cpu", num_workers=0, progress=False, img_scale=(32, 16), limit=1)
    record = evaluate("tiny_r50", tmp_path / "cityscapes", onnx=path, **common)
    assert record.backend["threads"] == torch.get_num_threads() == 1  # the single_thread fixture's setting
    with pytest.raises(PspZooError, match="threads must be a whole number"):
        evaluate("tiny_r50", tmp_path / "cityscapes", onnx=path, threads=0, **common)


# ------------------------------------------------------------------------------------------------
# the plain head on request


def test_plain_head_keeps_the_convolved_pyramid(tmp_path):
    model = tiny_model("r50", align_corners=True)
    plain = export.export_onnx(model, tmp_path / "plain.onnx", input_size=TRACE_SIZE, plain_head=True)
    proto = onnx.load(str(plain))
    assert {p.key: p.value for p in proto.metadata_props}["psp_zoo.head"] == "plain"
    wide = model.decode_head.bottleneck.conv.in_channels
    assert any(len(init.dims) == 4 and init.dims[1] == wide for init in proto.graph.initializer)
    assert [node.op_type for node in proto.graph.node].count("Resize") == 1 + len(model.decode_head.psp_modules)
    factorized = write_factorized(model, tmp_path / "factorized.onnx")
    x = torch.randn(1, 3, 45, 51, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        reference = model(x)
    for path in (plain, factorized):
        assert max_rel_diff(runtime.OnnxModel(path, threads=1)(x), reference) <= 1e-4


def test_cli_export_default_head_verifies_and_plain_head_is_onnx_only(tmp_path, capsys):
    out = tmp_path / "tiny.onnx"
    assert _cli_export(tmp_path, out, "--verify") == 0
    assert capsys.readouterr().out.count(" ok\n") == 3
    assert {p.key: p.value for p in onnx.load(str(out)).metadata_props}["psp_zoo.head"] == "factorized"
    assert _cli_export(tmp_path, out, "--plain-head", "--verify") == 0
    assert capsys.readouterr().out.count(" ok\n") == 3
    assert {p.key: p.value for p in onnx.load(str(out)).metadata_props}["psp_zoo.head"] == "plain"
    assert _cli_export(tmp_path, tmp_path / "m.pt", "--format", "torchscript", "--plain-head") == 2
    assert "--plain-head apply to --format onnx only" in capsys.readouterr().err
    assert not (tmp_path / "m.pt").exists()
    with pytest.raises(PspZooError, match="ONNX files only"):
        export.export_file(tiny_model("r50"), tmp_path / "m.pt", "torchscript", plain_head=True)
