"""Speed and memory follow the published protocol; checked with a fake clock and the tiny config."""
from __future__ import annotations

import json

import pytest
import torch

from psp_zoo import PSPNet
from psp_zoo.errors import PspZooError
from psp_zoo.evaluation.measure import inference_peak_memory, measure_fps, training_loss, training_memory
from psp_zoo.results.records import ImageCount, ResultRecord

from helpers import tiny_info


class FakeClock:
    """Time advances only when the fake model runs, by the duration attached to each input."""

    def __init__(self):
        self.now = 0.0
        self.calls = []

    def __call__(self) -> float:
        return self.now

    def model(self, duration: float) -> None:
        self.calls.append(duration)
        self.now += duration


def test_fps_times_only_calls_after_warmup():
    clock = FakeClock()
    inputs = [100.0] * 3 + [0.25] * 8 + [1000.0] * 5  # slow warm-up, 8 timed, beyond `total`
    speed = measure_fps(clock.model, iter(inputs), warmup=3, total=11, device="cpu", clock=clock)
    assert len(clock.calls) == 11
    assert (speed.images_timed, speed.warmup, speed.device_kind) == (8, 3, "cpu")
    assert speed.fps == pytest.approx(4.0)


def test_fps_accepts_fewer_inputs_and_refuses_too_few():
    clock = FakeClock()
    speed = measure_fps(clock.model, [1.0, 0.5, 0.5], warmup=1, total=200, device="cpu", clock=clock)
    assert speed.images_timed == 2 and speed.fps == pytest.approx(2.0)
    with pytest.raises(PspZooError, match="warm-up"):
        measure_fps(clock.model, [1.0] * 5, warmup=5, total=200, device="cpu", clock=clock)


def test_fps_runs_without_autograd_and_restores_cudnn_benchmark():
    torch.backends.cudnn.benchmark = True
    seen = []
    measure_fps(lambda x: seen.append((torch.is_grad_enabled(), torch.backends.cudnn.benchmark)),
                range(3), warmup=1, total=3, device="cpu")
    assert seen == [(False, False)] * 3
    assert torch.backends.cudnn.benchmark is True
    torch.backends.cudnn.benchmark = False


def test_inference_peak_memory_on_cpu_is_labelled():
    model = PSPNet(**tiny_info("r50")["config"]).eval()
    use = inference_peak_memory(model, [torch.randn(1, 3, 64, 96) for _ in range(2)], device="cpu")
    assert use.kind == "cpu peak RSS" and use.gb > 0
    assert "2 image(s)" in use.detail


def test_cpu_training_memory_never_reads_zero_after_earlier_work():
    """After this process has trained (so its allocator holds the memory a step needs), the CPU
    figure is still what a step needs: a fresh process measures it. The weights, gradients and SGD
    momentum buffers alone (3 copies of the parameters) are a lower bound."""
    from psp_zoo.evaluation.measure import _training_peak

    config = dict(tiny_info("r50")["config"], align_corners=False)
    _training_peak(config, (32, 48), 2, "cpu", 2, 0)  # warm this process's allocator, as earlier tests do
    weights = sum(p.numel() * 4 for p in PSPNet(**config).parameters())
    use = training_memory(config, (32, 48), 2, "cpu")
    assert use.kind == "cpu peak RSS" and use.gb * 2**30 >= 3 * weights, use
    assert "32x48" in use.detail and "2 image(s)" in use.detail and "fresh process" in use.detail
    # kept finer than 0.1 GB: a results file holds the figure as measured
    from psp_zoo.environment import environment_info

    record = ResultRecord(checkpoint="m", dataset="cityscapes", environment=environment_info("cpu"),
                          images=ImageCount(count=1), training_memory=use)
    assert ResultRecord.from_dict(json.loads(record.to_json())).training_memory.gb == use.gb


def test_training_loss_is_decode_plus_weighted_aux_and_skips_ignored_pixels():
    torch.manual_seed(0)
    model = PSPNet(**tiny_info("r50")["config"]).eval()  # eval: no dropout, so the loss is deterministic
    images = torch.randn(2, 3, 48, 48)
    ignored = torch.full((2, 48, 48), 255)
    assert training_loss(model, images, ignored).item() == 0.0
    labels = torch.randint(0, 5, (2, 48, 48))
    features = model.backbone(images)
    ce = lambda head: torch.nn.functional.cross_entropy(  # noqa: E731
        torch.nn.functional.interpolate(head(features), size=(48, 48), mode="bilinear"), labels)
    expected = ce(model.decode_head) + 0.4 * ce(model.auxiliary_head)
    assert training_loss(model, images, labels).item() == pytest.approx(expected.item(), rel=1e-5)
