"""Every manifest entry's training recipe: the published facts, and overrides checked early."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from psp_zoo.errors import PspZooError
from psp_zoo.manifest.loading import get_manifest, load_manifest
from psp_zoo.training.recipe import RECIPE_FIELDS, Recipe, recipe_for, recipe_from_entry

REPO = Path(__file__).resolve().parents[1]


def test_every_entry_has_a_recipe_with_the_published_defaults():
    """mmseg's rows; the PSPNet authors' six follow their configs (test_train_semseg.py)."""
    manifest = get_manifest()
    for entry in manifest:
        if entry.family == "semseg":
            continue
        recipe = recipe_from_entry(entry)
        assert (recipe.pipeline, recipe.head_lr_mult, recipe.avg_non_ignore, recipe.epochs) == ("mmseg", 1, False, None)
        assert recipe.max_iters == entry.schedule
        assert recipe.eval_interval == recipe.checkpoint_interval == entry.schedule // 10
        assert recipe.crop_size == entry.crop_size and recipe.num_classes == entry.num_classes
        assert recipe.gpus == 4 and recipe.aux_weight == 0.4 and recipe.log_interval == 50
        assert recipe.batch_size == (2 if entry.dataset == "cityscapes" else 4)
        assert recipe.pretrained in manifest.backbones
        if "rsb" in entry.name:
            assert recipe.optimizer == "adamw" and recipe.grad_clip == 1.0 and recipe.policy == "step"
            assert recipe.pretrained == "resnet50_rsb-a1"
        else:
            assert (recipe.optimizer, recipe.policy, recipe.power, recipe.min_lr) == ("sgd", "poly", 0.9, 1e-4)
            expected = (0.004, 1e-4) if entry.dataset.startswith("pascal_context") else (0.01, 5e-4)
            assert (recipe.lr, recipe.weight_decay) == expected
        assert recipe.loss_scale == (512.0 if "fp16" in entry.name else None)


def test_dataset_scales_and_backbones_follow_the_configs():
    assert recipe_for("pspnet_r50-d8_512x1024_40k_cityscapes").img_scale == (2048, 1024)
    assert recipe_for("pspnet_r50-d8_769x769_40k_cityscapes").img_scale == (2049, 1025)
    loveda = [n for n in get_manifest().names if n.endswith("loveda")][0]
    assert recipe_for(loveda).img_scale == (2048, 512)  # testing uses (1024, 1024)
    assert recipe_for("pspnet_r50b-d8_512x1024_80k_cityscapes").pretrained == "resnet50"
    assert recipe_for("pspnet_r18-d8_512x1024_80k_cityscapes").pretrained == "resnet18_v1c"


def test_overrides_are_checked_field_by_field():
    recipe = recipe_for("pspnet_r50-d8_512x1024_40k_cityscapes", max_iters=200, lr=0.02, crop_size=64,
                        batch_size=1)
    assert (recipe.max_iters, recipe.eval_interval, recipe.lr, recipe.crop_size, recipe.total_batch) == (
        200, 20, 0.02, (64, 64), 4)
    assert recipe_for("pspnet_r50-d8_512x1024_40k_cityscapes", max_iters=200, eval_interval=7).eval_interval == 7
    bad = {"lr": -1, "crop_size": (1,), "batch_size": True, "optimizer": "adam", "steps": (5, 3),
           "dropout": 2.0, "warmup": "cosine"}
    for key, value in bad.items():
        with pytest.raises(PspZooError, match=f"'{key}'"):
            recipe_for("pspnet_r50-d8_512x1024_40k_cityscapes", **{key: value})
    with pytest.raises(PspZooError, match="unknown training setting 'learning_rate'; settable: img_scale"):
        recipe_for("pspnet_r50-d8_512x1024_40k_cityscapes", learning_rate=0.1)
    with pytest.raises(PspZooError, match="needs steps"):
        recipe_for("pspnet_r50-d8_512x1024_40k_cityscapes", policy="step")
    assert set(Recipe.__dataclass_fields__) - set(RECIPE_FIELDS) == {"name", "dataset", "num_classes"}


def test_a_bad_train_block_names_the_manifest_entry(tmp_path):
    path = tmp_path / "user.yml"
    path.write_text("models:\n"
                    "  - name: my_pspnet\n    dataset: ade20k\n    backbone: R-50-D8\n    crop_size: [64, 64]\n"
                    "    schedule: 100\n    weights: http://127.0.0.1:1/my_pspnet-0123abcd.pth\n"
                    "    hash: \"0123abcd\"\n    published: {}\n    train: {lr: fast}\n")
    entry = load_manifest(path).get("my_pspnet")
    with pytest.raises(PspZooError, match=r"models 'my_pspnet': field 'train': training setting 'lr'"):
        recipe_from_entry(entry, str(path))


def test_a_user_entry_trains_its_own_class_count_and_a_tenth_of_its_schedule(tmp_path):
    """An entry whose model has fewer classes than its dataset (a test model) trains that many, with
    checkpoints and validations every tenth of its own schedule."""
    path = tmp_path / "user.yml"
    path.write_text("models:\n"
                    "  - name: my_pspnet\n    dataset: ade20k\n    backbone: R-18-D8\n    crop_size: [64, 64]\n"
                    "    schedule: 25\n    weights: http://127.0.0.1:1/my_pspnet-0123abcd.pth\n"
                    "    hash: \"0123abcd\"\n    published: {}\n    model: {num_classes: 4}\n")
    recipe = recipe_from_entry(load_manifest(path).get("my_pspnet"), str(path))
    assert (recipe.name, recipe.dataset, recipe.num_classes) == ("my_pspnet", "ade20k", 4)
    assert recipe.eval_interval == recipe.checkpoint_interval == 2 and recipe.settings()["max_iters"] == 25
    assert not {"name", "dataset", "num_classes"} & set(recipe.settings())


def test_recipes_need_no_torch():
    code = ("import sys\nfrom psp_zoo.training.recipe import recipe_for\n"
            "print(recipe_for('pspnet_r50-d8_512x1024_40k_cityscapes').describe())\n"
            "print('torch' in sys.modules)\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                         env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "SGD lr 0.01 momentum 0.9 weight_decay 0.0005" in run.stdout
    assert run.stdout.strip().endswith("False")


def test_info_shows_the_recipe(capsys):
    from psp_zoo.cli import main

    assert main(["info", "pspnet_r101-d8_480x480_40k_pascal_context"]) == 0
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("train "))
    assert "lr=0.004" in line and "weight_decay=0.0001" in line and "max_iters=40000" in line
    assert "pretrained=resnet101_v1c" in line and "crop_size=[480, 480]" in line
