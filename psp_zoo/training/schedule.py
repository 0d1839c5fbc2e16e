"""mmcv 1.x's learning-rate policies, by iteration, exactly as they trained the published files.

The lr of iteration ``t`` (0-based) is set before that iteration runs:

- poly (mmcv ``PolyLrUpdaterHook``): ``(lr0 - min_lr) * (1 - t / max_iters) ** power + min_lr``
  (mmseg 1.x's ``PolyLR`` divides by ``max_iters - 1``: not what trained these files);
- step (``StepLrUpdaterHook``): ``lr0 * gamma ** k``, k the number of steps ``<= t``;
- linear warm-up (``LrUpdaterHook.get_warmup_lr``), for ``t < warmup_iters``, scales that lr by
  ``1 - (1 - t / warmup_iters) * (1 - warmup_ratio)``.

mmcv applies the policy to each parameter group's own initial lr; a recipe's ``head_lr_mult`` makes
the heads' initial lr that multiple of ``lr`` (``learning_rate(recipe, t, lr0=...)``).

The PSPNet authors' loop (hszhao/semseg tool/train.py, ``poly_learning_rate``) is mmcv's poly with
``min_lr = 0``: it sets the lr after step k from ``current_iter = k + 1``, so step k runs at
``base x (1 - k / max_iter) ** power`` (step 0 at base), the lr mmcv sets before iteration k. Its
``max_iter`` is ``epochs x len(train_loader)``: :func:`iterations_per_epoch`.
"""
from __future__ import annotations

from typing import Optional, Sequence

__all__ = ["poly_lr", "step_lr", "warmup_factor", "learning_rate", "iterations_per_epoch"]


def poly_lr(lr0: float, iteration: int, max_iters: int, power: float = 0.9, min_lr: float = 1e-4) -> float:
    coeff = (1 - iteration / max_iters) ** power
    return (lr0 - min_lr) * coeff + min_lr


def step_lr(lr0: float, iteration: int, steps: Sequence[int], gamma: float = 0.1) -> float:
    exponent = len(steps)
    for index, step in enumerate(steps):
        if iteration < step:
            exponent = index
            break
    return lr0 * gamma ** exponent


def warmup_factor(iteration: int, warmup_iters: int, warmup_ratio: float) -> float:
    """mmcv's linear warm-up factor; 1 from ``warmup_iters`` on."""
    if iteration >= warmup_iters:
        return 1.0
    k = (1 - iteration / warmup_iters) * (1 - warmup_ratio)
    return 1 - k


def iterations_per_epoch(images: int, gpus: int, batch_size: int) -> int:
    """One epoch of the authors' loader: a DistributedSampler over ``gpus`` processes gives each
    ceil(images / gpus) images (padded by repeating), batched ``batch_size`` at a time with the last
    partial batch dropped. (Cityscapes' 2975 images over 8 x 2: 186, where floor(2975 / 16) is 185.)"""
    return -(-images // gpus) // batch_size


def learning_rate(recipe, iteration: int, lr0: Optional[float] = None) -> float:
    """The lr of ``iteration`` under ``recipe`` (a :class:`~psp_zoo.training.recipe.Recipe`), for a
    parameter group whose initial lr is ``lr0`` (default: the recipe's ``lr``)."""
    lr0 = recipe.lr if lr0 is None else lr0
    if recipe.policy == "poly":
        lr = poly_lr(lr0, iteration, recipe.max_iters, recipe.power, recipe.min_lr)
    else:
        lr = step_lr(lr0, iteration, recipe.steps, recipe.gamma)
    if recipe.warmup == "linear":  # mmcv multiplies the regular lr of this iteration by the factor
        lr = lr * warmup_factor(iteration, recipe.warmup_iters, recipe.warmup_ratio)
    return lr
