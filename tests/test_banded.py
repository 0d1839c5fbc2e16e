"""The full-size steps (resize to the original size, softmax, ms+flip average, argmax) in bands of
rows: the same values and labels as the full-size computation, in memory that does not grow with
classes x pixels."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from psp_zoo.datasets.transforms import resized_inputs, target_scales
from psp_zoo.evaluation.inference import (
    BAND_BYTES,
    _row_weights,
    infer_labels,
    infer_probs,
    predict_labels,
    predict_probs,
    resized_rows,
)
from psp_zoo.manifest.loading import EvalSettings as Settings

from helpers import assert_close_to_scale

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("single_thread")

# (input h, w) -> (output H, W): up- and downscaling, odd sizes, unchanged height, one row / column.
SIZES = [((13, 17), (200, 61)), ((64, 86), (701, 333)), ((37, 23), (16, 22)), ((50, 40), (31, 97)),
         ((33, 40), (33, 81)), ((2, 3), (1, 5)), ((1, 1), (7, 9)), ((5, 4), (500, 3))]


def _dense_weights(in_size: int, out_size: int, align_corners: bool) -> torch.Tensor:
    """out_size x in_size matrix of torch's own row weights: the resize of one-hot source rows."""
    eye = torch.eye(in_size).view(1, in_size, in_size, 1)
    return F.interpolate(eye, size=(out_size, 1), mode="bilinear", align_corners=align_corners)[0, :, :, 0].T


@pytest.mark.parametrize("align_corners", [False, True])
@pytest.mark.parametrize("sizes", SIZES)
def test_row_weights_are_torchs_own(sizes, align_corners):
    (h, _), (height, _) = sizes
    i0, i1, w0, w1 = _row_weights(h, height, align_corners, torch.device("cpu"))
    mine = torch.zeros(height, h)
    rows = torch.arange(height)
    mine.index_put_((rows, i0), w0, accumulate=True)
    mine.index_put_((rows, i1), w1, accumulate=True)
    dense = _dense_weights(h, height, align_corners)
    # Exactly torch's weights; a row clamped at the bottom edge samples one row twice (summed here).
    assert torch.equal(mine[i0 != i1], dense[i0 != i1])
    assert_close_to_scale(mine, dense, 1e-6)
    assert bool((i1 - i0 <= 1).all()) and bool((i0[1:] >= i0[:-1]).all())  # neighbours, in order


@pytest.mark.parametrize("align_corners", [False, True])
@pytest.mark.parametrize("sizes", SIZES)
@pytest.mark.parametrize("channels_last", [False, True])
def test_banded_resize_equals_the_full_resize(sizes, align_corners, channels_last):
    (h, w), (height, width) = sizes
    x = torch.randn(2, 3, h, w, generator=torch.Generator().manual_seed(h * w))
    if channels_last:  # what a channels-last model returns
        x = x.contiguous(memory_format=torch.channels_last)
    full = F.interpolate(x, size=(height, width), mode="bilinear", align_corners=align_corners)
    weights = _row_weights(h, height, align_corners, x.device)
    for step in (1, 7, max(height - 1, 1)):  # band edges everywhere, uneven last band
        bands = [resized_rows(x, (height, width), align_corners, (r0, min(r0 + step, height)), weights)
                 for r0 in range(0, height, step)]
        banded = torch.cat(bands, dim=2)
        assert banded.shape == full.shape
        # The same source rows and weights; only the rounding of the final weighted sum may differ.
        assert_close_to_scale(banded, full, 1e-6)
    # Without weights passed, and the whole height at once (exactly F.interpolate).
    assert_close_to_scale(resized_rows(x, (height, width), align_corners, (0, 1)), full[:, :, :1], 1e-6)
    assert torch.equal(resized_rows(x, (height, width), align_corners, (0, height)), full)


def test_a_wrong_source_row_would_be_seen():
    """The tolerance above is far below what half a pixel of shift makes."""
    x = torch.randn(1, 3, 64, 86, generator=torch.Generator().manual_seed(1))
    full = F.interpolate(x, size=(701, 333), mode="bilinear", align_corners=False)
    shifted = F.interpolate(x, size=(701, 333), mode="bilinear", align_corners=True)
    assert (full - shifted).abs().max() > 1e-2


class ManyClasses(nn.Module):
    """150 classes at 1/4 resolution resized to the input, like encode_decode; not flip-equivariant."""

    num_classes = 150

    def __init__(self, align_corners: bool = False):
        super().__init__()
        generator = torch.Generator().manual_seed(3)
        self.weight = nn.Parameter(torch.randn(150, 3, generator=generator) * 3, requires_grad=False)
        self.bias = nn.Parameter(torch.randn(150, generator=generator), requires_grad=False)
        self.align_corners = align_corners

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        coarse = F.avg_pool2d(x, 4, ceil_mode=True)
        ramp = torch.linspace(-1, 1, coarse.shape[3]).view(1, 1, 1, -1)
        logits = torch.einsum("kc,nchw->nkhw", self.weight, coarse) + self.bias.view(1, -1, 1, 1) + ramp
        return F.interpolate(logits, size=x.shape[2:], mode="bilinear", align_corners=self.align_corners)


def _image(height: int, width: int, seed: int) -> np.ndarray:
    import cv2

    coarse = np.random.default_rng(seed).integers(0, 256, (9, 11, 3), dtype=np.uint8)
    return cv2.resize(coarse, (width, height), interpolation=cv2.INTER_LINEAR)


@pytest.mark.parametrize("align_corners", [False, True])
@pytest.mark.parametrize("mode", ["whole", "slide"])
def test_single_scale_labels_in_small_bands_equal_the_full_size_argmax(align_corners, mode):
    model = ManyClasses(align_corners)
    settings = Settings(mode=mode, img_scale=(48, 32), align_corners=align_corners, crop_size=(24, 24),
                        stride=(16, 16))
    image = _image(301, 157, 0)  # upscaled from 32 x 17
    full = predict_probs(model, image, settings)
    assert full.shape == (150, 301, 157)
    for band_bytes in (1, 150 * 157 * 4 * 10 * 8):  # one row a band; about ten rows a band
        labels = predict_labels(model, image, settings, band_bytes=band_bytes)
        assert labels.dtype == torch.long and labels.shape == (301, 157)
        assert torch.equal(labels, full.argmax(dim=0))
    assert len(labels.unique()) > 5


@pytest.mark.parametrize("height,width", [(97, 131), (9, 13)])  # original larger / smaller than the inputs
def test_ms_flip_labels_equal_the_full_size_argmax(height, width):
    model = ManyClasses()
    settings = Settings(mode="whole", img_scale=(40, 24), align_corners=False)
    image = _image(height, width, 1)
    expected = predict_probs(model, image, settings, ms_flip=True).argmax(dim=0)
    inputs = resized_inputs(image, target_scales(settings.img_scale, True))
    for band_bytes in (1, 10 ** 6, None):
        labels = infer_labels(model, inputs, (height, width), settings, True, band_bytes=band_bytes)
        assert torch.equal(labels, expected)
    # infer_probs banded (its default budget holds a few rows here) is the mean of the 12 probability maps.
    probs = infer_probs(model, inputs, (height, width), settings, True)
    assert_close_to_scale(probs.sum(dim=0), torch.ones(height, width), 1e-5)


_MEASURE = r"""
import json, resource, sys
import numpy as np, torch, torch.nn.functional as F
torch.set_num_threads(1)
from psp_zoo import PSPNet, Predictor
from psp_zoo.datasets.transforms import normalize_batch, resized_inputs

height, width, classes = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
torch.manual_seed(0)
model = PSPNet(depth=50, num_classes=classes, base_channels=8, stem_channels=8, channels=16, aux_channels=8).eval()
model.decode_head.conv_seg.weight.data.mul_(30)  # random init scores nearly one class everywhere
predictor = Predictor.create(model, dataset="ade20k", img_scale=(64, 48), device="cpu", channels_last=False)
rng = np.random.default_rng(0)
coarse = rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)
import cv2
image = cv2.resize(coarse, (width, height), interpolation=cv2.INTER_LINEAR)
predictor(image[:64, :64].copy())  # warm-up: lazy allocations, thread pools
page = resource.getpagesize()
with open("/proc/self/statm") as statm:
    before = int(statm.read().split()[1]) * page
labels = predictor(image)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
# The full-size computation on sampled rows: F.interpolate of the whole map, a few classes at a
# time (each class is resized on its own), then softmax and argmax of those rows.
with torch.inference_mode():
    inputs = resized_inputs(image, [(64, 48)])
    logits = predictor.model(normalize_batch(inputs[0].unsqueeze(0)))
    rows = sorted(set(range(0, height, 97)) | {1, 20, 21, 22, height - 2, height - 1})
    parts = [F.interpolate(logits[:, c:c + 10], size=(height, width), mode="bilinear",
                           align_corners=False)[0][:, rows] for c in range(0, classes, 10)]
    reference = torch.cat(parts).softmax(dim=0).argmax(dim=0).numpy()
same = float((labels[rows] == reference).mean())
print(json.dumps({"before": before, "peak": peak, "same": same, "shape": list(labels.shape),
                  "distinct": int(len(np.unique(labels)))}))
"""


def test_a_large_photo_with_150_classes_stays_in_bounded_memory():
    height, width, classes = 2000, 3000, 150
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    done = subprocess.run([sys.executable, "-c", _MEASURE, str(height), str(width), str(classes)], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    full_probs = classes * height * width * 4  # one full-size float32 map: 3.6 GB
    grown = result["peak"] - result["before"]  # an upper bound of what the prediction added
    assert result["shape"] == [height, width] and result["distinct"] > 3
    assert grown < BAND_BYTES + 512 * 2 ** 20 < full_probs / 4, f"{grown / 2 ** 20:.0f} MiB"
    assert result["same"] >= 0.9999, result
