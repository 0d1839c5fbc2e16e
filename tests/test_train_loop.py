"""psp-zoo train end to end on a generated ADE20K-layout set: resume after a kill, Ctrl-C, the files written."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from psp_zoo.errors import PspZooError
from psp_zoo.hub.options import FetchOptions
from psp_zoo.manifest.loading import get_manifest
from psp_zoo.model import PSPNet
from psp_zoo.results.published_logs import read_log
from psp_zoo.results.records import read_result
from psp_zoo.testing import write_shapes_ade20k
from psp_zoo.training.checkpoints import LATEST, point, pointed, save_checkpoint
from psp_zoo.training.loop import RUN_OPTIONS, train
from psp_zoo.training.recipe import RECIPE_FIELDS, recipe_for
from psp_zoo.training.schedule import learning_rate
from psp_zoo.training.trainer import Trainer

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures" / "mmseg"
NAME = "shapes_pspnet_r18-d8_64x64_ade20k"
MANIFEST = f"""models:
  - name: {NAME}
    dataset: ade20k
    backbone: R-18-D8
    crop_size: [64, 64]
    schedule: 300
    weights: http://127.0.0.1:1/{NAME}-00000000.pth
    published: {{}}
    test: {{img_scale: [64, 64]}}
    model: {{num_classes: 4, stem_channels: 8, base_channels: 8, channels: 16, aux_channels: 8}}
    train: {{img_scale: [64, 64], batch_size: 2, gpus: 1, pretrained: null, log_interval: 2}}
"""
PUBLISHED_META = {"mmcv_version", "time", "iter", "epoch", "CLASSES", "PALETTE", "config", "env_info", "seed",
                  "exp_name", "mmseg_version"}


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    write_shapes_ade20k(root / "ADEChallengeData2016", train=8, val=3, seed=1)
    (root / "manifest.yml").write_text(MANIFEST)
    return root


def _command(shapes: Path, work_dir: Path, *extra: str) -> list:
    return [sys.executable, "-m", "psp_zoo", "train", NAME, "--data-root", str(shapes), "--work-dir", str(work_dir),
            "--manifest", str(shapes / "manifest.yml"), "--num-workers", "0", "--device", "cpu", *extra]


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def _run(command: list) -> subprocess.CompletedProcess:
    done = subprocess.run(command, capture_output=True, text=True, env=_env(), timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def _wait_for(path: Path, process: subprocess.Popen, timeout: float = 300) -> None:
    began = time.monotonic()
    while not path.exists():
        assert process.poll() is None, process.stderr.read()[-3000:]
        assert time.monotonic() - began < timeout, f"{path} never appeared"
        time.sleep(0.05)


def test_a_killed_run_resumes_to_the_same_weights(shapes, tmp_path):
    schedule = ["--max-iters", "6", "--checkpoint-interval", "2", "--eval-interval", "3"]
    _run(_command(shapes, tmp_path / "straight", *schedule))
    killed = subprocess.Popen(_command(shapes, tmp_path / "killed", *schedule), stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True, env=_env())
    _wait_for(tmp_path / "killed" / "iter_2.pth", killed)
    killed.send_signal(signal.SIGKILL)
    killed.wait(60)
    resumed = _run(_command(shapes, tmp_path / "killed", *schedule))
    assert "resumed at iteration" in resumed.stderr
    straight = torch.load(tmp_path / "straight" / "iter_6.pth", weights_only=True)
    again = torch.load(tmp_path / "killed" / "iter_6.pth", weights_only=True)
    assert straight["state_dict"].keys() == again["state_dict"].keys()
    for key, value in straight["state_dict"].items():
        assert torch.equal(value, again["state_dict"][key]), key
    for index, state in straight["optimizer"]["state"].items():
        assert torch.equal(state["momentum_buffer"], again["optimizer"]["state"][index]["momentum_buffer"])
    assert pointed(tmp_path / "killed", LATEST).name == "iter_6.pth"


def test_the_files_of_a_run(shapes, tmp_path):
    """Published checkpoint format, pointers, a log psp_zoo.results.published_logs reads, a checkpoint evaluate
    loads."""
    work = tmp_path / "run"
    _run(_command(shapes, work, "--max-iters", "4", "--eval-interval", "2", "--checkpoint-interval", "2"))
    saved = torch.load(work / "iter_4.pth", weights_only=True)
    assert set(saved) == {"meta", "state_dict", "optimizer"}
    assert PUBLISHED_META <= set(saved["meta"]) and saved["meta"]["iter"] == 4
    assert json.loads(saved["meta"]["config"])["max_iters"] == 4
    assert (work / "latest.pth").resolve().name == "iter_4.pth" and (work / "best.pth").exists()
    lines = [json.loads(line) for path in work.glob("*.log.json") for line in path.read_text().splitlines()]
    assert "env_info" in lines[0] and json.loads(lines[0]["config"])["max_iters"] == 4
    assert lines[0]["batch"].startswith("total batch 2 = 2 images x 1 process(es) x 1 accumulation step(s) "
                                        "(published: 2 images x 1 GPUs")
    train_lines = [line for line in lines if line.get("mode") == "train"]
    val_lines = [line for line in lines if line.get("mode") == "val"]
    # log every 2 iterations, validation at 2 and 4: mmcv writes no train line at a validation
    assert train_lines == [] and len(val_lines) == 2
    assert {"aAcc", "mIoU", "mAcc", "IoU.0", "Acc.3", "lr", "epoch"} <= set(val_lines[0]) and val_lines[0]["iter"] == 3
    log = read_log(next(work.glob("*.log.json")))
    assert len(log.val) == 2
    record_path = tmp_path / "record.json"
    evaluated = subprocess.run([sys.executable, "-m", "psp_zoo", "evaluate", NAME, "--data-root", str(shapes),
                                "--checkpoint", str(work / "iter_4.pth"), "--manifest", str(shapes / "manifest.yml"),
                                "--json", str(record_path), "--device", "cpu"],
                               capture_output=True, text=True, env=_env(), timeout=600)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    record = read_result(record_path)
    assert record.miou == pytest.approx(100 * val_lines[-1]["mIoU"], abs=0.006)
    logs = subprocess.run([sys.executable, "-m", "psp_zoo", "logs", NAME, "--log", str(next(work.glob("*.log.json"))),
                           "--manifest", str(shapes / "manifest.yml"), "--json"],
                          capture_output=True, text=True, env=_env(), timeout=300)
    assert logs.returncode == 0, logs.stderr[-3000:]
    report = json.loads(logs.stdout)
    assert report["val_lines"] == 2 and report["last_val"]["mIoU"] == pytest.approx(100 * val_lines[-1]["mIoU"])


def test_ctrl_c_saves_and_exits_130(shapes, tmp_path):
    work = tmp_path / "interrupted"
    process = subprocess.Popen(_command(shapes, work, "--max-iters", "1000", "--checkpoint-interval", "2",
                                        "--eval-interval", "1000"),
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=_env())
    _wait_for(work / "iter_2.pth", process)
    process.send_signal(signal.SIGINT)
    assert process.wait(120) == 130
    latest = pointed(work, LATEST)
    saved = torch.load(latest, weights_only=True)
    assert saved["meta"]["iter"] >= 2 and latest.name == f"iter_{saved['meta']['iter']}.pth"
    assert "interrupted" in process.stderr.read()


@pytest.mark.parametrize("keys, name", [
    ("r50-d8", "pspnet_r50-d8_512x1024_40k_cityscapes"), ("r101-d8", "pspnet_r101-d8_512x1024_40k_cityscapes"),
    ("r18-d8", "pspnet_r18-d8_512x1024_80k_cityscapes"), ("r18b-d8", "pspnet_r18b-d8_512x1024_80k_cityscapes"),
    ("r50b-d8", "pspnet_r50b-d8_512x1024_80k_cityscapes")])
def test_the_checkpoint_has_the_published_keys_shapes_and_dtypes(tmp_path, keys, name):
    """A full-size network's checkpoint as the loop writes it, against mmseg's key file (built, not trained)."""
    entry = get_manifest().get(name)
    trainer = Trainer(PSPNet(**entry.model_kwargs()), recipe_for(entry.name), device="cpu")
    state = trainer.state_dict()
    path = save_checkpoint(tmp_path, 8000, state["model"], state["optimizer"], {"iter": 8000})
    written = torch.load(path, weights_only=True)["state_dict"]
    expected = []
    for line in (FIXTURES / f"pspnet_{keys}_state_dict_keys.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            key, shape, dtype = line.split("\t")
            expected.append((key, shape, dtype))
    assert [(k, str(tuple(v.shape)), str(v.dtype).replace("torch.", "")) for k, v in written.items()] == expected


def test_ctrl_c_with_loader_workers_says_stopping_once(shapes, tmp_path):
    """A terminal's Ctrl-C reaches the whole process group: the loader's workers too."""
    work = tmp_path / "interrupted"
    command = _command(shapes, work, "--max-iters", "1000", "--checkpoint-interval", "2", "--eval-interval", "1000")
    command[command.index("--num-workers") + 1] = "2"
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=_env(),
                               start_new_session=True)
    _wait_for(work / "iter_2.pth", process)
    os.killpg(process.pid, signal.SIGINT)
    assert process.wait(120) == 130
    assert process.stderr.read().count("stopping after this iteration") == 1


def test_a_finished_run_rerun_is_reported_and_left_as_it_is(shapes, tmp_path):
    work = tmp_path / "run"
    schedule = ("--max-iters", "2", "--eval-interval", "2", "--checkpoint-interval", "2")
    _run(_command(shapes, work, *schedule))
    before = {path.name: (path.stat().st_mtime_ns, path.read_bytes()) for path in work.iterdir()}
    time.sleep(1.1)  # a new log would carry another second in its name
    again = _run(_command(shapes, work, *schedule))
    assert "already trained: 2 iterations" in again.stdout and "nothing to do" in again.stdout
    assert {path.name: (path.stat().st_mtime_ns, path.read_bytes()) for path in work.iterdir()} == before


def test_pretrained_is_the_recipe_field_alone(shapes, tmp_path):
    """--set pretrained=NAME sets the recipe's backbone; --no-pretrained (no_pretrained=) skips loading it."""
    assert not set(RUN_OPTIONS) & set(RECIPE_FIELDS)  # one name, one meaning
    work = tmp_path / "cli"
    _run(_command(shapes, work, "--max-iters", "1", "--set", "pretrained=resnet50", "--no-pretrained"))
    assert json.loads(torch.load(work / "iter_1.pth", weights_only=True)["meta"]["config"])["pretrained"] == "resnet50"
    result = train(NAME, data_root=shapes, work_dir=tmp_path / "api", pretrained="resnet50", no_pretrained=True,
                   max_iters=1, device="cpu", num_workers=0, progress=False,
                   fetch=FetchOptions(manifest=str(shapes / "manifest.yml")))
    assert result.iterations == 1 and result.recipe.pretrained == "resnet50"


def test_set_takes_recipe_fields_not_run_options(shapes, tmp_path, capsys):
    """--set seed=3 would reach train() as the run option: refused, pointing at --seed, nothing written."""
    from psp_zoo.cli import main
    assert main([str(a) for a in _command(shapes, tmp_path / "work", "--set", "seed=3")[3:]]) == 2
    assert "--set seed=3: seed is not a recipe field but a run option; give --seed instead" in capsys.readouterr().err
    assert not (tmp_path / "work").exists()


def test_best_pth_follows_a_validation_between_checkpoints(shapes, tmp_path, monkeypatch):
    """A validation that improves the best mIoU off the checkpoint interval still gets its checkpoint, as mmseg's
    save_best does: best.pth points at the iteration of the best score (it was left unset, and the summary line
    crashed on it)."""
    from psp_zoo.training import loop

    scores = iter([0.30, 0.50, 0.40])  # validations at 1, 2, 3: the best at 2, between checkpoints
    monkeypatch.setattr(loop, "_validate", lambda *args: next(scores))
    result = train(NAME, data_root=shapes, work_dir=tmp_path / "run", max_iters=3, eval_interval=1,
                   checkpoint_interval=100, no_pretrained=True, device="cpu", num_workers=0, progress=False,
                   fetch=FetchOptions(manifest=str(shapes / "manifest.yml")))
    assert result.best.resolve().name == "iter_2.pth" and result.best_miou == pytest.approx(50.0)
    assert torch.load(result.best, weights_only=True)["meta"]["psp_zoo"]["best"] == {"miou": 0.5, "iteration": 2}
    assert result.checkpoint.name == "iter_3.pth"


def _files(work: Path) -> dict:
    return {path.name: (path.stat().st_mtime_ns, path.read_bytes()) for path in work.iterdir()}


def test_a_larger_max_iters_continues_a_finished_run_on_the_new_schedule(shapes, tmp_path):
    """A finished 4-iteration run rerun with --max-iters 20 trains on to 20 from iter_4.pth: the lr of the
    continued steps is the poly schedule over 20 (as mmseg resumes a config whose max_iters was raised), the
    intervals follow 20 (every 2), and the log's meta line says the run was extended (it was refused as
    "other settings")."""
    work = tmp_path / "run"
    _run(_command(shapes, work, "--max-iters", "4", "--eval-interval", "4", "--checkpoint-interval", "4"))
    assert not (work / "iter_2.pth").exists()
    extended = _run(_command(shapes, work, "--max-iters", "20"))
    assert "resumed at iteration 4 of 20; extended from 4 to 20 iterations" in extended.stderr
    assert {f"iter_{n}.pth" for n in range(4, 21, 2)} <= {path.name for path in work.iterdir()}
    assert pointed(work, LATEST).name == "iter_20.pth"
    last = torch.load(work / "iter_20.pth", weights_only=True)["meta"]["psp_zoo"]
    assert last["iteration"] == 20 and last["recipe"]["max_iters"] == 20 and last["recipe"]["eval_interval"] == 2
    lines = [json.loads(line) for log in sorted(work.glob("*.log.json")) for line in log.read_text().splitlines()]
    metas = [line for line in lines if "exp_name" in line]
    assert [meta.get("extended", "") for meta in metas][-1].startswith("from 4 to 20 iterations at iteration 4")
    recipe = recipe_for(NAME, manifest=str(shapes / "manifest.yml"), max_iters=20)
    vals = {line["train_iter"]: line["lr"] for line in lines if line.get("mode") == "val" and line["train_iter"] > 4}
    assert sorted(vals) == list(range(6, 21, 2))
    for done, lr in vals.items():  # a val line's lr is that of the step just taken (0-based iteration done - 1)
        expected = learning_rate(recipe, done - 1)
        assert abs(lr - expected) <= 1e-6 * recipe.lr, (done, lr, expected)
    assert abs(vals[6] - learning_rate(recipe_for(NAME, manifest=str(shapes / "manifest.yml"), max_iters=4), 3)) \
        > 0.1 * recipe.lr  # the old schedule would have been told apart


def _api_train(shapes: Path, work: Path, **settings):
    return train(NAME, data_root=shapes, work_dir=work, device="cpu", num_workers=0, progress=False,
                 fetch=FetchOptions(manifest=str(shapes / "manifest.yml")), **settings)


def test_a_resume_refuses_fewer_iterations_than_done_and_any_other_change(shapes, tmp_path):
    """max_iters under the iterations done, or any other recipe field changed (with or without a new
    max_iters, intervals alone included), is refused in one line before anything is written."""
    work = tmp_path / "run"
    _api_train(shapes, work, max_iters=4, eval_interval=4, checkpoint_interval=2)
    before = _files(work)
    with pytest.raises(PspZooError, match=r"holds a run 4 iterations in \(of 4\); max_iters 3 would not "
                                          r"continue it: give more than 4") as refused:
        _api_train(shapes, work, max_iters=3, eval_interval=4, checkpoint_interval=2)
    assert "\n" not in str(refused.value)
    same = {"max_iters": 4, "eval_interval": 4, "checkpoint_interval": 2}
    for changed, named in [({"max_iters": 8, "lr": 0.02}, "lr"), ({**same, "lr": 0.02}, "lr"),
                           ({"max_iters": 8, "crop_size": 32}, "crop_size"), ({**same, "eval_interval": 1},
                                                                              "eval_interval")]:
        with pytest.raises(PspZooError, match=rf"holds a run with other settings \({named}\); resume it with "
                                              r"the same settings \(a larger max_iters alone continues it\)"):
            _api_train(shapes, work, **changed)
    assert _files(work) == before


def test_a_new_max_iters_continues_an_unfinished_run(shapes, tmp_path):
    """An unfinished run (at 2 of 4) continues to a new max_iters above the iterations done, with the given
    intervals; the latest checkpoint's recipe is the new one, so rerunning it is a finished run."""
    work = tmp_path / "run"
    _api_train(shapes, work, max_iters=4, eval_interval=4, checkpoint_interval=2)
    (work / "iter_4.pth").unlink()
    point(work / "iter_2.pth", LATEST)  # as a run killed after its checkpoint at 2 leaves it
    assert pointed(work, LATEST).name == "iter_2.pth"
    result = _api_train(shapes, work, max_iters=6, eval_interval=3, checkpoint_interval=3)
    assert result.iterations == 6 and result.checkpoint.name == "iter_6.pth" and (work / "iter_3.pth").exists()
    again = _api_train(shapes, work, max_iters=6, eval_interval=3, checkpoint_interval=3)
    assert again.already_finished
