"""Whole / slide / ms+flip inference against mmseg's outputs and the reference recipe."""
from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from psp_zoo import ms_flip_inference, predict_probs, slide_inference, whole_inference
from psp_zoo.datasets.transforms import normalize, to_tensor
from psp_zoo.evaluation.inference import slide_windows
from psp_zoo.manifest.loading import EvalSettings as Settings

from helpers import TINY, assert_close_to_scale, max_rel_diff, tiny_expected, tiny_model

TOL = 2e-5  # of the reference logits' largest magnitude (~4 here)


@pytest.mark.parametrize("tag", TINY)
@pytest.mark.parametrize("align_corners", [False, True])
def test_whole_and_slide_match_reference(tag, align_corners):
    model, expected = tiny_model(tag, align_corners), tiny_expected(tag, align_corners)
    whole = whole_inference(model, expected["whole_input"], (120, 160))
    assert whole.shape == (1, 5, 120, 160)
    assert_close_to_scale(whole, expected["whole_logits_rescaled_120x160"], TOL)
    crop, stride = expected["slide_crop"], expected["slide_stride"]
    batched = slide_inference(model, expected["slide_input"], crop, stride)
    one_by_one = slide_inference(model, expected["slide_input"], crop, stride, batch_size=1)
    assert_close_to_scale(batched, expected["slide_logits"], TOL)
    assert_close_to_scale(one_by_one, expected["slide_logits"], TOL)
    # Batched convolutions may round differently from single ones in the last bits only.
    assert (batched - one_by_one).abs().max() <= 1e-5


def test_slide_window_grid():
    windows = slide_windows(150, 200, (65, 65), (43, 43))
    assert len(windows) == 3 * 5  # rows = (150-65+42)//43+1, cols = (200-65+42)//43+1
    assert windows[0] == (0, 65, 0, 65) and windows[1] == (0, 65, 43, 108)
    assert windows[-1] == (85, 150, 135, 200)  # shifted back inside the image
    assert {(y2 - y1, x2 - x1) for y1, y2, x1, x2 in windows} == {(65, 65)}
    covered = np.zeros((150, 200), dtype=int)
    for y1, y2, x1, x2 in windows:
        covered[y1:y2, x1:x2] += 1
    assert covered.min() >= 1
    # A window larger than the image is clipped to it, never padded.
    assert slide_windows(40, 300, (65, 65), (43, 43))[:2] == [(0, 40, 0, 65), (0, 40, 43, 108)]
    assert slide_windows(30, 30, (480, 480), (320, 320)) == [(0, 30, 0, 30)]


class PositionalModel(nn.Module):
    """A per-pixel linear map plus a horizontal ramp: deterministic per crop, and not
    flip-equivariant, so an un-undone flip changes its output. Records every input it sees."""

    align_corners = False
    num_classes = 3

    def __init__(self):
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.weight = nn.Parameter(torch.randn(3, 3, generator=generator), requires_grad=False)
        self.calls = []

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        ramp = torch.linspace(-2, 2, x.shape[3]).view(1, 1, 1, -1)
        return torch.einsum("kc,nchw->nkhw", self.weight, x) + ramp * torch.tensor([1.0, -2.0, 0.5]).view(1, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.extend(x.clone())
        return self.logits(x)


def test_slide_batching_sums_like_the_one_window_loop():
    model = PositionalModel()
    img = torch.randn(2, 3, 50, 70)
    batched = slide_inference(model, img, (32, 32), (20, 20))
    assert len(model.calls) == 2 * 2 * 3  # images x rows x cols
    model.calls.clear()
    one_by_one = slide_inference(model, img, (32, 32), (20, 20), batch_size=1)
    assert torch.equal(batched, one_by_one)
    for index in range(2):  # images of a batch are independent
        assert torch.equal(batched[index:index + 1], slide_inference(model, img[index:index + 1], (32, 32), (20, 20)))


# Image 30 x 50 with img_scale (64, 32): the six ms+flip targets are (32,16), (48,24), (64,32),
# (80,40), (96,48), (112,56), giving these (h, w) by the keep-ratio rule (worked out by hand).
MS_SIZES = [(16, 27), (24, 40), (32, 53), (40, 67), (48, 80), (56, 93)]


def _reference_ms_flip(model: PositionalModel, image: np.ndarray) -> tuple:
    """The 12 inputs and the mean probability, spelled out step by step from docs/reference.md."""
    inputs, probs = [], []
    for h, w in MS_SIZES:
        resized = cv2.resize(image, (w, h), interpolation=cv2.INTER_LINEAR)
        plain = to_tensor(normalize(resized)).unsqueeze(0)
        for flip in (False, True):
            x = plain.flip(3) if flip else plain
            inputs.append(x[0])
            out = model.logits(x)
            out = out.flip(3) if flip else out
            out = F.interpolate(out, size=image.shape[:2], mode="bilinear", align_corners=False)
            probs.append(out.softmax(dim=1))
    return inputs, torch.stack(probs).mean(dim=0)[0], probs


def test_ms_flip_inputs_flips_and_probability_average():
    image = np.random.default_rng(5).integers(0, 256, (30, 50, 3), dtype=np.uint8)
    model = PositionalModel()
    settings = Settings(mode="whole", img_scale=(64, 32), align_corners=False)
    probs = predict_probs(model, image, settings, ms_flip=True)
    expected_inputs, expected_probs, all_probs = _reference_ms_flip(model, image)

    assert len(model.calls) == 12
    unmatched = list(expected_inputs)
    for seen in model.calls:  # every recorded input is exactly one of the reference's 12
        match = next(i for i, ref in enumerate(unmatched)
                     if ref.shape == seen.shape and max_rel_diff(seen, ref) <= 1e-6)
        unmatched.pop(match)
    assert not unmatched
    assert probs.shape == (3, 30, 50)
    assert_close_to_scale(probs, expected_probs, 1e-6)
    # The test can tell: averaging logits, or forgetting to flip back, gives another answer.
    mean_logit_probs = torch.stack([p.log() for p in all_probs]).mean(0).softmax(dim=1)[0]
    assert not torch.allclose(probs, mean_logit_probs, atol=1e-3)
    unflipped_back = torch.stack(all_probs[0::2] + [p.flip(3) for p in all_probs[1::2]]).mean(0)[0]
    assert not torch.allclose(probs, unflipped_back, atol=1e-3)


def test_single_scale_predict_probs_is_the_reference_pipeline():
    model = tiny_model("r50")
    image = np.random.default_rng(6).integers(0, 256, (31, 23, 3), dtype=np.uint8)
    settings = Settings(mode="whole", img_scale=(80, 40), align_corners=False)
    probs = predict_probs(model, image, settings)
    resized = cv2.resize(image, (40, 54), interpolation=cv2.INTER_LINEAR)  # s = min(80/31, 40/23)
    logits = model(to_tensor(normalize(resized)).unsqueeze(0))
    expected = F.interpolate(logits, size=(31, 23), mode="bilinear", align_corners=False).softmax(dim=1)[0]
    assert_close_to_scale(probs, expected, 1e-6)


def test_ms_flip_slide_mode_runs_slide_per_scale():
    model = PositionalModel()
    settings = Settings(mode="slide", img_scale=(64, 32), align_corners=False, crop_size=(20, 20), stride=(12, 12))
    imgs = [torch.randn(1, 3, h, w) for h, w in MS_SIZES[:2]]
    probs = ms_flip_inference(model, imgs, (30, 50), settings)
    expected = []
    for img in imgs:
        for flip in (False, True):
            out = slide_inference(model, img.flip(3) if flip else img, (20, 20), (12, 12), ori_size=(30, 50))
            expected.append((out.flip(3) if flip else out).softmax(dim=1))
    assert_close_to_scale(probs, torch.stack(expected).mean(0), 1e-6)
