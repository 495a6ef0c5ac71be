"""The training settings of a run: one validated dataclass, :class:`TrainConfig`.

Its defaults follow the paper and its public code; a preset's recipe (``recipes``) and
``--set train.KEY=VALUE`` override them. The run config that pairs it with a model config
and a data spec is in ``run_config``; the schedules it parametrises are in ``schedules``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

from ..core.errors import ConfigError
from .schedules import kl_balancing, kl_weight, learning_rate


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings (defaults follow the paper and its public code)."""

    steps: int = 1000                 # total optimisation steps (the "cosine" schedule spans them)
    batch_size: int = 16              # global batch (split across DDP ranks)
    optimizer: str = "adamax"         # "adamax" (Efficient-VDVAE) | "adamw" (VDVAE) | "adam"
    lr: float = 1e-3
    min_lr: float = 2e-4              # floor of the cosine decay
    lr_schedule: str = "cosine"       # "cosine" (the run's own length) | "official" (Efficient-VDVAE's steps)
    warmup_steps: int = 100           # linear warm-up from 0
    decay_start: int = 0              # cosine decay starts here (after warm-up) ...
    decay_steps: int = 0              # cosine: lasts this long (0 = until `steps`); official: ends at this step
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0
    ema_decay: float = 0.9999
    ema_warmup: bool = True           # EMA decay min(decay, (1+n)/(10+n)); false: the plain decay (official)
    grad_skip_threshold: float = 800.0  # skip the update when the grad norm is NaN or >= this (0 = never)
    grad_clip: float = 0.0            # clip the grad norm to this (0 = no clipping)
    kl_warmup_steps: int = 0          # linear KL weight ramp (NVAE-style; 0 = off): see kl_weight_at
    kl_warmup_start: int = 0          # ... which starts at this step
    kl_weight_min: float = 0.0        # ... floor of the KL weight during the ramp
    kl_balance_steps: int = 0         # NVAE KL balancing (gamma) on steps 0..N (0 = off)
    kl_balance_scaled: bool = True    # balance by per-element KL (official "scaled_gamma") or per-layer KL
    eval_binarization: str = "threshold"  # binary data at evaluation: "threshold" (>= 0.5) | "sampled" (fixed draw)
    seed: int = 0
    log_every: int = 10
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    eval_every: int = 0               # validation every N steps (0 = only at the end)
    val_limit: int = 2000             # images of the val split used for validation (0 = all)
    flip: bool = False                # random horizontal flips
    device: str = "auto"              # auto | cpu | cuda
    bf16: bool = True                 # bf16 autocast on CUDA
    tf32: bool = True                 # TF32 matmuls and convolutions on CUDA
    cpu_bf16: bool = True             # bf16 autocast on CPUs with native bf16 (AVX512-BF16, AMX); fp32 on others
    compile: bool = False             # torch.compile the forward pass (falls back to eager where it cannot)
    channels_last: bool = True        # channels_last (NHWC) weights and activations in training
    checkpoint_activations: bool = False  # recompute each block in the backward pass (less memory, more time)
    num_workers: int = -1             # DataLoader worker processes per rank (-1 = auto: data.resolve_workers)

    def __post_init__(self) -> None:
        check_train_config(self)

    # The schedules live in train/schedules.py, beside the step that uses them.
    def lr_at(self, step: int) -> float:
        """Learning rate for update ``step`` (0-based): :func:`~vdvae_latents.train.schedules.learning_rate`."""
        return learning_rate(self, step)

    def kl_weight_at(self, step: int) -> float:
        """Weight of the KL term at update ``step``: :func:`~vdvae_latents.train.schedules.kl_weight`."""
        return kl_weight(self, step)

    def kl_balance_at(self, step: int) -> bool:
        """Whether KL balancing weighs the layers at ``step``: :func:`~vdvae_latents.train.schedules.kl_balancing`."""
        return kl_balancing(self, step)


LR_SCHEDULES = ("cosine", "official")
EVAL_BINARIZATIONS = ("threshold", "sampled")


def check_train_config(cfg: TrainConfig) -> None:
    """Raise :class:`ConfigError` naming the first train setting of ``cfg`` that is out of range."""

    def bad(name: str, why: str) -> ConfigError:
        return ConfigError(f"train setting '{name}' {why}.")

    for f in fields(cfg):
        if isinstance(getattr(cfg, f.name), float) and not math.isfinite(getattr(cfg, f.name)):
            raise bad(f.name, f"must be finite, not {getattr(cfg, f.name)}")

    for name in ("steps", "batch_size", "log_every", "checkpoint_every", "keep_checkpoints"):
        if getattr(cfg, name) < 1:
            raise bad(name, f"must be at least 1, not {getattr(cfg, name)}")
    for name in ("warmup_steps", "decay_start", "decay_steps", "kl_warmup_steps", "eval_every", "val_limit",
                 "grad_clip", "grad_skip_threshold", "weight_decay", "min_lr"):
        if getattr(cfg, name) < 0:
            raise bad(name, f"must be non-negative, not {getattr(cfg, name)}")
    if cfg.num_workers < -1:
        raise bad("num_workers", f"must be -1 (auto) or a number of processes, not {cfg.num_workers}")
    if not cfg.lr > 0:
        raise bad("lr", f"must be positive, not {cfg.lr}")
    if cfg.min_lr > cfg.lr:
        raise bad("min_lr", f"must not exceed lr ({cfg.lr}), not {cfg.min_lr}")
    if not 0 <= cfg.ema_decay < 1:
        raise bad("ema_decay", f"must be in [0, 1), not {cfg.ema_decay}")
    if cfg.optimizer not in ("adamax", "adamw", "adam"):
        raise bad("optimizer", f"must be adamax, adamw or adam, not '{cfg.optimizer}'")
    if cfg.device not in ("auto", "cpu", "cuda"):
        raise bad("device", f"must be auto, cpu or cuda, not '{cfg.device}'")
    if cfg.lr_schedule not in LR_SCHEDULES:
        raise bad("lr_schedule", f"must be {' or '.join(LR_SCHEDULES)}, not '{cfg.lr_schedule}'")
    if cfg.lr_schedule == "official" and cfg.decay_steps:
        if cfg.decay_steps <= cfg.decay_start:
            raise bad("decay_steps", f"must exceed decay_start ({cfg.decay_start}) with the official "
                      f"schedule, where it is the step the cosine ends at, not {cfg.decay_steps}")
        if cfg.warmup_steps > cfg.decay_start:
            raise bad("decay_start", f"must not precede the end of the warm-up ({cfg.warmup_steps}) with the "
                      f"official schedule, not {cfg.decay_start}")
    if not 0 <= cfg.kl_weight_min <= 1:
        raise bad("kl_weight_min", f"must be in [0, 1], not {cfg.kl_weight_min}")
    if cfg.eval_binarization not in EVAL_BINARIZATIONS:
        raise bad("eval_binarization", f"must be {' or '.join(EVAL_BINARIZATIONS)}, not "
                  f"'{cfg.eval_binarization}'")
