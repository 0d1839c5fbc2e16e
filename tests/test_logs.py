"""`psp-zoo logs` and psp_zoo.results.published_logs: published training logs, served from 127.0.0.1, beside
the table."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from psp_zoo.cli import main
from psp_zoo.manifest.loading import get_checkpoint
from psp_zoo.results.published_logs import (
    LogError,
    compare_with_table,
    log_figure,
    parse_log,
    read_logs,
    render_comparison,
)
from psp_zoo.testing import manifest_entry, write_manifest

from helpers import REPO, tiny_checkpoint_path

NAME = "tiny_pspnet_r50-d8"  # manifest_entry's name for the r50 fixture file
LOG_PATH = "/mmsegmentation/v0.5/pspnet/tiny/tiny_pspnet_r50-d8_20200605_003338.log.json"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

# (training iteration, loss, memory MB) every 1000 iterations; the peak is 6246 MB at 3000
TRAIN = [(i * 1000, 2.0 - 0.1 * i, 6000 + (246 if i == 3 else i)) for i in range(1, 13)]
# (training iteration, mIoU as a fraction): the best is 8000, the last 12000
VAL = [(4000, 0.70), (8000, 0.74), (12000, 0.73)]


def log_0x() -> str:
    """An mmseg 0.x .log.json: metadata line, then train lines and val lines as mmcv writes them.
    "epoch" stays 1 in an iteration-based run; one val line carries mmcv >= 1.3's evaluation-step
    count (125) as its "iter", the others the training iteration."""
    lines = [json.dumps({"env_info": "sys.platform: linux\nPython: 3.7", "seed": 0, "exp_name": "x.py",
                         "mmseg_version": "0.5.0+b72a6d0"})]
    for iteration, loss, memory in TRAIN:
        lines.append(json.dumps({"mode": "train", "epoch": 1, "iter": iteration, "lr": 0.01, "memory": memory,
                                 "data_time": 0.01, "decode.loss_ce": loss * 0.7, "aux.loss_ce": loss * 0.3,
                                 "loss": loss, "time": 0.5}))
        for at, miou in VAL:
            if at == iteration:
                lines.append(json.dumps({"mode": "val", "epoch": 1, "iter": 125 if at == 8000 else at, "lr": 0.01,
                                         "aAcc": 0.95, "mIoU": miou, "mAcc": miou + 0.05, "IoU.road": 0.97}))
    lines.insert(5, "")  # a blank line is skipped
    return "\n".join(lines) + "\n"


def scalars_1x() -> str:
    """An mmseg 1.x vis_data/scalars.json: "step", metrics in percent, a final test line at step 0."""
    lines = []
    for iteration, loss, memory in TRAIN:
        lines.append(json.dumps({"lr": 0.01, "data_time": 0.01, "loss": loss, "decode.loss_ce": loss * 0.7,
                                 "time": 0.5, "iter": iteration, "memory": memory, "step": iteration}))
        for at, miou in VAL:
            if at == iteration:
                lines.append(json.dumps({"aAcc": 95.0, "mIoU": miou * 100, "mAcc": 80.0, "data_time": 0.01,
                                         "time": 0.2, "step": at}))
    lines.append(json.dumps({"aAcc": 95.1, "mIoU": 72.5, "mAcc": 80.1, "data_time": 0.01, "time": 0.2, "step": 0}))
    return "\n".join(lines) + "\n"


@pytest.fixture
def served(hub_server, tmp_path):
    """Serve ``text`` as the log of a manifest entry hosted by hub_server; returns the manifest path."""
    def serve(text: str, log_path: str = LOG_PATH, published=None) -> Path:
        hub_server.files[log_path] = text.encode()
        checkpoint = tiny_checkpoint_path("r50")
        entry = manifest_entry(checkpoint, checkpoint.as_uri(), num_classes=5)
        entry["published"] = published if published is not None else {"mIoU": 74.5, "Mem (GB)": 6.1}
        if log_path:
            entry["log"] = hub_server.base + log_path
        return write_manifest(tmp_path / "manifest.yml", [entry])
    return serve


def _logs(capsys, manifest: Path, cache: Path, *argv) -> tuple:
    code = main(["logs", NAME, "--manifest", str(manifest), "--cache-dir", str(cache), *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def test_0x_log_last_and_best_mIoU_and_peak_memory_beside_the_table(capsys, served, hub_server, tmp_path):
    cache, plot = tmp_path / "cache", tmp_path / "plots" / "curves.png"
    code, out, err = _logs(capsys, served(log_0x()), cache, "--plot", plot)
    assert code == 0, err
    lines = out.splitlines()
    assert lines[1] == "  mmseg 0.x .log.json, 12 training and 3 validation lines"
    assert lines[2] == "  last val mIoU  73.00 (table 74.50, -1.50) at iteration 12000"
    assert lines[3] == "  best val mIoU  74.00 (table 74.50, -0.50) at iteration 8000"
    # MiB, as mmseg logs them
    assert lines[4] == "  peak memory    6.10 GB (table 6.10, +0.00) at iteration 3000: 6246 MiB / 1024"
    assert lines[5] == f"wrote {plot}"
    assert plot.read_bytes().startswith(PNG_SIGNATURE)
    with Image.open(plot) as png:
        png.verify()
        assert png.format == "PNG"
    assert (cache / Path(LOG_PATH).name).read_text() == log_0x()  # cached under the URL's file name
    assert [r.path for r in hub_server.log] == [LOG_PATH]
    assert not list(plot.parent.glob(".*"))  # no temporary file left beside the plot


def test_json_output_of_a_1x_scalars_log(capsys, served, tmp_path):
    code, out, err = _logs(capsys, served(scalars_1x(), LOG_PATH.replace(".log.json", "_scalars.json")),
                           tmp_path / "cache", "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["layout"] == "mmseg 1.x scalars.json"
    assert (report["train_lines"], report["val_lines"]) == (12, 4)
    # the step-0 test line after training scores the last iteration's weights
    assert report["last_val"] == {"iter": 12000, "mIoU": pytest.approx(72.5), "exact": True}
    assert report["best_val"] == {"iter": 8000, "mIoU": pytest.approx(74.0), "exact": True}
    assert report["approximate_val_lines"] == 0
    assert report["peak_memory"] == {"iter": 3000, "MiB": 6246.0, "GB": pytest.approx(6246 / 1024)}
    assert report["published"] == {"mIoU": 74.5, "Mem (GB)": 6.1}


def test_both_layouts_read_the_same_run_alike():
    old, new = parse_log(log_0x(), "a.log.json"), parse_log(scalars_1x(), "scalars.json")
    assert old.train == new.train
    assert [(v.iteration, round(v.miou, 6)) for v in old.val] == [(v.iteration, round(v.miou, 6)) for v in new.val[:3]]
    assert [v.aacc for v in old.val] == pytest.approx([95.0] * 3)  # 0.x fractions become percent


def test_curves_are_drawn_against_the_training_iteration():
    pytest.importorskip("matplotlib")
    figure = log_figure(parse_log(log_0x()), published_miou=74.5)
    loss_axes, miou_axes = figure.axes
    assert list(loss_axes.lines[0].get_xdata()) == [i for i, _, _ in TRAIN]
    assert list(loss_axes.lines[0].get_ydata()) == pytest.approx([loss for _, loss, _ in TRAIN])
    # val lines sit at the training iteration, also the one logged with "iter": 125
    assert list(miou_axes.lines[0].get_xdata()) == [4000, 8000, 12000]
    assert list(miou_axes.lines[0].get_ydata()) == pytest.approx([70.0, 74.0, 73.0])
    assert miou_axes.get_xlabel() == "iteration"
    assert list(miou_axes.lines[1].get_ydata()) == [74.5, 74.5]  # the table's mIoU as a line


def test_a_malformed_served_log_is_one_clear_error_and_is_not_cached(capsys, served, tmp_path):
    broken = log_0x().splitlines()
    broken[6] = "<html><body>Not here</body></html>"
    cache = tmp_path / "cache"
    code, out, err = _logs(capsys, served("\n".join(broken)), cache)
    assert code == 2 and out == ""
    error = [line for line in err.splitlines() if "error" in line]
    assert len(error) == 1 and error[0].startswith("psp-zoo logs: error: http://127.0.0.1:")
    assert error[0].endswith(f"{LOG_PATH}:7: not a JSON object: '<html><body>Not here</body></html>'")
    assert not (cache / Path(LOG_PATH).name).exists()
    assert not list((cache / ".psp-zoo").glob("*.part"))  # nor its partial download


@pytest.mark.parametrize("text, message", [
    ('{"mode": "train", "iter": 50, "loss": 1.0}\n{"mode": "val", "iter": 50, "mIoU": 74.2}\n',
     "x.json:2: mIoU 74.2 is outside 0..1, where a mmseg 0.x .log.json keeps it"),
    ('{"mode": "train", "iter": 50, "loss": 1.0}\n{"step": 100, "loss": 0.9}\n',
     "x.json:2: a mmseg 1.x scalars.json line in a mmseg 0.x .log.json file"),
    ('{"mode": "train", "iter": 50, "loss": "high"}\n', "x.json:1: 'loss' should be a number, got 'high'"),
    ('{"mode": "train", "iter": 100, "loss": 1.0}\n{"mode": "train", "iter": 50, "loss": 1.0}\n',
     "x.json:2: training iteration 50 comes after 100"),
    ('{"env_info": "x"}\n{"seed": 0}\n', "x.json:2: a line with neither 'mode' (mmseg 0.x) nor 'step'"),
    ('{"mode": "test", "iter": 1}\n', "x.json:1: unknown mode 'test'"),
    ("\n\n", "x.json: no training or validation line"),
])
def test_logs_psp_zoo_cannot_read_are_refused_naming_the_line(text, message):
    with pytest.raises(LogError) as caught:
        parse_log(text, "x.json")
    assert str(caught.value).startswith(message)


def test_offline_uses_the_cached_log(capsys, served, hub_server, tmp_path):
    manifest, cache = served(log_0x()), tmp_path / "cache"
    assert _logs(capsys, manifest, cache)[0] == 0
    del hub_server.files[LOG_PATH]  # the host no longer has it
    code, out, err = _logs(capsys, manifest, cache, "--offline")
    assert code == 0 and err == ""
    assert "last val mIoU  73.00 (table 74.50, -1.50) at iteration 12000" in out
    assert len(hub_server.log) == 1


def test_offline_without_the_cached_log_says_where_it_looked(capsys, served, hub_server, tmp_path):
    code, out, err = _logs(capsys, served(log_0x()), tmp_path / "cache", "--offline")
    assert code == 2 and out == "" and hub_server.log == []
    assert err.strip() == (f"psp-zoo logs: error: offline: {Path(LOG_PATH).name} is not in the cache (looked "
                           f"for {tmp_path / 'cache' / Path(LOG_PATH).name}); fetch it while online, or copy "
                           f"the file there")


def test_an_entry_without_a_log_url_is_a_clear_error(capsys, served, tmp_path):
    code, out, err = _logs(capsys, served(log_0x(), log_path=""), tmp_path / "cache")
    assert code == 2 and out == ""
    assert err.strip() == (f"psp-zoo logs: error: {NAME} has no training log: its manifest entry gives "
                           f"no 'log' URL")


def test_without_matplotlib_a_plot_is_refused_before_fetching(capsys, served, hub_server, tmp_path, monkeypatch):
    for module in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")] + ["matplotlib"]:
        monkeypatch.setitem(sys.modules, module, None)
    plot = tmp_path / "curves.png"
    code, out, err = _logs(capsys, served(log_0x()), tmp_path / "cache", "--plot", plot)
    assert code == 2 and out == "" and hub_server.log == [] and not plot.exists()
    assert err.strip() == ("psp-zoo logs: error: plotting needs matplotlib, which is not installed; install it with "
                           "`python -m pip install 'psp-zoo[plot]'`")


def test_a_log_without_validation_or_memory_says_so(tmp_path, served):
    log = parse_log('{"mode": "train", "epoch": 1, "iter": 50, "loss": 1.5}\n', "cpu.log.json")
    text = render_comparison(compare_with_table(get_checkpoint(NAME, manifest=served("")), log))
    assert text.splitlines()[2:] == ["  no validation in the log (table mIoU 74.5)",
                                     "  no training memory in the log (table Mem (GB) 6.1)"]


# --------------------------------------------------------------------------------------------
# psp-zoo's own logs: validations placed exactly, a resumed run's files read as one run

EVAL_EVERY, LOG_EVERY, LAST = 60, 50, 480  # validations every 60 iterations, train lines every 50
VALIDATED = list(range(EVAL_EVERY, LAST + 1, EVAL_EVERY))
LOGGED = [i for i in range(LOG_EVERY, LAST + 1, LOG_EVERY) if i % EVAL_EVERY]  # none at a validation


def _miou(iteration: int) -> float:
    """The run's validation mIoU as a fraction: best (0.92) at 420, lower at 480."""
    return 0.5 + iteration / 1000 if iteration <= 420 else 0.81


def write_run_log(path: Path, start: int, stop: int, config: dict = None) -> Path:
    """The lines psp-zoo's loop writes for iterations start+1..stop of a run (TrainLog, as loop.py calls it)."""
    from psp_zoo.training.log import TrainLog

    log = TrainLog(path)
    log.meta(env_info="{}", config=json.dumps(config or {}), seed=0, exp_name=NAME)
    for done in range(start + 1, stop + 1):
        validating = done % EVAL_EVERY == 0 or done == LAST
        if done % LOG_EVERY == 0 and not validating:
            log.train(epoch=1, iteration=done, lr=0.01, means={"loss": 2.0 - done / 1000, "time": 0.1})
        if validating:
            log.val(epoch=1, steps=6, iteration=done, lr=0.01, aacc=0.95, miou=_miou(done), macc=0.9,
                    class_names=["a", "b"], iou=[0.9, 0.8], acc=[0.95, 0.9])
    return path


def without_train_iter(text: str, meta: dict = None) -> str:
    """The same log as mmseg 0.x writes it: no ``train_iter``; ``meta`` replaces the first line."""
    lines = [json.loads(line) for line in text.splitlines()]
    for line in lines:
        line.pop("train_iter", None)
    if meta is not None:
        lines[0] = meta
    return "\n".join(json.dumps(line) for line in lines) + "\n"


def test_a_validation_is_reported_and_plotted_at_its_own_iteration(capsys, served, tmp_path):
    # the log's config says nothing: the val lines' train_iter alone places them
    path = write_run_log(tmp_path / "work" / "20260101_000000.log.json", 0, LAST)
    val_lines = [json.loads(line) for line in path.read_text().splitlines() if '"val"' in line]
    # mmseg's iter kept
    assert [(line["iter"], line["train_iter"]) for line in val_lines] == [(6, i) for i in VALIDATED]
    code, out, err = _logs(capsys, served(log_0x()), tmp_path / "cache", "--log", path)
    assert code == 0, err
    assert "  last val mIoU  81.00 (table 74.50, +6.50) at iteration 480" in out.splitlines()
    assert "  best val mIoU  92.00 (table 74.50, +17.50) at iteration 420" in out.splitlines()
    assert "approximately" not in out
    log = read_logs([path])
    assert [v.iteration for v in log.val] == VALIDATED and all(v.exact for v in log.val)
    assert [s.iteration for s in log.train] == LOGGED
    pytest.importorskip("matplotlib")
    miou_axes = log_figure(log).axes[1]
    assert list(miou_axes.lines[0].get_xdata()) == VALIDATED


MMSEG_CONFIG = ("norm_cfg = dict(type='SyncBN', requires_grad=True)\n"
                f"runner = dict(type='IterBasedRunner', max_iters={LAST})\n"
                f"checkpoint_config = dict(by_epoch=False, interval={EVAL_EVERY})\n"
                f"evaluation = dict(interval={EVAL_EVERY}, metric='mIoU', pre_eval=True)\n")


@pytest.mark.parametrize("meta, given", [
    ({"env_info": "x", "config": MMSEG_CONFIG, "seed": 0, "exp_name": "x.py"}, {}),  # mmseg 0.x's config text
    ({"env_info": "x", "config": json.dumps({"eval_interval": EVAL_EVERY, "max_iters": LAST})}, {}),  # psp-zoo's
    ({"env_info": "x", "seed": 0}, {"eval_interval": EVAL_EVERY, "max_iters": LAST}),  # the caller's schedule
])
def test_an_mmseg_log_s_validations_are_placed_by_the_evaluation_interval(tmp_path, meta, given):
    text = without_train_iter(write_run_log(tmp_path / "run.log.json", 0, LAST).read_text(), meta)
    log = parse_log(text, "mmseg.log.json", **given)
    assert [v.iteration for v in log.val] == VALIDATED and all(v.exact for v in log.val)
    assert log.best_val.iteration == 420


def test_without_the_evaluation_interval_the_output_says_the_iterations_are_approximate(tmp_path, served):
    text = without_train_iter(write_run_log(tmp_path / "run.log.json", 0, LAST).read_text(), {"env_info": "x"})
    log = parse_log(text, "mmseg.log.json")
    assert [v.iteration for v in log.val] == [50, 100, 150, 200, 250, 350, 400, 450]  # the train line before each
    assert not any(v.exact for v in log.val)
    text = render_comparison(compare_with_table(get_checkpoint(NAME, manifest=served("")), log))
    assert "  best val mIoU  92.00 (table 74.50, +17.50) at about iteration 400" in text.splitlines()
    assert ("  8 validation(s) placed approximately, at the training line before each: the log records neither "
            "their iteration nor the evaluation interval") in text.splitlines()


def _resumed_run(work: Path) -> tuple:
    """A run killed after iteration 270 and resumed from its checkpoint at 200: two logs, the second
    opening with a validation (240) and logging 240 and 250 again."""
    first = write_run_log(work / "20260101_000000.log.json", 0, 270)
    second = write_run_log(work / "20260101_010000.log.json", 200, LAST)
    assert json.loads(second.read_text().splitlines()[1])["mode"] == "val"
    return first, second


def _read_as_one_run(log) -> None:
    assert [v.iteration for v in log.val] == VALIDATED and all(v.exact for v in log.val)
    assert [s.iteration for s in log.train] == LOGGED
    assert log.best_val.iteration == 420


@pytest.mark.parametrize("form", ["work dir", "A B", "B A", "--log A --log B", "one file"])
def test_logs_log_takes_a_work_dir_several_files_or_one(capsys, served, tmp_path, form):
    first, second = _resumed_run(tmp_path / "work")
    argv = {"work dir": ["--log", tmp_path / "work"], "A B": ["--log", first, second],
            "B A": ["--log", second, first], "--log A --log B": ["--log", first, "--log", second],
            "one file": ["--log", second]}[form]
    code, out, err = _logs(capsys, served(log_0x()), tmp_path / "cache", "--json", *argv)
    assert code == 0, err
    report = json.loads(out)
    if form == "one file":  # the resumed launch alone: its first validation at 240, not at its 6 steps
        assert (report["train_lines"], report["val_lines"]) == (4, 5)
        assert report["log"] == str(second)
    else:
        assert (report["train_lines"], report["val_lines"]) == (len(LOGGED), len(VALIDATED))
        assert report["log"] == f"{first}, {second}"  # in time order, whatever the order given
    assert report["best_val"] == {"iter": 420, "mIoU": pytest.approx(92.0), "exact": True}
    assert report["last_val"] == {"iter": LAST, "mIoU": pytest.approx(81.0), "exact": True}


def test_a_resumed_run_s_logs_are_one_run_and_plotted_so(tmp_path):
    first, second = _resumed_run(tmp_path / "work")
    log = read_logs([second, first])
    _read_as_one_run(log)
    assert read_logs([second]).val[0].iteration == 240
    pytest.importorskip("matplotlib")
    assert list(log_figure(log).axes[1].lines[0].get_xdata()) == VALIDATED


def test_the_glob_of_docs_training_md_reads_the_whole_run(tmp_path):
    (command,) = [line for line in (REPO / "docs" / "training.md").read_text().splitlines()
                  if line.startswith("psp-zoo logs ")]
    command = command.split("#")[0].strip()
    work = tmp_path / re.search(r"--log (\S+)/\*\.log\.json", command).group(1)
    _resumed_run(work)
    env = {**os.environ, "PYTHONPATH": str(REPO), "PSP_ZOO_OFFLINE": "1", "PSP_ZOO_HOME": str(tmp_path / "cache")}
    done = subprocess.run(command.replace("psp-zoo ", f"{sys.executable} -m psp_zoo ", 1), shell=True,
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "at iteration 420" in done.stdout and f"{len(VALIDATED)} validation lines" in done.stdout
    # offline, the published log beneath cannot be fetched: said, and the run's own curves drawn
    assert "the published log is not drawn" in done.stderr
    assert (tmp_path / re.search(r"--plot (\S+)", command).group(1)).read_bytes().startswith(PNG_SIGNATURE)


@pytest.mark.parametrize("make, message", [
    (lambda tmp: tmp / "nowhere.log.json", "no such training log: {tmp}/nowhere.log.json; give a .log.json file or "
                                           "the run's work dir"),
    (lambda tmp: tmp, "{tmp} holds no *.log.json file; give the work dir of a psp-zoo train run, or the log files "
                      "themselves"),
])
def test_a_log_path_that_holds_no_log_is_one_clear_error(capsys, served, tmp_path, make, message):
    (tmp_path / "empty").mkdir()
    code, out, err = _logs(capsys, served(log_0x()), tmp_path / "cache", "--log", make(tmp_path / "empty"))
    assert code == 2 and out == ""
    assert err.strip() == "psp-zoo logs: error: " + message.format(tmp=tmp_path / "empty")
