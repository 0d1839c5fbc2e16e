"""Speed and memory, measured the way the published table measured them (docs/reference.md,
"Speed and memory as published").

- fps: batch 1, the first ``warmup`` calls untimed, then ``fps = timed calls / summed call time``;
  only the model call is timed (it includes the final resize to the original size), with
  ``torch.cuda.synchronize()`` before and after each call and ``cudnn.benchmark = False``.
- inference memory: ``torch.cuda.max_memory_allocated`` while running the calls (weights on the
  device included); on CPU the process's peak resident set size, labelled "cpu peak RSS".
- training memory ("Mem (GB)" in the table): forward + backward + SGD step at the crop size with
  the published images per GPU, plain BN in place of SyncBN, decode CE + 0.4 x auxiliary CE
  (ignore_index 255); peak allocated on top of what was allocated before. On CPU: the peak RSS
  increase of a fresh process running the steps. GB are 2**30 bytes, as mmseg divides its MB (2**20) log figure by 1024.
"""
from __future__ import annotations

import contextlib
import itertools
import json
import os
import subprocess
import resource
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from .errors import PspZooError
from .manifest import IGNORE_INDEX  # declared once, with the datasets
from .model import PSPNet
from .records import MemoryUse, Speed

__all__ = ["measure_fps", "inference_peak_memory", "speed_and_memory", "training_memory", "PeakMemory", "AUX_LOSS_WEIGHT", "IGNORE_INDEX"]

AUX_LOSS_WEIGHT = 0.4
GB = float(2 ** 30)
DeviceLike = Union[str, torch.device]


@contextlib.contextmanager
def _timing_conditions(device: torch.device) -> Iterator[None]:
    """cudnn.benchmark off (the published setting) and no autograd, restored afterwards."""
    previous = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = False
    try:
        with torch.no_grad():
            yield
    finally:
        torch.backends.cudnn.benchmark = previous


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_fps(model_call: Callable[[Any], Any], inputs: Iterable[Any], *, warmup: int = 5,
                total: int = 200, device: DeviceLike,
                clock: Callable[[], float] = time.perf_counter) -> Speed:
    """Frames per second of ``model_call`` over the first ``total`` of ``inputs``.

    ``inputs`` are already preprocessed (preprocessing is not timed). Fewer than ``total`` inputs
    (a ``--limit`` or a CPU run) are accepted; the result says how many calls were timed.
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
    return Speed(fps=fps, images_timed=timed, warmup=warmup, device_kind=device.type)


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
                     device: DeviceLike) -> Tuple[Speed, MemoryUse]:
    """fps and inference peak memory from ONE pass over the same ``total`` images.

    The peak covers every call (warm-up included); timing covers the calls after ``warmup``.
    """
    device = torch.device(device)
    with PeakMemory(device, above_baseline=False) as peak:
        speed = measure_fps(model_call, inputs, warmup=warmup, total=total, device=device)
    return speed, _inference_use(peak, speed.images_timed + speed.warmup)


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
                    device: DeviceLike = "cpu", *, steps: int = 2, seed: int = 0) -> MemoryUse:
    """Peak memory of training PSPNet(**model_kwargs) on random ``images_per_gpu`` crops.

    Two steps by default: from the second on, the SGD momentum buffers and the zeroed (not
    freed: torch 1.5's ``zero_grad``) gradients are resident, as in every published iteration.
    On CUDA the allocator counts the bytes; on the CPU the steps run in a fresh process, whose
    allocator holds nothing yet, so the peak RSS increase is what the steps needed (in this
    process, memory freed by earlier work would be reused and the increase could read as zero).
    """
    device = torch.device(device)
    where = "above the memory in use before"
    if device.type == "cpu":
        used, exact = _in_fresh_process(dict(model_kwargs), list(crop_size), images_per_gpu, steps, seed)
        where = "in a fresh process, " + where
    else:
        used, exact = _training_peak(model_kwargs, crop_size, images_per_gpu, device, steps, seed)
    height, width = crop_size
    detail = (f"training, {steps} SGD step(s) at {height}x{width}, {images_per_gpu} image(s) per device, "
              f"BN in place of SyncBN, {where}")
    if not exact:
        detail += " (peak could not be reset: process lifetime peak)"
    return MemoryUse(gb=used / GB, kind="cuda max_memory_allocated" if device.type == "cuda" else "cpu peak RSS",
                     detail=detail)


def _in_fresh_process(model_kwargs: dict, crop_size: list, images_per_gpu: int, steps: int,
                      seed: int) -> Tuple[int, bool]:
    """:func:`_training_peak` on the CPU in a new Python process (not a fork: that would share this heap)."""
    job = json.dumps({"model_kwargs": model_kwargs, "crop_size": crop_size, "images_per_gpu": images_per_gpu,
                      "steps": steps, "seed": seed, "threads": torch.get_num_threads()})
    package_root = str(Path(__file__).resolve().parents[1])  # this psp_zoo, whatever sys.path the child gets
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-c", "from psp_zoo.measure import _training_peak_main; "
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
                                         job["steps"], job["seed"], job["threads"]))))


def _training_peak(model_kwargs: Mapping[str, Any], crop_size: Sequence[int], images_per_gpu: int,
                   device: DeviceLike, steps: int, seed: int, threads: Optional[int] = None) -> Tuple[int, bool]:
    """(peak bytes above the memory in use before, whether the peak was reset) of the training steps."""
    if threads is not None:
        torch.set_num_threads(threads)
    device = torch.device(device)
    height, width = crop_size
    generator = torch.Generator().manual_seed(seed)
    with PeakMemory(device, above_baseline=True) as peak:
        model = PSPNet(**model_kwargs).to(device).train()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
        images = torch.randn(images_per_gpu, 3, height, width, generator=generator).to(device)
        labels = torch.randint(0, model.num_classes, (images_per_gpu, height, width), generator=generator)
        labels[:, : height // 8] = IGNORE_INDEX  # some ignored pixels, as in real label maps
        labels = labels.to(device)
        for _ in range(steps):
            optimizer.zero_grad(set_to_none=False)
            training_loss(model, images, labels).backward()
            optimizer.step()
        del model, optimizer, images, labels
    return peak.bytes, peak.exact
