"""`psp-zoo dataset example DIR`: the fine-tuning walk-through's example, written offline."""
from __future__ import annotations

import torch
import yaml

from psp_zoo.cli import main
from psp_zoo.model import PSPNet
from psp_zoo.model.checkpoint import load_checkpoint
from psp_zoo.testing import TINY_ARCH, example_declaration


def test_the_example_is_a_dataset_its_declaration_and_a_published_format_checkpoint(tmp_path, capsys):
    folder = tmp_path / "shapes"
    assert main(["dataset", "example", str(folder), "--train-images", "3"]) == 0
    out, err = capsys.readouterr()
    assert out.strip() == (f"wrote {folder}/images, {folder}/masks, the declaration {folder}/shapes.yml and the "
                           f"starting checkpoint {folder}/tiny_pspnet_r18-d8.pth")
    assert len(list((folder / "images" / "train").glob("*.jpg"))) == 3
    assert len(list((folder / "masks" / "val").glob("*_mask.png"))) == 8
    declared = yaml.safe_load((folder / "shapes.yml").read_text())["datasets"]["shapes"]
    assert declared == example_declaration(train={"ratio_range": [0.75, 1.5]})
    saved = torch.load(folder / "tiny_pspnet_r18-d8.pth", weights_only=True)
    assert set(saved) == {"meta", "state_dict"}
    load_checkpoint(PSPNet(depth=18, num_classes=5, **TINY_ARCH), folder / "tiny_pspnet_r18-d8.pth")  # strict
    assert main(["dataset", "check", str(folder), "--dataset", "shapes", "--manifest", str(folder / "shapes.yml")]) == 0


def test_a_folder_that_is_not_empty_is_refused_and_left_alone(tmp_path, capsys):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    assert main(["dataset", "example", str(folder)]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.strip() == (f"psp-zoo dataset: error: {folder} is not a new or empty folder; "
                                         f"choose another for the example")
    assert [p.name for p in folder.iterdir()] == ["notes.txt"]
