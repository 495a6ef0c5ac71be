"""Training recipes: the optimisation settings that go with each preset.

A recipe is a set of :class:`~vdvae_latents.train.config.TrainConfig` values. The paper
presets take the official ones: the Efficient-VDVAE configs (``egs/*.cfg`` of the
authors' code) for ``-c1``/``-c2``, openai/vdvae's ``hps.py`` for ``-vdvae``. The CPU
presets take the project's own recipe, which measured better on their data in short runs
(``benchmarks/results/recipes-cpu.md``). ``--set train.KEY=VALUE`` overrides any value.

What the official Efficient-VDVAE recipe is, as its PyTorch code computes it:

* Adamax (0.9, 0.999, eps 1e-8), lr 1e-3, no weight decay (the configs' ``l2_weight``
  is not passed to the PyTorch optimiser);
* learning rate: ``NarrowCosineDecay`` (``lr_schedule="official"``, see
  :meth:`TrainConfig.lr_at`): warm-up over 100 updates, constant until ``decay_start``,
  cosine to ``min_learning_rate`` at step ``decay_steps``;
* KL weight: ``LinearBetaSchedule(anneal_start=21, anneal_steps, beta_min=1e-4)``;
* KL balancing: NVAE's gamma with ``scaled_gamma`` for ``gamma_max_steps`` updates;
* gradient norm: clipped only where ``clip_gradient_norm`` is true; updates skipped when
  it is NaN or >= ``gradient_skip_threshold`` (both for the loss in nats/dim);
* EMA 0.9999 from the first update (no warm-up); horizontal flips (not for MNIST, whose
  loader has none); binarized MNIST is validated on one fixed random binarisation.

The batch sizes and learning rates stay with the presets (the paper's Table 3; the
CIFAR-10 C1 config itself trains at batch 32).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any



@dataclass(frozen=True)
class Recipe:
    name: str
    source: str                                  # where the values come from
    settings: dict[str, Any] = field(default_factory=dict)  # TrainConfig field -> value


def _efficient(source: str, *, decay_steps: int, min_lr: float, skip: float, clip: float = 0.0,
               steps: int = 800_000, kl_steps: int = 5_000, balance_steps: int = 10_000,
               decay_start: int = 50_000, flip: bool = True, **extra: Any) -> dict[str, Any]:
    """The settings every Efficient-VDVAE config shares, with the per-data-set ones."""
    return dict(
        optimizer="adamax", beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0,
        lr_schedule="official", warmup_steps=100, decay_start=decay_start, decay_steps=decay_steps,
        min_lr=min_lr, steps=steps,
        kl_warmup_start=21, kl_warmup_steps=kl_steps, kl_weight_min=1e-4,
        kl_balance_steps=balance_steps, kl_balance_scaled=True,
        grad_clip=float(clip), grad_skip_threshold=float(skip), ema_decay=0.9999, ema_warmup=False, flip=flip, **extra,
    ) | {"_source": source}


def _openai(source: str, *, clip: float, skip: float, ema: float) -> dict[str, Any]:
    """openai/vdvae (hps.py): AdamW (0.9, 0.9), wd 0.01, 100-step warm-up to a constant lr."""
    return dict(
        optimizer="adamw", beta1=0.9, beta2=0.9, eps=1e-8, weight_decay=0.01,
        lr_schedule="official", warmup_steps=100, decay_start=0, decay_steps=0,
        kl_warmup_steps=0, kl_balance_steps=0, grad_clip=float(clip), grad_skip_threshold=float(skip),
        ema_decay=ema, ema_warmup=False, flip=False,
    ) | {"_source": source}


_EGS = "Efficient-VDVAE egs/"
_TABLE: dict[str, dict[str, Any]] = {
    # ---- Efficient-VDVAE (egs/*.cfg); the C2 presets reuse their data set's C1 recipe
    "cifar10": _efficient(_EGS + "cifar10_C1.cfg", decay_steps=750_000, min_lr=2e-4, skip=800),
    "imagenet32": _efficient(_EGS + "imagenet32_C1.cfg", decay_steps=750_000, min_lr=2e-4, skip=800),
    "imagenet64": _efficient(_EGS + "imagenet64_C1.cfg", decay_steps=750_000, min_lr=2e-4, skip=800),
    "celeba64": _efficient(_EGS + "celebA64_baseline.cfg", decay_steps=750_000, min_lr=1e-4, skip=800),
    "ffhq256": _efficient(_EGS + "ffhq256_5bits_C1.cfg", decay_steps=750_000, min_lr=1e-4, skip=1000, clip=20,
                          steps=900_000),
    "celebahq256": _efficient(_EGS + "celebAHQ256_8bits_baseline.cfg", decay_steps=750_000, min_lr=1e-4,
                              skip=800, clip=300),
    "ffhq1024": _efficient(_EGS + "ffhq1024_baseline.cfg", decay_steps=850_000, min_lr=1e-4, skip=1200, clip=300,
                           steps=900_000),
    "celebahq1024": _efficient(_EGS + "celebAHQ1024_baseline.cfg", decay_steps=850_000, min_lr=1e-4, skip=1200,
                               clip=300, steps=900_000),
    "mnist": _efficient(_EGS + "binarized_mnist_baseline.cfg", decay_steps=195_000, decay_start=5_000, min_lr=1e-4,
                        skip=800, steps=200_000, kl_steps=500, balance_steps=1_000, flip=False,
                        eval_binarization="sampled"),
    # ---- openai/vdvae (hps.py) for the -vdvae presets
    "cifar10-vdvae": _openai("openai/vdvae hps.py cifar10", clip=200, skip=400, ema=0.9999),
    "imagenet32-vdvae": _openai("openai/vdvae hps.py imagenet32", clip=200, skip=300, ema=0.999),
    "imagenet64-vdvae": _openai("openai/vdvae hps.py imagenet64", clip=220, skip=380, ema=0.999),
    "ffhq256-vdvae": _openai("openai/vdvae hps.py ffhq256", clip=130, skip=180, ema=0.999),
    "ffhq1024-vdvae": _openai("openai/vdvae hps.py ffhq1024", clip=360, skip=500, ema=0.999),
    # ---- the project's own recipe: TrainConfig's defaults (EMA warm-up, run-length cosine)
    "cpu": {"_source": "vdvl (measured best on the CPU presets' data)"},
}

RECIPES: dict[str, Recipe] = {
    name: Recipe(name, values["_source"], {k: v for k, v in values.items() if k != "_source"})
    for name, values in _TABLE.items()
}


def recipe_for_preset(preset: str) -> Recipe:
    """The recipe of a preset: ``<data>-vdvae`` -> openai's, ``<data>-c1/c2`` -> the egs config's."""
    if preset in RECIPES:
        return RECIPES[preset]
    data = preset.rsplit("-", 1)[0]
    if data in RECIPES and preset.endswith(("-c1", "-c2")):
        return RECIPES[data]
    return RECIPES["cpu"]


__all__ = ["Recipe", "RECIPES", "recipe_for_preset"]
