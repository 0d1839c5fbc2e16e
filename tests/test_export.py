"""Export to ONNX (dynamic shapes), TorchScript and safetensors; scoring through onnxruntime."""
from __future__ import annotations

import sys

import pytest
import torch
import torch.nn.functional as F

from psp_zoo import ConfusionMatrix, PSPNet, PspZooError, SegmentationDataset, load_checkpoint, optimize
from psp_zoo.cli import main
from psp_zoo.errors import CheckpointError
from psp_zoo.evaluation.inference import slide_inference
from psp_zoo.evaluation.scoring import score
from psp_zoo.manifest.loading import EvalSettings as Settings

import minidata
from helpers import assert_close_to_scale, tiny_checkpoint_path, tiny_expected, tiny_info, tiny_model
from hub_server import write_manifest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from psp_zoo.deploy import export, pooling, runtime, verify  # noqa: E402  (after the skips: needs onnx at call time only)

TRACE_SIZE = (64, 64)


@pytest.fixture(autouse=True)
def _one_thread(single_thread):
    """torch on one thread (conftest's single_thread); onnxruntime sessions get threads=1 below."""


@pytest.fixture(scope="module", params=[False, True], ids=["align_corners=False", "align_corners=True"])
def exported(request, tmp_path_factory):
    """(model, path of its dynamic ONNX export), exported once per align_corners setting."""
    model = tiny_model("r50", align_corners=request.param)
    path = tmp_path_factory.mktemp("onnx") / "tiny.onnx"
    export.export_onnx(model, path, input_size=TRACE_SIZE)
    return model, path


def _within(reference: torch.Tensor, got: torch.Tensor) -> None:
    result = verify.compare_outputs(reference, got)
    assert result.rel_diff <= 1e-4 and result.agreement >= 0.9999, result.line()


def test_exact_pooling_equals_adaptive_avg_pool_for_every_size():
    x = torch.randn(2, 3, 25, 25)
    for height in (1, 2, 3, 5, 6, 7, 11, 13, 25):
        for width in (1, 4, 7, 12, 25):
            part = x[:, :, :height, :width]
            for scale in (1, 2, 3, 6):
                expected = F.adaptive_avg_pool2d(part, scale)
                assert_close_to_scale(pooling.adaptive_avg_pool_exact(part, scale), expected, 1e-6)


def test_one_file_serves_three_sizes_and_a_batch(exported):
    model, path = exported
    runner = runtime.OnnxModel(path, threads=1)
    assert runner.static_size is None
    assert [d for d in runner.session.get_inputs()[0].shape] == ["batch", 3, "height", "width"]
    assert runner.num_classes == 5 and runner.align_corners is model.align_corners
    # 97 x 131 reaches the pyramid pooling at 13 x 17 (no scale divides it): the reference's logits
    expected = tiny_expected("r50", model.align_corners)
    _within(expected["whole_logits"], runner(expected["whole_input"]))
    generator = torch.Generator().manual_seed(0)
    for shape in ((2, 3, 61, 87), (1, 3, 37, 29)):  # a batch of two; pooled 5 x 4, below the 6 x 6 grid
        x = torch.randn(*shape, generator=generator)
        with torch.no_grad():
            reference = model(x)
        _within(reference, runner(x))
    with torch.no_grad():
        assert model.backbone(torch.zeros(1, 3, 37, 29))[3].shape[2:] == (5, 4)


def test_slide_inference_runs_on_the_onnx_model(exported):
    model, path = exported
    expected = tiny_expected("r50", model.align_corners)
    got = slide_inference(runtime.OnnxModel(path, threads=1), expected["slide_input"], expected["slide_crop"],
                          expected["slide_stride"], batch_size=3)
    _within(expected["slide_logits"], got)


def test_verify_reports_numbers_and_passes(exported):
    model, path = exported
    report = verify.verify_onnx(path, model, input_size=TRACE_SIZE, threads=1)
    assert report.ok and [c.shape for c in report.comparisons] == [(1, 5, 64, 64), (2, 5, 61, 87), (1, 5, 37, 29)]
    assert "max rel diff" in report.text() and "argmax agreement" in report.text()


def test_verify_fails_on_corrupted_weights(exported, tmp_path):
    model, path = exported
    proto = onnx.load(str(path))
    bias = next(t for t in proto.graph.initializer if t.name == "decode_head.conv_seg.bias")
    values = onnx.numpy_helper.to_array(bias).copy()
    values[0] += 0.5 * abs(values).max() + 0.1
    bias.CopyFrom(onnx.numpy_helper.from_array(values, bias.name))
    broken = tmp_path / "broken.onnx"
    onnx.save(proto, str(broken))
    report = verify.verify_onnx(broken, model, sizes=[(1, 40, 40)], threads=1)
    assert not report.ok and report.comparisons[0].rel_diff > 1e-4
    assert "FAILED" in report.text()


def test_static_export_has_fixed_shape(tmp_path):
    model = tiny_model("r50")
    path = export.export_onnx(model, tmp_path / "static.onnx", input_size=(48, 40), dynamic=False)
    assert runtime.OnnxModel(path, threads=1).static_size == (48, 40)
    assert verify.verify_onnx(path, model, threads=1).ok  # its own size
    report = verify.verify_onnx(path, model, sizes=[(1, 40, 48)], threads=1)
    assert not report.ok and report.comparisons[0].error


def test_bad_arguments_are_refused(tmp_path):
    model = tiny_model("r50")
    with pytest.raises(PspZooError, match="input_size"):
        export.export_onnx(model, tmp_path / "x.onnx", input_size=(0, 5))
    with pytest.raises(PspZooError, match="opset"):
        export.export_onnx(model, tmp_path / "x.onnx", opset=7)
    with pytest.raises(PspZooError, match="checkpoint="):
        export.export_onnx(model, tmp_path / "x.onnx", checkpoint=tiny_checkpoint_path("r50"))
    with pytest.raises(PspZooError, match="not found"):
        runtime.OnnxModel(tmp_path / "missing.onnx")
    (tmp_path / "junk.onnx").write_bytes(b"not a graph")
    with pytest.raises(PspZooError, match="not a loadable ONNX"):
        runtime.OnnxModel(tmp_path / "junk.onnx")
    assert not list(tmp_path.glob("x.onnx*"))


def test_missing_extra_names_the_pip_command(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "onnx", None)  # import onnx now raises ImportError
    with pytest.raises(PspZooError, match=r"pip install 'psp-zoo\[onnx\]'"):
        export.export_onnx(tiny_model("r50"), tmp_path / "x.onnx")
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)
    with pytest.raises(PspZooError, match=r"pip install 'psp-zoo\[safetensors\]'"):
        export.export_safetensors(tiny_model("r50"), tmp_path / "x.safetensors")
    assert not list(tmp_path.iterdir())


def test_cli_missing_extra_before_any_download(monkeypatch, tmp_path, capsys):
    manifest = write_manifest(tmp_path / "m.yml", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    code = main(["export", "tiny_r50", "--manifest", str(manifest), "--out", str(tmp_path / "x.onnx"),
                 "--cache-dir", str(tmp_path / "cache")])
    assert code == 2 and "pip install 'psp-zoo[onnx]'" in capsys.readouterr().err
    assert not (tmp_path / "cache").exists() and not (tmp_path / "x.onnx").exists()


def _cli_export(tmp_path, *extra):
    manifest = write_manifest(tmp_path / "m.yml", "http://127.0.0.1:9")
    return main(["export", "tiny_r50", "--manifest", str(manifest), "--checkpoint",
                 str(tiny_checkpoint_path("r50")), "--input-size", "64", "64", *extra])


def test_cli_export_verify(tmp_path, capsys):
    out = tmp_path / "tiny.onnx"
    assert _cli_export(tmp_path, "--out", str(out), "--verify") == 0
    printed = capsys.readouterr().out
    assert f"wrote {out}" in printed and printed.count(" ok\n") == 3
    meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert meta["psp_zoo.model"] == "tiny_r50" and meta["psp_zoo.num_classes"] == "5"


def test_cli_verify_failure_exits_1(tmp_path, capsys, monkeypatch):
    def floor_bins(size, bins, like):  # a plausible bug: bin ends rounded down drop pixels
        index, position = torch.arange(bins), torch.arange(size)
        start = torch.div(index * size, bins, rounding_mode="floor")
        end = torch.div((index + 1) * size, bins, rounding_mode="floor")
        inside = (position[None, :] >= start[:, None]) & (position[None, :] < end[:, None])
        return inside.to(like.dtype), (end - start).clamp(min=1).to(like.dtype)

    monkeypatch.setattr(pooling, "_bin_matrix", floor_bins)
    assert _cli_export(tmp_path, "--out", str(tmp_path / "bad.onnx"), "--verify") == 1
    captured = capsys.readouterr()
    assert "FAILED" in captured.out and "max rel diff" in captured.out
    assert "does not reproduce the PyTorch model" in captured.err


def test_cli_refuses_static_for_other_formats(tmp_path, capsys):
    assert _cli_export(tmp_path, "--out", str(tmp_path / "m.pt"), "--format", "torchscript", "--static") == 2
    assert "--format onnx only" in capsys.readouterr().err


def test_torchscript_export_verifies(tmp_path, capsys):
    out = tmp_path / "tiny.pt"
    assert _cli_export(tmp_path, "--out", str(out), "--format", "torchscript", "--verify") == 0
    assert capsys.readouterr().out.count(" ok\n") == 3


def test_safetensors_round_trip(tmp_path):
    pytest.importorskip("safetensors")
    model = tiny_model("r50")
    path = export.export_safetensors(model, tmp_path / "tiny.safetensors")
    fresh = PSPNet(**tiny_info("r50")["config"]).eval()
    meta = load_checkpoint(fresh, path)
    assert meta["psp_zoo.num_classes"] == "5"
    for key, value in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key
    assert verify.verify_safetensors(path, model).ok
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        load_checkpoint(fresh, path)


def test_backend_info(exported):
    info = runtime.onnx_backend_info(runtime.OnnxModel(exported[1], threads=1))
    assert info == {"backend": "onnxruntime", "version": ort.__version__, "providers": ["CPUExecutionProvider"]}


@pytest.mark.parametrize("mode", ["whole", "slide"])
def test_confusion_matrix_through_onnx_equals_pytorch(exported, tmp_path, mode):
    model, path = exported
    minidata.write_cityscapes(tmp_path / "cityscapes")
    slide = dict(crop_size=(17, 17), stride=(11, 11)) if mode == "slide" else {}
    settings = Settings(mode=mode, img_scale=(64, 32), align_corners=model.align_corners, **slide)
    matrices = []
    for runner in (optimize(model), runtime.OnnxModel(path, threads=1)):
        data = SegmentationDataset("cityscapes", tmp_path / "cityscapes", img_scales=[(64, 32)])
        metric = score(runner, data, settings, 5, ms_flip=False, device=torch.device("cpu"), num_workers=0,
                       show=False)
        assert isinstance(metric, ConfusionMatrix) and len(data) == 3
        matrices.append(metric.matrix)
    assert matrices[0].sum() > 0 and torch.equal(matrices[0], matrices[1])


@pytest.mark.parametrize("mode", ["whole", "slide"])
def test_evaluate_through_onnx_gives_the_pytorch_record(tmp_path, mode):
    """``evaluate(..., onnx=FILE)``: the same confusion matrix (so every score) as the PyTorch path,
    and a record that says onnxruntime ran it; the published weights are never fetched."""
    from psp_zoo import evaluate, read_result, write_result

    manifest = write_manifest(tmp_path / "m.yml", "http://127.0.0.1:9")  # unreachable: nothing fetched
    path = tmp_path / "tiny.onnx"
    assert _cli_export(tmp_path, "--out", str(path)) == 0
    minidata.write_cityscapes(tmp_path / "cityscapes")
    slide = dict(mode="slide", crop_size=(17, 17), stride=(11, 11)) if mode == "slide" else {}
    common = dict(manifest=str(manifest), device="cpu", num_workers=0, progress=False, img_scale=(64, 32), **slide)
    through_onnx = evaluate("tiny_r50", tmp_path / "cityscapes", onnx=path, **common)
    through_torch = evaluate("tiny_r50", tmp_path / "cityscapes", checkpoint=tiny_checkpoint_path("r50"), **common)
    assert through_onnx.single_scale == through_torch.single_scale and through_onnx.images.count == 3
    assert through_onnx.backend["backend"] == "onnxruntime" and through_torch.backend is None
    assert read_result(write_result(through_onnx, tmp_path / "onnx.json")) == through_onnx


def test_cli_evaluate_onnx_says_onnxruntime_scored_it(tmp_path, capsys):
    manifest = write_manifest(tmp_path / "m.yml", "http://127.0.0.1:9")
    path = tmp_path / "tiny.onnx"
    assert _cli_export(tmp_path, "--out", str(path)) == 0
    minidata.write_cityscapes(tmp_path / "cityscapes")
    capsys.readouterr()
    code = main(["evaluate", "tiny_r50", "--data-root", str(tmp_path / "cityscapes"), "--onnx", str(path),
                 "--manifest", str(manifest), "--device", "cpu", "--num-workers", "0"])
    headline = capsys.readouterr().out.splitlines()[0]
    assert code == 0 and headline.startswith("tiny_r50 on cityscapes (3 images, single-scale, ")
    assert headline.endswith(f", onnxruntime {ort.__version__})"), headline
