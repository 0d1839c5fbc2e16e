"""Speed and memory, measured the way the published table measured them (docs/reference.md,
"Speed and memory as published"; mmseg 0.x ``tools/benchmark.py``; docs/performance.md).

- fps: batch 1, the first ``warmup`` calls untimed, then ``fps = timed calls / summed call time``;
  only the model call is timed, with ``torch.cuda.synchronize()`` before and after each call,
  ``cudnn.benchmark = False`` and no TF32 (the V100 had none). The reference's model call
  (:func:`protocol_call`) covers the copy of the normalized float image to the device, the
  model one sliding window at a time, the resize to the original size, the softmax, the argmax
  and the copy of the labels back to the host. The published precision of a checkpoint
  (:class:`PublishedRun`: fp16 for the fp16 row) is the one timed where the device can run it.
- inference memory: ``torch.cuda.max_memory_allocated`` while running the calls (weights on the
  device included); on CPU the process's peak resident set size, labelled "cpu peak RSS".
- training memory ("Mem (GB)" in the table): forward + backward + SGD step at the crop size with
  the published images per GPU, plain BN in place of SyncBN, decode CE + 0.4 x auxiliary CE
  (ignore_index 255), ``cudnn.benchmark`` on (its workspaces counted, as in the published runs),
  one more gradient-sized buffer standing for DDP's gradient buckets, and the fp16 row in fp16
  autocast with its static loss scale on CUDA; peak allocated on top of what was allocated
  before. On CPU: the peak RSS increase of a fresh process running the steps, in fp32. GB are
  2**30 bytes, as mmseg divides its MB (2**20) log figure by 1024.
"""
from __future__ import annotations

import contextlib
import itertools
import json
import os
import resource
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from ..environment import exact_float32
from ..errors import PspZooError
from ..manifest.loading import IGNORE_INDEX  # declared once, with the datasets
from ..model import PSPNet
from ..results.records import MemoryUse, Speed
from .inference import single_scale_labels
from .semseg_inference import SEMSEG_MODE, labels_of_inputs

__all__ = ["measure_fps", "inference_peak_memory", "speed_and_memory", "training_memory", "PeakMemory",
           "PublishedRun", "protocol_call", "SEMSEG_CALL", "timed_call", "AUX_LOSS_WEIGHT", "IGNORE_INDEX",
           "FP16_LOSS_SCALE"]

AUX_LOSS_WEIGHT = 0.4
#: ``Fp16OptimizerHook(loss_scale=512.)`` of mmseg's fp16 PSPNet config: the static loss scale
FP16_LOSS_SCALE = 512.0
GB = float(2 ** 30)
DeviceLike = Union[str, torch.device]


@dataclass(frozen=True)
class PublishedRun:
    """How a checkpoint's published fps and memory were produced: the precision of its run and
    the static loss scale of its mixed-precision training (the fp16 row: fp16, 512)."""

    precision: str = "fp32"
    loss_scale: Optional[float] = None

    @classmethod
    def of(cls, entry: Any) -> "PublishedRun":
        """From the entry: its training recipe's ``loss_scale`` where the manifest declares one,
        else mmseg's naming, where ``_fp16_`` in a config name means ``fp16 = dict()`` and
        ``Fp16OptimizerHook(loss_scale=512.)``."""
        recipe = getattr(entry, "train", None) or {}
        loss_scale = recipe.get("loss_scale")
        if loss_scale is None and "fp16" in entry.name.split("_"):
            loss_scale = FP16_LOSS_SCALE
        return cls("fp16", float(loss_scale)) if loss_scale else cls()

    def precision_on(self, device: DeviceLike) -> str:
        """The precision this device measures in: fp16 needs CUDA, the CPU measures fp32."""
        return self.precision if torch.device(device).type == "cuda" else "fp32"

    def describe(self, device: DeviceLike) -> str:
        """What was done, for a record's detail: e.g. 'published in fp16; measured in fp32 on the CPU'."""
        if self.precision == "fp32":
            return "fp32 as published"
        scale = f" (training: static loss scale {self.loss_scale:g})" if self.loss_scale else ""
        if self.precision_on(device) == self.precision:
            return f"{self.precision} as published{scale}"
        return f"published in {self.precision}{scale}; measured in fp32 on the CPU ({self.precision} needs CUDA)"


@contextlib.contextmanager
def _timing_conditions(device: torch.device) -> Iterator[None]:
    """cudnn.benchmark off (the published setting), no TF32 and no autograd, restored afterwards."""
    previous = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = False
    try:
        with torch.no_grad(), exact_float32():
            yield
    finally:
        torch.backends.cudnn.benchmark = previous


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_fps(model_call: Callable[[Any], Any], inputs: Iterable[Any], *, warmup: int = 5,
                total: int = 200, device: DeviceLike,
                clock: Callable[[], float] = time.perf_counter, **described: Optional[str]) -> Speed:
    """Frames per second of ``model_call`` over the first ``total`` of ``inputs``.

    ``inputs`` are already preprocessed (preprocessing is not timed). Fewer than ``total`` inputs
    (a ``--limit`` or a CPU run) are accepted; the result says how many calls were timed.
    ``described``: the :class:`Speed` fields that say what was timed (model, precision, detail).
    """
    device = torch.device(device)
    if warmup < 0 or total <= warmup:
        raise PspZooError(f"speed needs total > warmup >= 0, got total={total}, warmup={warmup}")
    elapsed, calls = 0.0, 0
    with _timing_conditions(device):
        for calls, item in enumerate(itertools.islice(inputs, total), start=1):
            _synchronize(device)
            start = clock()
            model_call(item)
            _synchronize(device)
            if calls > warmup:
                elapsed += clock() - start
    timed = calls - warmup
    if timed < 1:
        raise PspZooError(f"speed needs more than {warmup} warm-up images, got {calls}; "
                          f"use more images or a smaller warm-up")
    fps = timed / elapsed if elapsed > 0 else float("inf")
    return Speed(fps=fps, images_timed=timed, warmup=warmup, device_kind=device.type, **described)


# --------------------------------------------------------------------------------------------
# peak memory


def _rss_kib(field: str) -> Optional[int]:
    """``VmRSS`` or ``VmHWM`` (peak) of this process in KiB, from Linux's /proc."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return None


def _reset_peak_rss() -> bool:
    """Linux resets VmHWM to the current RSS on writing 5 to clear_refs (kernel >= 4.0)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


class PeakMemory:
    """Peak bytes used on ``device`` during a ``with`` block, optionally above what was in use before."""

    def __init__(self, device: torch.device, above_baseline: bool):
        self.device, self.above_baseline = device, above_baseline
        self.bytes = 0
        self.exact = True  # False when the CPU peak could not be reset and is the process lifetime's

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            self.baseline = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self.exact = _reset_peak_rss()
            self.baseline = (_rss_kib("VmRSS") or 0) * 1024
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        else:
            peak = _cpu_peak_bytes()
        self.bytes = max(peak - (self.baseline if self.above_baseline else 0), 0)

    @property
    def kind(self) -> str:
        return "cuda max_memory_allocated" if self.device.type == "cuda" else "cpu peak RSS"

    def use(self, detail: str) -> MemoryUse:
        if not self.exact:
            detail += " (peak could not be reset: process lifetime peak)"
        return MemoryUse(gb=self.bytes / GB, kind=self.kind, detail=detail)


def _cpu_peak_bytes() -> int:
    hwm = _rss_kib("VmHWM")
    if hwm is not None:
        return hwm * 1024
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss if sys.platform == "darwin" else maxrss * 1024  # bytes on macOS, KiB elsewhere


def inference_peak_memory(model_call: Callable[[Any], Any], inputs: Iterable[Any], *,
                          device: DeviceLike) -> MemoryUse:
    """Peak memory while running ``model_call`` on each input, weights on the device included."""
    device = torch.device(device)
    calls = 0
    with _timing_conditions(device), PeakMemory(device, above_baseline=False) as peak:
        for calls, item in enumerate(inputs, start=1):
            model_call(item)
    if calls == 0:
        raise PspZooError("inference memory needs at least one input image")
    return _inference_use(peak, calls)


def _inference_use(peak: PeakMemory, calls: int) -> MemoryUse:
    where = "this process" if peak.device.type == "cpu" else "allocated on the device"
    return peak.use(f"inference peak over {calls} image(s), batch 1, {where}")


def speed_and_memory(model_call: Callable[[Any], Any], inputs: Iterable[Any], *, warmup: int, total: int,
                     device: DeviceLike, **described: Optional[str]) -> Tuple[Speed, MemoryUse]:
    """fps and inference peak memory from ONE pass over the same ``total`` images.

    The peak covers every call (warm-up included); timing covers the calls after ``warmup``.
    """
    device = torch.device(device)
    with PeakMemory(device, above_baseline=False) as peak:
        speed = measure_fps(model_call, inputs, warmup=warmup, total=total, device=device, **described)
    return speed, _inference_use(peak, speed.images_timed + speed.warmup)


PROTOCOL_CALL = ("copy of the normalized float image to the device, the model one sliding window at a "
                 "time, resize to the original size, softmax, argmax, labels copied to the host")
#: The timed call of an entry on the PSPNet authors' protocol (test mode 'semseg'): their test loop
#: times everything from the image as read, so the call does too.
SEMSEG_CALL = ("the authors' protocol from the image as read: float resize to the scale, mean padding, "
               "each window with its flip through the model (windows per call as stated), softmax, "
               "float64 averaging, cv2 resize to the original size, argmax, labels copied to the host")


def timed_call(settings: Any) -> str:
    """What :func:`protocol_call` times for these test settings."""
    return SEMSEG_CALL if settings.mode == SEMSEG_MODE else PROTOCOL_CALL


def protocol_call(model: Callable[[torch.Tensor], torch.Tensor], settings: Any, device: DeviceLike,
                  *, windows_per_call: int = 1) -> Callable[[Tuple[torch.Tensor, Sequence[int]]], torch.Tensor]:
    """The reference's timed model call on an ``(image, ori_size)`` pair (:data:`PROTOCOL_CALL`).

    ``image`` is the normalized 1 x 3 x h x w float32 image in host memory, as mmseg's loader
    hands it over; the call returns the H x W labels on the host. ``windows_per_call`` stays 1
    for the published protocol (mmseg's slide loop); psp-zoo's own figure may batch windows.
    For test mode 'semseg' ``image`` is the 1 x 3 x H x W uint8 image as read and the call runs
    the authors' single scale (:data:`SEMSEG_CALL`).
    """
    device = torch.device(device)

    def call(item: Tuple[torch.Tensor, Sequence[int]]) -> torch.Tensor:
        image, ori_size = item
        if settings.mode == SEMSEG_MODE:
            labels = labels_of_inputs(model, [image[0]], ori_size, settings, False, device=device,
                                      batch_size=windows_per_call)
        else:
            labels = single_scale_labels(model, image.to(device), ori_size, settings, batch_size=windows_per_call)
        return labels.cpu()
    return call


# --------------------------------------------------------------------------------------------
# training memory


def training_loss(model: PSPNet, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """mmseg's training loss: decode CE + 0.4 x auxiliary CE, logits resized to the labels."""
    features = model.backbone(images)
    loss = images.new_zeros(())
    for head, weight in ((model.decode_head, 1.0), (model.auxiliary_head, AUX_LOSS_WEIGHT)):
        logits = F.interpolate(head(features), size=labels.shape[1:], mode="bilinear",
                               align_corners=model.align_corners)
        # mmseg: per-pixel CE (ignored pixels count as 0) averaged over all pixels
        per_pixel = F.cross_entropy(logits, labels, reduction="none", ignore_index=IGNORE_INDEX)
        loss = loss + weight * per_pixel.mean()
    return loss


def training_memory(model_kwargs: Mapping[str, Any], crop_size: Sequence[int], images_per_gpu: int,
                    device: DeviceLike = "cpu", *, steps: int = 2, seed: int = 0,
                    published: PublishedRun = PublishedRun(), ddp_buckets: bool = True) -> MemoryUse:
    """Peak memory of training PSPNet(**model_kwargs) on random ``images_per_gpu`` crops.

    Two steps by default: from the second on, the SGD momentum buffers and the zeroed (not
    freed: torch 1.5's ``zero_grad``) gradients are resident, as in every published iteration.
    ``cudnn.benchmark`` is on, as in the published training runs (its workspaces are part of
    their ``max_memory_allocated``). ``ddp_buckets``: the published runs used DDP, whose gradient
    buckets hold one more copy of the gradients; one buffer of that size stands for them.
    ``published``: the fp16 row trains in fp16 autocast with its static loss scale on CUDA.
    On CUDA the allocator counts the bytes; on the CPU the steps run in a fresh process, whose
    allocator holds nothing yet, so the peak RSS increase is what the steps needed (in this
    process, memory freed by earlier work would be reused and the increase could read as zero).
    """
    device = torch.device(device)
    where = "above the memory in use before"
    if device.type == "cpu":
        used, exact = _in_fresh_process(dict(model_kwargs), list(crop_size), images_per_gpu, steps, seed, ddp_buckets)
        where = "in a fresh process, " + where
    else:
        used, exact = _training_peak(model_kwargs, crop_size, images_per_gpu, device, steps, seed,
                                     precision=published.precision_on(device), loss_scale=published.loss_scale,
                                     ddp_buckets=ddp_buckets)
    height, width = crop_size
    buckets = "one gradient-sized buffer for DDP's gradient buckets" if ddp_buckets else "no DDP buckets"
    detail = (f"training, {steps} SGD step(s) at {height}x{width}, {images_per_gpu} image(s) per device, "
              f"BN in place of SyncBN, {buckets}, cudnn.benchmark on, {published.describe(device)}, {where}")
    if not exact:
        detail += " (peak could not be reset: process lifetime peak)"
    return MemoryUse(gb=used / GB, kind="cuda max_memory_allocated" if device.type == "cuda" else "cpu peak RSS",
                     detail=detail)


def _in_fresh_process(model_kwargs: dict, crop_size: list, images_per_gpu: int, steps: int,
                      seed: int, ddp_buckets: bool = True) -> Tuple[int, bool]:
    """:func:`_training_peak` on the CPU (fp32) in a new Python process (not a fork: that would share this heap)."""
    job = json.dumps({"model_kwargs": model_kwargs, "crop_size": crop_size, "images_per_gpu": images_per_gpu,
                      "steps": steps, "seed": seed, "threads": torch.get_num_threads(), "ddp_buckets": ddp_buckets})
    package_root = str(Path(__file__).resolve().parents[1])  # this psp_zoo, whatever sys.path the child gets
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-c", "from psp_zoo.evaluation.measure import _training_peak_main; "
                           "_training_peak_main()"], input=job, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise PspZooError(f"the training-memory step failed in its own process ({last}); skip it with "
                          f"train_memory=False", cli_hint="--no-train-mem")
    used, exact = json.loads(done.stdout.strip().splitlines()[-1])
    return int(used), bool(exact)


def _training_peak_main() -> None:
    """The fresh process's side: a job as JSON on stdin, ``[bytes, exact]`` on stdout."""
    job = json.loads(sys.stdin.read())
    print(json.dumps(list(_training_peak(job["model_kwargs"], job["crop_size"], job["images_per_gpu"], "cpu",
                                         job["steps"], job["seed"], job["threads"],
                                         ddp_buckets=job.get("ddp_buckets", True)))))


def _training_peak(model_kwargs: Mapping[str, Any], crop_size: Sequence[int], images_per_gpu: int,
                   device: DeviceLike, steps: int, seed: int, threads: Optional[int] = None, *,
                   precision: str = "fp32", loss_scale: Optional[float] = None,
                   ddp_buckets: bool = True) -> Tuple[int, bool]:
    """(peak bytes above the memory in use before, whether the peak was reset) of the training
    steps, with ``cudnn.benchmark`` on and no TF32 (restored afterwards)."""
    if threads is not None:
        torch.set_num_threads(threads)
    device = torch.device(device)
    previous = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    try:
        with exact_float32(), PeakMemory(device, above_baseline=True) as peak:
            _train_steps(PSPNet(**model_kwargs).to(device).train(), _random_batch(
                model_kwargs, crop_size, images_per_gpu, device, seed), steps, precision, loss_scale, ddp_buckets)
    finally:
        torch.backends.cudnn.benchmark = previous
    return peak.bytes, peak.exact


def _random_batch(model_kwargs: Mapping[str, Any], crop_size: Sequence[int], images_per_gpu: int,
                  device: torch.device, seed: int) -> Tuple[torch.Tensor, torch.Tensor]:
    height, width = crop_size
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(images_per_gpu, 3, height, width, generator=generator).to(device)
    labels = torch.randint(0, model_kwargs["num_classes"], (images_per_gpu, height, width), generator=generator)
    labels[:, : height // 8] = IGNORE_INDEX  # some ignored pixels, as in real label maps
    return images, labels.to(device)


def _train_steps(model: PSPNet, batch: Tuple[torch.Tensor, torch.Tensor], steps: int, precision: str,
                 loss_scale: Optional[float], ddp_buckets: bool) -> None:
    """``steps`` SGD steps; fp16: autocast, the loss scaled up before backward, the gradients
    scaled down before the step (a static scale: mmcv's Fp16OptimizerHook with ``loss_scale``)."""
    images, labels = batch
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    scale = loss_scale if precision != "fp32" and loss_scale else 1.0
    buckets = None
    if ddp_buckets:  # zeros, not empty: on the CPU untouched pages would not count in the RSS
        buckets = torch.zeros(sum(p.numel() for p in model.parameters()), device=images.device)
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=False)
        with _autocast(images.device, precision):
            loss = training_loss(model, images, labels)
        (loss * scale).backward()
        if scale != 1.0:
            for param in model.parameters():
                if param.grad is not None:
                    param.grad.div_(scale)
        if buckets is not None:  # DDP copies the gradients into its buckets for the all-reduce
            torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None], out=buckets[
                : sum(p.numel() for p in model.parameters() if p.grad is not None)])
        optimizer.step()


def _autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype={"fp16": torch.float16, "bf16": torch.bfloat16}[precision])
