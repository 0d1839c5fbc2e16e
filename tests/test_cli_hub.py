"""`psp-zoo list / info / get`: output, exit codes, one-line errors, and one download for two processes."""
from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
import threading

import pandas as pd
import pytest

from helpers import REPO, one_line, run_cli, tiny_checkpoint_path, tiny_info
from hub_server import OPENMMLAB, write_manifest


def test_list_shows_published_numbers_and_cache_state(capsys, hub_server, hub_manifest, hub_cache):
    args = ("--manifest", hub_manifest, "--cache-dir", hub_cache)
    code, out, _ = run_cli(capsys, "list", "--format", "json", "--pattern", "tiny*", *args)
    rows = json.loads(out)
    assert code == 0 and [r["name"] for r in rows] == ["tiny_r50", "tiny_r101"]
    assert rows[0]["mIoU"] == 1.5 and rows[0]["Mem (GB)"] is None and rows[0]["cache_state"] == "missing"

    assert run_cli(capsys, "get", "tiny_r50", "--quiet", *args)[0] == 0
    code, out, _ = run_cli(capsys, "list", "--format", "csv", "--dataset", "cityscapes", *args)
    frame = pd.read_csv(io.StringIO(out))
    # 21 published Cityscapes checkpoints since the whole PSPNet family is in the manifest (was 8),
    # the PSPNet authors' two, the tiny two
    assert len(frame) == 21 + 2 + 2 and frame.set_index("name")["cache_state"].to_dict()["tiny_r50"] == "cached"
    assert frame.set_index("name").loc["pspnet_r50-d8_512x1024_40k_cityscapes", "mIoU"] == 77.85

    code, out, _ = run_cli(capsys, "list", "--pattern", "tiny*", *args)
    table = out.splitlines()
    # one vocabulary: the table says what CSV, JSON and `info` say
    assert table[0].startswith("| name") and "| cached" in table[2] and "| missing" in table[3] and len(table) == 4


def test_info_shows_every_field_and_the_cache(capsys, hub_manifest, hub_cache, hub_server):
    args = ("--manifest", hub_manifest, "--cache-dir", hub_cache)
    code, out, _ = run_cli(capsys, "info", "tiny-r101-alias", "--format", "json", *args)
    fields = json.loads(out)
    assert code == 0 and fields["name"] == "tiny_r101" and fields["sha256"] == tiny_info("r101")["sha256"]
    assert fields["cache_path"] == str(hub_cache / tiny_checkpoint_path("r101").name)
    assert fields["cache_state"] == "missing" and fields["arch"]["base_channels"] == 8
    assert fields["url"] == hub_server.url("r101") and fields["test"]["mode"] == "whole"

    run_cli(capsys, "get", "tiny_r101", "--quiet", *args)
    code, out, _ = run_cli(capsys, "info", "tiny_r101", *args)
    text = dict(line.split(None, 1) for line in out.splitlines())
    assert text["cache_state"] == "cached" and text["depth"] == "101" and text["crop_size"] == "64, 64"


def test_get_prints_verified_paths(capsys, hub_server, hub_manifest, hub_cache):
    code, out, err = run_cli(capsys, "get", "tiny_*", "--quiet", "--manifest", hub_manifest,
                             "--cache-dir", hub_cache)
    assert code == 0 and err == ""
    assert out.splitlines() == [str(hub_cache / tiny_checkpoint_path(t).name) for t in ("r50", "r101")]


def test_get_tries_the_rest_and_exits_nonzero(capsys, hub_server, hub_manifest, hub_cache):
    hub_server.script("r50", "404")
    code, out, err = run_cli(capsys, "get", "tiny_r50", "tiny_r101", "--quiet",
                             "--manifest", hub_manifest, "--cache-dir", hub_cache)
    assert code == 1 and out.splitlines() == [str(hub_cache / tiny_checkpoint_path("r101").name)]
    error, advice = err.strip().splitlines()
    assert error.startswith("psp-zoo get: error: tiny_r50: ") and "HTTP 404" in error
    assert advice.startswith("psp-zoo get: to fix: ") and "--mirror" in advice


def test_get_against_a_refused_mirror_says_one_short_line_per_file_and_the_advice_once(capsys, tmp_path):
    with socket.socket() as sock:  # a port nothing listens on: every connection is refused
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    code, out, err = run_cli(capsys, "get", "--dataset", "cityscapes", "--mirror", f"http://127.0.0.1:{port}/",
                             "--cache-dir", tmp_path / "cache")
    # the PSPNet authors' two files have no URL: said apart (tests/test_semseg_entries.py), no mirror asked
    by_hand = [line for line in err.strip().splitlines() if ": semseg_" in line or "no download URL" in line]
    assert len(by_hand) == 3  # one line per file, one to-fix line
    lines = [line for line in err.strip().splitlines() if line not in by_hand]
    errors = [line for line in lines if line.startswith("psp-zoo get: error: ")]
    fixes = [line for line in lines if line.startswith("psp-zoo get: to fix: ")]
    assert code == 1 and out == "" and len(errors) == 21 and len(fixes) == 1
    assert len(lines) <= len(errors) + 2  # at most one 'downloading' line: the refused host is not asked again
    assert all(len(line) < 200 for line in errors), max(errors, key=len)
    assert all(f"127.0.0.1:{port}" in line and "refused" in line for line in errors)
    assert "--mirror" in fixes[0] and "offline" in fixes[0] and not any("mirror" in line for line in errors)


def test_get_offline_and_mirror(capsys, hub_server, tmp_path, hub_cache, monkeypatch):
    manifest = write_manifest(tmp_path / "official.yml", OPENMMLAB)
    monkeypatch.setenv("PSP_ZOO_MANIFEST", str(manifest))
    monkeypatch.setenv("PSP_ZOO_HOME", str(hub_cache))
    code, _, err = run_cli(capsys, "get", "tiny_r50", "--offline")
    assert code == 1 and "is not in the cache" in one_line(err) and str(hub_cache) in err
    code, out, err = run_cli(capsys, "get", "tiny_r50", "--mirror", hub_server.base)
    assert code == 0 and out.strip() == str(hub_cache / tiny_checkpoint_path("r50").name)
    assert "downloading " + hub_server.url("r50") in err  # progress messages when not --quiet
    assert run_cli(capsys, "get", "tiny_r50", "--offline", "--quiet")[:2] == (0, out)
    assert len(hub_server.log) == 1


@pytest.mark.parametrize("argv,expected", [
    (["get", "tiny_r5", "tiny_r50"], "unknown checkpoint 'tiny_r5'; did you mean: tiny_r50"),
    (["get"], "give checkpoint names, --dataset D or --all"),
    (["get", "tiny_r50", "--all"], "give checkpoint names, --dataset D or --all"),
    (["get", "nothing*"], "no checkpoint name matches 'nothing*'"),
    (["list", "--dataset", "kitti"], "unknown dataset 'kitti'"),
    (["info", "pspnet_r50_cityscapes"], "did you mean: "),
])
def test_user_errors_are_one_line_and_nothing_is_fetched(capsys, hub_server, hub_manifest, argv, expected):
    code, out, err = run_cli(capsys, *argv, "--manifest", hub_manifest)
    assert code == 2 and expected in one_line(err) and hub_server.log == []


def test_a_dataset_without_checkpoints_is_one_line(capsys, hub_server, hub_manifest, tmp_path):
    # every built-in dataset has published checkpoints now (pascal_context_59 had none): declare one
    extra = tmp_path / "empty_dataset.yml"
    extra.write_text("datasets:\n  empty_set:\n    title: Empty\n    num_classes: 2\n    img_scale: [64, 64]\n"
                     "    reduce_zero_label: false\n    train_images_per_gpu: 1\n    test: {mode: whole}\n"
                     "    layout: {folders: [''], images: img, labels: ann, image_suffix: .png, label_suffix: .png}\n"
                     "    classes: [a, b]\n")
    code, out, err = run_cli(capsys, "get", "--dataset", "empty_set", "--manifest", hub_manifest, "--manifest", extra)
    assert code == 2 and "no checkpoints for dataset 'empty_set'" in one_line(err) and hub_server.log == []


def test_a_broken_manifest_is_one_line(capsys, tmp_path):
    code, _, err = run_cli(capsys, "info", "tiny_r50", "--manifest", tmp_path / "missing.yml")
    assert code == 2 and "cannot read manifest" in one_line(err)


def _psp_zoo(*argv, stderr=subprocess.PIPE) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "psp_zoo", *map(str, argv)], stdout=subprocess.PIPE,
                            stderr=stderr, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})


def test_two_processes_download_once(hub_server, hub_manifest, hub_cache):
    args = ("get", "tiny_r50", "--manifest", hub_manifest, "--cache-dir", hub_cache)
    hub_server.script("r50", "stall:300000")  # the first download pauses mid-file until released
    first = _psp_zoo(*args)
    assert hub_server.stalled.wait(120), "first process never started downloading"
    second = _psp_zoo(*args)
    waiting, lines = threading.Event(), []

    def read_stderr():
        for line in second.stderr:
            lines.append(line)
            if "waiting for another process" in line:
                waiting.set()

    reader = threading.Thread(target=read_stderr, daemon=True)
    reader.start()
    assert waiting.wait(120), "".join(lines)  # the second process is blocked on the lock ...
    hub_server.released.set()  # ... while the first one finishes
    outputs = [p.communicate(timeout=120)[0] for p in (first, second)]
    reader.join(30)
    assert [first.returncode, second.returncode] == [0, 0], lines
    assert outputs[0] == outputs[1] == f"{hub_cache / tiny_checkpoint_path('r50').name}\n"
    assert len(hub_server.requests_for("r50")) == 1


def test_the_console_entry_reports_an_unknown_name_without_traceback(hub_manifest):
    process = _psp_zoo("get", "tiny_r55", "--manifest", hub_manifest)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 2 and out == ""
    assert one_line(err).startswith("psp-zoo get: error: unknown checkpoint 'tiny_r55'; did you mean: tiny_r50")


@pytest.mark.parametrize("argv,expected", [
    (["--device", "gpu0"], "unknown device 'gpu0'; use cpu, cuda or cuda:N"),
    (["--device", "cuda:99"], "device 'cuda:99' is not usable here ("),
    (["--json", "{file}/result.json"], "--json {file}/result.json: {file} is a file, not a folder"),
])
def test_evaluate_refuses_a_bad_device_or_output_before_any_work(capsys, tmp_path, argv, expected):
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    argv = [a.format(file=a_file) for a in argv]
    code, out, err = run_cli(capsys, "evaluate", "pspnet_r50-d8_512x1024_40k_cityscapes", "--data-root",
                             tmp_path / "no-data", *argv)
    assert code == 2 and out == ""  # the device and the output path are checked before the data and weights
    assert one_line(err).startswith(f"psp-zoo evaluate: error: {expected.format(file=a_file)}")


def test_a_refused_write_is_one_line_not_a_traceback(capsys, tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    code, _, err = run_cli(capsys, "tables", "--plot", a_file / "plot.png")
    # refused before the tables are built, naming the requested file and what is in its way
    assert code == 2 and one_line(err).startswith(
        f"psp-zoo tables: error: --plot {a_file / 'plot.png'}: {a_file} is a file, not a folder")
