"""One optimizer step of PSPNet training, as mmseg 0.x takes it: ``Trainer(model, recipe).step(images, labels)``.

Per step: the lr of the current iteration is set first (mmcv sets it before each iteration), the
decode head's and the auxiliary head's logits are resized bilinearly to the label size (with the
head's ``align_corners``), each gets a cross-entropy with the dataset's ignore index (255 unless
declared) averaged over ALL label pixels (ignored and padded ones count 0, mmseg's
``avg_non_ignore=False``), the auxiliary loss is weighted 0.4, and the optimizer (SGD or AdamW over
every parameter, weight decay on all of them) steps. Under torchrun the BatchNorm layers are
synchronized (SyncBN: statistics over every process's images, as the published runs had) and the
model runs inside torch's ``DistributedDataParallel``, which averages the gradients over the
processes in buckets while the backward pass runs, so N processes x B images step exactly like one
process with N x B images. Gradient accumulation splits a step's images into chunks (the loss of
each scaled by 1 / chunks; DDP's ``no_sync`` on all but the last, so gradients are averaged once
per step); BatchNorm then sees each chunk alone, which is the one way it differs from the larger
batch.

The PSPNet authors' recipe (``avg_non_ignore``, ``head_lr_mult``) differs in two places. Their
``nn.CrossEntropyLoss(ignore_index=255)`` averages over the non-ignored pixels of one GPU's images
and DDP averages the GPUs' gradients: here the images of each published GPU (global-batch slots
``g * batch_size`` onwards) are averaged over their own non-ignored pixels (a GPU with none
contributes 0, where theirs would give NaN), then the GPUs averaged, however many processes run.
And the backbone's parameters form one SGD group at the schedule's lr, the decode and auxiliary
heads' another at ``head_lr_mult`` x it (their ``modules_new`` at 10 x ``base_lr``).

The one randomness inside a step, the heads' Dropout2d, is drawn per sample, as the crops are:
each sample's channel mask is keyed by (seed, iteration, the sample's slot in the global batch,
the layer) and by nothing else (:class:`KeyedDropout2d`), so a resumed run draws what an
uninterrupted one draws, and N processes draw what one process draws for the same global batch.
"""
from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ..distributed import Distributed
from ..errors import PspZooError
from ..manifest.entries import IGNORE_INDEX
from .freeze import freeze_backbone
from .recipe import Recipe
from .schedule import learning_rate
from .syncbn import convert_sync_batchnorm

__all__ = ["Trainer", "StepResult", "segmentation_loss", "KeyedDropout2d"]


@dataclass(frozen=True)
class StepResult:
    """What one step did, averaged over processes and accumulation chunks; the lr it used."""

    lr: float
    loss: float
    decode_loss: float
    aux_loss: float  # already weighted (x 0.4), as mmseg logs it
    decode_acc: float  # percent of the non-ignored pixels
    aux_acc: float

    def as_log(self) -> Dict[str, float]:
        """The loss parts under the names of mmseg 0.30's log lines."""
        return {"decode.loss_ce": self.decode_loss, "decode.acc_seg": self.decode_acc,
                "aux.loss_ce": self.aux_loss, "aux.acc_seg": self.aux_acc, "loss": self.loss}


def segmentation_loss(logits: torch.Tensor, labels: torch.Tensor, *, align_corners: bool,
                      ignore_index: int = IGNORE_INDEX,
                      sample_weights: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """(cross-entropy averaged over all label pixels, accuracy in percent over non-ignored pixels).

    The logits are resized to the labels' size in float32 first, as mmseg's ``losses`` does.
    ``sample_weights`` (N,) given: the loss is instead the sum over samples of each one's summed
    pixel losses times its weight (``Trainer``'s non-ignored averaging).
    """
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    logits = F.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=align_corners)
    pixel_losses = F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction="none")
    if sample_weights is None:
        loss = pixel_losses.mean()
    else:
        loss = (pixel_losses.flatten(1).sum(1) * sample_weights.to(pixel_losses.dtype)).sum()
    with torch.no_grad():
        valid = labels != ignore_index
        correct = (logits.argmax(1) == labels) & valid
        accuracy = correct.sum().to(loss.dtype) * 100.0 / valid.sum().clamp(min=1)
    return loss, accuracy


class KeyedDropout2d(nn.Module):
    """``nn.Dropout2d`` whose mask for each sample is drawn from its own key: (seed, iteration, the
    sample's slot in the global batch, ``layer``), set in ``keys`` as (seed, iteration, slots) by the
    trainer before each forward pass. Identity in eval mode."""

    def __init__(self, p: float, layer: int):
        super().__init__()
        self.p, self.layer = float(p), int(layer)
        self.keys: Optional[Tuple[int, int, Tuple[int, ...]]] = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        return x * self._mask(x)

    @torch.compiler.disable
    def _mask(self, x: torch.Tensor) -> torch.Tensor:
        if self.keys is None or len(self.keys[2]) != x.shape[0]:
            raise PspZooError(f"dropout needs the global-batch slot of each of the {x.shape[0]} samples; "
                              f"Trainer.step sets them")
        seed, iteration, slots = self.keys
        keep = [np.random.Generator(np.random.PCG64(np.random.SeedSequence(
            [seed, iteration, slot, self.layer], spawn_key=(2,)))).random(x.shape[1]) >= self.p for slot in slots]
        scale = 0.0 if self.p >= 1 else 1.0 / (1.0 - self.p)
        return (torch.from_numpy(np.stack(keep)).to(x.device, x.dtype) * scale)[:, :, None, None]

    def extra_repr(self) -> str:
        return f"p={self.p}, layer={self.layer}, keyed by (seed, iteration, sample)"


class _HeadsForward(nn.Module):
    """backbone -> (decode logits, auxiliary logits), one module so ``torch.compile`` sees it whole."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        features = self.model.backbone(images)
        return self.model.decode_head(features), self.model.auxiliary_head(features)


class Trainer:
    """Takes optimizer steps on ``model`` (a :class:`psp_zoo.PSPNet`) as ``recipe`` says.

    ``device``: where to train (default: the model's). ``distributed``: this process's place in a
    torchrun job (``psp_zoo.distributed.Distributed``; default: alone). ``accumulation``: chunks per
    step. ``amp``: mixed precision on CUDA (default: when the recipe has a loss scale, the fp16
    row). ``channels_last`` and ``compile`` change speed, not the arithmetic's meaning. ``seed``
    keys the dropout draws. ``dtype=torch.float64`` trains in double precision: slow, but free of
    float32 rounding, which a few steps of a small PSPNet amplify (for exact comparisons).
    ``iteration`` counts the steps taken (0-based index of the next one).
    ``ignore_index``: the label value the losses skip, the dataset's (``DatasetSpec.ignore_index``).
    ``ddp``: run the model inside ``DistributedDataParallel`` (default: when more than one process
    trains; True with one process measures the wrapper's cost, and needs a process group).

    Under DDP, ``engine`` is the ``DistributedDataParallel`` module (``model`` stays the plain
    PSPNet: its state dict, and so every checkpoint, keeps the published keys). It is built after
    the backbone is frozen (frozen parameters take no gradient, so they are in none of its buckets)
    and after SyncBN's conversion; its buckets are the gradients themselves
    (``gradient_as_bucket_view``: no second copy), in the parameters' dtype (float64 included); no
    ``find_unused_parameters``, since both heads are used in every step. ``broadcast_buffers`` is
    off (``forward_sync_buffers`` from torch 2.14 on), as for mmseg's ``MMDistributedDataParallel``
    users with SyncBN: every process computes the same running statistics from the same all-reduced
    sums (the processes' buffers stay bit-identical, tests/test_train_ddp.py), and a frozen
    BatchNorm's never change, so rank 0's buffers broadcast before every forward pass would only
    overwrite equal values.
    """

    def __init__(self, model: nn.Module, recipe: Recipe, *, device: Union[None, str, torch.device] = None,
                 distributed: Optional[Distributed] = None, accumulation: int = 1, amp: Optional[bool] = None,
                 channels_last: bool = False, compile: bool = False, seed: int = 0,
                 dtype: Optional[torch.dtype] = None, ignore_index: int = IGNORE_INDEX,
                 ddp: Optional[bool] = None):
        self.recipe, self.ignore_index = recipe, ignore_index
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.distributed = distributed or Distributed()
        if accumulation < 1:
            raise PspZooError(f"accumulation must be a whole number >= 1, got {accumulation}")
        self.accumulation = accumulation
        self.seed = seed
        self.amp = self._use_amp(amp)
        self.channels_last = channels_last
        self.iteration = 0
        model = model.to(self.device) if dtype is None else model.to(self.device, dtype)
        self.dtype = next(model.parameters()).dtype
        if recipe.freeze_backbone:  # before SyncBN: a frozen BN is no BatchNorm2d, so it stays frozen
            model = freeze_backbone(model)
        if self.distributed.world_size > 1:
            model = convert_sync_batchnorm(model)
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        self._dropouts = _keyed_dropout(model, recipe.dropout)
        self.model = model.train()
        self.optimizer, self._lr_multiples = _optimizer(model, recipe)
        self.scaler = _scaler(recipe, self.amp)
        forward: nn.Module = _HeadsForward(model)
        self.engine: Optional[DistributedDataParallel] = None
        if self.distributed.world_size > 1 if ddp is None else ddp:
            self.engine = forward = _wrap(forward, self.device)
        self._forward = torch.compile(forward) if compile else forward

    def _use_amp(self, amp: Optional[bool]) -> bool:
        amp = self.recipe.loss_scale is not None if amp is None else amp
        if amp and self.device.type != "cuda":
            raise PspZooError(f"mixed precision (the recipe's loss_scale or amp=True) needs a CUDA device, not "
                              f"{self.device}; train in float32 with amp=False",
                              cli_hint="--no-amp")
        return bool(amp)

    @property
    def lr(self) -> float:
        """The lr of the next step."""
        return learning_rate(self.recipe, self.iteration)

    def step(self, images: torch.Tensor, labels: torch.Tensor, samples: Optional[Sequence[int]] = None) -> StepResult:
        """One optimizer step on this process's ``images`` (N, 3, H, W), normalized, and ``labels`` (N, H, W).

        ``samples``: the images' slots in the global batch, which key their dropout draws (default:
        this process's consecutive slice, ``rank * N`` onwards)."""
        count = images.shape[0]
        if count % self.accumulation:
            raise PspZooError(f"{count} images do not split into {self.accumulation} equal chunks")
        samples = tuple(range(self.distributed.rank * count, (self.distributed.rank + 1) * count)) \
            if samples is None else tuple(int(s) for s in samples)
        if len(samples) != count:
            raise PspZooError(f"{len(samples)} sample slots given for {count} images; give one per image")
        lr = self.lr
        for group, multiple in zip(self.optimizer.param_groups, self._lr_multiples):
            group["lr"] = learning_rate(self.recipe, self.iteration, self.recipe.lr * multiple)
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        weights = self._sample_weights(labels, samples) if self.recipe.avg_non_ignore else None
        parts = torch.zeros(5, dtype=torch.float64)
        size = count // self.accumulation
        for start in range(0, count, size):
            last = start + size == count
            # DDP averages the gradients in the last chunk's backward pass, over every chunk's sum
            with self.engine.no_sync() if self.engine is not None and not last else contextlib.nullcontext():
                parts += self._backward(images[start:start + size], labels[start:start + size],
                                        samples[start:start + size],
                                        None if weights is None else weights[start:start + size])
        parts /= self.accumulation
        self._optimizer_step()
        self.iteration += 1
        loss, decode, aux, decode_acc, aux_acc = self._averaged(parts).tolist()
        return StepResult(lr, loss, decode, aux, decode_acc, aux_acc)

    def _sample_weights(self, labels: torch.Tensor, samples: Tuple[int, ...]) -> torch.Tensor:
        """Per image: the weight of its summed pixel losses that makes this process's chunk losses, scaled
        by 1 / chunks and averaged over processes, the mean over published GPUs of each GPU's loss
        averaged over its non-ignored pixels."""
        slots = self.distributed.world_size * labels.shape[0]
        counts = torch.zeros(slots, dtype=torch.float64)
        if max(samples) >= slots:
            raise PspZooError(f"sample slot {max(samples)} lies outside the global batch of {slots} images")
        counts[list(samples)] = (labels != self.ignore_index).flatten(1).sum(1).double().cpu()
        if self.distributed.world_size > 1:
            reduced = counts.to(self.device, torch.float64 if self.device.type == "cpu" else torch.float32)
            dist.all_reduce(reduced)
            counts = reduced.double().cpu()
        groups = torch.arange(slots) // self.recipe.batch_size
        per_group = torch.zeros(int(groups.max()) + 1, dtype=torch.float64).index_add_(0, groups, counts)
        scale = self.distributed.world_size * self.accumulation / per_group.numel()
        weights = torch.where(per_group > 0, scale / per_group.clamp(min=1), torch.zeros_like(per_group))
        return weights[groups[list(samples)]].to(self.device)

    def _backward(self, images: torch.Tensor, labels: torch.Tensor, samples: Tuple[int, ...],
                  weights: Optional[torch.Tensor] = None) -> torch.Tensor:
        for dropout in self._dropouts:
            dropout.keys = (self.seed, self.iteration, samples)
        memory_format = torch.channels_last if self.channels_last else torch.contiguous_format
        images = images.to(self.device, self.dtype, non_blocking=True).contiguous(memory_format=memory_format)
        labels = labels.to(self.device, non_blocking=True).long()
        align_corners = bool(getattr(self.model, "align_corners", False))
        with torch.autocast(self.device.type, dtype=torch.float16, enabled=self.amp):
            decode_logits, aux_logits = self._forward(images)
        decode_loss, decode_acc = segmentation_loss(decode_logits, labels, align_corners=align_corners,
                                                    ignore_index=self.ignore_index, sample_weights=weights)
        aux_loss, aux_acc = segmentation_loss(aux_logits, labels, align_corners=align_corners,
                                              ignore_index=self.ignore_index, sample_weights=weights)
        aux_loss = aux_loss * self.recipe.aux_weight
        loss = decode_loss + aux_loss
        scaled = loss / self.accumulation
        (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
        return torch.stack([loss, decode_loss, aux_loss, decode_acc, aux_acc]).detach().double().cpu()

    def _parameters(self) -> List[torch.Tensor]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def _optimizer_step(self) -> None:
        if self.scaler is not None:
            if self.recipe.grad_clip is not None:
                self.scaler.unscale_(self.optimizer)
                nn.utils.clip_grad_norm_(self._parameters(), self.recipe.grad_clip)
            self.scaler.step(self.optimizer)
            # mmcv's Fp16OptimizerHook with a number: the scale is set back to it after every step
            self.scaler.update(self.recipe.loss_scale)
            return
        if self.recipe.grad_clip is not None:
            nn.utils.clip_grad_norm_(self._parameters(), self.recipe.grad_clip)
        self.optimizer.step()

    def _averaged(self, parts: torch.Tensor) -> torch.Tensor:
        """The logged values averaged over processes (mmseg all-reduces its log variables)."""
        if self.distributed.world_size == 1:
            return parts
        reduced = parts.to(self.device, torch.float64 if self.device.type == "cpu" else torch.float32)
        dist.all_reduce(reduced)
        return reduced.double().cpu() / self.distributed.world_size

    def state_dict(self) -> dict:
        """Everything a resumed run needs besides the data position: model, optimizer, iteration, scaler."""
        return {"model": _plain_state_dict(self.model), "optimizer": self.optimizer.state_dict(),
                "iteration": self.iteration, "seed": self.seed,
                "scaler": self.scaler.state_dict() if self.scaler is not None else None}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.iteration = int(state["iteration"])
        self.seed = int(state.get("seed", self.seed))
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])


def _wrap(forward: nn.Module, device: torch.device) -> DistributedDataParallel:
    """``forward`` inside DistributedDataParallel, set as the Trainer's docstring says."""
    if not dist.is_available() or not dist.is_initialized():
        raise PspZooError("DistributedDataParallel needs a process group: run under torchrun (or call "
                          "torch.distributed.init_process_group first), or train without ddp=True")
    # buffers synchronized at construction only (all equal then): torch 2.14 renamed broadcast_buffers
    no_forward_sync = "forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(
        DistributedDataParallel).parameters else "broadcast_buffers"
    device_ids = [torch.cuda.current_device() if device.index is None else device.index] \
        if device.type == "cuda" else None
    return DistributedDataParallel(forward, device_ids=device_ids, gradient_as_bucket_view=True,
                                   **{no_forward_sync: False})


def _plain_state_dict(model: nn.Module) -> "dict[str, torch.Tensor]":
    """The model's weights in the published layout: plain BN's keys, contiguous tensors, and mmseg's
    order (a head's ``conv_seg`` first: mmseg's decode heads create it before their own layers)."""
    state = model.state_dict()
    modules = list(dict.fromkeys(key.split(".", 1)[0] for key in state))
    rank = {key: (modules.index(key.split(".", 1)[0]), ".conv_seg." not in key) for key in state}
    return {key: state[key].detach().contiguous() for key in sorted(state, key=rank.__getitem__)}


def _keyed_dropout(model: nn.Module, p: float) -> List[KeyedDropout2d]:
    """Every ``nn.Dropout2d`` of ``model`` replaced in place by a :class:`KeyedDropout2d` with ``p`` (no
    tensors, so the state dict keeps its keys); the layers in ``model.modules()`` order."""
    keyed: List[KeyedDropout2d] = []
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, (nn.Dropout2d, KeyedDropout2d)):
                keyed.append(KeyedDropout2d(p, len(keyed)))
                setattr(parent, name, keyed[-1])
    return keyed


def _optimizer(model: nn.Module, recipe: Recipe) -> Tuple[torch.optim.Optimizer, Tuple[float, ...]]:
    """The optimizer, and each parameter group's lr as a multiple of the recipe's: one group, or with a
    ``head_lr_mult`` the backbone's then the heads' (everything outside ``model.backbone``)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups, multiples = [{"params": params}], (1.0,)
    if recipe.head_lr_mult != 1:
        backbone = {id(p) for p in model.backbone.parameters()}
        groups = [{"params": [p for p in params if id(p) in backbone]},
                  {"params": [p for p in params if id(p) not in backbone], "lr": recipe.lr * recipe.head_lr_mult}]
        multiples = (1.0, recipe.head_lr_mult)
        if not groups[0]["params"]:  # a frozen backbone
            groups, multiples = groups[1:], multiples[1:]
    if recipe.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=recipe.lr, weight_decay=recipe.weight_decay), multiples
    return torch.optim.SGD(groups, lr=recipe.lr, momentum=recipe.momentum,
                           weight_decay=recipe.weight_decay), multiples


def _scaler(recipe: Recipe, amp: bool) -> Optional[torch.amp.GradScaler]:
    if not amp:
        return None
    if recipe.loss_scale is None:
        return torch.amp.GradScaler("cuda")  # dynamic scaling for AMP asked of a float32 recipe
    return torch.amp.GradScaler("cuda", init_scale=recipe.loss_scale, growth_interval=2 ** 31 - 1)
