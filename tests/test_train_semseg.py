"""The PSPNet authors' training recipe (hszhao/semseg tool/train.py) as recipe data: lr groups, their poly,
their loss normalization, their epochs, their augmentation; each against an independent re-statement."""
from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from psp_zoo.errors import PspZooError
from psp_zoo.manifest.loading import load_manifest
from psp_zoo.model import PSPNet
from psp_zoo.testing import write_shapes_ade20k
from psp_zoo.training.pipeline import Draws, TrainTransform, sample_rng
from psp_zoo.training.recipe import Recipe, recipe_from_entry
from psp_zoo.training.schedule import iterations_per_epoch, learning_rate
from psp_zoo.training.semseg_pipeline import SemsegTransform, transform_for
from psp_zoo.training.trainer import Trainer
from tests.helpers import REPO, assert_close_to_scale

MEAN = (123.675, 116.28, 103.53)  # their mean: (0.485, 0.456, 0.406) x 255, RGB
STD = (58.395, 57.12, 57.375)
#: their config's TRAIN block as psp-zoo recipe fields (config/ade20k/ade20k_pspnet50.yaml)
THEIR_SETTINGS = dict(pipeline="semseg", head_lr_mult=10.0, avg_non_ignore=True, min_lr=0.0, weight_decay=1e-4,
                      lr=0.01, momentum=0.9, power=0.9, aux_weight=0.4, rotate_range=(-10.0, 10.0),
                      ratio_range=(0.5, 2.0), pretrained=None)


def _recipe(**changes) -> Recipe:
    values = dict(name="narrow", dataset="ade20k", num_classes=5, img_scale=(33, 33), crop_size=(33, 33),
                  batch_size=2, gpus=1, dropout=0.0, max_iters=5, **THEIR_SETTINGS)
    values.update(changes)
    return Recipe(**values)


def _narrow_model(seed: int = 0) -> PSPNet:
    torch.manual_seed(seed)
    model = PSPNet(depth=18, num_classes=5, align_corners=True, stem_channels=8, base_channels=8, channels=8,
                   aux_channels=8)
    for module in model.modules():  # BN away from identity, so a wrong normalization shows
        if isinstance(module, nn.BatchNorm2d):
            nn.init.uniform_(module.weight, 0.5, 1.5)
            nn.init.uniform_(module.bias, -0.2, 0.2)
    return model


def _batch(images: int = 2, seed: int = 1):
    """Images and labels with very different numbers of ignored pixels per image."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(images, 3, 33, 33, generator=generator, dtype=torch.float64)
    y = torch.randint(0, 5, (images, 33, 33), generator=generator)
    y[0, :25] = 255  # image 0: most pixels ignored
    y[-1, :, :3] = 255
    return x, y


def _their_poly(base_lr: float, curr_iter: int, max_iter: int, power: float = 0.9) -> float:
    return base_lr * (1 - float(curr_iter) / max_iter) ** power  # util/util.py poly_learning_rate


def _their_steps(model: PSPNet, images, labels, steps: int, max_iter: int, gpus: int, sync_bn: bool = True):
    """tool/train.py's loop re-stated: SGD over layer0-4 at base_lr and ppm/cls/aux at 10 x, each GPU's
    nn.CrossEntropyLoss(ignore_index=255) mean over its images (SyncBN: one forward for the batch), DDP's
    mean over GPUs, the lr set after each step from current_iter = i + 1. Returns the losses."""
    base_lr = 0.01
    backbone = list(model.backbone.parameters())
    heads = list(model.decode_head.parameters()) + list(model.auxiliary_head.parameters())
    optimizer = torch.optim.SGD([dict(params=backbone, lr=base_lr), dict(params=heads, lr=base_lr * 10)],
                                lr=base_lr, momentum=0.9, weight_decay=1e-4)
    criterion = nn.CrossEntropyLoss(ignore_index=255)
    for module in model.modules():  # the comparison runs without dropout (the trainer's is keyed per sample)
        if isinstance(module, nn.Dropout2d):
            module.p = 0.0
    model.train()
    losses = []
    for i in range(steps):
        per_gpu = labels.shape[0] // gpus
        parts = [slice(g * per_gpu, (g + 1) * per_gpu) for g in range(gpus)]
        size = labels.shape[-2:]
        if sync_bn:  # SyncBN: BatchNorm over every GPU's images, one forward
            features = model.backbone(images)
            main = F.interpolate(model.decode_head(features), size=size, mode="bilinear", align_corners=True)
            aux = F.interpolate(model.auxiliary_head(features), size=size, mode="bilinear", align_corners=True)
            mains, auxes = [main[p] for p in parts], [aux[p] for p in parts]
        else:  # plain BN under DDP: each GPU's forward alone
            mains, auxes = [], []
            for p in parts:
                features = model.backbone(images[p])
                mains.append(F.interpolate(model.decode_head(features), size=size, mode="bilinear",
                                           align_corners=True))
                auxes.append(F.interpolate(model.auxiliary_head(features), size=size, mode="bilinear",
                                           align_corners=True))
        loss = sum(criterion(main, labels[p]) + 0.4 * criterion(aux, labels[p])
                   for main, aux, p in zip(mains, auxes, parts)) / gpus
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        current_lr = _their_poly(base_lr, i + 1, max_iter)
        optimizer.param_groups[0]["lr"] = current_lr
        optimizer.param_groups[1]["lr"] = current_lr * 10
    return losses


@pytest.mark.parametrize("batch_size,gpus", [(2, 1), (1, 2)])
def test_trainer_step_equals_their_train_loop_step(batch_size, gpus):
    """Three steps of Trainer.step on their recipe = three steps of their loop, weights and losses (float64);
    with 2 GPUs of 1 image each, each GPU's loss is averaged over its own non-ignored pixels."""
    images, labels = _batch()
    model = _narrow_model().double()
    theirs = copy.deepcopy(model)
    trainer = Trainer(model, _recipe(batch_size=batch_size, gpus=gpus), device="cpu", dtype=torch.float64)
    ours = [trainer.step(images, labels).loss for _ in range(3)]
    expected = _their_steps(theirs, images, labels, 3, max_iter=5, gpus=gpus)
    assert_close_to_scale(ours, expected, 1e-10)
    ours_state, their_state = trainer.model.state_dict(), theirs.state_dict()
    for key, value in their_state.items():
        if value.is_floating_point():
            assert_close_to_scale(ours_state[key], value, 1e-9)
    # the yardstick can tell: mmseg's normalization (all label pixels) on the same steps ends elsewhere
    mmseg = Trainer(_narrow_model().double(), _recipe(batch_size=batch_size, gpus=gpus, avg_non_ignore=False),
                    device="cpu", dtype=torch.float64)
    assert abs(mmseg.step(images, labels).loss - expected[0]) > 1e-3 * abs(expected[0])


def test_accumulation_chunks_step_like_their_gpus_without_syncbn():
    """One process accumulating 2 chunks of their 2 GPUs' images = their DDP step with plain BatchNorm
    (each chunk's BatchNorm alone, the documented difference), each GPU averaged over its own pixels."""
    images, labels = _batch(images=4)
    model = _narrow_model().double()
    theirs = copy.deepcopy(model)
    trainer = Trainer(model, _recipe(batch_size=2, gpus=2), device="cpu", dtype=torch.float64, accumulation=2)
    ours = [trainer.step(images, labels).loss for _ in range(3)]
    assert_close_to_scale(ours, _their_steps(theirs, images, labels, 3, max_iter=5, gpus=2, sync_bn=False), 1e-10)
    for key, value in theirs.state_dict().items():
        if value.is_floating_point():
            assert_close_to_scale(trainer.model.state_dict()[key], value, 1e-9)


def test_lr_per_group_follows_their_loop_over_a_schedule():
    """Backbone at base x (1 - k/max)^0.9, heads at 10 x that, no floor, step 0 at base: what their loop
    sets after each step from current_iter = k + 1; the heads' parameters are exactly the head group's."""
    max_iters = 7
    trainer = Trainer(_narrow_model(), _recipe(max_iters=max_iters), device="cpu")
    backbone, heads = trainer.optimizer.param_groups
    assert {id(p) for p in backbone["params"]} == {id(p) for p in trainer.model.backbone.parameters()}
    assert {id(p) for p in heads["params"]} == {
        id(p) for name in ("decode_head", "auxiliary_head") for p in getattr(trainer.model, name).parameters()}
    images, labels = _batch()
    their_lr = 0.01  # their optimizer's initial lr; then set after each step
    for k in range(max_iters):
        result = trainer.step(images.float(), labels)
        assert result.lr == pytest.approx(their_lr, rel=1e-12)
        assert backbone["lr"] == pytest.approx(their_lr, rel=1e-12)
        assert heads["lr"] == pytest.approx(10 * their_lr, rel=1e-12)
        assert their_lr == pytest.approx(0.01 * (1 - k / max_iters) ** 0.9, rel=1e-12)
        their_lr = _their_poly(0.01, k + 1, max_iters)
    assert their_lr == 0  # no floor: mmcv's min_lr 1e-4 would leave 1e-4 here


def test_head_lr_mult_follows_mmcvs_per_group_poly_with_a_floor():
    """mmcv's poly runs on each group's initial lr: with a floor, (10 lr - min_lr) * coeff + min_lr."""
    recipe = _recipe(min_lr=1e-4, max_iters=10)
    assert learning_rate(recipe, 4, lr0=0.1) == pytest.approx((0.1 - 1e-4) * 0.6 ** 0.9 + 1e-4, rel=1e-12)


def test_an_ordinary_recipe_keeps_one_group_and_mmsegs_loss():
    trainer = Trainer(_narrow_model(), _recipe(head_lr_mult=1.0, avg_non_ignore=False), device="cpu")
    assert len(trainer.optimizer.param_groups) == 1


@pytest.mark.parametrize("images,expected", [(2975, 186), (20210, 1263), (10582, 661), (16, 1), (15, 1), (8, 0)])
def test_iterations_per_epoch_is_their_distributed_loader(images, expected):
    """ceil(N / 8) per GPU, then 2 at a time with drop_last: Cityscapes gets 186, not floor(2975 / 16) = 185."""
    assert iterations_per_epoch(images, 8, 2) == expected


def test_epochs_set_max_iters_from_the_training_set():
    recipe = _recipe(epochs=200, batch_size=2, gpus=8, max_iters=37200, eval_interval=3720,
                     checkpoint_interval=3720)
    sized = recipe.for_training_set(2975)
    assert (sized.max_iters, sized.eval_interval, sized.checkpoint_interval) == (37200, 3720, 3720)
    small = recipe.for_training_set(40)  # ceil(40 / 8) = 5 images per GPU: 2 iterations an epoch
    assert (small.max_iters, small.eval_interval) == (400, 40)
    assert _recipe(max_iters=5).for_training_set(40).max_iters == 5  # no epochs: unchanged
    with pytest.raises(PspZooError, match="make no batch"):
        recipe.for_training_set(8)


def test_recipe_fields_are_checked():
    recipe = _recipe()
    with pytest.raises(PspZooError, match=r"training setting 'pipeline': expected 'mmseg' or 'semseg'"):
        recipe.with_overrides({"pipeline": "hszhao"})
    with pytest.raises(PspZooError, match=r"'rotate_range': expected two angles"):
        recipe.with_overrides({"rotate_range": (10, -10)})
    with pytest.raises(PspZooError, match=r"'avg_non_ignore': expected true or false"):
        recipe.with_overrides({"avg_non_ignore": "yes"})
    with pytest.raises(PspZooError, match=r"'epochs': expected a whole number >= 1"):
        recipe.with_overrides({"epochs": 0})
    assert recipe.with_overrides({"epochs": None}).epochs is None


def test_transform_is_selected_by_the_recipe():
    assert isinstance(transform_for(_recipe(), 255), SemsegTransform)
    assert isinstance(transform_for(_recipe(pipeline="mmseg"), 255), TrainTransform)
    semseg = transform_for(_recipe(crop_size=(41, 39), rotate_range=(-5.0, 7.0), flip_prob=0.25), 7)
    assert (semseg.crop_size, semseg.rotate_range, semseg.flip_prob, semseg.ignore_index) == ((41, 39), (-5, 7),
                                                                                              0.25, 7)


# ---------------------------------------------------------------------------------------------
# their augmentation, re-stated: util/transform.py's steps in their order, numpy for flip/pad/crop


def _their_sample(image_bgr, label, rng, crop=(41, 39), scale_range=(0.5, 2.0), rotate=(-10.0, 10.0)):
    """(normalized 3 x h x w image, label, what was drawn), drawing from ``rng`` in their order."""
    image = image_bgr[:, :, ::-1].astype(np.float32)
    drawn = {}
    scale = scale_range[0] + (scale_range[1] - scale_range[0]) * rng.random()
    image = cv2.resize(image, None, fx=scale, fy=scale, interpolation=cv2.INTER_LINEAR)
    label = cv2.resize(label, None, fx=scale, fy=scale, interpolation=cv2.INTER_NEAREST)
    drawn["size"] = label.shape
    drawn["rotated"] = rng.random() < 0.5
    if drawn["rotated"]:
        angle = rotate[0] + (rotate[1] - rotate[0]) * rng.random()
        h, w = label.shape
        matrix = cv2.getRotationMatrix2D((w / 2, h / 2), angle, 1)
        image = cv2.warpAffine(image, matrix, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT,
                               borderValue=MEAN)
        label = cv2.warpAffine(label, matrix, (w, h), flags=cv2.INTER_NEAREST, borderMode=cv2.BORDER_CONSTANT,
                               borderValue=255)
    if rng.random() < 0.5:
        image = cv2.GaussianBlur(image, (5, 5), 0)
    drawn["flipped"] = rng.random() < 0.5
    if drawn["flipped"]:
        image, label = image[:, ::-1], label[:, ::-1]
    h, w = label.shape
    pad_h, pad_w = max(crop[0] - h, 0), max(crop[1] - w, 0)
    pads = ((int(pad_h / 2), pad_h - int(pad_h / 2)), (int(pad_w / 2), pad_w - int(pad_w / 2)))
    image = np.stack([np.pad(image[:, :, c], pads, constant_values=np.float32(MEAN[c])) for c in range(3)], 2)
    label = np.pad(label, pads, constant_values=255)
    h_off = int(rng.integers(0, label.shape[0] - crop[0] + 1))
    w_off = int(rng.integers(0, label.shape[1] - crop[1] + 1))
    drawn["padded"] = pad_h > 0 or pad_w > 0
    image = image[h_off:h_off + crop[0], w_off:w_off + crop[1]]
    label = label[h_off:h_off + crop[0], w_off:w_off + crop[1]]
    image = (image - np.float32(MEAN)) / np.float32(STD)
    return image.transpose(2, 0, 1), label.astype(np.int64), drawn


def _odd_sample(seed: int = 3, size=(37, 53)):
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
    label = rng.integers(0, 6, size, dtype=np.uint8)
    label[:4] = 255
    return image, label


def test_pipeline_draws_match_their_transforms_on_odd_sizes():
    """40 keyed samples of a 37 x 53 image into a 41 x 39 crop: scaled sizes, rotation, flip and crop
    padding all occur, and every output equals the re-statement drawn from the same generator."""
    image, label = _odd_sample()
    transform = SemsegTransform(crop_size=(41, 39))
    seen = {"rotated": set(), "flipped": set(), "padded": set()}
    sizes = set()
    for sample in range(40):
        ours_image, ours_label = transform(image, label, sample_rng(5, 2, sample))
        their_image, their_label, drawn = _their_sample(image, label, sample_rng(5, 2, sample))
        assert ours_image.shape == (3, 41, 39) and ours_image.dtype == np.float32
        assert ours_label.shape == (41, 39) and ours_label.dtype == np.int64
        np.testing.assert_array_equal(ours_label, their_label)
        assert_close_to_scale(ours_image, their_image, 1e-6)
        sizes.add(drawn["size"])
        for key in seen:
            seen[key].add(drawn[key])
    assert all(values == {True, False} for values in seen.values()), seen
    assert min(sizes) < (37, 53) < max(sizes)
    # the draws are the sample's and nothing else's: the same key gives the same sample
    again = transform(image, label, sample_rng(5, 2, 7))
    np.testing.assert_array_equal(again[0], transform(image, label, sample_rng(5, 2, 7))[0])
    assert not np.array_equal(again[0], transform(image, label, sample_rng(5, 3, 7))[0])


def test_rotation_and_crop_pad_with_the_mean_and_the_ignore_label():
    """A constant image at scale 1 rotated 30 degrees into a larger crop: the rotated-out corners and the
    crop's border (int(pad / 2) before, the rest after) hold the mean and 255; normalized, the mean is 0."""
    image = np.full((37, 53, 3), 200, np.uint8)
    label = np.full((37, 53), 3, np.uint8)
    transform = SemsegTransform(crop_size=(42, 58), ratio_range=(1.0, 1.0), rotate_range=(30.0, 30.0))
    sample = next(s for s in range(100) if _rotates(sample_rng(0, 0, s)))
    rgb, ours = transform.geometric(image[:, :, ::-1].astype(np.float32), label, Draws(sample_rng(0, 0, sample)))
    assert ours.shape == (42, 58) and rgb.shape == (42, 58, 3)
    # the crop's padding: 5 rows -> 2 above, 3 below; 5 columns -> 2 left, 3 right
    for rows, cols in ((slice(0, 2), slice(None)), (slice(39, 42), slice(None)),
                       (slice(None), slice(0, 2)), (slice(None), slice(55, 58))):
        assert (ours[rows, cols] == 255).all()
        np.testing.assert_array_equal(rgb[rows, cols], np.broadcast_to(np.float32(MEAN), rgb[rows, cols].shape))
    inner_label, inner = ours[2:39, 2:55], rgb[2:39, 2:55]
    for corner in ((0, 0), (0, -1), (-1, 0), (-1, -1)):  # rotated out of the picture
        assert inner_label[corner] == 255
        np.testing.assert_array_equal(inner[corner], np.float32(MEAN))
    assert inner_label[18, 26] == 3 and (inner[18, 26] == 200).all()
    normalized, _ = transform(image, label, sample_rng(0, 0, sample))
    assert (normalized[:, 0, :] == 0).all() and (normalized[:, :, -1] == 0).all()


def _rotates(rng) -> bool:
    rng.random()  # the scale
    return rng.random() < 0.5


def test_pipeline_refuses_bad_input():
    with pytest.raises(PspZooError, match="rotate_range"):
        SemsegTransform(crop_size=(9, 9), rotate_range=(5.0, -5.0))
    with pytest.raises(PspZooError, match="uint8 BGR image"):
        SemsegTransform(crop_size=(9, 9))(np.zeros((9, 9, 3), np.float32), np.zeros((9, 9), np.uint8),
                                          sample_rng(0, 0, 0))


# ---------------------------------------------------------------------------------------------
# a user manifest entry with their recipe: info shows it, train runs it

NAME = "shapes_semseg_pspnet_r18_ade20k"
MANIFEST = f"""models:
  - name: {NAME}
    dataset: ade20k
    backbone: R-18-D8
    crop_size: [33, 33]
    schedule: 4
    weights: http://127.0.0.1:1/{NAME}-00000000.pth
    published: {{}}
    test: {{img_scale: [64, 64]}}
    model: {{num_classes: 4, stem_channels: 8, base_channels: 8, channels: 8, aux_channels: 8}}
    train: {{pipeline: semseg, head_lr_mult: 10, avg_non_ignore: true, min_lr: 0, weight_decay: 0.0001,
             epochs: 2, batch_size: 2, gpus: 2, pretrained: null, log_interval: 1, eval_interval: 4,
             checkpoint_interval: 4}}
"""


def test_user_entry_with_their_recipe_resolves_and_describes(tmp_path):
    path = tmp_path / "manifest.yml"
    path.write_text(MANIFEST)
    recipe = recipe_from_entry(load_manifest(path).get(NAME), str(path))
    assert (recipe.pipeline, recipe.head_lr_mult, recipe.avg_non_ignore, recipe.epochs) == ("semseg", 10, True, 2)
    text = recipe.describe()
    assert "the PSPNet authors' pipeline" in text and "rotate -10..10 degrees" in text
    assert "decode/auxiliary heads at 10 x lr" in text and "poly 0.9 to 0\n" in text
    assert "non-ignored pixels of each GPU's images" in text and "2 epochs of" in text


def test_train_runs_their_recipe_end_to_end(tmp_path):
    """``psp-zoo train`` on a user entry with their recipe: 10 images over 2 GPUs x 2 = ceil(10/2) // 2 = 2
    iterations an epoch, 2 epochs = 4 iterations, every loss finite."""
    write_shapes_ade20k(tmp_path / "ADEChallengeData2016", train=10, val=2, seed=1)
    (tmp_path / "manifest.yml").write_text(MANIFEST)
    run = subprocess.run([sys.executable, "-m", "psp_zoo", "train", NAME, "--data-root", str(tmp_path),
                          "--work-dir", str(tmp_path / "work"), "--manifest", str(tmp_path / "manifest.yml"),
                          "--num-workers", "0", "--device", "cpu"],
                         capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    meta = torch.load(tmp_path / "work" / "iter_4.pth", weights_only=True)["meta"]
    assert meta["psp_zoo"]["iteration"] == 4 and not (tmp_path / "work" / "iter_5.pth").exists()
    config = json.loads(meta["config"])
    assert (config["max_iters"], config["pipeline"], config["head_lr_mult"]) == (4, "semseg", 10.0)
    lines = [json.loads(line) for line in next((tmp_path / "work").glob("*.log.json")).read_text().splitlines()[1:]]
    train_lines = [line for line in lines if line["mode"] == "train"]
    assert [line["iter"] for line in train_lines] == [1, 2, 3]
    assert all(math.isfinite(line["loss"]) for line in train_lines)
    assert [line["lr"] for line in train_lines] == pytest.approx([0.01 * (1 - k / 4) ** 0.9 for k in range(3)])


# ---------------------------------------------------------------------------------------------
# the six entries: their configs' TRAIN blocks (config/<dataset>/<dataset>_pspnet<depth>.yaml)

#: name -> (epochs, crop, published training images: ADE20K training.txt, VOC trainaug, Cityscapes fine train)
THEIR_CONFIGS = {
    "semseg_pspnet50_ade20k": (100, 473, 20210), "semseg_pspnet101_ade20k": (100, 473, 20210),
    "semseg_pspnet50_voc2012": (50, 473, 10582), "semseg_pspnet101_voc2012": (50, 473, 10582),
    "semseg_pspnet50_cityscapes": (200, 713, 2975), "semseg_pspnet101_cityscapes": (200, 713, 2975),
}


@pytest.mark.parametrize("name", sorted(THEIR_CONFIGS))
def test_the_six_entries_train_with_their_configs(name):
    from psp_zoo.training.recipe import recipe_for

    epochs, crop, images = THEIR_CONFIGS[name]
    recipe = recipe_for(name)
    for key, value in THEIR_SETTINGS.items():
        if key != "pretrained":
            assert getattr(recipe, key) == value, key
    assert (recipe.batch_size, recipe.gpus, recipe.crop_size, recipe.epochs, recipe.flip_prob, recipe.dropout) == (
        2, 8, (crop, crop), epochs, 0.5, 0.1)
    assert recipe.max_iters == epochs * (-(-images // 8) // 2) == recipe.for_training_set(images).max_iters
    # their ImageNet start (initmodel/resnet*_v2.pth, a 64-64-128 deep stem) is not served, and mmseg's V1c
    # files have a 32-32-64 stem: the entries start from mmcv's initialization
    assert recipe.pretrained is None


def test_info_shows_their_recipe(capsys):
    from psp_zoo.cli import main

    assert main(["info", "semseg_pspnet101_cityscapes"]) == 0
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("train "))
    for part in ("pipeline=semseg", "head_lr_mult=10.0", "avg_non_ignore=True", "epochs=200", "max_iters=37200",
                 "min_lr=0.0", "weight_decay=0.0001", "crop_size=[713, 713]", "gpus=8", "batch_size=2"):
        assert part in line, part


_TWO_PROCESS_SCRIPT = """
import sys, torch
from psp_zoo.distributed import Distributed
from psp_zoo.training.trainer import Trainer
from tests.test_train_semseg import _batch, _narrow_model, _recipe

dist, device = Distributed.from_env(torch.device("cpu"))
images, labels = _batch(images=4)
part = slice(2 * dist.rank, 2 * dist.rank + 2)
per_gpu, gpus = int(sys.argv[2]), int(sys.argv[3])
trainer = Trainer(_narrow_model().double(), _recipe(batch_size=per_gpu, gpus=gpus), device="cpu",
                  dtype=torch.float64, distributed=dist)
losses = [trainer.step(images[part], labels[part]).loss for _ in range(2)]
if dist.is_main:
    torch.save({"losses": losses, "state": trainer.state_dict()["model"]}, sys.argv[1])
dist.close()
"""


@pytest.mark.parametrize("per_gpu,gpus", [(2, 2), (4, 1)])
def test_two_processes_average_each_gpu_over_its_own_pixels(tmp_path, per_gpu, gpus):
    """torchrun, 2 CPU processes x 2 images (SyncBN, DDP) = 1 process with the 4 images, their recipe, in
    float64; with one published GPU of 4 images its pixel count adds both processes' images."""
    script = tmp_path / "two.py"
    script.write_text(_TWO_PROCESS_SCRIPT)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
               str(tmp_path / "two.pt"), str(per_gpu), str(gpus)]
    run = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=REPO,
                         env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    two = torch.load(tmp_path / "two.pt", weights_only=True)
    images, labels = _batch(images=4)
    alone = Trainer(_narrow_model().double(), _recipe(batch_size=per_gpu, gpus=gpus), device="cpu",
                    dtype=torch.float64)
    assert_close_to_scale(two["losses"], [alone.step(images, labels).loss for _ in range(2)], 1e-9)
    state = alone.state_dict()["model"]
    for key, value in state.items():
        if value.is_floating_point():
            assert_close_to_scale(two["state"][key], value, 1e-8)
