"""Training configuration and the resolved run config (TOML).

A run is fully described by a :class:`RunConfig`: the model (:class:`ModelConfig`), the
optimisation (:class:`TrainConfig`), the data spec and the preset it started from.
It is resolved from ``--preset`` or ``--config FILE.toml`` plus ``--set key=value``
overrides, and written to ``RUN_DIR/config.toml`` so a run can be read and resumed.

A config file looks like::

    preset = "fashion-mnist-cpu"      # optional base preset
    data = "fashion-mnist"
    [model]                           # any ModelConfig field
    variates = 8
    [train]                           # any TrainConfig field
    steps = 5000
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..core.errors import ConfigError


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
        def bad(name: str, why: str) -> ConfigError:
            return ConfigError(f"train setting '{name}' {why}.")

        for name in ("steps", "batch_size", "log_every", "checkpoint_every", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise bad(name, f"must be at least 1, not {getattr(self, name)}")
        for name in ("warmup_steps", "decay_start", "decay_steps", "kl_warmup_steps", "eval_every", "val_limit",
                     "grad_clip", "grad_skip_threshold", "weight_decay", "min_lr"):
            if getattr(self, name) < 0:
                raise bad(name, f"must be non-negative, not {getattr(self, name)}")
        if self.num_workers < -1:
            raise bad("num_workers", f"must be -1 (auto) or a number of processes, not {self.num_workers}")
        if not self.lr > 0:
            raise bad("lr", f"must be positive, not {self.lr}")
        if self.min_lr > self.lr:
            raise bad("min_lr", f"must not exceed lr ({self.lr}), not {self.min_lr}")
        if not 0 <= self.ema_decay < 1:
            raise bad("ema_decay", f"must be in [0, 1), not {self.ema_decay}")
        if self.optimizer not in ("adamax", "adamw", "adam"):
            raise bad("optimizer", f"must be adamax, adamw or adam, not '{self.optimizer}'")
        if self.device not in ("auto", "cpu", "cuda"):
            raise bad("device", f"must be auto, cpu or cuda, not '{self.device}'")
        if self.lr_schedule not in LR_SCHEDULES:
            raise bad("lr_schedule", f"must be {' or '.join(LR_SCHEDULES)}, not '{self.lr_schedule}'")
        if self.lr_schedule == "official" and self.decay_steps:
            if self.decay_steps <= self.decay_start:
                raise bad("decay_steps", f"must exceed decay_start ({self.decay_start}) with the official "
                          f"schedule, where it is the step the cosine ends at, not {self.decay_steps}")
            if self.warmup_steps > self.decay_start:
                raise bad("decay_start", f"must not precede the end of the warm-up ({self.warmup_steps}) with the "
                          f"official schedule, not {self.decay_start}")
        if not 0 <= self.kl_weight_min <= 1:
            raise bad("kl_weight_min", f"must be in [0, 1], not {self.kl_weight_min}")
        if self.eval_binarization not in EVAL_BINARIZATIONS:
            raise bad("eval_binarization", f"must be {' or '.join(EVAL_BINARIZATIONS)}, not "
                      f"'{self.eval_binarization}'")

    def lr_at(self, step: int) -> float:
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
        if self.lr_schedule == "official":
            return self._official_lr(step)
        if self.warmup_steps and step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        start = max(self.decay_start, self.warmup_steps)
        length = self.decay_steps or max(1, self.steps - start)
        t = min(max(step - start, 0) / length, 1.0)
        return self.min_lr + 0.5 * (self.lr - self.min_lr) * (1 + math.cos(math.pi * t))

    def _official_lr(self, step: int) -> float:
        def warm(s: int) -> float:
            return self.lr * min(1.0, s / self.warmup_steps) if self.warmup_steps else self.lr

        if not self.decay_steps or step < self.decay_start:
            return warm(step)
        period = self.decay_steps
        if step >= period:
            return self.min_lr
        before = max(self.decay_start - 1, 0)  # the rate the recursion starts from (the initial lr at 0)
        start_lr = warm(before) if self.decay_start else self.lr
        ratio = (1 + math.cos(math.pi * step / period)) / (1 + math.cos(math.pi * before / period))
        return self.min_lr + (start_lr - self.min_lr) * ratio

    def kl_weight_at(self, step: int) -> float:
        """Weight of the KL term at update ``step`` (0-based).

        The official (NVAE-style) linear ramp, exactly as Efficient-VDVAE computes it:
        ``clamp((step - start) / (start + steps), kl_weight_min, 1)`` with ``start =
        kl_warmup_start`` and ``steps = kl_warmup_steps`` (its denominator is ``start +
        steps``, so the ramp reaches 1 at ``2 * start + steps``). 1 when ``kl_warmup_steps``
        is 0.
        """
        if not self.kl_warmup_steps:
            return 1.0
        start = self.kl_warmup_start
        return min(1.0, max(self.kl_weight_min, (step - start) / (start + self.kl_warmup_steps)))

    def kl_balance_at(self, step: int) -> bool:
        """Whether KL balancing (gamma) weighs the layers at update ``step`` (official: step <= N)."""
        return self.kl_balance_steps > 0 and step <= self.kl_balance_steps


LR_SCHEDULES = ("cosine", "official")
EVAL_BINARIZATIONS = ("threshold", "sampled")


