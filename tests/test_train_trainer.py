"""Trainer.step against mmsegmentation's own training steps (tests/fixtures/mmseg/train_step_case.pt),
mmcv's lr formulas, and the pieces of a step (loss over all pixels, accumulation, state)."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from psp_zoo.errors import PspZooError
from psp_zoo.model import PSPNet
from psp_zoo.model.checkpoint import load_checkpoint
from psp_zoo.training.recipe import recipe_for
from psp_zoo.training.schedule import learning_rate, poly_lr, step_lr
from psp_zoo.training.trainer import Trainer, segmentation_loss

from helpers import max_rel_diff

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "mmseg"
CITYSCAPES = "pspnet_r50-d8_512x1024_40k_cityscapes"
RSB = "pspnet_r50-d8_rsb-pretrain_512x1024_adamw_80k_cityscapes"


def _case() -> dict:
    return torch.load(FIXTURES / "train_step_case.pt", weights_only=True)


def _tiny_model(case: dict) -> PSPNet:
    config = dict(case["config"])
    model = PSPNet(num_classes=config.pop("num_classes"), **config)
    load_checkpoint(model, FIXTURES / case["checkpoint"])
    return model


def _rel(ours: torch.Tensor, reference: torch.Tensor) -> float:
    """Largest difference relative to the reference tensor's largest magnitude."""
    ours, reference = ours.double(), reference.double()
    return ((ours - reference).abs().max() / reference.abs().max().clamp(min=1e-12)).item()


def _fixture_trainers(case: dict):
    """The Trainer of the fixture's recipe in float32, and the same one in float64 (its rounding yardstick)."""
    recipe = recipe_for(CITYSCAPES, max_iters=case["schedule"]["max_iters"], dropout=0.0)
    assert (recipe.lr, recipe.momentum, recipe.weight_decay) == tuple(
        case["optimizer"][k] for k in ("lr", "momentum", "weight_decay"))
    assert (recipe.power, recipe.min_lr) == (case["schedule"]["power"], case["schedule"]["min_lr"])
    model = _tiny_model(case)
    wide = copy.deepcopy(model).double()
    return Trainer(model, recipe, device="cpu"), Trainer(wide, recipe, device="cpu")


def test_three_steps_reproduce_mmsegmentation():
    """The reference's lr, losses, step-0 gradients and weights after three steps.

    The fixture's model is numerically touchy: our float32 and float64 gradients of step 0 differ
    by up to ~4e-3 of a tensor's largest value in the backbone (BatchNorm over 2 images amplifies
    rounding), and from step 1 on the trajectory is chaotic (the same code on 1 or 2 threads
    ends 3 steps ~25% apart in some BN statistics). So each tensor must match the reference to
    1e-4, OR to within a small multiple of its own float32 rounding, measured here as our float32
    minus our float64 result. A wrong loss (e.g. aux weight 0.41 instead of 0.4) is hundreds of
    times that yardstick; the reference's own rounding is within 1.5x of it (measured).
    """
    case = _case()
    trainer, wide = _fixture_trainers(case)
    images, labels = case["inputs"], case["labels"]
    for index, expected in enumerate(case["steps"]):
        result = trainer.step(images, labels)
        exact = wide.step(images.double(), labels)
        assert result.lr == pytest.approx(expected["lr"], rel=1e-12)
        parts = {"loss": "loss", "decode_loss": "decode_loss_ce", "aux_loss": "aux_loss_ce"}
        for ours, theirs in parts.items():
            value, yardstick = getattr(result, ours), abs(getattr(result, ours) - getattr(exact, ours))
            bound = 1e-5 * abs(expected[theirs]) if index == 0 else max(1e-5 * abs(expected[theirs]), 10 * yardstick)
            assert abs(value - expected[theirs]) <= bound, (index, ours, value, expected[theirs])
        if index == 0:
            assert result.decode_acc == pytest.approx(expected["decode_acc"], abs=0.01)  # < 1 pixel of 12288
            _check_gradients(trainer, wide, expected["grads"])
    _check_state(trainer, wide, case["state_dict_after"])


def _check_gradients(trainer: Trainer, wide: Trainer, reference: dict) -> None:
    ours = dict(trainer.model.named_parameters())
    exact = dict(wide.model.named_parameters())
    assert set(ours) == set(reference)
    within_1e4 = 0
    for name, grad in reference.items():
        difference = _rel(ours[name].grad, grad)
        yardstick = _rel(ours[name].grad, exact[name].grad.float())
        assert difference <= max(1e-4, 3 * yardstick), (name, difference, yardstick)
        within_1e4 += difference <= 1e-4
    # the heads, downstream of the touchy BatchNorms, match at the bound outright
    assert within_1e4 >= 10


def _check_state(trainer: Trainer, wide: Trainer, reference: dict) -> None:
    ours, exact = trainer.model.state_dict(), wide.model.state_dict()
    assert set(ours) == set(reference)
    for name, value in reference.items():
        if not value.is_floating_point():
            assert torch.equal(ours[name], value), name  # num_batches_tracked == 3
            continue
        difference, yardstick = _rel(ours[name], value), _rel(ours[name], exact[name].float())
        assert difference <= max(1e-4, 10 * yardstick), (name, difference, yardstick)


def test_poly_lr_is_mmcvs_formula():
    recipe = recipe_for(CITYSCAPES)
    lr0, max_iters = 0.01, 40000
    assert recipe.max_iters == max_iters
    for t in (0, 1, 1234, max_iters - 1):
        expected = (lr0 - 1e-4) * (1 - t / max_iters) ** 0.9 + 1e-4
        assert learning_rate(recipe, t) == pytest.approx(expected, rel=1e-15)
    assert learning_rate(recipe, 0) == 0.01
    # mmseg 1.x's PolyLR (max_iters - 1 in the denominator) is a different number
    assert learning_rate(recipe, max_iters - 1) != pytest.approx(
        (lr0 - 1e-4) * (1 - (max_iters - 1) / (max_iters - 1)) ** 0.9 + 1e-4, rel=1e-6)
    assert poly_lr(0.004, 10, 20, 0.9, 1e-4) == pytest.approx(0.0039 * 0.5 ** 0.9 + 1e-4)


def test_step_lr_with_linear_warmup_is_mmcvs_formula():
    recipe = recipe_for(RSB)
    lr0 = 5e-4
    assert (recipe.optimizer, recipe.warmup_iters, recipe.warmup_ratio, recipe.steps) == (
        "adamw", 1000, 0.001, (60000, 72000))
    for t in (0, 1, 500, 999):
        k = (1 - t / 1000) * (1 - 0.001)
        assert learning_rate(recipe, t) == pytest.approx(lr0 * (1 - k), rel=1e-14)
    assert learning_rate(recipe, 0) == pytest.approx(lr0 * 0.001)
    assert learning_rate(recipe, 1000) == lr0
    assert learning_rate(recipe, 59999) == lr0
    assert learning_rate(recipe, 60000) == pytest.approx(lr0 * 0.1)
    assert learning_rate(recipe, 72000) == pytest.approx(lr0 * 0.01)
    assert learning_rate(recipe, recipe.max_iters - 1) == pytest.approx(lr0 * 0.01)
    assert step_lr(1.0, 5, (5, 10), 0.5) == 0.5 and step_lr(1.0, 4, (5, 10), 0.5) == 1.0


def test_loss_averages_over_all_label_pixels():
    """Ignored (255) pixels count 0 in the mean (mmseg 0.x's avg_non_ignore=False), not left out."""
    torch.manual_seed(0)
    logits = torch.randn(1, 3, 4, 4)
    labels = torch.randint(0, 3, (1, 4, 4))
    labels[0, :2] = 255
    loss, acc = segmentation_loss(logits, labels, align_corners=False)
    per_pixel = torch.nn.functional.cross_entropy(logits, labels.clamp(max=2), reduction="none")
    kept = labels != 255
    assert loss.item() == pytest.approx((per_pixel * kept).sum().item() / 16)
    correct = (logits.argmax(1) == labels) & kept
    assert acc.item() == pytest.approx(100.0 * correct.sum().item() / kept.sum().item())


def test_state_dict_round_trip_continues_identically():
    case = _case()
    recipe = recipe_for(CITYSCAPES, max_iters=10)  # dropout 0.1: the seeded draws must be restored too
    images, labels = case["inputs"], case["labels"]
    straight = Trainer(_tiny_model(case), recipe, device="cpu", seed=3)
    for _ in range(3):
        straight.step(images, labels)
    first = Trainer(_tiny_model(case), recipe, device="cpu", seed=3)
    first.step(images, labels)
    saved = copy.deepcopy(first.state_dict())
    second = Trainer(_tiny_model(case), recipe, device="cpu")
    second.load_state_dict(saved)
    assert second.iteration == 1 and second.seed == 3
    for _ in range(2):
        second.step(images, labels)
    for key, value in straight.model.state_dict().items():
        assert torch.equal(value, second.model.state_dict()[key]), key


def test_accumulation_splits_the_batch_and_refuses_uneven_chunks():
    case = _case()
    recipe = recipe_for(CITYSCAPES, max_iters=10, dropout=0.0)
    images = torch.cat([case["inputs"], case["inputs"].flip(-1)])
    labels = torch.cat([case["labels"], case["labels"].flip(-1)])
    trainer = Trainer(_tiny_model(case), recipe, device="cpu", accumulation=2)
    result = trainer.step(images, labels)
    # each chunk of two images alone, averaged: what two GPUs with two images each would log
    alone = [Trainer(_tiny_model(case), recipe, device="cpu").step(images[i:i + 2], labels[i:i + 2])
             for i in (0, 2)]
    assert result.loss == pytest.approx(sum(r.loss for r in alone) / 2, rel=1e-6)
    assert result.decode_acc == pytest.approx(sum(r.decode_acc for r in alone) / 2, rel=1e-6)
    with pytest.raises(PspZooError, match="equal chunks"):
        trainer.step(images[:3], labels[:3])


def test_mixed_precision_needs_cuda():
    case = _case()
    recipe = recipe_for("pspnet_r101-d8_fp16_512x1024_80k_cityscapes")
    assert recipe.loss_scale == 512.0
    with pytest.raises(PspZooError, match="needs a CUDA device"):
        Trainer(_tiny_model(case), recipe, device="cpu")
    Trainer(_tiny_model(case), recipe, device="cpu", amp=False)  # float32 when asked


def test_fixture_describes_what_the_test_assumes():
    case = _case()
    assert case["schedule"]["type"] == "poly" and case["optimizer"]["type"] == "SGD"
    assert json.dumps(case["about"]).count("avg_non_ignore False") == 1


@pytest.mark.compile
def test_compiled_training_draws_the_eager_dropout_masks():
    """Under Trainer(compile=True) the keyed dropout masks are drawn outside the compiled graph: for two
    different (iteration, slots) keys the compiled heads' logits are the eager ones, while the two keys'
    draws differ far more; three steps' losses and weights are eager's.

    The steps run in float64: in float32 this model amplifies rounding chaotically (compiled and eager
    float32 losses part by ~1e-3 relative by the third step, and float32 eager is itself ~2e-3 from
    float64 eager at step 1), while in float64 compiled and eager agree to ~1e-9 after three steps
    (measured). A mask reused across keys, or a skipped update, moves the loss by ~1e-3 or more."""
    case = _case()
    images, labels = case["inputs"].double(), case["labels"]
    recipe = recipe_for(CITYSCAPES, max_iters=10, dropout=0.5)
    eager = Trainer(_tiny_model(case), recipe, device="cpu", seed=3, dtype=torch.float64)
    compiled = Trainer(_tiny_model(case), recipe, device="cpu", seed=3, compile=True, dtype=torch.float64)
    outputs = []
    for iteration, slots in [(0, (0, 1)), (1, (5, 2))]:
        for trainer in (eager, compiled):
            for dropout in trainer._dropouts:
                dropout.keys = (3, iteration, slots)
        # with autograd on, as in a step: the same compiled graph as step's (one compile, not two)
        ours, reference = compiled._forward(images), eager._forward(images)
        for out, ref in zip(ours, reference):
            assert max_rel_diff(out.detach(), ref.detach()) <= 1e-9
        outputs.append([ref.detach() for ref in reference])
    assert all(max_rel_diff(a, b) > 0.05 for a, b in zip(*outputs))  # the keys decide the masks
    start = [p.detach().clone() for p in eager._parameters()]
    losses = []
    for slots in [(0, 1), (5, 2), (3, 4)]:
        ours, reference = compiled.step(images, labels, slots), eager.step(images, labels, slots)
        assert ours.loss == pytest.approx(reference.loss, rel=1e-7), (len(losses), ours.loss, reference.loss)
        losses.append(reference.loss)
    assert min(abs(a - b) / abs(b) for a, b in zip(losses, losses[1:])) > 1e-3  # each step moves the loss
    for ours, reference in zip(compiled._parameters(), eager._parameters()):
        assert _rel(ours, reference) <= 1e-6  # measured <= 6e-8 after three steps
    assert max(_rel(p, q) for p, q in zip(eager._parameters(), start)) > 1e-2  # weights moved
