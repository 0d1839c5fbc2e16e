"""``psp-zoo selftest``: prove an installation works end to end, offline, without touching its caches.

Everything happens in a temporary folder: a tiny PSPNet checkpoint is written in the published
file format under its hashed name, served from an HTTP server on 127.0.0.1, downloaded and
verified through a temporary user manifest into a temporary cache, evaluated on a small dataset
in the real Cityscapes folder layout, written into a results table and used for a prediction
picture. Each step prints ``ok`` or ``FAILED: reason``; a step whose inputs failed is skipped.

The material (tiny checkpoint, manifest, mini dataset, server) comes from :mod:`psp_zoo.testing`.
"""
from __future__ import annotations

import contextlib
import math
import platform
import sys
import tempfile
from pathlib import Path
from typing import Callable, Dict, Optional, Sequence, TextIO, Tuple, Union

import cv2
import numpy as np
import torch

from ._version import __version__
from .datasets.readers import list_items
from .errors import DownloadError, PspZooError, one_line
from .evaluation.evaluator import evaluate
from .files import check_writable_folder
from .hub.cache import HOME_ENV, cache_dir, cache_state, download
from .manifest.loading import IGNORE_INDEX, Manifest, get_checkpoint, get_manifest
from .model import PSPNet
from .model.checkpoint import load_checkpoint
from .prediction.predictor import Predictor, predict_files
from .results.records import read_results, result_path, write_result
from .results.tables import build_tables, render
from .testing import (
    SELFTEST_NAME,
    SELFTEST_TEST_SETTINGS,
    TINY_ARCH,
    manifest_entry,
    no_proxy_for_localhost,
    serve_folder,
    write_manifest,
    write_mini_cityscapes,
    write_tiny_checkpoint,
)

__all__ = ["run_selftest"]

PathLike = Union[str, Path]


# --------------------------------------------------------------------------------------------
# the steps


class _Report:
    """Runs steps in order, prints each outcome, and skips a step whose prerequisites did not pass."""

    def __init__(self, stream: TextIO):
        self.stream, self.passed, self.failed = stream, set(), []

    def step(self, title: str, action: Callable[[], str], needs: Sequence[str] = ()) -> bool:
        missing = [need for need in needs if need not in self.passed]
        if missing:
            self._print(title, f"skipped (needs: {', '.join(missing)})")
            self.failed.append(title)
            return False
        try:
            detail = action()
        except Exception as exc:  # a self-test reports any failure as a result, whatever its kind
            self._print(title, f"FAILED: {one_line(exc)}")
            self.failed.append(title)
            return False
        self._print(title, f"ok  {detail}" if detail else "ok")
        self.passed.add(title)
        return True

    def _print(self, title: str, outcome: str) -> None:
        print(f"  {title:<18} {outcome}", file=self.stream, flush=True)


def _versions() -> str:
    import torchvision


    return (f"psp-zoo {__version__}, torch {torch.__version__}, torchvision {torchvision.__version__}, "
            f"numpy {np.__version__}, opencv {cv2.__version__}, python {platform.python_version()}")


def _devices() -> str:
    found = [f"cpu ({torch.get_num_threads()} threads)"]
    if not torch.cuda.is_available():
        build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "no CUDA"
        return f"{found[0]}; no CUDA device (torch built with {build})"
    for index in range(torch.cuda.device_count()):
        device = torch.device("cuda", index)
        ones = torch.ones(64, 64, device=device)
        if float((ones @ ones).sum()) != 64.0 ** 3:  # the device computes, not just enumerates
            raise PspZooError(f"{device} computed a wrong matrix product")
        props = torch.cuda.get_device_properties(device)
        found.append(f"{device} {props.name} ({props.total_memory / 2 ** 30:.0f} GiB)")
    return "; ".join(found)


def _fast_path() -> str:
    """The default fast path (folded BN, factorized head, Winograd convs) gives the plain model's
    logits on this machine's kernels, on a narrow R-18 whose last stage is wide enough for Winograd."""
    import torch

    from .deploy.verify import compare_outputs
    from .model import PSPNet
    from .model.optimization import optimize

    torch.manual_seed(0)
    model = PSPNet(depth=18, num_classes=5, base_channels=32, stem_channels=16).eval()
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        plain = model(x)
    fast = optimize(model)
    found = compare_outputs(plain, fast(x))
    if found.rel_diff > 1e-4 or found.agreement < 1.0:
        raise PspZooError(f"the fp32 fast path differs from the plain model by {found.rel_diff:.1e} (relative); "
                          "run with --no-winograd / --no-factorize-head and report this machine")
    applied = [name for name in ("fuse_bn", "channels_last", "factorize_head", "winograd")
               if fast.optimizations[name]]
    return f"{', '.join(applied)} on cpu: logits within {found.rel_diff:.1e} of the plain model, same labels"


def _user_cache() -> str:
    """The real checkpoint cache must be writable (or creatable); checked without writing to it."""
    path = cache_dir()
    try:
        check_writable_folder(path, "checkpoint cache")
    except PspZooError as exc:
        raise PspZooError(f"cannot write to the checkpoint cache {path} ({exc}); downloads will fail: "
                          f"set {HOME_ENV} to a writable folder") from None
    return f"{path} ({'writable' if path.is_dir() else 'can be created'})"


class _SelfTest:
    """The state the steps hand on to each other, in one temporary folder."""

    def __init__(self, work: Path, port: int, device: Optional[str], stack: contextlib.ExitStack):
        self.work, self.port, self.stack = work, port, stack
        self.device = device
        self.checkpoint_file: Optional[Path] = None
        self.base_url = self.manifest = self.downloaded = self.entry = None
        self.written: Dict[str, Tuple[np.ndarray, np.ndarray]] = {}
        self.result = None  # the evaluate step's ResultRecord
        self.table_text = ""

    def checkpoint(self) -> str:

        self.checkpoint_file = write_tiny_checkpoint(self.work / "zoo" / "pspnet" / SELFTEST_NAME)
        load_checkpoint(PSPNet(depth=50, num_classes=19, **TINY_ARCH), self.checkpoint_file)
        return self.checkpoint_file.name

    def server(self) -> str:
        self.base_url = self.stack.enter_context(serve_folder(self.work / "zoo", self.port))
        return self.base_url

    def download(self) -> str:

        url = f"{self.base_url}/pspnet/{SELFTEST_NAME}/{self.checkpoint_file.name}"
        entry = manifest_entry(self.checkpoint_file, url, test=SELFTEST_TEST_SETTINGS)
        self.manifest = write_manifest(self.work / "manifest.yml", [entry])
        self.entry = get_checkpoint(entry["name"], manifest=self.manifest)
        cache, options = self.work / "cache", dict(offline=False, quiet=True, retries=1, backoff=0.1)
        with no_proxy_for_localhost():
            self.downloaded = download(self.entry, cache_dir=cache, **options)
            try:  # the same file name, hence its own cache
                download(self._corrupt_copy(), sha256=entry["sha256"], cache_dir=self.work / "cache-2", **options)
            except DownloadError as exc:
                if "SHA-256 mismatch" not in str(exc):
                    raise
            else:
                raise PspZooError("a corrupted copy of the checkpoint passed the hash check")
        if cache_state(self.entry, cache_dir=cache) != "cached":
            raise PspZooError(f"{self.downloaded} is not in the cache after the download")
        return f"{self.downloaded} (SHA-256 verified; a corrupted copy was rejected)"

    def _corrupt_copy(self) -> str:
        """The URL of the checkpoint with one byte changed, served under the same hashed name."""
        data = bytearray(self.checkpoint_file.read_bytes())
        data[len(data) // 2] ^= 0xFF
        bad_dir = self.work / "zoo" / "corrupt"
        bad_dir.mkdir(parents=True, exist_ok=True)
        (bad_dir / self.checkpoint_file.name).write_bytes(bytes(data))
        return f"{self.base_url}/corrupt/{self.checkpoint_file.name}"

    def dataset(self) -> str:

        root = self.work / "data" / "cityscapes"
        self.written = write_mini_cityscapes(root)
        found = list_items("cityscapes", self.work / "data")
        if [item.name for item in found] != sorted(self.written):
            raise PspZooError(f"the dataset reader found {[i.name for i in found]}, expected {sorted(self.written)}")
        return f"{len(found)} Cityscapes images in {root}"

    def evaluate_step(self) -> str:
        self.result = evaluate(self.entry.name, self.work / "data", manifest=self.manifest,
                               checkpoint=self.downloaded, device=self.device, num_workers=0, progress=False)
        if self.result.images.count != len(self.written):
            raise PspZooError(f"evaluated {self.result.images.count} images, expected {len(self.written)}")
        if not all(0.0 <= value <= 100.0 for value in (self.result.aacc, self.result.miou, self.result.macc)):
            raise PspZooError(f"metrics out of range: {self.result.metrics}")
        return (f"{self.result.images.count} images on {self.result.environment['device_name']}: "
                f"aAcc {self.result.aacc:.2f}, mIoU {self.result.miou:.2f}, mAcc {self.result.macc:.2f}")

    def table(self) -> str:
        record = self.result
        write_result(record, result_path(self.work / "results", record.checkpoint, record.environment))
        records = read_results(self.work / "results")
        datasets = get_manifest(self.manifest).datasets
        tables = build_tables(Manifest(datasets, [self.entry]), records)
        reproduced = tables[0].frame["mIoU reproduced"].tolist()
        if len(records) != 1 or not math.isclose(reproduced[0], record.miou, abs_tol=1e-6):
            raise PspZooError(f"the table shows mIoU {reproduced}, evaluate gave {record.miou}")
        self.table_text = render(tables, "md")
        return f"{records[0].source}"

    def predict(self) -> str:

        predictor = Predictor.create(self.entry.name, manifest=self.manifest, checkpoint=self.downloaded,
                                     device=self.device)
        images = sorted((self.work / "data" / "cityscapes" / "leftImg8bit" / "val").rglob("*.png"))
        agree = counted = 0
        for (path, outcome), (rgb, label) in zip(predict_files(predictor, images, self.work / "predictions"),
                                                 (self.written[n] for n in sorted(self.written))):
            if isinstance(outcome, Exception):
                raise outcome
            labels = _read_palette_png(outcome[0])
            if labels.shape != rgb.shape[:2]:
                raise PspZooError(f"{outcome[0]} is {labels.shape}, the image {rgb.shape[:2]}")
            valid = label != IGNORE_INDEX
            agree, counted = agree + int((labels[valid] == label[valid]).sum()), counted + int(valid.sum())
        return f"{outcome[1]}{self._agreement(100.0 * agree / counted)}"

    def _agreement(self, aacc: float) -> str:
        """Pixel accuracy of the saved predictions must be the one evaluate reported."""
        if self.result is None:
            return ""
        if abs(aacc - self.result.aacc) > 0.05:
            raise PspZooError(f"saved predictions score aAcc {aacc:.3f}, evaluate reported {self.result.aacc:.3f}")
        return f" (its labels score aAcc {aacc:.2f}, as evaluate reported)"


def _read_palette_png(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as image:
        if image.mode != "P":
            raise PspZooError(f"{path} is a {image.mode} image, expected an indexed-colour (P) PNG")
        return np.array(image)


# --------------------------------------------------------------------------------------------


def _work_folder(keep: Optional[PathLike], stack: contextlib.ExitStack) -> Path:
    if keep is None:
        return Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="psp-zoo-selftest-")))
    folder = Path(keep).expanduser()
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise PspZooError(f"keep folder {folder}: choose a new or empty folder, so that nothing of yours is mixed in",
                          cli_hint="--keep DIR")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def run_selftest(*, keep: Optional[PathLike] = None, port: int = 0, device: Optional[str] = None,
                 stream: Optional[TextIO] = None) -> int:
    """Run every step, print a report on ``stream``; returns the number of steps that did not pass.

    ``keep`` is a new or empty folder to leave the files in (default: a temporary folder, removed).
    ``port`` is the local server's port (0: any free one). ``device`` defaults to CUDA if available.
    ``stream`` defaults to standard output.
    """
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        # a wrong argument, not a failed step of the installation
        raise PspZooError(f"port must be a whole number from 0 to 65535 (0: any free port), got {port!r}")
    stream = stream or sys.stdout
    with contextlib.ExitStack() as stack:
        work = _work_folder(keep, stack)
        test = _SelfTest(work, port, device, stack)
        print(f"psp-zoo selftest in {work}", file=stream, flush=True)
        report = _Report(stream)
        report.step("versions", _versions)
        report.step("devices", _devices)
        report.step("user cache", _user_cache)
        report.step("fast path", _fast_path)
        report.step("tiny checkpoint", test.checkpoint)
        report.step("local server", test.server, needs=["tiny checkpoint"])
        report.step("download", test.download, needs=["local server"])
        report.step("mini dataset", test.dataset)
        report.step("evaluate", test.evaluate_step, needs=["download", "mini dataset"])
        if report.step("results table", test.table, needs=["evaluate"]):
            print("\n".join("      " + line for line in test.table_text.strip().splitlines()), file=stream)
        report.step("predict", test.predict, needs=["download", "mini dataset"])
        total = len(report.passed) + len(report.failed)
        if report.failed:
            print(f"selftest: {len(report.failed)} of {total} steps did not pass: {', '.join(report.failed)}",
                  file=stream, flush=True)
        else:
            print(f"selftest: all {total} steps ok", file=stream, flush=True)
        print(f"files kept in {work}" if keep is not None else "temporary files removed "
              "(use --keep DIR to keep them)", file=stream, flush=True)
        return len(report.failed)
