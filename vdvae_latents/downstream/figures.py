"""The probe figure: what each feature set is worth (test accuracy) and what it costs (bytes per image).

One row per feature set, the same rows in both panels, named on the shared y axis so that
names never collide however close the values are. The accuracy axis is zoomed to the
values: at 0.965 against 0.972 the differences are the point, so the majority-class rate
(usually far below) is stated in the panel's title rather than drawn at the bottom of an
empty 0..1 axis.
"""

from __future__ import annotations

import math
from pathlib import Path

from ..core.atomic import save_figure
from ..core.errors import UserError

STORE_ROW = "active"  # the store's own features: drawn in the highlight colour
STORE_COLOUR, OTHER_COLOUR = "#c44e52", "#4c72b0"  # kl.png's two colours


def probe_figure(report: dict):
    """A matplotlib Figure of a :func:`~vdvae_latents.downstream.probe.run_probe` report.

    Left: test accuracy per feature set, mean and standard deviation over the seeds (the
    error bar) with each seed's accuracy as a dot, on an axis zoomed to the values. Right:
    bytes per image of each feature set (log scale when they span more than 20x), with the
    store's size on disk marked where the report has it.
    """
    from matplotlib.figure import Figure

    rows = report["rows"]
    n = len(rows)
    fig = Figure(figsize=(11, 1.7 + 0.42 * n), layout="constrained")
    acc_ax, size_ax = fig.subplots(1, 2, sharey=True, width_ratios=(3, 2))
    y = list(range(n - 1, -1, -1))  # the report's first row (the store) on top
    colours = [STORE_COLOUR if row["name"] == STORE_ROW else OTHER_COLOUR for row in rows]
    _accuracy_panel(acc_ax, report, y, colours)
    _size_panel(size_ax, rows, y, colours)
    acc_ax.set_yticks(y, [f"{row['name']} ({row['features']:,} features)" for row in rows])
    acc_ax.set_ylim(-0.6, n - 0.4)
    source = f"test store {Path(report['test_store']).name}" if report.get("test_store") else "a 20% hold-out"
    fig.suptitle(f"{report['model']} probe on {Path(report['store']).name}: {report['n_train']:,} training rows, "
                 f"{report['n_test']:,} test rows from {source}", fontsize=11)
    return fig


def plot_probe(report: dict, path: str | Path) -> Path:
    """Write :func:`probe_figure` to ``path`` (PNG, or another type matplotlib writes), atomically."""
    from matplotlib.figure import Figure

    path = Path(path)
    if not path.parent.is_dir():
        raise UserError(f"cannot write --plot {path}: the directory {path.parent} does not exist.")
    supported = Figure().canvas.get_supported_filetypes()
    if path.suffix.lstrip(".").lower() not in supported:
        raise UserError(f"--plot {path} must end in .png (or another image type: {', '.join(sorted(supported))}).")
    return save_figure(probe_figure(report), path)


def _accuracy_panel(ax, report: dict, y: list[int], colours: list[str]) -> None:
    from matplotlib.ticker import MaxNLocator

    rows = report["rows"]
    means = [row["test_accuracy"] for row in rows]
    stds = [row["test_accuracy_std"] for row in rows]
    seeds = [row.get("test_accuracies") or [row["test_accuracy"]] for row in rows]
    lo = min(min(m - s for m, s in zip(means, stds)), min(min(a) for a in seeds))
    hi = max(max(m + s for m, s in zip(means, stds)), max(max(a) for a in seeds))
    if hi - lo < 0.01:  # at least one percentage point around the values, so equal accuracies get an axis
        middle = (lo + hi) / 2
        lo, hi = middle - 0.005, middle + 0.005
    span = hi - lo
    for yi, row, colour, accs in zip(y, rows, colours, seeds):
        ax.errorbar(row["test_accuracy"], yi, xerr=row["test_accuracy_std"], fmt="o", color=colour, capsize=5,
                    markersize=7, zorder=3)
        ax.scatter(accs, [yi] * len(accs), s=14, facecolors="none", edgecolors=colour, alpha=0.7, zorder=2)
        # The values in a column right of the axes (x in axes fraction, y in data), clear of every point.
        ax.annotate(f"{row['test_accuracy']:.3f} ± {row['test_accuracy_std']:.3f}", (1, yi),
                    xycoords=ax.get_yaxis_transform(), xytext=(8, 0), textcoords="offset points", va="center",
                    fontsize=9, color=colour)
    left, right = lo - 0.08 * span, min(hi + 0.08 * span, 1.0 + 0.02 * span)
    ax.set_xlim(left, right)
    ax.xaxis.set_major_locator(MaxNLocator(6))
    chance = report.get("chance_accuracy")
    if chance is not None and left <= chance <= right:
        ax.axvline(chance, color="grey", linestyle="--", linewidth=1)
    seeds_text = f"{report['seeds']} seeds" if report.get("seeds", 1) > 1 else "1 seed"
    chance_text = f"; majority class {chance:.3f}" if chance is not None else ""
    ax.set_title(f"test accuracy: mean ± std over {seeds_text} (circles: each seed){chance_text}", fontsize=10)
    ax.set_xlabel("test accuracy (fraction of test rows classified correctly)")
    ax.grid(True, axis="x", alpha=0.3)


def _size_panel(ax, rows: list[dict], y: list[int], colours: list[str]) -> None:
    sizes = [row["bytes_per_image"] for row in rows]
    disk = [row.get("disk_bytes_per_image") for row in rows]  # the store's row only: what it takes on disk
    ax.barh(y, sizes, color=colours, height=0.55, alpha=0.85)
    for yi, size, on_disk in zip(y, sizes, disk):
        text = format_bytes(size) + (f" (on disk: {format_bytes(on_disk)})" if on_disk else "")
        ax.annotate(text, (size, yi), xytext=(6, 0), textcoords="offset points", va="center", fontsize=9)
    largest = max(sizes)
    log = largest / max(min(sizes), 1) > 20
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    if log:  # decades only: minor tick labels such as 6x10^1 crowd the axis
        ax.set_xscale("log")
        ax.set_xlim(max(min(sizes), 1) / 2, largest * 40)  # room on the right for the labels
        ax.xaxis.set_major_locator(LogLocator(base=10))
        ax.xaxis.set_minor_formatter(NullFormatter())
    else:  # room on the right for the labels, more for the store's "(on disk: ...)"
        ax.set_xlim(0, largest * (2.0 if any(disk) else 1.6))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: format_bytes(v)))
    ax.set_title("size of the features, in memory as probed", fontsize=10)
    ax.set_xlabel("bytes per image" + (" (log scale)" if log else ""))
    ax.grid(True, axis="x", alpha=0.3)


def format_bytes(n: float) -> str:
    """1234 -> '1.2 kB' (powers of 1000, as the store sizes in the README are written)."""
    if n < 1000:
        return f"{n:.0f} B" if n == int(n) or n >= 10 else f"{n:.1f} B"
    exponent = min(int(math.log10(n) // 3), 4)
    return f"{n / 1000 ** exponent:.3g} {('B', 'kB', 'MB', 'GB', 'TB')[exponent]}"


__all__ = ["probe_figure", "plot_probe", "format_bytes"]
