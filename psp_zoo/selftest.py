"""``psp-zoo selftest``: prove an installation works end to end, offline, without touching its caches.

Everything happens in a temporary folder: a tiny PSPNet checkpoint is written in the published
file format under its hashed name, served from an HTTP server on 127.0.0.1, downloaded and
verified through a temporary user manifest into a temporary cache, evaluated on a small dataset
in the real Cityscapes folder layout, written into a results table and used for a prediction
picture. Each step prints ``ok`` or ``FAILED: reason``; a step whose inputs failed is skipped.

The writers (``write_tiny_checkpoint``, ``write_mini_cityscapes``, ``write_manifest``) and
``serve_folder`` are public so tests can build the same material.
"""
from __future__ import annotations

import contextlib
import datetime
import functools
import hashlib
import io
import math
import os
import platform
import sys
import tempfile
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Callable, Dict, Iterator, Mapping, Optional, Sequence, TextIO, Tuple, Union

import cv2
import numpy as np
import torch
import yaml

from .errors import PspZooError
from .results import atomic_write

__all__ = ["TINY_ARCH", "write_tiny_checkpoint", "write_mini_cityscapes", "manifest_entry", "write_manifest",
           "serve_folder", "run_selftest"]

PathLike = Union[str, Path]
#: Widths of the tiny PSPNet: the real R-50-D8 depth and layout, narrow enough to run in a second.
TINY_ARCH = {"stem_channels": 8, "base_channels": 8, "channels": 16, "aux_channels": 8}
SELFTEST_NAME = "selftest_pspnet_r50-d8_64x64_cityscapes"
# Small test settings so the checkpoint runs in well under a second per image on a CPU; slide
# mode exercises the sliding-window path (3 x 2 windows on the 96 x 144 resized image).
SELFTEST_TEST_SETTINGS = {"mode": "slide", "img_scale": [192, 96], "crop_size": [64, 64], "stride": [48, 48]}


# --------------------------------------------------------------------------------------------
# reusable material: checkpoint, manifest, dataset, server


def _hashed_name(folder: Path, name: str, stamp: str, digest: str) -> Path:
    return folder / f"{name}_{stamp}-{digest[:8]}.pth"


def _calibrate_batchnorm(model: torch.nn.Module) -> None:
    """Give BN the statistics of real activations and random affine terms: with default ones a
    random 50-layer net's signal fades and its output ignores the input; with these it does not."""
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = None  # running stats = plain average over the calibration batches
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.normal_(0.0, 0.1)
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn(2, 3, 64, 64))
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = 0.1
    model.eval()


def write_tiny_checkpoint(folder: PathLike, name: str = SELFTEST_NAME, *, num_classes: int = 19,
                          depth: int = 50, seed: int = 0, stamp: Optional[str] = None) -> Path:
    """A tiny-width PSPNet (``TINY_ARCH``) with seeded weights and non-trivial BN statistics, saved
    as mmseg publishes checkpoints: ``{'meta', 'state_dict'}`` in ``<name>_<date>_<time>-<sha256[:8]>.pth``."""
    from .model import PSPNet

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng(devices=[]):  # leave the caller's random state alone
        torch.manual_seed(seed)
        model = PSPNet(depth=depth, num_classes=num_classes, **TINY_ARCH)
        _calibrate_batchnorm(model)
    stamp = stamp or datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d_%H%M%S")
    meta = {"psp_zoo_selftest": True, "seed": seed, "arch": dict(TINY_ARCH, depth=depth, num_classes=num_classes)}
    buffer = io.BytesIO()  # in memory: a file's name would end up inside the zip, changing the hash
    torch.save({"meta": meta, "state_dict": model.state_dict()}, buffer)
    data = buffer.getvalue()
    final = _hashed_name(folder, name, stamp, hashlib.sha256(data).hexdigest())
    atomic_write(final, data)
    return final


def manifest_entry(checkpoint_file: PathLike, url: str, *, dataset: str = "cityscapes",
                   num_classes: int = 19, depth: int = 50, test: Optional[Mapping] = None,
                   arch: Mapping[str, int] = TINY_ARCH) -> dict:
    """A user-manifest entry for a local hashed checkpoint file hosted at ``url``."""
    path = Path(checkpoint_file)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    name = path.stem.rsplit("-", 1)[0].rsplit("_", 2)[0]  # drop _<date>_<time>-<hash8>
    entry = {"name": name, "dataset": dataset, "depth": depth, "crop_size": [64, 64], "schedule": 1,
             "weights": url, "hash": digest[:8], "sha256": digest, "published": {},
             "model": dict(arch, num_classes=num_classes)}
    if test is not None:
        entry["test"] = dict(test)
    return entry


def write_manifest(path: PathLike, entries: Sequence[Mapping]) -> Path:
    """A user manifest (``--manifest`` / ``$PSP_ZOO_MANIFEST``) listing ``entries``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump({"version": 1, "models": [dict(e) for e in entries]}, sort_keys=False))
    return path


def _smooth_image(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    coarse = rng.integers(0, 256, (max(height // 16, 2), max(width // 16, 2), 3), dtype=np.uint8)
    return cv2.resize(coarse, (width, height), interpolation=cv2.INTER_LINEAR)


def write_mini_cityscapes(root: PathLike, *, num_images: int = 4, size: Tuple[int, int] = (64, 96),
                          num_classes: int = 19, seed: int = 0) -> Dict[str, Tuple[np.ndarray, np.ndarray]]:
    """Cityscapes validation files under ``root`` (``leftImg8bit/val/<city>/*_leftImg8bit.png``,
    ``gtFine/val/<city>/*_gtFine_labelTrainIds.png``); returns ``{name: (rgb, label)}``.

    Labels are blocks of class ids below ``num_classes`` with some 255 (ignored) pixels.
    """
    from PIL import Image

    rng = np.random.default_rng(seed)
    root, (height, width) = Path(root), size
    written = {}
    for index in range(num_images):
        city = ("selftown", "testville")[index % 2]
        name = f"{city}/{city}_{index:06d}_000019"
        rgb = _smooth_image(rng, height, width)
        blocks = rng.integers(0, num_classes, (max(height // 8, 1), max(width // 8, 1)), dtype=np.uint8)
        label = cv2.resize(blocks, (width, height), interpolation=cv2.INTER_NEAREST)
        label[rng.random((height, width)) < 0.05] = 255
        image_path = root / "leftImg8bit" / "val" / f"{name}_leftImg8bit.png"
        label_path = root / "gtFine" / "val" / f"{name}_gtFine_labelTrainIds.png"
        image_path.parent.mkdir(parents=True, exist_ok=True)
        label_path.parent.mkdir(parents=True, exist_ok=True)
        if not cv2.imwrite(str(image_path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)):
            raise OSError(f"could not write {image_path}")
        Image.fromarray(label, mode="L").save(label_path)
        written[name] = (rgb, label)
    return written


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:  # the selftest prints its own report
        pass


@contextlib.contextmanager
def serve_folder(folder: PathLike, port: int = 0) -> Iterator[str]:
    """Serve ``folder`` over HTTP on 127.0.0.1 (``port`` 0 = any free port); yields the base URL."""
    handler = functools.partial(_QuietHandler, directory=str(folder))
    if not 0 <= port <= 65535:  # bind() would raise OverflowError, not OSError
        raise PspZooError(f"port {port} is not a TCP port; choose one in 1..65535, or 0 for any free one")
    try:
        server = ThreadingHTTPServer(("127.0.0.1", port), handler)
    except OSError as exc:
        raise PspZooError(f"cannot serve on 127.0.0.1:{port} ({exc.strerror or exc}); "
                          f"choose a free --port or 0 for any") from None
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


@contextlib.contextmanager
def _no_proxy_for_localhost() -> Iterator[None]:
    """requests would send even 127.0.0.1 through $HTTP_PROXY unless $NO_PROXY exempts it."""
    saved = {key: os.environ.get(key) for key in ("NO_PROXY", "no_proxy")}
    for key, value in saved.items():
        os.environ[key] = ",".join(v for v in (value, "127.0.0.1") if v)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


# --------------------------------------------------------------------------------------------
# the steps


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text if isinstance(exc, PspZooError) else f"{type(exc).__name__}: {text}"


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
            self._print(title, f"FAILED: {_one_line(exc)}")
            self.failed.append(title)
            return False
        self._print(title, f"ok  {detail}" if detail else "ok")
        self.passed.add(title)
        return True

    def _print(self, title: str, outcome: str) -> None:
        print(f"  {title:<18} {outcome}", file=self.stream, flush=True)


def _versions() -> str:
    import torchvision

    from . import __version__

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


def _user_cache() -> str:
    """The real checkpoint cache must be writable (or creatable); checked without writing to it."""
    from .download import HOME_ENV, cache_dir

    path = cache_dir()
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise PspZooError(f"cannot write to the checkpoint cache {path} ({existing} is not a writable "
                          f"folder); downloads will fail: set {HOME_ENV} to a writable folder")
    return f"{path} ({'writable' if existing == path else 'can be created'})"


class _SelfTest:
    """The state the steps hand on to each other, in one temporary folder."""

    def __init__(self, work: Path, port: int, device: Optional[str], stack: contextlib.ExitStack):
        self.work, self.port, self.stack = work, port, stack
        self.device = device
        self.checkpoint_file: Optional[Path] = None
        self.base_url = self.manifest = self.downloaded = self.entry = None
        self.written: Dict[str, Tuple[np.ndarray, np.ndarray]] = {}
        self.result: Optional[dict] = None
        self.table_text = ""

    def checkpoint(self) -> str:
        from .checkpoint import load_checkpoint
        from .model import PSPNet

        self.checkpoint_file = write_tiny_checkpoint(self.work / "zoo" / "pspnet" / SELFTEST_NAME)
        load_checkpoint(PSPNet(depth=50, num_classes=19, **TINY_ARCH), self.checkpoint_file)
        return self.checkpoint_file.name

    def server(self) -> str:
        self.base_url = self.stack.enter_context(serve_folder(self.work / "zoo", self.port))
        return self.base_url

    def download(self) -> str:
        from .download import cache_state, download
        from .errors import DownloadError
        from .manifest import get_checkpoint

        url = f"{self.base_url}/pspnet/{SELFTEST_NAME}/{self.checkpoint_file.name}"
        entry = manifest_entry(self.checkpoint_file, url, test=SELFTEST_TEST_SETTINGS)
        self.manifest = write_manifest(self.work / "manifest.yml", [entry])
        self.entry = get_checkpoint(entry["name"], manifest=self.manifest)
        cache, options = self.work / "cache", dict(offline=False, quiet=True, retries=1, backoff=0.1)
        with _no_proxy_for_localhost():
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
        from .datasets import list_items

        root = self.work / "data" / "cityscapes"
        self.written = write_mini_cityscapes(root)
        found = list_items("cityscapes", self.work / "data")
        if [item.name for item in found] != sorted(self.written):
            raise PspZooError(f"the dataset reader found {[i.name for i in found]}, expected {sorted(self.written)}")
        return f"{len(found)} Cityscapes images in {root}"

    def evaluate(self) -> str:
        from .evaluate import evaluate

        self.result = evaluate(self.entry.name, self.work / "data", manifest=self.manifest,
                               checkpoint=self.downloaded, device=self.device, num_workers=0, progress=False)
        if self.result["num_images"] != len(self.written):
            raise PspZooError(f"evaluated {self.result['num_images']} images, expected {len(self.written)}")
        if not all(0.0 <= self.result[key] <= 100.0 for key in ("aAcc", "mIoU", "mAcc")):
            raise PspZooError(f"metrics out of range: {self.result}")
        return (f"{self.result['num_images']} images on {self.result['device']}: aAcc {self.result['aAcc']:.2f}, "
                f"mIoU {self.result['mIoU']:.2f}, mAcc {self.result['mAcc']:.2f}")

    def table(self) -> str:
        from .manifest import Manifest, get_manifest
        from .results import read_results, result_path, write_result
        from .tables import build_tables, render

        record = _record_of(self.result, self.entry.dataset)
        write_result(result_path(self.work / "results", record.checkpoint, record.environment), record)
        records = read_results(self.work / "results")
        datasets = get_manifest(self.manifest).datasets
        tables = build_tables(Manifest(datasets, [self.entry]), records)
        reproduced = tables[0].frame["mIoU reproduced"].tolist()
        if len(records) != 1 or not math.isclose(reproduced[0], self.result["mIoU"], abs_tol=1e-6):
            raise PspZooError(f"the table shows mIoU {reproduced}, evaluate gave {self.result['mIoU']}")
        self.table_text = render(tables, "md")
        return f"{records[0].source}"

    def predict(self) -> str:
        from .prediction import Predictor, predict_files

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
            valid = label != 255
            agree, counted = agree + int((labels[valid] == label[valid]).sum()), counted + int(valid.sum())
        return f"{outcome[1]}{self._agreement(100.0 * agree / counted)}"

    def _agreement(self, aacc: float) -> str:
        """Pixel accuracy of the saved predictions must be the one evaluate reported."""
        if self.result is None:
            return ""
        if abs(aacc - self.result["aAcc"]) > 0.05:
            raise PspZooError(f"saved predictions score aAcc {aacc:.3f}, evaluate reported {self.result['aAcc']:.3f}")
        return f" (its labels score aAcc {aacc:.2f}, as evaluate reported)"


def _read_palette_png(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as image:
        if image.mode != "P":
            raise PspZooError(f"{path} is a {image.mode} image, expected an indexed-colour (P) PNG")
        return np.array(image)


def _record_of(result: Mapping, dataset: str):
    """A results record of one ``evaluate()`` result (percentages, per-class dicts keyed by name)."""
    from .results import ImageCount, Metrics, ResultRecord, environment_info, none_if_nan

    per_class = {name: {"IoU": none_if_nan(iou), "Acc": none_if_nan(result["Acc"][name])}
                 for name, iou in result["IoU"].items()}
    metrics = Metrics(aacc=result["aAcc"], miou=result["mIoU"], macc=result["mAcc"], per_class=per_class)
    count = int(result["num_images"])
    return ResultRecord(checkpoint=result["model"], dataset=dataset, environment=environment_info(result["device"]),
                        images=ImageCount(count, available=count), settings=dict(result["settings"]),
                        single_scale=metrics)


# --------------------------------------------------------------------------------------------


def _work_folder(keep: Optional[PathLike], stack: contextlib.ExitStack) -> Path:
    if keep is None:
        return Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="psp-zoo-selftest-")))
    folder = Path(keep).expanduser()
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise PspZooError(f"--keep {folder}: choose a new or empty folder, so that nothing of yours is mixed in")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def run_selftest(*, keep: Optional[PathLike] = None, port: int = 0, device: Optional[str] = None,
                 stream: Optional[TextIO] = None) -> int:
    """Run every step, print a report on ``stream``; returns the number of steps that did not pass.

    ``keep`` is a new or empty folder to leave the files in (default: a temporary folder, removed).
    ``port`` is the local server's port (0: any free one). ``device`` defaults to CUDA if available.
    ``stream`` defaults to standard output.
    """
    stream = stream or sys.stdout
    with contextlib.ExitStack() as stack:
        work = _work_folder(keep, stack)
        test = _SelfTest(work, port, device, stack)
        print(f"psp-zoo selftest in {work}", file=stream, flush=True)
        report = _Report(stream)
        report.step("versions", _versions)
        report.step("devices", _devices)
        report.step("user cache", _user_cache)
        report.step("tiny checkpoint", test.checkpoint)
        report.step("local server", test.server, needs=["tiny checkpoint"])
        report.step("download", test.download, needs=["local server"])
        report.step("mini dataset", test.dataset)
        report.step("evaluate", test.evaluate, needs=["download", "mini dataset"])
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
