"""Fine-tuning a published (or any local) PSPNet on a dataset of one's own; the result joins the zoo.

``finetune(source, dataset=..., data_root=..., work_dir=...)`` reads, in this order, so that a
wrong declaration or a missing folder is said before any model is built or file fetched:

1. the dataset's declaration (a user manifest's ``datasets:`` entry, checked when the manifest is
   read) and its training and validation folders;
2. the recipe: the source entry's optimizer and schedule (its ``train:`` block, crop and schedule
   length), the dataset's own training facts (img_scale, images per GPU, its ``train:`` block), then
   the caller's overrides, each checked;
3. the total batch against the processes and the training images, then every image and label of
   both splits, read as ``psp-zoo dataset check`` reads them (``datasets.check.scan_for_training``):
   a problem stops the run here, naming the file;
4. the source's weights (a manifest name, fetched and verified, or a local file), read safely.

The network is the source's (backbone, widths, ``align_corners``) with the dataset's class count.
When that count differs from the source's, the two classifier convs (``decode_head.conv_seg``,
``auxiliary_head.conv_seg``) are initialized afresh as mmseg initializes them (normal(0, 0.01),
bias 0, seeded) and every other tensor is loaded strictly: same names, same shapes. The starting
weights are written as ``work_dir/init/<name>_init-<sha8>.pth`` (after every check has passed,
the total batch against the processes and the images included) and the run is an ordinary
``psp_zoo.train`` of the recipe built here, for a manifest entry declared for the run
(``work_dir/init/manifest.yml``: the network, its test settings and its dataset), resumable like
any run. At the end :mod:`psp_zoo.training.zoo_entry` publishes the best checkpoint into
``work_dir/model_index.yml``; a rerun of a finished fine-tune leaves the published entry as it is.
"""
from __future__ import annotations

import hashlib
import io
import logging
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import torch

from ..datasets.check import check_folders, scan_for_training
from ..datasets.readers import dataset_spec, list_items
from ..distributed import Distributed
from ..environment import usable_device
from ..errors import CheckpointError, PspZooError
from ..files import atomic_write, check_writable_folder
from ..hub.cache import download
from ..hub.options import FetchOptions
from ..manifest.loading import DatasetSpec, get_manifest
from ..model import PSPNet
from ..model.checkpoint import read_checkpoint
from .loop import RunOptions, TrainResult, check_batch, listed_training_items, run_options, train
from .recipe import Recipe, base_recipe, dataset_train_where, recipe_from_entry
from .zoo_entry import manifest_paths, published_entry, write_run_manifest, write_zoo_manifest

__all__ = ["CLASSIFIERS", "Source", "read_source", "starting_weights", "finetune", "FinetuneResult"]

log = logging.getLogger("psp_zoo")
PathLike = Union[str, Path]

#: The layers whose shape follows the class count: re-initialized when it changes.
CLASSIFIERS = ("decode_head.conv_seg", "auxiliary_head.conv_seg")
# Recipe fields that say how to optimize (taken from the source); the rest describe the data.
_OPTIMIZATION = ("gpus", "aux_weight", "dropout", "optimizer", "lr", "momentum", "weight_decay", "grad_clip",
                 "loss_scale", "policy", "power", "min_lr", "steps", "gamma", "warmup", "warmup_iters",
                 "warmup_ratio")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")


@dataclass(frozen=True)
class Source:
    """The checkpoint a fine-tune starts from."""

    label: str  # its manifest name, or the file's path
    path: Optional[Path]  # the verified local file (None: not fetched yet)
    sha256: Optional[str]
    arch: Dict[str, Any]  # PSPNet keyword arguments that rebuild it
    backbone: str  # the results table's backbone name, e.g. "R-50-D8"
    crop_size: Tuple[int, int]
    schedule: int
    optimization: Dict[str, Any]  # its recipe's optimizer and schedule fields
    url: Optional[str] = None  # where the manifest says it is published

    def record(self) -> dict:
        """What the fine-tuned entry says about where it came from (``finetuned_from``)."""
        return {"name": self.label, "sha256": self.sha256, "url": self.url or self.path.resolve().as_uri()}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_source(source: PathLike, fetch: FetchOptions) -> Source:
    """A manifest name (its file not fetched yet: ``path`` None, see ``fetched``) or a local checkpoint file."""
    manifest = get_manifest(fetch.manifest)
    if isinstance(source, str) and source in manifest:
        entry = manifest.get(source)
        recipe = recipe_from_entry(entry, fetch.manifest)
        optimization = {key: getattr(recipe, key) for key in _OPTIMIZATION}
        return Source(entry.name, None, entry.sha256, entry.model_kwargs(), entry.backbone,
                      entry.crop_size, entry.schedule, optimization, entry.url)
    path = Path(source).expanduser()
    if not path.is_file():
        close = manifest._unknown_message(str(source))  # the names it might have meant
        raise PspZooError(f"{source} is neither a checkpoint file nor a manifest name ({close})")
    state_dict, meta = read_checkpoint(path)
    arch = inferred_arch(state_dict, meta, path)
    backbone = f"R-{arch['depth']}{'' if arch['deep_stem'] else 'b'}-D{arch['output_stride']}"
    return Source(str(path), path, _sha256(path), arch, backbone, (512, 512), 80000, {})


def fetched(source: Source, fetch: FetchOptions) -> Source:
    """``source`` with its file fetched and verified through the checkpoint cache."""
    if source.path is not None:
        return source
    path = download(source.label, cache_dir=fetch.cache_dir, mirror=fetch.mirror, offline=fetch.offline,
                    quiet=fetch.quiet, manifest=fetch.manifest)
    return replace(source, path=path, sha256=source.sha256 or _sha256(path))


def run_recipe(name: str, spec: DatasetSpec, source: Source, overrides: Dict[str, Any]) -> Recipe:
    """The recipe the run will follow, checked field by field: the source's optimizer and schedule, the
    dataset's training facts, then ``overrides`` (the run's entry gives the loop the same)."""
    base = base_recipe(name, spec, num_classes=spec.num_classes, crop_size=source.crop_size,
                       max_iters=source.schedule, pretrained=None)
    recipe = base.with_overrides(source.optimization, where=f"the recipe of {source.label}")
    recipe = recipe.with_overrides(dict(spec.train), where=dataset_train_where(spec))
    return recipe.with_overrides(overrides)


def inferred_arch(state_dict: Dict[str, torch.Tensor], meta: dict, path: Path) -> Dict[str, Any]:
    """PSPNet keyword arguments read off a published-format state dict's names and shapes.

    The output stride is not in the tensors: D32 when the file's mmseg config says its strides are
    (1, 2, 2, 2), else D8 (every published PSPNet but the D32 rows)."""
    def shape(key: str) -> Tuple[int, ...]:
        if key not in state_dict:
            raise CheckpointError(f"{path} is not a PSPNet checkpoint in mmseg's layout: it has no {key!r}")
        return tuple(state_dict[key].shape)

    deep_stem = "backbone.stem.0.weight" in state_dict
    bottleneck = "backbone.layer1.0.conv3.weight" in state_dict
    blocks = len({key.split(".")[2] for key in state_dict if key.startswith("backbone.layer3.")})
    depth = {(True, 6): 50, (True, 23): 101, (False, 2): 18}.get((bottleneck, blocks))
    if depth is None:
        raise CheckpointError(f"{path}: a ResNet with {blocks} blocks in stage 3 is not a published PSPNet backbone")
    config = str(meta.get("config", "")).replace(" ", "")
    return {
        "depth": depth, "deep_stem": deep_stem, "output_stride": 32 if "strides=(1,2,2,2)" in config else 8,
        "num_classes": shape("decode_head.conv_seg.weight")[0],
        "stem_channels": shape("backbone.stem.6.weight" if deep_stem else "backbone.conv1.weight")[0],
        "base_channels": shape("backbone.layer1.0.conv1.weight")[0],
        "channels": shape("decode_head.bottleneck.conv.weight")[0],
        "aux_channels": shape("auxiliary_head.convs.0.conv.weight")[0],
        "align_corners": bool(meta.get("align_corners", False)),
    }


def starting_weights(source_state: Dict[str, torch.Tensor], model: torch.nn.Module, seed: int
                     ) -> Tuple[Dict[str, torch.Tensor], List[str]]:
    """``model``'s starting state dict: the source's tensors, the classifier convs re-initialized
    (normal(0, 0.01), bias 0) when their shapes differ; any other difference is an error."""
    target = model.state_dict()
    missing = [key for key in target if key not in source_state]
    unexpected = [key for key in source_state if key not in target]
    reinit = sorted({key.rsplit(".", 1)[0] for key in target if key in source_state
                     and tuple(source_state[key].shape) != tuple(target[key].shape)})
    wrong = [layer for layer in reinit if layer not in CLASSIFIERS]
    if missing or unexpected or wrong:
        parts = [f"{label}: {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}"
                 for label, keys in (("missing", missing), ("unexpected", unexpected), ("other shapes", wrong)) if keys]
        raise CheckpointError(f"the source checkpoint does not fit the network to fine-tune ({'; '.join(parts)}); "
                              f"only the classifier convs may differ")
    generator = torch.Generator().manual_seed(seed)
    state = {key: value.clone() for key, value in source_state.items()}
    for layer in reinit:
        weight = target[f"{layer}.weight"]
        state[f"{layer}.weight"] = torch.empty(weight.shape, dtype=weight.dtype).normal_(0.0, 0.01, generator=generator)
        state[f"{layer}.bias"] = torch.zeros_like(target[f"{layer}.bias"])
    return state, reinit


@dataclass(frozen=True)
class FinetuneResult:
    """A finished fine-tune: the run, and the entry it added to the zoo."""

    name: str
    manifest: Path  # work_dir/model_index.yml
    weights: Path  # the published-format file the entry names
    miou: Optional[float]  # percent, the entry's published number
    reinitialized: Tuple[str, ...]
    run: TrainResult


def _default_name(source: Source, dataset: str) -> str:
    stem = Path(source.label).name
    stem = re.sub(r"(_\d{8}_\d{6})?-[0-9a-f]{8}\.pth$|\.pth$", "", stem)
    return f"{stem}_finetuned_{dataset}"


def _check_data(spec: DatasetSpec, data_root: PathLike, work_dir: Path, recipe: Recipe, world_size: int,
                manifest) -> None:
    """Both splits listed as the run lists them, the total batch checked against them and the processes, then
    both read as ``psp-zoo dataset check`` reads them, before anything is built (the scan's record in
    ``work_dir``, written when it passes, spares the run reading them again)."""
    check_batch(recipe, world_size, len(listed_training_items(spec.key, data_root, work_dir, manifest)))
    list_items(spec.key, data_root, manifest=manifest)
    scan_for_training(spec.key, data_root, work_dir, manifest=manifest)


def _run_entry(name: str, spec: DatasetSpec, source: Source, init_file: Path, freeze: bool) -> dict:
    """The manifest entry the run trains: the source's network and recipe on the dataset."""
    arch = {key: source.arch[key] for key in ("stem_channels", "base_channels", "channels", "aux_channels")}
    train_block = {**source.optimization, **dict(spec.train), "pretrained": None}
    if freeze:
        train_block["freeze_backbone"] = True
    digest = _sha256(init_file)
    entry = {"name": name, "dataset": spec.key, "backbone": source.backbone, "crop_size": list(source.crop_size),
             "schedule": source.schedule, "weights": init_file.resolve().as_uri(), "hash": digest[:8],
             "sha256": digest, "published": {}, "model": dict(arch, num_classes=spec.num_classes),
             "train": {k: list(v) if isinstance(v, tuple) else v for k, v in train_block.items()}}
    if source.arch.get("align_corners"):
        entry["test"] = {"align_corners": True}
    return entry


def _write_init(work_dir: Path, name: str, state: Dict[str, torch.Tensor], source: Source,
                reinit: List[str]) -> Path:
    """The starting weights in the published format, named ``<name>_init-<sha8>.pth``."""
    buffer = io.BytesIO()
    meta = {"psp_zoo_finetune": {"source": source.record(), "reinitialized": reinit}}
    torch.save({"meta": meta, "state_dict": state}, buffer)
    data = buffer.getvalue()
    path = work_dir / "init" / f"{name}_init-{hashlib.sha256(data).hexdigest()[:8]}.pth"
    for old in path.parent.glob(f"{name}_init-*.pth"):  # from a run with other starting weights
        if old != path:
            old.unlink()
    return atomic_write(path, data)


def _prepare(name: str, spec: DatasetSpec, source: Source, work_dir: Path, seed: int, freeze: bool,
             dist: Distributed) -> Tuple[Path, Path, List[str]]:
    """Process 0 writes the starting weights and the run's manifest; every process learns where."""
    arch = dict(source.arch, num_classes=spec.num_classes)
    state, reinit = starting_weights(read_checkpoint(source.path)[0], PSPNet(**arch), seed)
    run_manifest, init_file = work_dir / "init" / "manifest.yml", None
    if dist.is_main:
        init_file = _write_init(work_dir, name, state, source, reinit)
        write_run_manifest(run_manifest, spec, _run_entry(name, spec, source, init_file, freeze))
    init_file = dist.from_main(init_file)
    if dist.is_main and reinit:
        log.info("re-initialized for %d classes (was %d): %s", spec.num_classes, source.arch["num_classes"],
                 ", ".join(reinit))
    elif dist.is_main:
        log.info("the source has %d classes too: every tensor loaded, nothing re-initialized", spec.num_classes)
    return run_manifest, init_file, reinit


def finetune(source: PathLike, *, dataset: str, data_root: PathLike, work_dir: PathLike,
             name: Optional[str] = None, freeze_backbone: bool = False, options: Optional[RunOptions] = None,
             **settings: Any) -> FinetuneResult:
    """Fine-tune ``source`` (a manifest name or a checkpoint file) on ``dataset`` under ``data_root``.

    ``settings`` are recipe overrides (``max_iters``, ``lr``, ``batch_size``, ``crop_size``, ...) and
    :class:`psp_zoo.training.loop.RunOptions` fields (``seed``, ``device``, ``resume``,
    ``num_workers``, ``float64``, ``progress``, ``fetch``, ...), as :func:`psp_zoo.train` takes them.
    Returns where the new entry is: ``psp-zoo evaluate NAME --manifest work_dir/model_index.yml``.
    """
    options, overrides = run_options(options, settings)
    fetch = options.fetch
    spec = dataset_spec(dataset, fetch.manifest)
    check_folders(spec.key, data_root, manifest=fetch.manifest)
    source = read_source(source, fetch)  # the path or name, read
    name = name or _default_name(source, dataset)
    if not _NAME_RE.match(name):
        raise PspZooError(f"model name {name!r}: use letters, digits, '_', '-', '.' and '+'")
    recipe = run_recipe(name, spec, source, dict(overrides, freeze_backbone=freeze_backbone))
    work_dir = check_writable_folder(work_dir, "work dir")
    dist, device = Distributed.from_env(usable_device(options.device))
    try:
        _check_data(spec, data_root, work_dir, recipe, dist.world_size, fetch.manifest)
        source = fetched(source, fetch)
        run_manifest, init_file, reinit = _prepare(name, spec, source, work_dir, options.seed, freeze_backbone, dist)
        run_fetch = replace(fetch, manifest=manifest_paths(fetch.manifest) + (str(run_manifest),))
        result = train(recipe, data_root=data_root, work_dir=work_dir,
                       options=replace(options, device=device, init_from=init_file, fetch=run_fetch))
        published = (None, None)
        if dist.is_main:
            published = published_entry(work_dir, name) if result.already_finished else None
            published = published or write_zoo_manifest(work_dir, name, result, spec, run_fetch.manifest,
                                                        source.record(), reinit)
        dist.barrier()
    finally:
        dist.close()
    return FinetuneResult(name, work_dir / "model_index.yml", published[0], published[1], tuple(reinit), result)

