"""`psp-zoo logs` and psp_zoo.results.published_logs: published training logs, served from 127.0.0.1, beside
the table."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from PIL import Image

from psp_zoo.cli import main
from psp_zoo.manifest.loading import get_checkpoint
from psp_zoo.results.published_logs import LogError, compare_with_table, log_figure, parse_log, render_comparison
from psp_zoo.testing import manifest_entry, write_manifest

from helpers import tiny_checkpoint_path

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
    assert report["last_val"] == {"iter": 12000, "mIoU": pytest.approx(72.5)}
    assert report["best_val"] == {"iter": 8000, "mIoU": pytest.approx(74.0)}
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
