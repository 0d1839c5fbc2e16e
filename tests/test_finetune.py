"""Fine-tuning end to end on a CPU: a narrow published-format checkpoint with 5 classes (a tiny R-18-D8
from psp_zoo.testing, served as a manifest entry; the mmseg-written tiny R-50 fixture as a local file
for --freeze-backbone) fine-tuned on a generated 3-class dataset of one's own layout
(psp_zoo.testing.write_example_dataset), then used by name from the work dir's manifest: evaluate, predict, export,
info, reproduce and tables."""
from __future__ import annotations

import contextlib
import hashlib
import io
import os
import re
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from psp_zoo import testing
from psp_zoo.cli import main
from psp_zoo.errors import CheckpointError
from psp_zoo.manifest.loading import load_manifest
from psp_zoo.model import PSPNet
from psp_zoo.model.checkpoint import load_checkpoint, read_checkpoint
from psp_zoo.testing import TINY_ARCH, write_tiny_checkpoint
from psp_zoo.training.finetune import CLASSIFIERS, inferred_arch, starting_weights
from psp_zoo.training.freeze import freeze_backbone

from helpers import REPO, tiny_checkpoint_path, tiny_info

SOURCE = "tiny_pspnet_r18-d8_cityscapes"
NAME = "shapes_pspnet"
ITERATIONS = 200
# what the fine-tune needs to learn the shapes within a few hundred iterations on small crops
RECIPE = ("--max-iters", str(ITERATIONS), "--lr", "0.05", "--batch-size", "4", "--gpus", "1", "--eval-interval", "40",
          "--num-workers", "0")


def source_entry(path, url: str) -> dict:
    """A manifest entry publishing the 5-class checkpoint file ``path`` at ``url``."""
    return {"name": SOURCE, "dataset": "cityscapes", "depth": 18, "crop_size": [64, 64], "schedule": 1000,
            "weights": url, "sha256": hashlib.sha256(path.read_bytes()).hexdigest(), "published": {},
            "model": dict(TINY_ARCH, num_classes=5)}


def _cli(*argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    folder = tmp_path_factory.mktemp("finetune")
    data = testing.write_example_dataset(folder / "data", train=32, val=8)
    source = write_tiny_checkpoint(folder / "published", "tiny_pspnet_r18-d8", num_classes=5, depth=18,
                                   stamp="20260101_000000")
    spec = testing.example_declaration(train=testing.EXAMPLE_TRAIN)
    manifest = testing.write_example_manifest(folder / "user.yml", spec=spec,
                                            models=[source_entry(source, source.as_uri())])
    common = ("--manifest", manifest, "--cache-dir", folder / "cache")
    return {"folder": folder, "data": data, "manifest": manifest, "common": common, "source": source}


@pytest.fixture(scope="module")
def finetuned(setup):
    work = setup["folder"] / "work"
    code, out, err = _cli("train", "--from", SOURCE, "--dataset", "shapes", "--name", NAME, "--data-root",
                          setup["data"], "--work-dir", work, *RECIPE, *setup["common"])
    assert code == 0, err[-3000:]
    return {"work": work, "out": out, "err": err, "manifest": work / "model_index.yml",
            "by_name": ("--manifest", work / "model_index.yml", "--cache-dir", setup["folder"] / "cache")}


def test_the_classifier_convs_are_reinitialized_and_everything_else_starts_as_the_source(finetuned, setup):
    assert "re-initialized for 3 classes (was 5): auxiliary_head.conv_seg, decode_head.conv_seg" in finetuned["err"]
    init_file, = (finetuned["work"] / "init").glob(f"{NAME}_init-*.pth")
    start, meta = read_checkpoint(init_file)
    source, _ = read_checkpoint(setup["source"])
    assert list(start) == list(source)
    layers = {key.rsplit(".", 1)[0] for key in source}
    for key, tensor in source.items():
        if key.rsplit(".", 1)[0] in CLASSIFIERS:
            continue
        assert torch.equal(start[key], tensor), key
    for layer, channels in zip(CLASSIFIERS, (16, 8)):
        assert layer in layers and start[f"{layer}.weight"].shape == (3, channels, 1, 1)
        assert torch.equal(start[f"{layer}.bias"], torch.zeros(3))
        weight = start[f"{layer}.weight"]
        assert 0.004 < weight.std().item() < 0.02 and weight.abs().max().item() < 0.06  # normal(0, 0.01)
    assert meta["psp_zoo_finetune"]["reinitialized"] == sorted(CLASSIFIERS)
    # the run started from that file: its manifest entry names it, hash and all
    run_entry = yaml.safe_load((finetuned["work"] / "init" / "manifest.yml").read_text())["models"][0]
    assert run_entry["weights"].endswith(init_file.name) and run_entry["train"]["pretrained"] is None


def test_it_joins_the_zoo_with_a_self_contained_manifest_entry(finetuned, setup):
    manifest = load_manifest(finetuned["manifest"])  # the work dir's manifest alone
    entry = manifest.get(NAME)
    assert entry.dataset == "shapes" and entry.num_classes == 3 and entry.backbone == "R-18-D8"
    assert entry.schedule == ITERATIONS and entry.crop_size == (64, 64)
    weights = finetuned["work"] / entry.filename
    assert weights.is_file() and entry.sha256.startswith(entry.hash_prefix) and weights.stem.endswith(entry.hash_prefix)
    assert hashlib.sha256(weights.read_bytes()).hexdigest() == entry.sha256
    published = torch.load(weights, weights_only=True)
    assert set(published) == {"meta", "state_dict"}  # the published form: no optimizer
    assert published["meta"]["psp_zoo_finetune"]["reinitialized"] == sorted(CLASSIFIERS)
    assert entry.finetuned_from == {"name": SOURCE, "sha256": hashlib.sha256(setup["source"].read_bytes()).hexdigest(),
                                    "url": setup["source"].as_uri()}
    assert entry.published.miou is not None and entry.published.miou >= 85.0
    spec = manifest.datasets["shapes"]
    assert spec.classes == testing.EXAMPLE_CLASSES and spec.palette == testing.EXAMPLE_PALETTE
    assert spec.layout.train[0].images == "images/train"
    code, out, _ = _cli("info", NAME, *finetuned["by_name"])
    assert code == 0 and "finetuned_from" in out and SOURCE in out and "shapes" in out


def test_evaluate_by_name_reaches_85_miou_on_held_out_images(finetuned, setup):
    code, out, err = _cli("evaluate", NAME, "--data-root", setup["data"], "--num-workers", "0", *finetuned["by_name"])
    assert code == 0, err
    miou = float(re.search(r"mIoU\s*[:=]?\s*([0-9.]+)", out).group(1))
    assert miou >= 85.0, out
    # the published number is this same measurement (validation through the same scoring code)
    entry = load_manifest(finetuned["manifest"]).get(NAME)
    assert abs(entry.published.miou - miou) < 0.05
    assert "disc" in out and "square" in out  # per-class lines under the declared class names


def test_predict_by_name_draws_the_declared_palette(finetuned, setup, tmp_path):
    image = setup["data"] / "images" / "val" / "shape_000.jpg"
    code, out, err = _cli("predict", NAME, image, "--out", tmp_path, *finetuned["by_name"])
    assert code == 0, err
    with Image.open(tmp_path / "shape_000_labels.png") as png:
        labels, shown = np.array(png), np.array(png.convert("RGB"))
    colours = {tuple(c) for c in shown.reshape(-1, 3)}
    assert colours <= set(testing.EXAMPLE_PALETTE) and len(colours) >= 2
    truth = np.array(Image.open(setup["data"] / "masks" / "val" / "shape_000_mask.png"))
    scored = truth != 255
    assert (labels[scored] == truth[scored]).mean() > 0.9


def test_export_by_name_verifies(finetuned, tmp_path):
    code, out, err = _cli("export", NAME, "--out", tmp_path / "shapes.onnx", "--verify", *finetuned["by_name"])
    assert code == 0, out + err


def test_reproduce_and_tables_by_name(finetuned, setup):
    results = setup["folder"] / "results"
    code, out, err = _cli("reproduce", "--dataset", "shapes", "--data-root", setup["data"], "--results", results,
                          "--no-ms-flip", "--no-train-mem", "--speed-images", "2", "--speed-warmup", "1",
                          "--num-workers", "0", *finetuned["by_name"])
    assert code == 0, err
    code, tables, _ = _cli("tables", "--results", results, "--manifest", finetuned["manifest"])
    assert code == 0 and "Shapes" in tables
    entry = load_manifest(finetuned["manifest"]).get(NAME)
    assert f"{entry.published.miou:.2f} / " in tables


def test_freeze_backbone_leaves_every_backbone_tensor_bit_identical(setup):
    work = setup["folder"] / "frozen"
    code, _, err = _cli("train", "--from", tiny_checkpoint_path("r50"), "--dataset", "shapes", "--name", "frozen",
                        "--freeze-backbone", "--data-root", setup["data"], "--work-dir", work, "--max-iters", "6",
                        "--eval-interval", "6", "--lr", "0.05", "--batch-size", "2", "--gpus", "1",
                        "--num-workers", "0", *setup["common"])
    assert code == 0, err[-3000:]
    source, _ = read_checkpoint(tiny_checkpoint_path("r50"))
    trained, _ = read_checkpoint(work / "latest.pth")
    backbone = [key for key in source if key.startswith("backbone.")]
    assert len(backbone) > 300 and any(key.endswith("running_var") for key in backbone)
    for key in backbone:  # weights, BN statistics and num_batches_tracked alike
        assert torch.equal(trained[key], source[key]), key
    moved = [key for key in trained if key.startswith("decode_head.") and key.endswith("running_mean")
             and not torch.equal(trained[key], source[key])]
    assert moved  # the heads trained (their BN statistics too)
    entry = load_manifest(work / "model_index.yml").get("frozen")
    assert entry.train["freeze_backbone"] is True and entry.finetuned_from["name"] == str(tiny_checkpoint_path("r50"))


@pytest.mark.parametrize("change, expected", [
    ({"colours": [[0, 0, 0]]}, "field 'colours': unknown field"),
    ({"palette": [[0, 0, 0]]}, "field 'palette': expected 3 colours"),
    ({"train": {"ratio_range": "wide"}}, "datasets.shapes: field 'train': training setting 'ratio_range'"),
    ({"layout": dict(testing.example_declaration()["layout"], train={"images": "pictures/train"})},
     "layout.train[0].images 'pictures/train'"),
])
def test_a_wrong_declaration_is_refused_before_any_model_is_built(tmp_path, change, expected):
    data = testing.write_example_dataset(tmp_path / "data", train=2, val=1)
    # the source is not fetchable: had anything been built or fetched first, that would be the error
    source = tiny_checkpoint_path("r50")
    manifest = testing.write_example_manifest(tmp_path / "m.yml", spec=testing.example_declaration(**change),
                                            models=[source_entry(source, f"http://127.0.0.1:9/{source.name}")])
    code, out, err = _cli("train", "--from", SOURCE, "--dataset", "shapes", "--data-root", data, "--work-dir",
                          tmp_path / "work", "--manifest", manifest, "--cache-dir", tmp_path / "cache")
    assert code == 2 and out == "" and expected in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "work" / "init").exists() and not (tmp_path / "cache").exists()


@pytest.mark.parametrize("tag", ["r50", "r101"])
def test_a_local_files_network_is_read_off_its_tensors(tag):
    state_dict, meta = read_checkpoint(tiny_checkpoint_path(tag))
    arch = inferred_arch(state_dict, meta, tiny_checkpoint_path(tag))
    assert arch == dict(tiny_info(tag)["config"], deep_stem=True, output_stride=8, align_corners=False)
    model = PSPNet(**arch)
    load_checkpoint(model, tiny_checkpoint_path(tag))  # strict: every key and shape


def test_a_v1b_r18_is_read_off_its_tensors_too(tmp_path):
    path = write_tiny_checkpoint(tmp_path, "tiny_r18", num_classes=7, depth=18)
    state_dict, meta = read_checkpoint(path)
    assert inferred_arch(state_dict, meta, path) == dict(TINY_ARCH, depth=18, num_classes=7, deep_stem=True,
                                                         output_stride=8, align_corners=False)


def test_only_the_classifier_convs_may_differ_from_the_source():
    source, _ = read_checkpoint(tiny_checkpoint_path("r50"))
    same, reinit = starting_weights(source, PSPNet(**tiny_info("r50")["config"]), seed=0)
    assert reinit == [] and all(torch.equal(same[key], source[key]) for key in source)
    wider = dict(tiny_info("r50")["config"], num_classes=3, channels=32)
    with pytest.raises(CheckpointError, match=r"other shapes: decode_head\.bottleneck.*only the classifier convs"):
        starting_weights(source, PSPNet(**wider), seed=0)
    first, _ = starting_weights(source, PSPNet(**dict(tiny_info("r50")["config"], num_classes=3)), seed=1)
    again, _ = starting_weights(source, PSPNet(**dict(tiny_info("r50")["config"], num_classes=3)), seed=1)
    assert all(torch.equal(first[key], again[key]) for key in first)  # seeded: a rerun starts the same


def test_a_frozen_batchnorm_keeps_the_keys_and_never_moves():
    model = PSPNet(**tiny_info("r50")["config"])
    load_checkpoint(model, tiny_checkpoint_path("r50"))
    keys = list(model.state_dict())
    before = {key: value.clone() for key, value in model.state_dict().items()}
    freeze_backbone(model)
    assert list(model.state_dict()) == keys
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.backbone.modules())
    model.train()
    images = torch.randn(2, 3, 64, 64)
    reference = PSPNet(**tiny_info("r50")["config"])
    load_checkpoint(reference, tiny_checkpoint_path("r50"))
    reference.eval()
    with torch.no_grad():  # in train mode the frozen backbone computes what an eval-mode one does
        torch.testing.assert_close(model.backbone(images)[-1], reference.backbone(images)[-1], rtol=0, atol=0)
    (model.decode_head(model.backbone(images))).sum().backward()
    assert all(p.grad is None for p in model.backbone.parameters())
    after = model.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in keys if k.startswith("backbone."))
    key = "decode_head.bottleneck.bn.running_mean"
    assert not torch.equal(after[key], before[key])


def test_under_torchrun_the_frozen_backbone_stays_frozen_and_process_0_writes_the_entry(tmp_path):
    """Two CPU processes: synchronized BatchNorm in the heads, the frozen backbone's left alone."""
    data = testing.write_example_dataset(tmp_path / "data", train=4, val=2)
    manifest = testing.write_example_manifest(tmp_path / "m.yml")
    source = tiny_checkpoint_path("r50")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "psp_zoo",
               "train", "--from", str(source), "--dataset", "shapes", "--name", "shapes_torchrun", "--freeze-backbone",
               "--data-root", str(data), "--work-dir", str(tmp_path / "work"), "--manifest", str(manifest),
               "--max-iters", "2", "--eval-interval", "2", "--batch-size", "1", "--gpus", "2", "--num-workers", "0",
               "--device", "cpu"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    assert done.stderr.count("re-initialized for 3 classes") == 1  # said once, by process 0
    trained = torch.load(tmp_path / "work" / "latest.pth", weights_only=True)
    assert trained["meta"]["psp_zoo"]["world_size"] == 2
    start, _ = read_checkpoint(source)
    assert all(torch.equal(trained["state_dict"][key], start[key]) for key in start if key.startswith("backbone."))
    assert load_manifest(tmp_path / "work" / "model_index.yml").get("shapes_torchrun").schedule == 2


@pytest.mark.parametrize("argv, expected", [
    (["--dataset", "shapes"], "--dataset applies to fine-tuning: give --from SOURCE too"),
    (["--freeze-backbone", "tiny"], "--freeze-backbone applies to fine-tuning"),
    ([], "give NAME (the entry whose published recipe to run), or --from SOURCE --dataset DATASET"),
    (["tiny", "--from", "x", "--dataset", "shapes"], "NAME does not go with --from"),
    (["--from", "x", "--dataset", "shapes", "--init-from", "y.pth"], "--init-from does not go with --from"),
    (["--from", "x"], "--from needs --dataset"),
])
def test_the_fine_tuning_options_go_together(tmp_path, argv, expected):
    code, out, err = _cli("train", *argv, "--data-root", tmp_path, "--work-dir", tmp_path / "work")
    assert code == 2 and out == "" and expected in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "work").exists()


def _quick(setup, work, *extra):
    """A two-iteration fine-tune of SOURCE into ``work`` (the command line's arguments)."""
    return ("train", "--from", SOURCE, "--dataset", "shapes", "--name", NAME, "--data-root", setup["data"],
            "--work-dir", work, "--max-iters", "2", "--eval-interval", "2", "--batch-size", "2", "--gpus", "1",
            "--crop-size", "64", "--num-workers", "0", *setup["common"], *extra)


def test_float64_reaches_the_fine_tuning_run_from_the_command_line_and_python(setup, tmp_path):
    code, _, err = _cli(*_quick(setup, tmp_path / "cli", "--float64"))
    assert code == 0, err[-3000:]
    trained, _ = read_checkpoint(tmp_path / "cli" / "latest.pth")
    assert trained["decode_head.conv_seg.weight"].dtype == torch.float64
    from psp_zoo.hub.options import FetchOptions
    from psp_zoo.training.finetune import finetune
    result = finetune(SOURCE, dataset="shapes", data_root=setup["data"], work_dir=tmp_path / "api", name=NAME,
                      float64=True, max_iters=1, batch_size=2, gpus=1, crop_size=64, num_workers=0, progress=False,
                      fetch=FetchOptions(manifest=str(setup["manifest"]), cache_dir=setup["folder"] / "cache"))
    weights, _ = read_checkpoint(result.run.checkpoint)
    assert result.run.iterations == 1 and weights["decode_head.conv_seg.weight"].dtype == torch.float64


def test_a_finished_fine_tune_rerun_is_reported_and_left_as_it_is(setup, tmp_path):
    work = tmp_path / "work"
    code, out, err = _cli(*_quick(setup, work))
    assert code == 0, err[-3000:]
    before = {path.name: (path.stat().st_mtime_ns, path.read_bytes()) for path in work.iterdir() if path.is_file()}
    time.sleep(1.1)  # a republished file or a new log would carry another second in its name
    code, again, err = _cli(*_quick(setup, work))
    assert code == 0, err[-3000:]
    assert "already trained (2 iterations); nothing to do" in again
    assert again.splitlines()[1:] == out.splitlines()  # the same entry, weights file and mIoU
    after = {path.name: (path.stat().st_mtime_ns, path.read_bytes()) for path in work.iterdir() if path.is_file()}
    assert after == before  # no new log, no republished weights, nothing rewritten
