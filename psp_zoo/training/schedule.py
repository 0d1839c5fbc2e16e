"""mmcv 1.x's learning-rate policies, by iteration, exactly as they trained the published files.

The lr of iteration ``t`` (0-based) is set before that iteration runs:

- poly (mmcv ``PolyLrUpdaterHook``): ``(lr0 - min_lr) * (1 - t / max_iters) ** power + min_lr``
  (mmseg 1.x's ``PolyLR`` divides by ``max_iters - 1``: not what trained these files);
- step (``StepLrUpdaterHook``): ``lr0 * gamma ** k``, k the number of steps ``<= t``;
- linear warm-up (``LrUpdaterHook.get_warmup_lr``), for ``t < warmup_iters``, scales that lr by
  ``1 - (1 - t / warmup_iters) * (1 - warmup_ratio)``.
"""
from __future__ import annotations

from typing import Sequence

__all__ = ["poly_lr", "step_lr", "warmup_factor", "learning_rate"]


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


def learning_rate(recipe, iteration: int) -> float:
    """The lr of ``iteration`` under ``recipe`` (a :class:`~psp_zoo.training.recipe.Recipe`)."""
    if recipe.policy == "poly":
        lr = poly_lr(recipe.lr, iteration, recipe.max_iters, recipe.power, recipe.min_lr)
    else:
        lr = step_lr(recipe.lr, iteration, recipe.steps, recipe.gamma)
    if recipe.warmup == "linear":  # mmcv multiplies the regular lr of this iteration by the factor
        lr = lr * warmup_factor(iteration, recipe.warmup_iters, recipe.warmup_ratio)
    return lr
