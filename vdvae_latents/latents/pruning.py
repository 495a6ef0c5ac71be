"""Pruning sweeps (the paper's Table 5) and the KL figure.

Pruning replaces the posterior of the inactive dimensions by the prior: in the pruned
forward pass a pruned dimension takes a prior sample (temperature 1), contributing
zero KL, and later layers are conditioned on it. The sweep reports, for each kept
percentage, the negative ELBO split into reconstruction and KL, and the size of the
encoded split.

Two KL conventions are reported side by side. ``kl_bits_per_dim`` (and
``bits_per_dim``) charge a pruned dimension nothing: it takes a sample of its prior, so
its proposal equals its prior and the result is a true bound on -log p(x) for the
pruned model (this project's convention). ``kl_all_bits_per_dim`` (and
``bits_per_dim_kl_all``) charge every dimension its KL(q || p) in the same pruned pass,
pruned ones included, as the official Efficient-VDVAE code does when it masks variates
(the paper's Table 5 is computed that way).
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import numpy as np

from ..core.atomic import save_figure
from ..core.errors import UserError
from ..model.evaluation import evaluate
from .active_set import ActiveSet, select_dimensions

DEFAULT_SWEEP = (2.5, 3.0, 4.0, 5.0, 7.0, 100.0)


def parse_sweep(text: str) -> list[float]:
    """'2.5,3,4,100' -> [2.5, 3.0, 4.0, 100.0] (percentages in (0, 100])."""
    try:
        values = [float(part.strip().rstrip("%")) for part in text.split(",") if part.strip()]
    except ValueError:
        raise UserError(f"--sweep must be comma-separated percentages like 2.5,3,5,100, not '{text}'.") from None
    if not values or any(not 0 < v <= 100 for v in values):
        raise UserError(f"--sweep percentages must each be in (0, 100], got '{text}'.")
    return values


def pruning_sweep(model, images, active: ActiveSet, percentages=DEFAULT_SWEEP, *, batch_size: int = 256,
                  seed: int = 0, device=None, progress=None) -> list[dict]:
    """Negative ELBO under the pruned forward pass for each kept percentage of ``active``'s ranking.

    ``images`` is the split to score (the test split in the paper). At 100% no dimension
    is pruned and the numbers equal `vdvl eval` with the same seed and batch size.
    """
    n_images = len(images)
    rows = []
    total_scalars = active.total_scalars_per_image()
    for pct in percentages:
        if pct >= 100:
            masks, kept = None, replace(active, selected=np.arange(active.n_dims))
        else:
            selected = select_dimensions(active.table, keep=pct / 100)
            kept = replace(active, selected=selected)
            masks = kept.layer_masks(device=device)
        result = evaluate(model, images, batch_size=batch_size, seed=seed, active=masks, masked="sample",
                          temperature=1.0, device=device, progress=progress)
        if result.kl_all_nats is None:  # nothing pruned: both conventions agree
            result.kl_all_nats = result.kl_nats
        scalars = kept.kept_scalars_per_image()
        row = {"keep_pct": pct, "n_active": kept.n_active, "kl_share_active": kept.summary()["kl_share_active"],
               "kept_scalars_per_image": scalars, **result.as_dict(),
               "encoded_bytes_float16": n_images * scalars * 2, "encoded_bytes_float32": n_images * scalars * 4,
               "full_latents_bytes_float16": n_images * total_scalars * 2,
               "full_latents_bytes_float32": n_images * total_scalars * 4}
        rows.append(row)
    return rows


def kl_figure(active: ActiveSet, *, title: str | None = None):
    """Histogram of log10 average KL (the polarized regime's two modes) and the cumulative
    KL share against the fraction of dimensions kept, with the chosen cut marked (a matplotlib
    Figure; no pyplot state, so it is safe in notebooks and threads)."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise UserError("--plot needs matplotlib: pip install 'vdvae-latents[plots]'.") from None
    kl = active.table.avg_kl
    floor = 1e-6
    fig = Figure(figsize=(11, 4))
    ax1, ax2 = fig.subplots(1, 2)
    ax1.hist(np.log10(np.maximum(kl, floor)), bins=60, color="#4c72b0")
    ax1.set_xlabel(f"log10 average KL per {active.granularity} (nats; floored at {floor:g})")
    ax1.set_ylabel("dimensions")
    ax1.set_title("polarized regime: most dimensions carry ~0 nats")
    cut_kl = kl[active.selected].min() if active.n_active else None
    if cut_kl is not None:
        ax1.axvline(math.log10(max(cut_kl, floor)), color="#c44e52", ls="--", label="cut")
        ax1.legend()

    order = active.ranking
    total = kl.sum()
    share = np.cumsum(kl[order]) / total if total > 0 else np.zeros(len(order))
    frac = np.arange(1, len(order) + 1) / len(order)
    ax2.plot(frac * 100, share * 100, color="#4c72b0")
    kept_frac = active.n_active / active.n_dims
    kept_share = active.summary()["kl_share_active"]
    ax2.axvline(kept_frac * 100, color="#c44e52", ls="--",
                label=f"kept {kept_frac * 100:.1f}% -> {kept_share * 100:.1f}% of KL")
    ax2.set_xscale("log")
    ax2.set_xlabel("% of dimensions kept (highest average KL first)")
    ax2.set_ylabel("% of total KL")
    ax2.set_ylim(0, 101)
    ax2.legend(loc="lower right")
    ax2.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_kl(active: ActiveSet, path: str | Path, *, title: str | None = None) -> Path:
    """Write :func:`kl_figure` to ``path``, atomically (PNG, or the type its suffix names)."""
    return save_figure(kl_figure(active, title=title), Path(path))
