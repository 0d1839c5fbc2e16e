"""Test material that psp-zoo itself ships: tiny checkpoints, mini datasets, manifests, a local server.

Used by ``psp-zoo selftest`` to prove an installation works offline, and by psp-zoo's own tests
(and users' tests of code built on psp-zoo) to make the same material: a tiny-width PSPNet saved
in the published file format under its hashed name, a user-manifest entry for it, a small
validation set in the real Cityscapes folder layout, and an HTTP server on 127.0.0.1. Also the
fine-tuning walk-through's example (``psp-zoo dataset example DIR``, :func:`write_example`): a
dataset of coloured shapes in a layout of its own, its declaration, and a starting checkpoint.
"""
from __future__ import annotations

import contextlib
import datetime
import functools
import hashlib
import io
import os
import sys
import threading
from collections import OrderedDict
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Dict, Iterator, Mapping, Optional, Sequence, Tuple, Union

import cv2
import numpy as np
import torch
import yaml

from .errors import PspZooError
from .files import atomic_write
from .manifest.backbones import FAMILIES
from .model import PSPNet
from .model.checkpoint import to_semseg_names

__all__ = ["TINY_ARCH", "SHAPE_CLASSES", "write_shapes_ade20k", "EXAMPLE_CLASSES", "EXAMPLE_PALETTE",
           "example_declaration", "example_sample", "write_example_split", "write_example_dataset",
           "write_example_manifest", "write_example", "SELFTEST_NAME", "SELFTEST_TEST_SETTINGS",
           "calibrate_batchnorm", "write_tiny_checkpoint", "TINY_SEMSEG_ARCH", "tiny_semseg_model",
           "write_semseg_checkpoint", "write_mini_cityscapes", "manifest_entry", "write_manifest",
           "serve_folder", "LocalHTTPServer", "no_proxy_for_localhost"]

PathLike = Union[str, Path]
#: Widths of the tiny PSPNet: the real R-50-D8 depth and layout, narrow enough to run in a second.
TINY_ARCH = {"stem_channels": 8, "base_channels": 8, "channels": 16, "aux_channels": 8}
SELFTEST_NAME = "selftest_pspnet_r50-d8_64x64_cityscapes"
# Small test settings so the checkpoint runs in well under a second per image on a CPU; slide
# mode exercises the sliding-window path (3 x 2 windows on the 96 x 144 resized image).
SELFTEST_TEST_SETTINGS = {"mode": "slide", "img_scale": [192, 96], "crop_size": [64, 64], "stride": [48, 48]}


def _hashed_name(folder: Path, name: str, stamp: str, digest: str) -> Path:
    return folder / f"{name}_{stamp}-{digest[:8]}.pth"


def calibrate_batchnorm(model: torch.nn.Module, inputs: Optional[Sequence[torch.Tensor]] = None, *,
                        random_affine: bool = True, residual_scale: float = 1.0) -> torch.nn.Module:
    """Give a randomly initialised PSPNet's BN layers the statistics of real activations (the
    average over ``inputs``, default two random 2x3x64x64 batches) and, with ``random_affine``,
    random scales and shifts: with fresh BN layers a random 50-layer net's signal fades and its
    output ignores the input. ``residual_scale`` < 1 shrinks each residual block's last BN scale,
    as trained ResNets have small residual branches (a random one is chaotic: a 1e-7 change of
    the input grows to 30% of the logits). Returns the model in eval mode."""
    batch_norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for module in batch_norms:
        module.momentum = None  # running stats = plain average over the calibration batches
        if random_affine:
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.normal_(0.0, 0.1)
    model.train()
    with torch.no_grad():
        for batch in inputs if inputs is not None else [torch.randn(2, 3, 64, 64) for _ in range(2)]:
            model(batch)
    for module in batch_norms:
        module.momentum = 0.1
    for name, module in model.named_modules():
        last_bn = getattr(module, "bn3", None) if hasattr(module, "conv3") else getattr(module, "bn2", None)
        if residual_scale != 1.0 and name.startswith("backbone.layer") and name.count(".") == 2 and last_bn is not None:
            last_bn.weight.data.mul_(residual_scale)
    return model.eval()


def write_tiny_checkpoint(folder: PathLike, name: str = SELFTEST_NAME, *, num_classes: int = 19,
                          depth: int = 50, seed: int = 0, stamp: Optional[str] = None) -> Path:
    """A tiny-width PSPNet (``TINY_ARCH``) with seeded weights and non-trivial BN statistics, saved
    as mmseg publishes checkpoints: ``{'meta', 'state_dict'}`` in ``<name>_<date>_<time>-<sha256[:8]>.pth``.

    ``folder``: where the file goes (made if missing); ``name``: the file name's stem; ``num_classes``
    and ``depth`` (a depth of ``manifest.backbones.STAGE_BLOCKS``, mmseg's V1c stem): the network;
    ``seed``: the weights drawn; ``stamp``: the ``<date>_<time>`` of the name (default now, UTC). Returns the
    file's path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng(devices=[]):  # leave the caller's random state alone
        torch.manual_seed(seed)
        model = PSPNet(depth=depth, num_classes=num_classes, **TINY_ARCH)
        calibrate_batchnorm(model)
    stamp = stamp or datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d_%H%M%S")
    meta = {"psp_zoo_selftest": True, "seed": seed, "arch": dict(TINY_ARCH, depth=depth, num_classes=num_classes)}
    buffer = io.BytesIO()  # in memory: a file's name would end up inside the zip, changing the hash
    torch.save({"meta": meta, "state_dict": model.state_dict()}, buffer)
    data = buffer.getvalue()
    final = _hashed_name(folder, name, stamp, hashlib.sha256(data).hexdigest())
    atomic_write(final, data)
    return final


#: The tiny widths of the PSPNet authors' network (family 'semseg': 8, 8, 16 stem channels), in their
#: proportions: the pyramid and ``cls`` a quarter of stage 4's width, ``aux`` a quarter of stage 3's.
TINY_SEMSEG_ARCH = {"stem_channels": 16, "base_channels": 8, "channels": 64, "aux_channels": 32}


def tiny_semseg_model(*, num_classes: int = 19, depth: int = 50, seed: int = 0) -> PSPNet:
    """The authors' network (``FAMILIES['semseg']``) at ``TINY_SEMSEG_ARCH`` widths, seeded random
    weights with calibrated BatchNorm, in eval mode."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = PSPNet(depth=depth, num_classes=num_classes, align_corners=True,
                       **{**FAMILIES["semseg"], **TINY_SEMSEG_ARCH})
        calibrate_batchnorm(model, [torch.randn(2, 3, 65, 65) for _ in range(2)])
    return model


def write_semseg_checkpoint(path: PathLike, model: Optional[torch.nn.Module] = None, *, epoch: int = 100,
                            **model_kwargs) -> Path:
    """``model`` (default :func:`tiny_semseg_model` of ``model_kwargs``) saved as the PSPNet authors
    publish theirs: ``{'epoch', 'state_dict', 'optimizer'}``, keys under their names with DDP's
    ``module.`` prefix, an SGD state beside them."""
    model = model if model is not None else tiny_semseg_model(**model_kwargs)
    state = OrderedDict((f"module.{key}", value) for key, value in to_semseg_names(model.state_dict()).items())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    buffer = io.BytesIO()
    torch.save({"epoch": epoch, "state_dict": state, "optimizer": optimizer.state_dict()}, buffer)
    atomic_write(Path(path), buffer.getvalue())
    return Path(path)


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
    """A user manifest (``manifest=`` / ``$PSP_ZOO_MANIFEST``) listing ``entries``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump({"version": 1, "models": [dict(e) for e in entries]}, sort_keys=False))
    return path


def _smooth_image(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    coarse = rng.integers(0, 256, (max(height // 16, 2), max(width // 16, 2), 3), dtype=np.uint8)
    return cv2.resize(coarse, (width, height), interpolation=cv2.INTER_LINEAR)


def write_mini_cityscapes(root: PathLike, *, num_images: int = 4, size: Tuple[int, int] = (64, 96),
                          sizes: Optional[Sequence[Tuple[int, int]]] = None, num_classes: int = 19,
                          label_values: Optional[Sequence[int]] = None, label_ids: bool = False,
                          smooth: bool = True, seed: int = 0) -> Dict[str, Tuple[np.ndarray, np.ndarray]]:
    """Cityscapes validation files under ``root`` (``leftImg8bit/val/<city>/*_leftImg8bit.png``,
    ``gtFine/val/<city>/*_gtFine_labelTrainIds.png``, or ``*_gtFine_labelIds.png`` with
    ``label_ids``); returns ``{name: (rgb, label)}``.

    ``sizes`` (h, w) per image, default ``num_images`` of ``size``. Labels are blocks of class ids
    below ``num_classes`` with some 255 (ignored) pixels, or pixels drawn from ``label_values``.
    ``smooth`` images look like photos to a network; otherwise pixels are independent noise.
    """
    from PIL import Image

    rng = np.random.default_rng(seed)
    written = {}
    for index, (height, width) in enumerate(sizes or [size] * num_images):
        city = ("aachen", "bonn")[index % 2]
        name = f"{city}/{city}_{index:06d}_000019"
        rgb = _smooth_image(rng, height, width) if smooth else rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        label = _label_map(rng, height, width, num_classes, label_values)
        image_path = Path(root) / "leftImg8bit" / "val" / f"{name}_leftImg8bit.png"
        kind = "labelIds" if label_ids else "labelTrainIds"
        label_path = Path(root) / "gtFine" / "val" / f"{name}_gtFine_{kind}.png"
        image_path.parent.mkdir(parents=True, exist_ok=True)
        label_path.parent.mkdir(parents=True, exist_ok=True)
        if not cv2.imwrite(str(image_path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)):
            raise OSError(f"could not write {image_path}")
        Image.fromarray(label, mode="L").save(label_path)
        written[name] = (rgb, label)
    return written


def _label_map(rng: np.random.Generator, height: int, width: int, num_classes: int,
               values: Optional[Sequence[int]]) -> np.ndarray:
    if values is not None:
        return rng.choice(np.asarray(values, dtype=np.uint8), size=(height, width))
    blocks = rng.integers(0, num_classes, (max(height // 8, 1), max(width // 8, 1)), dtype=np.uint8)
    label = cv2.resize(blocks, (width, height), interpolation=cv2.INTER_NEAREST)
    label[rng.random((height, width)) < 0.05] = 255
    return label


class LocalHTTPServer(ThreadingHTTPServer):
    """A threaded HTTP server for 127.0.0.1 whose clients may hang up mid-transfer (download tests
    drop and resume connections on purpose): that is not printed as an error on stderr."""

    daemon_threads = True

    def handle_error(self, request, client_address) -> None:
        if isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            return
        super().handle_error(request, client_address)

    def start(self, poll_interval: float = 0.05) -> str:
        """Serve from a daemon thread; returns the base URL (``http://127.0.0.1:<port>``)."""
        self._thread = threading.Thread(target=self.serve_forever, args=(poll_interval,), daemon=True)
        self._thread.start()
        return f"http://127.0.0.1:{self.server_address[1]}"

    def stop(self) -> None:
        """Stop serving, close the socket and wait for the thread."""
        self.shutdown()
        self.server_close()
        self._thread.join(10)


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
        server = LocalHTTPServer(("127.0.0.1", port), handler)
    except OSError as exc:
        raise PspZooError(f"cannot serve on 127.0.0.1:{port} ({exc.strerror or exc}); "
                          f"choose a free port, or 0 for any", cli_hint="--port") from None
    try:
        yield server.start()
    finally:
        server.stop()


@contextlib.contextmanager
def no_proxy_for_localhost() -> Iterator[None]:
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
# the fine-tuning walk-through's example (docs/finetune.md)

#: The example's classes and their colours (RGB).
EXAMPLE_CLASSES = ("background", "disc", "square")
EXAMPLE_PALETTE = ((0, 0, 0), (220, 20, 60), (0, 0, 142))
EXAMPLE_SIZE = (96, 96)  # (h, w)
#: the dataset's training facts in docs/finetune.md: milder scale jitter than mmseg's 0.5-2.0 for 96x96 images
EXAMPLE_TRAIN = {"ratio_range": [0.75, 1.5]}
#: The example's starting checkpoint: a 5-class tiny-width R-18-D8, as a published 5-class file would be.
EXAMPLE_START = "tiny_pspnet_r18-d8.pth"


def example_declaration(**changes) -> dict:
    """The example dataset's manifest declaration (``changes`` replace or add top-level fields)."""
    spec = {
        "title": "Shapes",
        "num_classes": 3,
        "classes": list(EXAMPLE_CLASSES),
        "palette": [list(c) for c in EXAMPLE_PALETTE],
        "img_scale": [EXAMPLE_SIZE[1], EXAMPLE_SIZE[0]],
        "reduce_zero_label": False,
        "ignore_index": 255,
        "train_images_per_gpu": 4,
        "test": {"mode": "whole"},
        "layout": {"folders": [""], "images": "images/val", "labels": "masks/val", "image_suffix": ".jpg",
                   "label_suffix": "_mask.png", "train": {"images": "images/train", "labels": "masks/train"}},
    }
    spec.update(changes)
    return spec


def write_example_manifest(path: PathLike, key: str = "shapes", spec: Optional[dict] = None,
                           models: Sequence[Mapping] = ()) -> Path:
    """A user manifest declaring the example dataset under ``key`` (and any model entries)."""
    data = {"version": 1, "datasets": {key: example_declaration() if spec is None else spec}}
    if models:
        data["models"] = [dict(m) for m in models]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _example_background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Smooth mid-grey blotches with a slight green tint: neither as bright as a disc nor as blue as a square."""
    grey = rng.integers(90, 150, (h // 12 + 2, w // 12 + 2, 1)).astype(np.float32)
    coarse = grey + rng.integers(-10, 11, grey.shape[:2] + (3,)) + np.array([0, 15, 0], np.float32)
    return cv2.resize(coarse, (w, h), interpolation=cv2.INTER_LINEAR)


def example_sample(rng: np.random.Generator, size: Tuple[int, int] = EXAMPLE_SIZE) -> Tuple[np.ndarray, np.ndarray]:
    """One RGB image and its label: discs (bright yellow-orange) and squares (dark blue) on a smooth
    background, each shape ringed by 2 pixels of 255 (ignored), as VOC marks its object borders."""
    h, w = size
    image = _example_background(rng, h, w)
    label = np.zeros((h, w), np.uint8)
    for _ in range(rng.integers(2, 4)):
        cls = int(rng.integers(1, 3))
        r = int(rng.integers(h // 10, h // 4))
        cy, cx = (int(v) for v in rng.integers(r, (h - r, w - r)))
        mask = np.zeros((h, w), np.uint8)
        if cls == 1:
            cv2.circle(mask, (cx, cy), r, 1, -1)
            colour = (rng.integers(210, 251), rng.integers(160, 221), rng.integers(30, 81))  # bright yellow-orange
        else:
            cv2.rectangle(mask, (cx - r, cy - r), (cx + r, cy + r), 1, -1)
            colour = (rng.integers(20, 51), rng.integers(30, 71), rng.integers(120, 181))  # dark blue
        ring = cv2.dilate(mask, np.ones((5, 5), np.uint8)) - cv2.erode(mask, np.ones((3, 3), np.uint8))
        image[mask > 0] = colour
        label[mask > 0] = cls
        label[ring > 0] = 255
    noise = rng.normal(0, 6, image.shape)
    return np.clip(image + noise, 0, 255).astype(np.uint8), label


def write_example_split(root: PathLike, split: str, count: int, *, seed: int,
                        size: Tuple[int, int] = EXAMPLE_SIZE) -> Dict[str, Tuple[Path, Path]]:
    """``count`` images and masks of ``split`` under ``root``: ``images/<split>/shape_NNN.jpg`` and
    ``masks/<split>/shape_NNN_mask.png``; returns ``{name: (image path, mask path)}``."""
    rng = np.random.default_rng(seed)
    written = {}
    for index in range(count):
        image, label = example_sample(rng, size)
        name = f"shape_{index:03d}"
        image_path = Path(root) / "images" / split / f"{name}.jpg"
        label_path = Path(root) / "masks" / split / f"{name}_mask.png"
        _write_pair(image_path, label_path, image, label)
        written[name] = (image_path, label_path)
    return written


def write_example_dataset(root: PathLike, *, train: int = 32, val: int = 8, seed: int = 0) -> Path:
    """The example's images and masks: ``train`` training and ``val`` held-out images (different seeds)."""
    write_example_split(root, "train", train, seed=seed)
    write_example_split(root, "val", val, seed=seed + 1000)
    return Path(root)


def write_example(root: PathLike, *, train: int = 64, val: int = 8) -> Dict[str, Path]:
    """Everything the fine-tuning walk-through needs offline, under ``root`` (a new or empty folder):
    the dataset (``images/``, ``masks/``), its declaration ``shapes.yml`` and the starting checkpoint
    ``tiny_pspnet_r18-d8.pth`` (:func:`write_tiny_checkpoint`: a 5-class tiny-width R-18-D8 in the
    published format, standing in for a published checkpoint). Returns the paths by role."""
    root = Path(root)
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise PspZooError(f"{root} is not a new or empty folder; choose another for the example")
    write_example_dataset(root, train=train, val=val)
    manifest = write_example_manifest(root / "shapes.yml", spec=example_declaration(train=EXAMPLE_TRAIN))
    written = write_tiny_checkpoint(root, EXAMPLE_START[:-len(".pth")], num_classes=5, depth=18,
                                    stamp="20260101_000000")
    start = written.with_name(EXAMPLE_START)
    os.replace(written, start)
    return {"dataset": root, "manifest": manifest, "checkpoint": start}


def _write_pair(image_path: Path, label_path: Path, rgb: np.ndarray, label: np.ndarray) -> None:
    from PIL import Image

    image_path.parent.mkdir(parents=True, exist_ok=True)
    label_path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(image_path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 95]):
        raise OSError(f"could not write {image_path}")
    Image.fromarray(label, mode="L").save(label_path)


#: The classes of :func:`write_shapes_ade20k`: the example's (label value - 1, ADE20K's reduce_zero_label).
SHAPE_CLASSES = EXAMPLE_CLASSES


def write_shapes_ade20k(root: PathLike, *, train: int = 32, val: int = 8, size: Tuple[int, int] = (64, 64),
                        seed: int = 0) -> Path:
    """The example's shapes in ADE20K's layout under ``root`` (returned).

    ``images/{training,validation}/*.jpg`` and ``annotations/{training,validation}/*.png`` with
    label 0 unlabelled and 1..3 the :data:`SHAPE_CLASSES` (ADE20K's ``reduce_zero_label`` makes
    them 0..2; the rings stay 255). Different seeds draw different images.
    """
    rng = np.random.default_rng(seed)
    for split, count in (("training", train), ("validation", val)):
        for index in range(count):
            rgb, label = example_sample(rng, size)
            label = np.where(label == 255, label, label + 1).astype(np.uint8)
            stem = f"ADE_{split[:5]}_{index:08d}"
            image_path = Path(root) / "images" / split / f"{stem}.jpg"
            _write_pair(image_path, Path(root) / "annotations" / split / f"{stem}.png", rgb, label)
    return Path(root)
