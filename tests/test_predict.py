"""`psp-zoo predict` and psp_zoo.predict: the checkpoint's own test pipeline, files that match the input."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

import psp_zoo
from psp_zoo.cli import build_parser, main
from psp_zoo.datasets.readers import palette, read_image
from psp_zoo.evaluation.inference import predict_probs
from psp_zoo.manifest.loading import get_checkpoint, get_manifest
from psp_zoo.prediction.predictor import output_stems
from psp_zoo.testing import manifest_entry, write_manifest

from helpers import tiny_checkpoint_path, tiny_info, tiny_model

pytestmark = pytest.mark.usefixtures("single_thread")

NAME = "tiny_pspnet_r50-d8"  # manifest_entry's name for the r50 fixture file
# Small slide settings with an upscaling resize, so whole-image inference would give other labels.
TEST_SETTINGS = {"mode": "slide", "img_scale": [80, 60], "crop_size": [32, 32], "stride": [24, 24]}


@pytest.fixture
def manifest(tmp_path) -> Path:
    checkpoint = tiny_checkpoint_path("r50")
    arch = {k: v for k, v in tiny_info("r50")["config"].items() if k not in ("depth", "num_classes")}
    entry = manifest_entry(checkpoint, checkpoint.as_uri(), num_classes=5, arch=arch, test=TEST_SETTINGS)
    return write_manifest(tmp_path / "manifest.yml", [entry])


def _write_image(path: Path, height: int, width: int, seed: int) -> np.ndarray:
    coarse = np.random.default_rng(seed).integers(0, 256, (4, 5, 3), dtype=np.uint8)
    rgb = cv2.resize(coarse, (width, height), interpolation=cv2.INTER_LINEAR)
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    return read_image(path)  # what a JPEG decodes to


def _expected_labels(manifest: Path, rgb: np.ndarray, ms_flip: bool = False, **changes) -> np.ndarray:
    settings = dataclasses.replace(get_checkpoint(NAME, manifest=manifest).test, **changes)
    return predict_probs(tiny_model("r50"), rgb, settings, ms_flip).argmax(dim=0).numpy()


def _predict(capsys, manifest: Path, *argv):
    code = main(["predict", NAME, "--device", "cpu", *map(str, argv), "--manifest", str(manifest),
                 "--checkpoint", str(tiny_checkpoint_path("r50"))])
    out, err = capsys.readouterr()
    return code, out.splitlines(), err


def test_predict_writes_labels_overlay_and_legend_at_the_input_size(capsys, manifest, tmp_path):
    images = {"street": _write_image(tmp_path / "in" / "street.png", 40, 60, 0),
              "portrait": _write_image(tmp_path / "in" / "portrait.jpg", 45, 31, 1)}
    code, lines, err = _predict(capsys, manifest, tmp_path / "in", "--out", tmp_path / "out")
    assert code == 0 and all(line.startswith("psp-zoo: predicting ") for line in err.splitlines())  # progress only
    out = tmp_path / "out"
    assert lines == [" ".join(str(out / f"{stem}{s}") for s in ("_labels.png", "_overlay.png", "_legend.png"))
                     for stem in ("portrait", "street")]  # folder contents in sorted order
    colours = {tuple(c) for c in palette("cityscapes")}
    for stem, rgb in images.items():
        with Image.open(out / f"{stem}_labels.png") as png:
            assert png.mode == "P" and png.size == (rgb.shape[1], rgb.shape[0])
            labels, shown = np.array(png), np.array(png.convert("RGB"))
        # The checkpoint's own test settings (slide, its img_scale) made these labels, not whole-image ones.
        np.testing.assert_array_equal(labels, _expected_labels(manifest, rgb))
        assert not np.array_equal(labels, _expected_labels(manifest, rgb, mode="whole"))
        assert {tuple(c) for c in shown.reshape(-1, 3)} <= colours and len(np.unique(labels)) > 1
        with Image.open(out / f"{stem}_overlay.png") as overlay:
            assert overlay.mode == "RGB" and overlay.size == png.size
        assert cv2.imread(str(out / f"{stem}_legend.png")) is not None


def test_npy_holds_the_labels_of_the_png(capsys, manifest, tmp_path):
    rgb = _write_image(tmp_path / "a.png", 30, 50, 2)
    assert _predict(capsys, manifest, tmp_path / "a.png", "--out", tmp_path / "png")[0] == 0
    code, lines, _ = _predict(capsys, manifest, tmp_path / "a.png", "--out", tmp_path / "npy", "--format", "npy")
    assert code == 0 and lines == [str(tmp_path / "npy" / "a.npy")]
    raw = np.load(tmp_path / "npy" / "a.npy")
    assert raw.dtype == np.uint8 and raw.shape == (30, 50)
    np.testing.assert_array_equal(raw, np.array(Image.open(tmp_path / "png" / "a_labels.png")))
    assert sorted(p.name for p in (tmp_path / "npy").iterdir()) == ["a.npy"]

    code, _, _ = _predict(capsys, manifest, tmp_path / "a.png", "--out", tmp_path / "ms", "--format", "npy",
                          "--ms-flip")
    ms_flip = np.load(tmp_path / "ms" / "a.npy")
    assert code == 0 and not np.array_equal(ms_flip, raw)
    np.testing.assert_array_equal(ms_flip, _expected_labels(manifest, rgb, ms_flip=True))


def test_a_broken_image_is_reported_and_the_rest_are_done(capsys, manifest, tmp_path):
    folder = tmp_path / "in"
    _write_image(folder / "good.png", 24, 32, 3)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (folder / "notes.txt").write_text("not an image, not an input")
    code, lines, err = _predict(capsys, manifest, folder, "--out", tmp_path / "out")
    assert code == 1
    assert [line.split()[0] for line in lines] == [str(tmp_path / "out" / "good_labels.png")]
    error = [line for line in err.splitlines() if line.startswith("psp-zoo predict:")]
    assert len(error) == 1 and "cannot read image" in error[0] and str(folder / "broken.jpg") in error[0]
    # which image it is on, one line each, also when stderr is no terminal (as here)
    assert f"predicting 1/2: {folder / 'broken.jpg'}" in err and f"predicting 2/2: {folder / 'good.png'}" in err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "good_labels.png", "good_legend.png", "good_overlay.png"]


def test_same_stems_from_different_folders_do_not_collide(capsys, manifest, tmp_path, monkeypatch):
    for folder in ("a", "b"):
        _write_image(tmp_path / folder / "x.png", 20, 20, ord(folder))
    monkeypatch.chdir(tmp_path)
    code, lines, _ = _predict(capsys, manifest, "*/x.png", "a/x.png", "--out", "out", "--format", "npy")
    assert code == 0 and lines == ["out/a_x.npy", "out/b_x.npy"]  # the repeated a/x.png is done once
    assert output_stems([Path("p/a/x.png"), Path("q/a/x.jpg"), Path("y.png")]) == ["a_x", "a_x-2", "y"]


@pytest.mark.parametrize("argv,expected", [
    (["missing.png"], "no such file or folder: missing.png"),
    (["*.webp"], "'*.webp' matches no image"),
    (["empty"], "folder empty holds no image"),
    (["ok.png", "--precision", "fp16", "--device", "cpu"], "precision 'fp16' needs a CUDA device"),
    (["ok.png", "--out", "ok.png/out"], "--out ok.png/out: "),  # a file where the folder goes
    (["ok.png", "--device", "gpu0"], "unknown device 'gpu0'; use cpu, cuda or cuda:N"),
    (["ok.png", "--device", "cuda:99"], "device 'cuda:99' is not usable here"),
])
def test_bad_inputs_are_one_line_errors_before_any_work(capsys, manifest, tmp_path, monkeypatch, argv, expected):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty").mkdir()
    _write_image(tmp_path / "ok.png", 16, 16, 4)
    code, lines, err = _predict(capsys, manifest, *argv)
    errors = err.strip().splitlines()
    assert code == 2 and lines == [] and len(errors) == 1
    assert errors[0].startswith(f"psp-zoo predict: error: {expected}")
    assert not (tmp_path / "predictions").exists()


def test_python_api_with_a_name_or_a_model_object(manifest, tmp_path):
    rgb = _write_image(tmp_path / "api.png", 36, 28, 5)
    by_name = psp_zoo.predict(NAME, tmp_path / "api.png", manifest=manifest, device="cpu",
                              checkpoint=tiny_checkpoint_path("r50"))
    np.testing.assert_array_equal(by_name, _expected_labels(manifest, rgb))
    with pytest.raises(psp_zoo.PspZooError, match="is a cityscapes checkpoint"):
        psp_zoo.predict(NAME, rgb, manifest=manifest, checkpoint=tiny_checkpoint_path("r50"), dataset="ade20k")
    # A model object takes the dataset's test settings (here with a smaller img_scale) and its align_corners.
    model = tiny_model("r50", align_corners=True)
    by_model = psp_zoo.predict(model, rgb, dataset="cityscapes", img_scale=(80, 60), device="cpu")
    settings = dataclasses.replace(get_manifest().datasets["cityscapes"].test, img_scale=(80, 60), align_corners=True)
    np.testing.assert_array_equal(by_model, predict_probs(model, rgb, settings).argmax(dim=0).numpy())
    assert by_model.dtype == np.uint8 and by_model.shape == rgb.shape[:2]
    with pytest.raises(psp_zoo.PspZooError, match="needs dataset="):
        psp_zoo.predict(model, rgb)


SUBCOMMANDS = sorted(build_parser()._subparsers._group_actions[0].choices)


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_every_subcommand_has_help(capsys, command):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0 and f"usage: psp-zoo {command}" in capsys.readouterr().out


def test_the_commands_the_issue_names_exist():
    assert {"list", "info", "get", "tables", "predict", "selftest"} <= set(SUBCOMMANDS)


def test_an_image_that_cannot_be_opened_says_why_in_one_line(capfd, manifest, tmp_path):
    from psp_zoo.prediction.predictor import Predictor, predict_files

    predictor = Predictor.create(NAME, manifest=manifest, device="cpu")
    gone = tmp_path / "gone.png"  # listed, then deleted (or not readable) before it is read
    ((path, outcome),) = predict_files(predictor, [gone], tmp_path / "out")
    assert isinstance(outcome, psp_zoo.PspZooError)
    assert str(outcome) == f"cannot read image {gone}: No such file or directory"
    assert capfd.readouterr().err == ""  # no warning of OpenCV's own on the terminal


def test_outputs_get_the_usual_file_permissions(capsys, manifest, tmp_path):
    import os

    _write_image(tmp_path / "a.png", 20, 20, 5)
    umask = os.umask(0o022)
    try:
        for fmt in ("png", "npy"):
            assert _predict(capsys, manifest, tmp_path / "a.png", "--out", tmp_path / fmt, "--format", fmt)[0] == 0
    finally:
        os.umask(umask)
    written = list((tmp_path / "png").iterdir()) + list((tmp_path / "npy").iterdir())
    assert len(written) == 4  # no temporary file left beside them
    assert {oct(p.stat().st_mode & 0o777) for p in written} == {oct(0o644)}  # not private 0600 files


@pytest.mark.parametrize("failure,expected", [
    (RuntimeError("[enforce fail at alloc_cpu.cpp:117] err == 0. DefaultCPUAllocator: can't allocate memory: "
                  "you tried to allocate 28800000000 bytes.\nError code 12 (Cannot allocate memory)"),
     ("not enough memory for this image (", "you tried to allocate 28800000000 bytes. Error code 12")),
    (MemoryError(), ("not enough memory for this image (MemoryError); free memory",)),
    (ValueError("something inside the model\nwent wrong"), ("ValueError: something inside the model went wrong",)),
])
def test_an_image_that_fails_in_the_model_is_one_line_and_the_rest_are_done(capsys, manifest, tmp_path,
                                                                             monkeypatch, failure, expected):
    import psp_zoo.prediction.predictor as prediction

    folder = tmp_path / "in"
    for stem, seed in (("a", 6), ("big", 7), ("c", 8)):
        _write_image(folder / f"{stem}.png", 30 if stem != "big" else 41, 40, seed)
    real = prediction.labels_of_image

    def failing_on_big(model, image_rgb, *args, **kwargs):
        if image_rgb.shape[0] == 41:
            raise failure
        return real(model, image_rgb, *args, **kwargs)

    monkeypatch.setattr(prediction, "labels_of_image", failing_on_big)
    code, lines, err = _predict(capsys, manifest, folder, "--out", tmp_path / "out", "--format", "npy")
    assert code == 1
    assert lines == [str(tmp_path / "out" / "a.npy"), str(tmp_path / "out" / "c.npy")]  # the one after it too
    errors = [line for line in err.strip().splitlines() if not line.startswith("psp-zoo: predicting ")]
    assert len(errors) == 1, err
    assert errors[0].startswith(f"psp-zoo predict: error: {folder / 'big.png'}: ")
    assert all(part in errors[0] for part in expected), errors[0]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.npy", "c.npy"]


def test_a_folder_or_glob_yields_no_hidden_files(tmp_path):
    """As the datasets skip them: '.hidden.png' and macOS's '._x.jpg' (resource forks, not images)."""
    from psp_zoo.prediction.predictor import expand_image_args

    folder = tmp_path / "pics"
    folder.mkdir()
    for name in ("a.png", ".hidden.png", "._b.jpg", "b.jpg"):
        cv2.imwrite(str(folder / name), np.zeros((4, 4, 3), np.uint8))
    assert [p.name for p in expand_image_args([str(folder)])] == ["a.png", "b.jpg"]
    assert [p.name for p in expand_image_args([str(tmp_path / "**")])] == ["a.png", "b.jpg"]
    assert [p.name for p in expand_image_args([str(folder / ".hidden.png")])] == [".hidden.png"]  # named: taken
