"""The report's own figures (the KL and probe figures come from ``latents`` and ``downstream``),
and the one way every figure enters the page: a PNG inside a ``data:`` URI.

Each figure follows ``kl.png``: a title that says what is shown, axes with units, a legend
where there is more than one series. They are matplotlib ``Figure`` objects (no pyplot
state), drawn and encoded here, never written to disk.
"""

from __future__ import annotations

import base64
import io
import math

from ..downstream.figures import STORE_COLOUR, format_bytes

BLUE, GREY = "#4c72b0", "#8c8c8c"
DPI = 110  # ~1200 px wide figures: sharp on screen and in print, ~50-100 kB each


def data_uri(fig) -> str:
    """``fig`` as a ``data:image/png;base64,...`` URI (the page embeds every figure; nothing is fetched)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def training_figure(train: list[dict], val: list[dict], *, unit: str, key: str, kl_key: str):
    """The training curve from metrics.jsonl: the negative ELBO (left) and its KL part (right)
    against the step; training values are averages over each logging window, validation values
    are the EMA weights on the val split."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 3.8), layout="constrained")
    elbo_ax, kl_ax = fig.subplots(1, 2)
    for ax, field, what in ((elbo_ax, key, "negative ELBO"), (kl_ax, kl_key, "KL part of the negative ELBO")):
        steps = [r["step"] for r in train if _finite(r.get(field))]
        values = [r[field] for r in train if _finite(r.get(field))]
        ax.plot(steps, values, color=BLUE, marker="." if len(steps) < 40 else None, label="training (window mean)")
        v_steps = [r["step"] for r in val if _finite(r["validation"].get(field))]
        v_values = [r["validation"][field] for r in val if _finite(r["validation"].get(field))]
        if v_steps:
            ax.plot(v_steps, v_values, color=STORE_COLOUR, marker="o", label="validation (EMA weights)")
        if len(values) > 40:  # the first few windows sit far above the rest; let them leave the axis
            top = max(values[len(values) // 20:] + v_values)
            bottom = min(values + v_values)
            ax.set_ylim(bottom - 0.05 * (top - bottom), top + 0.05 * (top - bottom))
        ax.set_xlabel("training step")
        ax.set_ylabel(f"{what} ({unit})")
        ax.set_title(what, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return fig


def sweep_figure(rows: list[dict], *, unit: str, key: str, key_all: str, keep_pct: float | None, split: str):
    """Negative ELBO of the pruned model against the share of dimensions kept, under both KL conventions."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 4), layout="constrained")
    ax = fig.subplots()
    pct = [r["keep_pct"] for r in rows]
    ax.plot(pct, [r[key] for r in rows], color=BLUE, marker="o",
            label="pruned dims charged nothing (a bound for the pruned model)")
    ax.plot(pct, [r.get(key_all, r[key]) for r in rows], color=STORE_COLOUR, marker="s", linestyle="--",
            label="every dim charged its KL (official code, paper's Table 5)")
    if keep_pct is not None:
        ax.axvline(keep_pct, color=GREY, linestyle=":", label=f"the active set: {keep_pct:g}% kept")
    ax.set_xscale("log")
    ax.set_xticks(pct, [f"{p:g}%" for p in pct])
    ax.minorticks_off()
    ax.set_xlabel("latent dimensions kept (highest average KL first; log scale)")
    ax.set_ylabel(f"negative ELBO ({unit})")
    ax.set_title(f"pruning sweep on the {split} split: pruned dimensions take prior samples", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def store_sizes_figure(bars: list[tuple[str, float, bool]]):
    """Bytes per image, one bar per (label, bytes, is_store): the stores beside the raw pixels and the
    full latents, on a log axis (they differ by orders of magnitude)."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    fig = Figure(figsize=(9, 1.3 + 0.4 * len(bars)), layout="constrained")
    ax = fig.subplots()
    y = list(range(len(bars) - 1, -1, -1))
    sizes = [size for _, size, _ in bars]
    ax.barh(y, sizes, color=[STORE_COLOUR if store else GREY for _, _, store in bars], height=0.6)
    for yi, size in zip(y, sizes):
        ax.annotate(format_bytes(size), (size, yi), xytext=(5, 0), textcoords="offset points", va="center",
                    fontsize=9)
    ax.set_yticks(y, [label for label, _, _ in bars])
    ax.set_xscale("log")
    ax.set_xlim(10 ** math.floor(math.log10(max(min(sizes), 1))), max(sizes) * 12)
    ax.xaxis.set_major_locator(LogLocator(base=10))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: format_bytes(v)))
    ax.set_xlabel("bytes per image (log scale)")
    ax.set_title("stores (red, on disk) against the raw pixels and the full latents (grey)", fontsize=10)
    ax.grid(True, axis="x", alpha=0.3)
    return fig


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


__all__ = ["data_uri", "training_figure", "sweep_figure", "store_sizes_figure"]
