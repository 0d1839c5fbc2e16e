"""The CUDA paths measure what the published tables meant, checked on the CPU: the GPU-only checks
are faked (monkeypatch) where a test needs "a GPU without native bf16" or "cuda:1", and model
calls are counted with a wrapper."""
from __future__ import annotations

import contextlib
import sys

import numpy as np
import pytest
import torch
from torch import nn

from psp_zoo import PSPNet
from psp_zoo.environment import exact_float32, float32_flags
from psp_zoo.errors import PspZooError
from psp_zoo.evaluation.measure import (
    PublishedRun,
    _train_steps,
    _training_peak,
    measure_fps,
    protocol_call,
    training_memory,
)
from psp_zoo.evaluation.metrics import ConfusionMatrix, count_cells
from psp_zoo.hub.options import SpeedOptions
from psp_zoo.manifest.loading import EvalSettings, get_checkpoint

from helpers import load_speed_script, tiny_info, tiny_model

EXACT = {"cuda_matmul_allow_tf32": False, "cudnn_allow_tf32": False, "float32_matmul_precision": "highest"}


@pytest.fixture
def tf32_on():
    """TF32 switched on as PyTorch's defaults on Ampere leave cuDNN; restored after the test."""
    before = (torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32)
    torch.set_float32_matmul_precision("high")
    torch.backends.cudnn.allow_tf32 = True
    yield {"cuda_matmul_allow_tf32": True, "cudnn_allow_tf32": True, "float32_matmul_precision": "high"}
    torch.set_float32_matmul_precision(before[0])
    torch.backends.cudnn.allow_tf32 = before[1]


class Counting(nn.Module):
    """A model wrapper that records the batch size of every call."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model, self.align_corners = model, model.align_corners
        self.batches = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.batches.append(x.shape[0])
        return self.model(x)


# --------------------------------------------------------------------------------------------
# 1. TF32 off while scoring and timing in fp32, restored afterwards


def test_exact_float32_turns_tf32_off_and_restores_it(tf32_on):
    with exact_float32() as flags:
        assert flags == float32_flags() == EXACT
    assert float32_flags() == tf32_on


def test_scoring_and_timing_run_without_tf32(tf32_on, tmp_path):
    from psp_zoo import evaluate

    import minidata

    minidata.write_cityscapes(tmp_path / "cityscapes")
    model, seen = tiny_model("r50"), []
    # a hook, not a wrapper's list: evaluate prepares a deep copy of the model, hooks included
    model.register_forward_pre_hook(lambda module, args: seen.append(float32_flags()))
    record = evaluate(model, tmp_path / "cityscapes", dataset="cityscapes", device="cpu", num_workers=0,
                      img_scale=(32, 16))
    assert seen and all(flags == EXACT for flags in seen)
    assert record.settings["float32"] == EXACT  # what the results file states
    seen.clear()
    measure_fps(model, [torch.randn(1, 3, 32, 32)] * 2, warmup=1, total=2, device="cpu")
    assert seen == [EXACT, EXACT]
    assert float32_flags() == tf32_on


# --------------------------------------------------------------------------------------------
# 2-3. the timed call: one window per model call on every device, labels back on the host


SLIDE = EvalSettings(mode="slide", img_scale=(96, 64), crop_size=(48, 48), stride=(32, 32), align_corners=False)


def test_protocol_call_runs_one_window_at_a_time_and_returns_host_labels(monkeypatch):
    import psp_zoo.evaluation.inference as inference

    monkeypatch.setattr(inference, "default_slide_batch", lambda device: 8)  # what CUDA's default would batch
    model = Counting(tiny_model("r50"))
    image = torch.randn(1, 3, 64, 96)
    labels = protocol_call(model, SLIDE, "cpu")((image, (70, 100)))
    windows = len(inference.slide_windows(64, 96, (48, 48), (32, 32)))
    assert model.batches == [1] * windows and windows == 6
    assert labels.device.type == "cpu" and labels.dtype == torch.int64 and labels.shape == (1, 70, 100)
    expected = inference.slide_inference(model.model, image, (48, 48), (32, 32), ori_size=(70, 100)).argmax(1)
    assert torch.equal(labels, expected)


# --------------------------------------------------------------------------------------------
# 6. the fp16 row is measured as it was run


def test_published_run_comes_from_the_entry():
    fp16 = get_checkpoint("pspnet_r101-d8_fp16_512x1024_80k_cityscapes")
    assert PublishedRun.of(fp16) == PublishedRun("fp16", 512.0)
    assert PublishedRun.of(get_checkpoint("pspnet_r101-d8_512x1024_80k_cityscapes")) == PublishedRun("fp32", None)
    run = PublishedRun.of(fp16)
    assert run.precision_on("cuda:0") == "fp16" and run.precision_on("cpu") == "fp32"
    assert run.describe("cuda") == "fp16 as published (training: static loss scale 512)"
    assert "measured in fp32 on the CPU" in run.describe("cpu")


def test_training_memory_runs_with_cudnn_benchmark_and_without_tf32(monkeypatch, tf32_on):
    import psp_zoo.evaluation.measure as measure

    seen = []
    monkeypatch.setattr(measure, "_train_steps", lambda *args: seen.append(
        (torch.backends.cudnn.benchmark, float32_flags(), args[2:])))
    torch.backends.cudnn.benchmark = False
    _training_peak(dict(tiny_info("r50")["config"]), (32, 32), 2, "cpu", 2, 0, precision="fp16", loss_scale=512.0)
    assert seen == [(True, EXACT, (2, "fp16", 512.0, True))]  # DDP buckets on by default
    assert torch.backends.cudnn.benchmark is False and float32_flags() == tf32_on


def test_the_fp16_rows_training_memory_says_what_was_done_on_the_cpu():
    use = training_memory(dict(tiny_info("r50")["config"]), (32, 32), 2, "cpu", published=PublishedRun("fp16", 512.0))
    assert use.gb > 0 and "DDP's gradient buckets" in use.detail and "cudnn.benchmark on" in use.detail
    assert "published in fp16 (training: static loss scale 512); measured in fp32 on the CPU" in use.detail


def test_the_static_loss_scale_is_undone_before_the_step():
    torch.manual_seed(0)
    config = dict(tiny_info("r50")["config"])
    images, labels = torch.randn(2, 3, 32, 32), torch.randint(0, config["num_classes"], (2, 32, 32))
    updates = {}
    for precision, scale in (("fp32", None), ("bf16", 512.0)):
        torch.manual_seed(1)
        model = PSPNet(**config).train()
        before = [p.detach().clone() for p in model.parameters()]
        torch.manual_seed(2)  # the same dropout draws
        _train_steps(model, (images, labels), 1, precision, scale, True)
        updates[precision] = torch.cat([(p.detach() - b).flatten() for p, b in zip(model.parameters(), before)])
    ratio = updates["bf16"].norm() / updates["fp32"].norm()
    assert 0.8 < float(ratio) < 1.25  # a loss scale left in the gradients would make this ~512


# --------------------------------------------------------------------------------------------
# 7. bf16 refused on a GPU without native bf16


@pytest.mark.parametrize("native", [False, True])
def test_bf16_on_a_gpu_without_native_bf16_is_refused(monkeypatch, native):
    asked = []
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext(asked.append(device)))
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: native or including_emulation)
    options = SpeedOptions(precision="bf16")
    if native:
        assert options.check("cuda:1") is options
    else:
        with pytest.raises(PspZooError,
                           match=r"precision 'bf16' needs a GPU with native bf16 .*cuda:1.*'fp16' or 'fp32'"):
            options.check("cuda:1")
    assert asked == [torch.device("cuda:1")]  # the device asked about is the one given
    SpeedOptions(precision="fp16").check("cuda:1")  # fp16 runs on every GPU


# --------------------------------------------------------------------------------------------
# 9. benchmarks/speed.py on the device it was given


class _Stop(Exception):
    pass


def test_speed_benchmark_sets_its_device_before_anything_touches_cuda(monkeypatch):
    speed = load_speed_script()
    touched = []
    for name in ("is_available", "current_device", "synchronize", "get_device_name", "Stream", "current_stream",
                 "memory_allocated", "reset_peak_memory_stats", "empty_cache", "device_count", "init"):
        monkeypatch.setattr(torch.cuda, name, lambda *a, _name=name, **k: touched.append(_name))

    def set_device(device):
        touched.append(("set_device", torch.device(device)))
        raise _Stop

    monkeypatch.setattr(torch.cuda, "set_device", set_device)
    with pytest.raises(_Stop):
        speed.main(["--device", "cuda:1", "--tiny", "--threads", "1"])
    assert touched == [("set_device", torch.device("cuda:1"))]
    touched.clear()
    with pytest.raises(_Stop):  # 'cuda' names a device too: set_device needs its index
        speed.main(["--device", "cuda", "--tiny"])
    assert touched == [("set_device", torch.device("cuda:0"))]


def test_speed_benchmark_synchronizes_the_device_it_times(monkeypatch):
    speed = load_speed_script()
    synced = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: synced.append(device))
    speed.timed(lambda: torch.zeros(1), torch.device("cuda:1"))
    assert synced == [torch.device("cuda:1")] * 2


def test_cuda_graph_peak_counts_the_capture(monkeypatch):
    """The graph's pool is allocated while capturing: its replay alone reads ~0 above the baseline."""
    speed = load_speed_script()
    assert speed._peak_mib(0.0, 512.0) == 512.0 and speed._peak_mib(3.0, None) == 3.0
    assert speed._peak_mib(None, None) is None


# --------------------------------------------------------------------------------------------
# 10. no per-image synchronisation, no GPU memory kept across checkpoints, pinning on the device


def test_normalization_copies_no_constants_to_the_device(monkeypatch):
    from psp_zoo.datasets.transforms import normalize, normalize_batch

    image = np.random.default_rng(0).integers(0, 256, (17, 23, 3), dtype=np.uint8)
    batch = torch.from_numpy(image.transpose(2, 0, 1).copy()).unsqueeze(0)
    copies = []
    original = torch.Tensor.to
    monkeypatch.setattr(torch.Tensor, "to", lambda self, *a, **k: copies.append(a) or original(self, *a, **k))
    out = normalize_batch(batch)
    assert copies == []
    assert np.array_equal(out[0].numpy().transpose(1, 2, 0), normalize(image))  # the same float32 numbers


def test_resize_weights_create_no_tensors_on_the_device(monkeypatch):
    import psp_zoo.evaluation.inference as inference

    made = []
    original = torch.tensor
    monkeypatch.setattr(torch, "tensor", lambda *a, **k: made.append(k.get("device")) or original(*a, **k))
    for align_corners in (False, True):
        inference._row_weights(13, 40, align_corners, "cpu")
    assert made and all(device is None for device in made)  # 0-dim CPU scalars only


@pytest.mark.parametrize("mode", ["whole", "slide"])
def test_the_timed_steps_never_read_the_device_back(mode):
    """On the meta device any read back to the host (``.item()``, ``int()``, a boolean selection)
    raises: normalization, the model, the banded resize + softmax + argmax and the confusion-matrix
    update run there end to end, so on a GPU nothing inside a timed call waits for it to finish."""
    from psp_zoo.datasets.transforms import normalize_batch
    from psp_zoo.evaluation.inference import single_scale_labels

    model = PSPNet(**tiny_info("r50")["config"]).eval().to("meta")
    settings = EvalSettings(mode=mode, img_scale=(96, 64), crop_size=(48, 48), stride=(32, 32), align_corners=False)
    image = normalize_batch(torch.empty(1, 3, 64, 96, dtype=torch.uint8, device="meta"))
    labels = single_scale_labels(model, image, (70, 100), settings, batch_size=1, band_bytes=4096)  # several bands
    metric = ConfusionMatrix(5, device="meta").update(labels, torch.empty(1, 70, 100, dtype=torch.long, device="meta"))
    assert labels.shape == (1, 70, 100) and metric.matrix.shape == (6, 5)


def test_confusion_matrix_update_reads_nothing_back(monkeypatch):
    pred, label = torch.tensor([0, 1, 2, 2, 1]), torch.tensor([0, 1, 1, 255, 7])
    expected = ConfusionMatrix(3).update(pred, label).matrix.clone()
    for name in ("min", "max", "nonzero"):
        monkeypatch.setattr(torch.Tensor, name, lambda *a, _n=name, **k: pytest.fail(f"{_n} synchronises"))
    assert torch.equal(ConfusionMatrix(3).update(pred, label).matrix, expected)
    cells = torch.tensor([0, 3, 3, 5, 0, 0])
    assert torch.equal(count_cells(cells, 7, index_add=True), count_cells(cells, 7, index_add=False))
    assert count_cells(cells, 7).tolist() == [3, 0, 0, 2, 0, 1, 0]


def test_factorized_head_keeps_its_matrices_to_itself():
    import psp_zoo.model.fast_head as fast_head
    from psp_zoo.model.optimization import optimize

    model = optimize(tiny_model("r50"), fuse_bn=False, channels_last=False, winograd=False)
    model(torch.randn(1, 3, 48, 64))
    head = model.model.decode_head
    assert isinstance(head, fast_head.FactorizedPSPHead) and head._matrices
    assert not [name for name, value in vars(fast_head).items()
                if isinstance(value, dict) and value and not name.startswith("__")]


def test_loader_pins_for_the_device_it_feeds(monkeypatch, tmp_path):
    import psp_zoo.datasets.readers as datasets

    import minidata

    minidata.write_cityscapes(tmp_path / "cityscapes")
    data = datasets.SegmentationDataset("cityscapes", tmp_path / "cityscapes", img_scales=[(32, 16)])
    current, built, iterated = [None], [], []

    @contextlib.contextmanager
    def on_device(device):
        current[0] = device
        yield
        current[0] = None

    class Loader:
        def __init__(self, dataset, **kwargs):
            built.append((current[0], kwargs["pin_memory"]))
            self.items = [dataset[i] for i in range(len(dataset))]

        def __iter__(self):
            iterated.append(current[0])  # samples are pinned while iterating
            return iter(self.items)

    monkeypatch.setattr(datasets, "on_device", on_device)
    monkeypatch.setattr(torch.utils.data, "DataLoader", Loader)
    assert len(list(datasets.make_loader(data, num_workers=0, device="cuda:1"))) == len(data)
    assert built == [(torch.device("cuda:1"), True)] and iterated == [torch.device("cuda:1")]
    list(datasets.make_loader(data, num_workers=0, device="cpu"))
    assert built[-1] == (torch.device("cpu"), False)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
