"""Learning works: a narrow PSPNet trained from scratch through the command line segments held-out shapes."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from psp_zoo.results.records import read_result
from psp_zoo.testing import SHAPE_CLASSES, write_shapes_ade20k

REPO = Path(__file__).resolve().parents[1]
NAME = "shapes_pspnet_r18-d8_64x64_ade20k"
# A narrow R-18-D8 from scratch (AdamW: from-scratch SGD needs many more iterations); images are 64x64,
# resized to 128x128 (16x16 logits) for sharper edges. About 2-3 minutes on 2 quiet cores.
MANIFEST = f"""models:
  - name: {NAME}
    dataset: ade20k
    backbone: R-18-D8
    crop_size: [64, 64]
    schedule: 400
    weights: http://127.0.0.1:1/{NAME}-00000000.pth
    published: {{}}
    test: {{img_scale: [128, 128]}}
    model: {{num_classes: {len(SHAPE_CLASSES)}, stem_channels: 16, base_channels: 16, channels: 32, aux_channels: 16}}
    train: {{img_scale: [128, 128], batch_size: 8, gpus: 1, pretrained: null, optimizer: adamw, lr: 0.005,
            weight_decay: 0.0001, eval_interval: 400, checkpoint_interval: 400}}
"""


def _psp_zoo(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-m", "psp_zoo", *args], capture_output=True, text=True, env=env,
                          timeout=1800)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_training_from_scratch_segments_held_out_shapes(tmp_path):
    write_shapes_ade20k(tmp_path / "data" / "ADEChallengeData2016", train=128, val=8, seed=0)
    write_shapes_ade20k(tmp_path / "held_out" / "ADEChallengeData2016", train=0, val=24, seed=1)
    (tmp_path / "manifest.yml").write_text(MANIFEST)
    manifest = ["--manifest", str(tmp_path / "manifest.yml"), "--device", "cpu"]
    _psp_zoo("train", NAME, "--data-root", str(tmp_path / "data"), "--work-dir", str(tmp_path / "work"), *manifest)
    _psp_zoo("evaluate", NAME, "--data-root", str(tmp_path / "held_out"), "--checkpoint",
             str(tmp_path / "work" / "latest.pth"), "--json", str(tmp_path / "held_out.json"), *manifest)
    record = read_result(tmp_path / "held_out.json")
    assert record.images.count == 24
    assert record.miou >= 90.0, record.iou
