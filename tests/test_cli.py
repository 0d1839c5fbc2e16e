"""The command line as people meet it: one list of commands in workflow order, one vocabulary,
one-line errors, Ctrl-C, mistakes refused before any work, and messages that say what happened."""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

import psp_zoo.cli as cli
from psp_zoo.cli import build_parser, main
from psp_zoo.errors import PspZooError
from psp_zoo.results.records import write_result
from psp_zoo.testing import manifest_entry, write_manifest

import minidata
from helpers import make_record, one_line, run_cli, tiny_checkpoint_path, tiny_info, write_tiny_ade_manifest

SHARED = ("name", "--checkpoint", "--data-root", "--num-workers", "--device", "--manifest", "--cache-dir",
          "--mirror", "--offline", "--dataset")
FETCHING = ("get", "evaluate", "predict", "reproduce", "logs", "export", "info")
EVERY_COMMAND = {"list", "info", "get", "dataset", "evaluate", "predict", "reproduce", "tables", "show", "train",
                 "logs", "export", "selftest"}




def _subcommands() -> dict:
    action = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


# --------------------------------------------------------------------------------------------
# one vocabulary


def test_commands_are_listed_once_in_the_order_of_the_workflow(capsys):
    """One list (cli.COMMANDS) gives --help its order: a new command is one module and one line."""
    workflow = ["list", "info", "get", "dataset", "predict", "evaluate", "reproduce", "tables", "show", "train", "logs",
                "export", "selftest"]
    assert [module.__name__.rsplit(".", 1)[1] for module in cli.COMMANDS] == workflow
    assert list(_subcommands()) == workflow
    with pytest.raises(SystemExit):
        main(["--help"])
    shown = [line.split()[0] for line in capsys.readouterr().out.split("COMMAND\n", 1)[1].splitlines()
             if line.startswith("    ") and not line.startswith("     ")]
    assert shown == workflow
    for module in cli.COMMANDS:
        assert callable(module.add_parser) and callable(module.run)


def test_every_subcommand_has_a_description_and_every_option_a_help():
    commands = _subcommands()
    assert set(commands) == EVERY_COMMAND
    for name, parser in commands.items():
        assert parser.description and len(parser.description) > 40, name
        for action in parser._actions:
            assert action.help, f"{name}: {action.option_strings or action.dest} has no help"


def test_shared_options_read_the_same_everywhere():
    seen = {}
    for command, parser in _subcommands().items():
        for action in parser._actions:
            key = action.option_strings[0] if action.option_strings else action.dest
            if key in SHARED and key != "--dataset":
                # train's NAME may be left out (psp-zoo train --from SOURCE fine-tunes)
                nargs = None if (command, key) == ("train", "name") else action.nargs
                seen.setdefault(key, {})[command] = (action.metavar, action.help, nargs)
            if key == "--dataset":
                seen.setdefault(key, {})[command] = (action.metavar,)
    for key, by_command in seen.items():
        assert len(set(by_command.values())) == 1, f"{key} differs: {by_command}"
    # the old spellings are gone
    for parser in _subcommands().values():
        strings = {s for a in parser._actions for s in a.option_strings}
        assert "--workers" not in strings and all(a.dest != "model" for a in parser._actions)
    assert set(seen["name"]) >= {"evaluate", "info", "predict", "logs", "export"}
    assert set(seen["--checkpoint"]) == {"evaluate", "predict", "export"}
    assert set(seen["--data-root"]) == {"evaluate", "reproduce", "train"}


def test_every_fetching_command_takes_the_fetch_options():
    commands = _subcommands()
    for command in FETCHING:
        strings = {s for a in commands[command]._actions for s in a.option_strings}
        assert {"--manifest", "--cache-dir", "--mirror", "--offline"} <= strings, command


def test_ms_flip_cost_is_the_measured_one():
    texts = [a.help for p in _subcommands().values() for a in p._actions if a.help and "ms" in a.dest]
    assert texts and all("13x" in t and "6x" not in t for t in texts if "flip" in t)


# --------------------------------------------------------------------------------------------
# usage errors and Ctrl-C


@pytest.mark.parametrize("argv, where", [
    (["evaluate", "x"], "psp-zoo evaluate: error: the following arguments are required: --data-root"),
    (["selftest", "--port", "99999"], "psp-zoo selftest: error: argument --port: expected a port number"),
    (["list", "--format", "xml"], "psp-zoo list: error: argument --format: invalid choice"),
    (["nonsense"], "psp-zoo: error: argument COMMAND: invalid choice"),
    (["list", "--datset", "x"], "psp-zoo list: error: unrecognized arguments: --datset x"),
    ([], "psp-zoo: error: the following arguments are required: COMMAND"),
])
def test_a_command_line_mistake_is_one_line_and_exit_2(capsys, argv, where):
    with pytest.raises(SystemExit) as stop:
        main(argv)
    out, err = capsys.readouterr()
    line = one_line(err)
    assert stop.value.code == 2 and out == ""
    assert line.startswith(where) and line.endswith("--help)"), line


def test_ctrl_c_in_a_command_is_interrupted_exit_130(capsys, monkeypatch):
    def interrupted(args):
        raise KeyboardInterrupt
    monkeypatch.setattr(cli.list_command, "run", interrupted)
    code, out, err = run_cli(capsys, "list")
    assert code == 130 and one_line(err) == "psp-zoo list: interrupted"


def test_ctrl_c_while_the_parser_is_built_is_interrupted_exit_130(capsys, monkeypatch):
    def interrupted():
        raise KeyboardInterrupt
    monkeypatch.setattr(cli, "build_parser", interrupted)
    code, out, err = run_cli(capsys, "list")
    assert code == 130 and one_line(err) == "psp-zoo: interrupted"


def test_ctrl_c_during_a_lazy_import_is_interrupted(capsys, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def slow_import(name, *args, **kwargs):
        if name == "tabulate":
            raise KeyboardInterrupt
        return real_import(name, *args, **kwargs)
    monkeypatch.setattr(builtins, "__import__", slow_import)
    for name in ("tabulate", "psp_zoo.results.reports"):  # imported afresh, whatever earlier tests imported
        monkeypatch.delitem(sys.modules, name, raising=False)
    code, _, err = run_cli(capsys, "list")
    assert code == 130 and one_line(err) == "psp-zoo list: interrupted"


# --------------------------------------------------------------------------------------------
# messages


@pytest.fixture
def manifest(tmp_path) -> Path:
    checkpoint = tiny_checkpoint_path("r50")
    arch = {k: v for k, v in tiny_info("r50")["config"].items() if k not in ("depth", "num_classes")}
    entry = manifest_entry(checkpoint, checkpoint.as_uri(), num_classes=5, arch=arch,
                           test={"mode": "whole", "img_scale": [64, 32]})
    return write_manifest(tmp_path / "manifest.yml", [entry])


NAME = "tiny_pspnet_r50-d8"


def test_a_truncated_checkpoint_is_one_clean_sentence(capsys, tmp_path, manifest):
    data = tiny_checkpoint_path("r50").read_bytes()
    truncated = tmp_path / "cut.pth"
    truncated.write_bytes(data[: len(data) // 2])
    image = tmp_path / "pic.png"
    cv2.imwrite(str(image), np.zeros((8, 8, 3), np.uint8))
    code, _, err = run_cli(capsys, "predict", NAME, image, "--out", tmp_path / "out", "--device", "cpu",
                           "--manifest", manifest, "--checkpoint", truncated)
    line = one_line(err)
    assert code == 2
    assert line == (f"psp-zoo predict: error: {truncated} is truncated or corrupt, not a readable PyTorch "
                    f"checkpoint; delete it and download it again")


def test_a_refused_pickle_has_no_terminal_codes(tmp_path):
    import torch

    from psp_zoo.errors import CheckpointError
    from psp_zoo.model.checkpoint import read_checkpoint

    path = tmp_path / "code.pth"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "meta": {"x": argparse.Namespace(a=1)}}, path)
    with pytest.raises(CheckpointError) as caught:
        read_checkpoint(path)
    text = str(caught.value)
    assert "\x1b" not in text and "argparse.Namespace" in text and "arbitrary unpickling" in text


def test_a_folder_as_checkpoint_says_folder(capsys, tmp_path, manifest):
    image = tmp_path / "pic.png"
    cv2.imwrite(str(image), np.zeros((8, 8, 3), np.uint8))
    code, _, err = run_cli(capsys, "predict", NAME, image, "--out", tmp_path / "out", "--device", "cpu",
                           "--manifest", manifest, "--checkpoint", tmp_path)
    assert code == 2 and f"{tmp_path} is a folder, not a checkpoint file" in one_line(err)


def test_a_missing_data_root_says_it_does_not_exist(capsys, tmp_path, manifest):
    code, _, err = run_cli(capsys, "evaluate", NAME, "--data-root", tmp_path / "nonexist", "--device", "cpu",
                           "--manifest", manifest, "--checkpoint", tiny_checkpoint_path("r50"))
    line = one_line(err)
    assert code == 2 and f"{tmp_path / 'nonexist'} does not exist" in line and "not a folder" not in line


def test_an_unwritable_plot_names_the_requested_file(capsys, tmp_path):
    pytest.importorskip("matplotlib")
    requested = "/proc/x.png"
    code, _, err = run_cli(capsys, "tables", "--results", tmp_path, "--plot", requested)
    line = err.strip().splitlines()[-1]
    assert code == 2 and line.startswith(f"psp-zoo tables: error: --plot {requested}")
    assert ".tmp" not in line and "tmp" not in line.replace(str(tmp_path), "")


def test_list_shows_the_same_cache_state_as_info(capsys, tmp_path):
    # a file:// URL's own file would be used where it is: the entry here is hosted, so the cache counts
    checkpoint = tiny_checkpoint_path("r50")
    hosted = manifest_entry(checkpoint, f"http://127.0.0.1:1/{checkpoint.name}", num_classes=5)
    manifest = write_manifest(tmp_path / "hosted.yml", [hosted])
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / checkpoint.name).write_bytes(b"not the checkpoint")
    code, out, _ = run_cli(capsys, "info", NAME, "--manifest", manifest, "--cache-dir", cache, "--format", "json")
    assert code == 0 and json.loads(out)["cache_state"] == "corrupt"
    code, out, _ = run_cli(capsys, "list", "--pattern", NAME, "--manifest", manifest, "--cache-dir", cache)
    assert code == 0 and "| corrupt" in out.splitlines()[2]
    code, out, _ = run_cli(capsys, "list", "--pattern", NAME, "--manifest", manifest, "--cache-dir", cache,
                           "--format", "json")
    assert json.loads(out)[0]["cache_state"] == "corrupt"


# --------------------------------------------------------------------------------------------
# odd input


def test_list_with_a_pattern_that_matches_nothing_is_an_error(capsys):
    code, out, err = run_cli(capsys, "list", "--pattern", "nomatch*")
    assert code == 2 and out == "" and "'nomatch*'" in one_line(err)


def test_tables_with_an_empty_results_folder_warns(capsys, tmp_path):
    code, out, err = run_cli(capsys, "tables", "--results", tmp_path)
    assert code == 0 and "### Cityscapes" in out
    assert one_line(err) == (f"psp-zoo tables: warning: no results files in {tmp_path}; "
                             f"showing the published tables alone")


def test_predict_says_which_input_became_which_name(capsys, tmp_path, manifest):
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        cv2.imwrite(str(tmp_path / folder / "pic.png"), np.full((16, 20, 3), 90, np.uint8))
    code, out, err = run_cli(capsys, "predict", NAME, tmp_path / "a" / "pic.png", tmp_path / "b" / "pic.png",
                             "--out", tmp_path / "out", "--device", "cpu", "--manifest", manifest,
                             "--checkpoint", tiny_checkpoint_path("r50"), "--format", "npy")
    assert code == 0 and (tmp_path / "out" / "a_pic.npy").is_file() and (tmp_path / "out" / "b_pic.npy").is_file()
    notes = [line for line in err.strip().splitlines() if not line.startswith("psp-zoo: predicting ")]
    assert notes == [f"psp-zoo predict: note: {tmp_path / 'a' / 'pic.png'} is written as a_pic* "
                     f"(another input has the same name)",
                     f"psp-zoo predict: note: {tmp_path / 'b' / 'pic.png'} is written as b_pic* "
                     f"(another input has the same name)"]


@pytest.fixture
def unlabelled_ade(tmp_path):
    """An ADE20K folder whose labels all lie outside a 5-class model's range."""
    folder = tmp_path / "data" / "ADEChallengeData2016"
    minidata.write_ade20k(folder)
    for label in (folder / "annotations" / "validation").glob("*.png"):
        shape = np.asarray(Image.open(label)).shape
        Image.fromarray(np.full(shape, 100, np.uint8), mode="L").save(label)
    return folder


@pytest.fixture
def ade_manifest(tmp_path):
    """A user manifest serving the tiny r50 fixture as an ADE20K entry."""
    return write_tiny_ade_manifest(tmp_path / "tiny.yml", "{img_scale: [64, 32]}")


def test_evaluate_warns_when_no_pixel_was_scored(capsys, unlabelled_ade, ade_manifest, single_thread):
    code, out, err = run_cli(capsys, "evaluate", "tiny_pspnet_r50-d8_ade20k", "--data-root", unlabelled_ade.parent,
                             "--limit", "2", "--manifest", ade_manifest, "--checkpoint", tiny_checkpoint_path("r50"),
                             "--device", "cpu", "--num-workers", "0")
    warning = [line for line in err.splitlines() if "warning" in line]
    assert code == 0 and "aAcc -" in out
    assert len(warning) == 1 and warning[0].startswith(
        "psp-zoo evaluate: warning: no labelled pixel was scored in the 2 image(s)")


# --------------------------------------------------------------------------------------------
# show


def test_show_prints_per_class_and_published_beside_reproduced(capsys, tmp_path):
    record = make_record(miou=0.778, ms_flip=0.791)
    path = write_result(record, tmp_path / "r.json")
    code, out, err = run_cli(capsys, "show", path)
    lines = out.splitlines()
    assert code == 0 and err == ""
    assert lines[0].startswith("pspnet_r50-d8_512x1024_40k_cityscapes on cityscapes (500 images")
    header = lines[1].replace(" ", "")
    assert header == "|class|IoUsingle-scale|Accsingle-scale|IoUms+flip|Accms+flip|"
    road = next(line for line in lines if line.startswith("| road"))
    assert [c.strip() for c in road.strip("|").split("|")] == ["road", "90.00", "95.00", "90.00", "95.00"]
    rare = next(line for line in lines if line.startswith("| rare"))
    assert [c.strip() for c in rare.strip("|").split("|")][1:] == ["-"] * 4
    assert any(re.match(r"single-scale\s+aAcc 95.00  mIoU \S+  mAcc 85.00  published mIoU 77.85$", line)
               for line in lines), out
    assert any(line.startswith("ms+flip") and line.endswith("published mIoU 79.18") for line in lines), out


def test_show_of_a_limited_run_says_how_many_images_and_not_comparable(capsys, tmp_path):
    path = write_result(make_record(limit=10, count=10), tmp_path / "r.json")
    code, out, _ = run_cli(capsys, "show", path)
    lines = out.splitlines()
    assert code == 0 and lines[0].startswith("pspnet_r50-d8_512x1024_40k_cityscapes on cityscapes "
                                             "(10 of 500 images (--limit), ")
    assert lines[-1] == ("(only 10 of 500 images (--limit) were scored; the published mIoU is over all 500, "
                         "so the two are not comparable)")


def test_show_a_checkpoint_outside_the_manifest_and_a_bad_file(capsys, tmp_path):
    path = write_result(make_record(name="private_model", ms_flip=None), tmp_path / "p.json")
    code, out, _ = run_cli(capsys, "show", path)
    assert code == 0 and "published mIoU -" in out and "not in the manifest" in out
    assert "ms+flip" not in out
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    code, _, err = run_cli(capsys, "show", bad)
    assert code == 2 and str(bad) in one_line(err)


def test_selftest_refuses_a_port_out_of_range_before_any_step(capsys):
    from psp_zoo.errors import PspZooError
    from psp_zoo.selftest import run_selftest

    for port in (99999, -1, "80"):
        with pytest.raises(PspZooError, match="port must be a whole number from 0 to 65535"):
            run_selftest(port=port)
    assert capsys.readouterr().out == ""


# --------------------------------------------------------------------------------------------
# refused before any work


@pytest.mark.parametrize("command", sorted(FETCHING))
def test_a_bad_offline_setting_is_refused_by_every_command_that_reads_it(command, capsys, monkeypatch, tmp_path):
    image = tmp_path / "pic.png"
    cv2.imwrite(str(image), np.zeros((8, 8, 3), np.uint8))
    argv = {"get": ["get", NAME], "info": ["info", NAME], "logs": ["logs", NAME],
            "evaluate": ["evaluate", NAME, "--data-root", tmp_path], "predict": ["predict", NAME, image],
            "reproduce": ["reproduce", "--dataset", "cityscapes", "--data-root", tmp_path],
            "export": ["export", NAME, "--out", tmp_path / "m.onnx", "--format", "torchscript"]}[command]
    monkeypatch.setenv("PSP_ZOO_OFFLINE", "maybe")
    code, out, err = run_cli(capsys, *argv, "--cache-dir", tmp_path / "cache")
    assert code == 2 and out == ""
    assert one_line(err).startswith(f"psp-zoo {command}: error: PSP_ZOO_OFFLINE='maybe' is neither on")


def test_export_refuses_an_opset_before_downloading_anything(capsys, hub_server, hub_manifest, tmp_path):
    code, _, err = run_cli(capsys, "export", "tiny_r50", "--opset", "22", "--out", tmp_path / "m.onnx",
                           "--manifest", hub_manifest, "--cache-dir", tmp_path / "cache")
    assert code == 2 and "opset must be a whole number from 11 to 21, got 22" in one_line(err)
    assert hub_server.log == [] and not (tmp_path / "cache").exists()


def test_speed_images_below_what_the_library_takes_is_a_usage_error(capsys, tmp_path):
    from psp_zoo.constants import MIN_SPEED_IMAGES
    from psp_zoo.evaluation.reproduction import ReproduceOptions

    with pytest.raises(SystemExit) as stop:
        main(["reproduce", "--dataset", "cityscapes", "--data-root", str(tmp_path), "--speed-images", "1"])
    assert stop.value.code == 2
    assert "argument --speed-images: expected a whole number >= 2, got '1'" in one_line(capsys.readouterr().err)
    with pytest.raises(PspZooError, match="speed_images must be a whole number >= 2"):
        ReproduceOptions(speed_images=MIN_SPEED_IMAGES - 1).check()
    ReproduceOptions(speed_images=MIN_SPEED_IMAGES, speed_warmup=1).check()  # the least both accept
