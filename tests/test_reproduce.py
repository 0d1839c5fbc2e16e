"""`psp-zoo reproduce` end to end: tiny checkpoints from a local HTTP host, a 3-image Cityscapes set.

The tiny fixture models have 5 classes and the mini Cityscapes labels use 0-4 and 255, so every
label is a valid class (the metrics name the classes by index). Test images are resized to
(32, 16) instead of Cityscapes' (2048, 1024) through the user manifest's ``test`` override.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import yaml

from psp_zoo import FetchOptions, evaluate
from psp_zoo.cli import main
from psp_zoo.datasets.readers import SegmentationDataset
from psp_zoo.environment import environment_info
from psp_zoo.evaluation.metrics import ConfusionMatrix
from psp_zoo.evaluation.reproduction import reproduce
from psp_zoo.evaluation.scoring import score
from psp_zoo.manifest.loading import get_checkpoint
from psp_zoo.model import PSPNet
from psp_zoo.results.records import device_tag, read_result

import minidata
from helpers import REPO, tiny_checkpoint_path, tiny_info, tiny_model
from hub_server import CheckpointServer, manifest_text

SMALL_SCALE = [32, 16]
CPU_FILE = f"{device_tag(environment_info('cpu'))}.json"  # results files are named by the CPU model
CRASH_EXIT_CODE = 75  # crash_reproduce.py's hard exit, like a kill
# a quick run: no decoding workers, 3 images timed after 1 warm-up
QUICK = ("--num-workers", "0", "--speed-images", "3", "--speed-warmup", "1")


def _small_manifest(path: Path, base: str) -> Path:
    data = yaml.safe_load(manifest_text(base))
    for entry in data["models"]:
        entry["test"] = {"img_scale": SMALL_SCALE}
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny tensors gain nothing from threads, and on a shared machine their syncing costs ~5x."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A checkpoint host, a manifest of tiny_r50 / tiny_r101 on it, a cache and a mini Cityscapes."""
    folder = tmp_path_factory.mktemp("reproduce")
    server = CheckpointServer()
    minidata.write_cityscapes(folder / "cityscapes")
    yield {"server": server, "manifest": _small_manifest(folder / "manifest.yml", server.base),
           "cache": folder / "cache", "data": folder / "cityscapes", "tmp": folder}
    server.close()


def _argv(setup, results: Path, *extra: str) -> list:
    return ["reproduce", "--dataset", "cityscapes", "--data-root", str(setup["data"]),
            "--results", str(results),
            "--manifest", str(setup["manifest"]), "--cache-dir", str(setup["cache"]), *QUICK, *extra]


def _cli(capsys, *argv) -> tuple:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _result(results: Path, name: str) -> dict:
    return json.loads((results / name / CPU_FILE).read_text())


def _scores(data: dict) -> dict:
    """What must not depend on how the run was split or interrupted."""
    return {"images": data["images"], "metrics": data["metrics"], "status": data["status"]}


@pytest.fixture(scope="module")
def first_run(setup):
    """Both tiny checkpoints, tiny_r101's download refused: (exit code, stdout, stderr, results)."""
    results = setup["tmp"] / "first_run"
    setup["server"].script("r101", "404")
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(_argv(setup, results, "--models", "tiny_*"))
    return code, out.getvalue(), err.getvalue(), results, _result(results, "tiny_r50")


@pytest.fixture(scope="module")
def uninterrupted(first_run):
    """tiny_r50 reproduced in one go by one process: the numbers other runs must equal."""
    return first_run[4]


def test_reproduce_records_everything_and_tables_show_both_columns(capsys, setup, first_run):
    code, out, err, results, _ = first_run
    assert code == 1 and "failed: tiny_r101" in err  # and tiny_r50 was still reproduced
    record = read_result(results / "tiny_r50" / CPU_FILE)
    assert record.status == "complete" and record.precision == "fp32"
    # the default exact fast path
    assert record.optimizations == ("fuse_bn", "channels_last", "factorize_head", "winograd")
    assert (record.images.count, record.images.available, record.images.limit) == (3, 3, None)
    for ms_flip, metrics in ((False, record.single_scale), (True, record.ms_flip)):
        expected = evaluate("tiny_r50", setup["data"], manifest=setup["manifest"], device="cpu",
                            num_workers=0, checkpoint=tiny_checkpoint_path("r50"), ms_flip=ms_flip)
        assert metrics.miou == pytest.approx(expected.miou, abs=1e-9)
        assert metrics.per_class["3"]["IoU"] == pytest.approx(expected.iou["3"], abs=1e-9)
    assert record.speed.device_kind == "cpu" and (record.speed.images_timed, record.speed.warmup) == (2, 1)
    # the published protocol (the model as loaded, one window per call) and psp-zoo's figure apart
    assert (record.speed.model, record.fast_speed.model) == ("plain", "optimized")
    assert record.speed.fps > 0 and record.fast_speed.fps > 0 and record.fast_speed.images_timed == 2
    assert "labels copied to the host" in record.speed.detail and record.speed.precision == "fp32"
    assert record.settings["measure"]["plain_windows_per_call"] == 1 and record.failed_steps == {}
    assert record.settings["measure"]["float32"]["cudnn_allow_tf32"] is False
    assert record.inference_memory.kind == record.fast_inference_memory.kind == record.training_memory.kind
    assert record.training_memory.kind == "cpu peak RSS"
    # a fresh process trains: the weights, gradients and momentum buffers alone (3 copies) are a lower bound,
    # whatever this process's allocator already holds after other tests
    weights = sum(p.numel() * 4 for p in PSPNet(**tiny_info("r50")["config"]).parameters())
    assert record.training_memory.gb * 2**30 >= 3 * weights, record.training_memory
    assert "64x64, 2 image(s)" in record.training_memory.detail and "fresh process" in record.training_memory.detail
    assert record.settings["test"]["img_scale"] == SMALL_SCALE and record.settings["world_size"] == 1
    assert {"torch", "psp_zoo", "git_revision", "device_name", "python"} <= set(record.environment)
    failed = read_result(results / "tiny_r101" / CPU_FILE)
    assert failed.status == "failed" and "404" in failed.error and failed.images.count == 0
    assert "| PSPNet [1] " in out and "1.50 / " in out  # the summary: published / reproduced

    code, tables, _ = _cli(capsys, "tables", "--results", results, "--manifest", setup["manifest"])
    assert code == 0
    row = next(line for line in tables.splitlines() if line.startswith("| PSPNet [1]"))
    assert f"1.50 / {record.single_scale.miou:.2f} ({record.single_scale.miou - 1.5:+.2f})" in row
    assert f"- / {record.ms_flip.miou:.2f}" in row
    header = next(line for line in tables.splitlines() if line.startswith("| Method"))
    cells = dict(zip([c.strip() for c in header.split("|")], [c.strip() for c in row.split("|")]))
    assert cells["Inf time (fps)"] == f"- / {record.speed.fps:.2f}"
    assert cells["psp-zoo fps"] == f"{record.fast_speed.fps:.2f}"
    assert "not reproduced: tiny_r101 failed" in tables


def test_a_rerun_skips_finished_checkpoints_and_retries_failed_ones(capsys, setup, first_run, tmp_path):
    results = tmp_path / "results"  # a copy: other tests read the first run's files as it wrote them
    shutil.copytree(first_run[3], results)
    record = read_result(results / "tiny_r50" / CPU_FILE)
    setup["server"].script("r101", "404")
    requests_before = len(setup["server"].log)
    code, out, err = _cli(capsys, *_argv(setup, results, "--models", "tiny_*"))
    assert code == 1 and "tiny_r50: skipped" in err and "1 already done" in out
    assert read_result(results / "tiny_r50" / CPU_FILE) == record  # not rewritten
    assert len(setup["server"].log) == requests_before + 1  # tiny_r101 was tried again
    # a finished run with other settings (here: a limit) is not "finished" for this one
    code, _, err = _cli(capsys, *_argv(setup, results, "--models", "tiny_r50", "--limit", "2",
                                       "--no-ms-flip", "--no-train-mem"))
    assert code == 0 and "skipped" not in err
    assert read_result(results / "tiny_r50" / CPU_FILE).images.limit == 2


@pytest.mark.parametrize("extra, message", [
    (("--models", "nope*"), "no cityscapes checkpoint matches 'nope*'; the cityscapes checkpoints are: "),
    (("--precision", "fp16"), "precision 'fp16' needs a CUDA device"),
])
def test_user_errors_are_one_line_before_any_work(capsys, setup, tmp_path, extra, message):
    code, out, err = _cli(capsys, *_argv(setup, tmp_path / "results", *extra))
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    if "nope" in message:
        assert "tiny_r50, tiny_r101" in err
    assert not (tmp_path / "results").exists()


def test_a_killed_run_resumes_and_ends_with_the_same_numbers(capsys, setup, uninterrupted, tmp_path):
    results = tmp_path / "results"
    argv = _argv(setup, results, "--models", "tiny_r50", "--no-train-mem", "--save-every", "2")

    def killed_after(images: int) -> str:
        run = subprocess.run([sys.executable, str(Path(__file__).with_name("crash_reproduce.py")), str(images), *argv],
                             env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"},
                             capture_output=True, text=True)
        assert run.returncode == CRASH_EXIT_CODE, run.stderr
        assert not (results / "tiny_r50" / CPU_FILE).exists()
        return run.stderr

    # single-scale saved after image 2; image 3 scored, not saved, lost with the kill
    killed_after(3)
    # resumes at 2, finishes single-scale (saved), ms+flip saved after 2 of 3 images, killed again
    assert "single-scale: resuming at image 2 of 3" in killed_after(3)
    partials = sorted(p.name for p in (results / "tiny_r50").glob("*.partial.npz"))
    assert partials == [f"{CPU_FILE}.ms_flip.partial.npz", f"{CPU_FILE}.single_scale.partial.npz"]

    code, out, err = _cli(capsys, *argv)
    assert code == 0, err
    assert "single-scale: resuming at image 3 of 3" in err and "ms-flip: resuming at image 2 of 3" in err
    assert not list((results / "tiny_r50").glob("*.partial.npz"))  # consumed
    assert _scores(_result(results, "tiny_r50")) == _scores(uninterrupted)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _tiny_r50_split(manifest: Path, data_root: Path, rank: int = 0, world_size: int = 1) -> ConfusionMatrix:
    """tiny_r50's single-scale confusion matrix of one shard, not reduced."""
    settings = get_checkpoint("tiny_r50", manifest=manifest).test
    data = SegmentationDataset("cityscapes", data_root, img_scales=[settings.img_scale])
    return score(tiny_model("r50"), data.shard(rank, world_size), settings, 5, ms_flip=False,
                 device=torch.device("cpu"), num_workers=0, show=False)


def _distributed_worker(rank: int, world_size: int, port: int, paths: dict, out: Path) -> None:
    """One torchrun-like process: RANK / WORLD_SIZE in the environment, as torchrun sets them."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    matrix = _tiny_r50_split(paths["manifest"], paths["data"], rank, world_size).all_reduce().matrix
    if rank == 0:
        torch.save(matrix, out / "matrix.pt")
    # the whole command on the same process group (it joins the group it finds)
    reproduce("cityscapes", paths["data"], models="tiny_r50", device="cpu", results_dir=out / "results",
              fetch=FetchOptions(manifest=paths["manifest"], cache_dir=paths["cache"]), num_workers=0, speed_images=3,
              speed_warmup=1, train_memory=False, progress=False)
    dist.destroy_process_group()


def test_two_gloo_processes_give_the_single_process_numbers(setup, uninterrupted, tmp_path):
    paths = {key: setup[key] for key in ("manifest", "data", "cache")}
    mp.spawn(_distributed_worker, args=(2, _free_port(), paths, tmp_path), nprocs=2, join=True)

    single = _tiny_r50_split(setup["manifest"], setup["data"])
    assert single.matrix.sum() > 0
    assert torch.equal(torch.load(tmp_path / "matrix.pt", weights_only=True), single.matrix)
    record = _result(tmp_path / "results", "tiny_r50")
    assert record["settings"]["world_size"] == 2 and record["speed"] is not None
    assert _scores(record) == _scores(uninterrupted)
    assert not list((tmp_path / "results" / "tiny_r50").glob("*.partial.npz"))


# --------------------------------------------------------------------------------------------
# holds up in real use: checked folder, one run per results file, options, passes, progress


def test_an_unusable_results_folder_fails_before_any_model_work(capsys, setup, tmp_path):
    blocker = tmp_path / "readme.txt"
    blocker.write_text("a file, not a folder\n")
    before = len(setup["server"].log)
    code, _, err = _cli(capsys, *_argv(setup, blocker / "x", "--models", "tiny_r50"))
    assert code == 2 and "results folder" in err and len(err.strip().splitlines()) == 1
    assert len(setup["server"].log) == before  # nothing fetched, nothing built


def test_a_second_run_on_the_same_folder_does_not_measure_beside_the_first(capsys, setup, tmp_path):
    import filelock

    results = tmp_path / "results"
    target = results / "tiny_r50" / CPU_FILE
    target.parent.mkdir(parents=True)
    with filelock.FileLock(str(target.with_name(f".{CPU_FILE}.lock"))):  # the first run, still measuring
        code, out, err = _cli(capsys, *_argv(setup, results, "--models", "tiny_r50", "--no-ms-flip",
                                             "--no-train-mem"))
    assert code == 1 and "another run is reproducing it" in err and "busy in another run: tiny_r50" in err
    assert not target.exists()


def test_finished_results_are_reused_only_with_the_same_options(capsys, setup, tmp_path):
    results = tmp_path / "results"
    quick = ("--models", "tiny_r50", "--no-train-mem")
    code, _, err = _cli(capsys, *_argv(setup, results, *quick, "--no-ms-flip"))
    assert code == 0 and "3/3 images" in err  # progress lines when stderr is not a terminal
    first = read_result(results / "tiny_r50" / CPU_FILE)
    assert first.ms_flip is None and first.speed.images_timed == 2

    # ms+flip added later: only that pass runs; single-scale, speed and memory are kept as they were
    code, _, err = _cli(capsys, *_argv(setup, results, *quick))
    assert code == 0 and "adding ms+flip" in err and "single-scale" not in err.split("adding ms+flip")[1]
    second = read_result(results / "tiny_r50" / CPU_FILE)
    assert second.ms_flip is not None and second.single_scale == first.single_scale
    assert second.speed == first.speed and second.inference_memory == first.inference_memory

    # other speed switches: a result of their own beside it, never "skipped, finished"
    code, _, err = _cli(capsys, *_argv(setup, results, *quick, "--no-fuse-bn", "--no-channels-last"))
    assert code == 0 and "skipped" not in err
    other = read_result(results / "tiny_r50" / CPU_FILE.replace(".json", "_fp32-no_fuse_bn-no_channels_last.json"))
    assert "fuse_bn" not in other.optimizations and "channels_last" not in other.optimizations
    assert read_result(results / "tiny_r50" / CPU_FILE) == second  # the default result is kept
    code, _, err = _cli(capsys, *_argv(setup, results, *quick, "--no-ms-flip", "--no-winograd",
                                       "--no-factorize-head"))
    assert code == 0 and "skipped" not in err
    exact = read_result(results / "tiny_r50" / CPU_FILE.replace(".json", "_fp32-no_factorize_head-no_winograd.json"))
    assert exact.optimizations == ("fuse_bn", "channels_last")

    # another number of speed images: redone, not reused
    code, _, err = _cli(capsys, *_argv(setup, results, *quick, "--speed-images", "2"))
    assert code == 0 and "other options" in err and "skipped" not in err
    assert read_result(results / "tiny_r50" / CPU_FILE).speed.images_timed == 1


def test_speed_from_too_few_images_is_flagged_in_the_record_and_the_table(capsys, setup, tmp_path):
    results = tmp_path / "results"
    code, _, err = _cli(capsys, *_argv(setup, results, "--models", "tiny_r50", "--limit", "1", "--no-ms-flip",
                                       "--no-train-mem"))
    assert code == 0 and "only 1 image(s) for speed: 0 warm-up, 1 timed" in err
    record = read_result(results / "tiny_r50" / CPU_FILE)
    assert (record.speed.images_timed, record.speed.warmup) == (1, 0)
    code, tables, _ = _cli(capsys, "tables", "--results", results, "--manifest", setup["manifest"])
    assert code == 0 and "fps from 1 timed image(s) after 0 warm-up (published: 195 after 5)" in tables


def test_a_cityscapes_checkpoint_is_reproduced_on_dark_zurich(capsys, tmp_path):
    """Cross-dataset rows: the checkpoint's Dark Zurich numbers, in their own results file and section."""
    from psp_zoo.testing import SELFTEST_NAME, manifest_entry, write_manifest, write_tiny_checkpoint

    checkpoint = write_tiny_checkpoint(tmp_path / "zoo", num_classes=19)
    entry = manifest_entry(checkpoint, checkpoint.as_uri(), test={"img_scale": SMALL_SCALE})
    entry["published_on"] = {"dark_zurich": {"aliases": [f"{SELFTEST_NAME}_dark"], "published": {"mIoU": 10.0}}}
    manifest = write_manifest(tmp_path / "manifest.yml", [entry])
    minidata.write_dark_zurich(tmp_path / "data" / "dark_zurich")
    code, out, _ = _cli(capsys, "list", "--dataset", "dark_zurich", "--manifest", manifest, "--format", "csv")
    assert code == 0 and SELFTEST_NAME in out and "dark_zurich (trained on cityscapes)" in out and ",10.0," in out
    results = tmp_path / "results"
    code, out, err = _cli(capsys, "reproduce", "--dataset", "dark_zurich", "--data-root", tmp_path / "data",
                          "--models", SELFTEST_NAME, "--manifest", manifest, "--cache-dir", tmp_path / "cache",
                          "--results", results, "--no-ms-flip", "--no-train-mem", *QUICK)
    assert code == 0, err
    record = read_result(results / SELFTEST_NAME / "dark_zurich" / CPU_FILE)
    assert record.dataset == "dark_zurich" and record.images.count == 3
    assert record.settings["test"]["img_scale"] == [1920, 1080]  # Dark Zurich's own test scale
    code, tables, _ = _cli(capsys, "tables", "--results", results, "--manifest", manifest)
    section = tables.split("### Dark Zurich")[1].split("###")[0]
    assert f"10.00 / {record.miou:.2f}" in section and "| Cityscapes" in section


# --------------------------------------------------------------------------------------------
# the published protocol as a GPU would run it, checked on the CPU


def _reproduce(setup, results: Path, models: str = "tiny_r50", manifest=None, **options):
    return reproduce("cityscapes", setup["data"], models=models, device="cpu", results_dir=results,
                     fetch=FetchOptions(manifest=manifest or setup["manifest"], cache_dir=setup["cache"]),
                     num_workers=0, speed_images=3, speed_warmup=1, progress=False, **options)


def test_an_error_while_measuring_keeps_the_scores(capsys, monkeypatch, setup, tmp_path):
    import psp_zoo.evaluation.reproduction as reproduction

    def out_of_memory(*args, **kwargs):
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore detail")

    results = tmp_path / "results"
    monkeypatch.setattr(reproduction, "training_memory", out_of_memory)
    report = _reproduce(setup, results)
    record = read_result(results / "tiny_r50" / CPU_FILE)
    assert report.failed == [] and record.status == "complete"
    assert record.single_scale is not None and record.ms_flip is not None and record.images.count == 3
    assert record.speed is not None and record.fast_speed is not None and record.training_memory is None
    assert record.failed_steps == {"training_memory": "RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB"}
    code, tables, _ = _cli(capsys, "tables", "--results", results, "--manifest", setup["manifest"])
    row = next(line for line in tables.splitlines() if line.startswith("| PSPNet [1]"))
    assert code == 0 and f"1.50 / {record.miou:.2f}" in row and "| - / failed |" in row  # Mem failed, scores shown
    assert "- not measured: tiny_r50 [1]: training memory failed: RuntimeError: CUDA out of memory" in tables
    code, shown, _ = _cli(capsys, "show", results / "tiny_r50" / CPU_FILE, "--manifest", setup["manifest"])
    assert code == 0 and "training memory" in shown and "failed" in shown

    # the next run measures only what is missing; the scores are kept as they were
    monkeypatch.undo()
    _reproduce(setup, results)
    again = read_result(results / "tiny_r50" / CPU_FILE)
    assert again.failed_steps == {} and again.training_memory is not None
    assert again.single_scale == record.single_scale and again.ms_flip == record.ms_flip
    assert again.speed == record.speed and again.fast_speed == record.fast_speed


def test_timing_runs_the_plain_model_one_window_per_call_whatever_the_device_default(monkeypatch, setup, tmp_path):
    import psp_zoo.evaluation.reproduction as reproduction

    calls = []

    def recording(model, settings, device, *, windows_per_call=1):
        calls.append((type(model).__name__, windows_per_call))
        return protocol_call(model, settings, device, windows_per_call=windows_per_call)

    from psp_zoo.evaluation.measure import protocol_call
    monkeypatch.setattr(reproduction, "default_slide_batch", lambda device: 8)  # CUDA's batching default
    monkeypatch.setattr(reproduction, "protocol_call", recording)
    _reproduce(setup, tmp_path / "results", ms_flip=False, train_memory=False)
    assert calls == [("OptimizedModel", 8), ("PSPNet", 1)]  # psp-zoo's own figure, then the protocol
    record = read_result(tmp_path / "results" / "tiny_r50" / CPU_FILE)
    assert "1 window(s) per model call" in record.speed.detail
    assert "8 window(s) per model call" in record.fast_speed.detail


def test_the_fp16_row_is_measured_as_its_entry_says(setup, tmp_path):
    data = yaml.safe_load(setup["manifest"].read_text())
    fp16 = dict(data["models"][0], name="tiny_r50_fp16_cityscapes", aliases=[])
    manifest = tmp_path / "fp16.yml"
    manifest.write_text(yaml.safe_dump({"models": [fp16]}))
    _reproduce(setup, tmp_path / "results", models="tiny_r50_fp16_cityscapes", manifest=manifest, ms_flip=False)
    record = read_result(tmp_path / "results" / "tiny_r50_fp16_cityscapes" / CPU_FILE)
    measured = record.settings["measure"]
    assert (measured["published_precision"], measured["loss_scale"], measured["plain_precision"]) == (
        "fp16", 512.0, "fp32")
    said = "published in fp16 (training: static loss scale 512); measured in fp32 on the CPU (fp16 needs CUDA)"
    assert said in record.training_memory.detail and said in record.speed.detail
    assert record.speed.precision == "fp32" and record.precision == "fp32"
