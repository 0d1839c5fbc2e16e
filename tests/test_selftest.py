"""`psp-zoo selftest`: passes offline in a clean environment, and says which step broke and why."""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
import socket
import subprocess
import sys

import pytest
import torch

from psp_zoo import PSPNet, PspZooError, load_checkpoint
from psp_zoo.cli import main
from psp_zoo.selftest import run_selftest
from psp_zoo.testing import TINY_ARCH, write_tiny_checkpoint

from helpers import REPO

pytestmark = pytest.mark.usefixtures("single_thread")

STEPS = ("versions", "devices", "user cache", "fast path", "tiny checkpoint", "local server", "download",
         "mini dataset", "evaluate", "results table", "predict")


def _outcomes(report: str) -> dict:
    """{step: its outcome text} from the report's step lines."""
    found = {}
    for line in report.splitlines():
        for step in STEPS:
            if line.startswith(f"  {step} ") and line[2 + len(step):].startswith(" "):
                found[step] = line[2 + len(step):].strip()
    return found


def test_selftest_passes_offline_in_a_clean_environment(tmp_path):
    home = tmp_path / "home"
    env = {**os.environ, "PYTHONPATH": str(REPO), "HOME": str(home), "TORCH_HOME": str(home / "torch"),
           "PSP_ZOO_HOME": str(home / "psp-zoo"), "OMP_NUM_THREADS": "1",
           # a proxy that does not exist: the download from 127.0.0.1 must not go through it
           "HTTP_PROXY": "http://127.0.0.1:9", "http_proxy": "http://127.0.0.1:9"}
    for var in ("PSP_ZOO_MANIFEST", "PSP_ZOO_MIRROR", "PSP_ZOO_OFFLINE", "NO_PROXY", "no_proxy"):
        env.pop(var, None)
    keep = tmp_path / "kept"
    process = subprocess.run([sys.executable, "-m", "psp_zoo", "selftest", "--keep", str(keep)],
                             capture_output=True, text=True, env=env, timeout=300)
    outcomes = _outcomes(process.stdout)
    assert process.returncode == 0, process.stdout + process.stderr
    assert list(outcomes) == list(STEPS) and all(o.startswith("ok") for o in outcomes.values()), process.stdout
    assert "selftest: all 11 steps ok" in process.stdout
    assert re.search(r"torch \S+, torchvision \S+, numpy \S+, opencv \S+, python \d", outcomes["versions"])
    assert not home.exists()  # the user's caches were never written

    cached = list((keep / "cache").glob("*.pth"))
    assert len(cached) == 1 and re.fullmatch(r"selftest_pspnet_r50-d8_64x64_cityscapes_\d{8}_\d{6}-[0-9a-f]{8}\.pth",
                                             cached[0].name)
    assert hashlib.sha256(cached[0].read_bytes()).hexdigest()[:8] == cached[0].stem[-8:]
    record = json.loads(next((keep / "results").rglob("*.json")).read_text())
    assert record["images"]["count"] == 4 and f"{record['metrics']['single_scale']['mIoU']:.2f}" in process.stdout
    assert len(list((keep / "predictions").glob("*_overlay.png"))) == 4


def test_a_taken_port_fails_the_server_step_and_skips_what_needs_it(capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        code = main(["selftest", "--port", str(port)])
    report = capsys.readouterr().out
    outcomes = _outcomes(report)
    assert code == 1
    assert outcomes["local server"].startswith(f"FAILED: cannot serve on 127.0.0.1:{port} (")
    assert "choose a free port, or 0 for any (--port)" in outcomes["local server"]
    assert outcomes["download"] == "skipped (needs: local server)"
    assert outcomes["evaluate"] == "skipped (needs: download)"
    assert outcomes["results table"] == "skipped (needs: evaluate)"
    assert outcomes["mini dataset"].startswith("ok") and outcomes["tiny checkpoint"].startswith("ok")
    assert "selftest: 5 of 11 steps did not pass: local server, download, evaluate, results table, predict" in report


def test_an_unwritable_cache_is_reported_and_the_rest_still_runs(tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"  # a folder cannot be made below a file, even by root
    blocker.write_text("")
    monkeypatch.setenv("PSP_ZOO_HOME", str(blocker / "cache"))
    stream = io.StringIO()
    assert run_selftest(stream=stream, device="cpu") == 1
    outcomes = _outcomes(stream.getvalue())
    assert outcomes["user cache"].startswith(f"FAILED: cannot write to the checkpoint cache {blocker / 'cache'}")
    assert "set PSP_ZOO_HOME to a writable folder" in outcomes["user cache"]
    assert [s for s, o in outcomes.items() if not o.startswith("ok")] == ["user cache"]
    assert not (blocker.parent / "cache").exists()


def test_keep_refuses_a_folder_with_files(capsys, tmp_path):
    (tmp_path / "mine.txt").write_text("precious")
    assert main(["selftest", "--keep", str(tmp_path)]) == 2
    assert "choose a new or empty folder" in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ["mine.txt"]


def test_the_tiny_checkpoint_is_in_the_published_format(tmp_path):
    path = write_tiny_checkpoint(tmp_path, "tiny_x", num_classes=7, stamp="20240102_030405")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert path.name == f"tiny_x_20240102_030405-{digest[:8]}.pth"
    saved = torch.load(path, weights_only=True)
    assert set(saved) == {"meta", "state_dict"} and saved["meta"]["arch"]["num_classes"] == 7
    model = PSPNet(depth=50, num_classes=7, **TINY_ARCH)
    load_checkpoint(model, path)  # strict: every key and shape fits
    running_var = saved["state_dict"]["backbone.layer4.2.bn3.running_var"]
    assert not torch.allclose(running_var, torch.ones_like(running_var))  # calibrated, not the default 1s
    again = write_tiny_checkpoint(tmp_path / "again", "tiny_x", num_classes=7, stamp="20240102_030405")
    assert again.name == path.name  # same seed, same bytes


def test_a_port_out_of_range_is_a_clear_error(tmp_path):
    from psp_zoo.testing import serve_folder

    with pytest.raises(PspZooError, match="port 99999 is not a TCP port; choose one in 1..65535, or 0"):
        with serve_folder(tmp_path, 99999):
            pass
