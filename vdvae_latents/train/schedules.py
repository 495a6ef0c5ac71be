"""Training schedules: the learning rate, the KL weight and KL balancing, per update.

Pure functions of a :class:`~vdvae_latents.train.config.TrainConfig` and the (0-based)
update step; the training step calls them once per update. Tests check them against the
closed forms and the official code's trajectories.
"""

from __future__ import annotations

import math
from typing import Protocol


class TrainConfig(Protocol):
    """The settings the schedules read, as :class:`~vdvae_latents.train.config.TrainConfig` holds them
    (a protocol: ``config`` calls these functions, so this module does not import it back)."""

    steps: int
    lr: float
    min_lr: float
    lr_schedule: str
    warmup_steps: int
    decay_start: int
    decay_steps: int
    kl_warmup_steps: int
    kl_warmup_start: int
    kl_weight_min: float
    kl_balance_steps: int


def learning_rate(cfg: TrainConfig, step: int) -> float:
    """Learning rate for update ``step`` (0-based).

    ``"cosine"`` (the project's): linear warm-up ``lr * (step + 1) / warmup_steps``, then a
    cosine from ``lr`` to ``min_lr``, measured from its own start (``decay_start``, or the
    end of the warm-up if later) over ``decay_steps`` (0: to the end of the run), so a
    warm-up does not eat into the decay.

    ``"official"``: the trajectory of Efficient-VDVAE's ``NarrowCosineDecay`` (a
    subclass of torch's ``CosineAnnealingLR`` with ``T_max = decay_steps``), stepped
    once per update from the start: ``lr * min(1, step / warmup_steps)`` (0 at the
    first update) and constant until ``decay_start``; from there torch's recursion
    ``l_s - floor = (l_{s-1} - floor) * (1 + cos(pi s / T)) / (1 + cos(pi (s-1) / T))``
    telescopes to a cosine of the absolute step, rescaled to be continuous at
    ``decay_start``, that reaches ``min_lr`` at step ``decay_steps`` and stays there.
    (torch's cosine is periodic, but the official code keeps its rates as float32
    tensors, in which the first step of the climb past ``decay_steps`` rounds away for
    every shipped config, so its runs stay on the floor; before that step the float32
    recursion drifts from this exact form by at most 0.16% of ``lr``.)
    ``decay_steps = 0``: no decay, openai/VDVAE's linear warm-up to a constant rate.
    """
    if cfg.lr_schedule == "official":
        return _official_learning_rate(cfg, step)
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    start = max(cfg.decay_start, cfg.warmup_steps)
    length = cfg.decay_steps or max(1, cfg.steps - start)
    t = min(max(step - start, 0) / length, 1.0)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * t))


def _official_learning_rate(cfg: TrainConfig, step: int) -> float:
    def warm(s: int) -> float:
        return cfg.lr * min(1.0, s / cfg.warmup_steps) if cfg.warmup_steps else cfg.lr

    if not cfg.decay_steps or step < cfg.decay_start:
        return warm(step)
    period = cfg.decay_steps
    if step >= period:
        return cfg.min_lr
    before = max(cfg.decay_start - 1, 0)  # the rate the recursion starts from (the initial lr at 0)
    start_lr = warm(before) if cfg.decay_start else cfg.lr
    ratio = (1 + math.cos(math.pi * step / period)) / (1 + math.cos(math.pi * before / period))
    return cfg.min_lr + (start_lr - cfg.min_lr) * ratio


def kl_weight(cfg: TrainConfig, step: int) -> float:
    """Weight of the KL term at update ``step`` (0-based).

    The official (NVAE-style) linear ramp, exactly as Efficient-VDVAE computes it:
    ``clamp((step - start) / (start + steps), kl_weight_min, 1)`` with ``start =
    kl_warmup_start`` and ``steps = kl_warmup_steps`` (its denominator is ``start +
    steps``, so the ramp reaches 1 at ``2 * start + steps``). 1 when ``kl_warmup_steps``
    is 0.
    """
    if not cfg.kl_warmup_steps:
        return 1.0
    start = cfg.kl_warmup_start
    return min(1.0, max(cfg.kl_weight_min, (step - start) / (start + cfg.kl_warmup_steps)))


def kl_balancing(cfg: TrainConfig, step: int) -> bool:
    """Whether KL balancing (NVAE's gamma) weighs the layers at update ``step`` (official: step <= N)."""
    return cfg.kl_balance_steps > 0 and step <= cfg.kl_balance_steps


__all__ = ["learning_rate", "kl_weight", "kl_balancing"]
