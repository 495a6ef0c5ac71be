"""How a run polarizes over training: every checkpoint's per-variate average KL, in one figure.

The paper's section 7 argues that hierarchical VAEs train in a polarized regime: most latent
variates are switched off for every image, a few carry nearly all of the KL. This script ranks
the variates of each checkpoint of a run (the same statistics as `vdvl analyze-kl`) and draws,
one line per checkpoint, the histogram of log10 average KL (bimodal when polarized) and the
share of the KL against the fraction of variates kept, and tabulates the share held by the top
3% (and 1%, 10%) at each step.

    python examples/polarization.py RUN --data fashion-mnist [--split train] [--limit 2000]
                                    [--granularity variate|element] [--out polarization-out]

Writes OUT/polarization.png, OUT/polarization.json and OUT/polarization.md. A run keeps its last
`train.keep_checkpoints` checkpoints (3 by default): raise it before training to see more steps.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from vdvae_latents.core.atomic import save_figure
from vdvae_latents.data import open_images
from vdvae_latents.latents.active_set import fit_active_set
from vdvae_latents.model.checkpoints import list_checkpoints, load_model

FLOOR = 1e-6  # nats: below it a variate counts as switched off (and is drawn at the floor)
SHARES = (0.01, 0.03, 0.10)


def checkpoint_row(path: Path, step: int, images, granularity: str, batch_size: int) -> dict:
    model, info = load_model(path, ema=True, device="cpu")
    active = fit_active_set(model, images, granularity=granularity, keep=0.03, batch_size=batch_size)
    kl = np.sort(active.table.avg_kl)[::-1]
    total = kl.sum()
    row = {"step": step, "checkpoint": str(path), "dims": len(kl), "total_avg_kl_nats": float(total),
           "off": int((kl < FLOOR).sum()), "avg_kl": kl.tolist()}
    for share in SHARES:
        n = max(1, int(round(share * len(kl))))
        row[f"top_{share:g}"] = {"dims": n, "kl_share": float(kl[:n].sum() / total) if total > 0 else 0.0}
    return row


def figure(rows: list[dict], granularity: str, title: str):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.2), layout="constrained")
    hist_ax, share_ax = fig.subplots(1, 2)
    from matplotlib import colormaps

    # One colour per checkpoint along a sequential map: early steps dark, late steps light (the
    # ten-colour cycle repeats beyond ten checkpoints).
    colours = colormaps["viridis"](np.linspace(0.0, 0.9, len(rows)))
    bins = np.linspace(np.log10(FLOOR), max(np.log10(max(max(r["avg_kl"]), FLOOR)) for r in rows) + 0.1, 50)
    for row, colour in zip(rows, colours):
        kl = np.asarray(row["avg_kl"])
        hist_ax.hist(np.log10(np.maximum(kl, FLOOR)), bins=bins, histtype="step", color=colour,
                     label=f"step {row['step']:,}")
        share = np.cumsum(kl) / kl.sum() if kl.sum() > 0 else np.zeros(len(kl))
        share_ax.plot(np.arange(1, len(kl) + 1) / len(kl) * 100, share * 100, color=colour,
                      label=f"step {row['step']:,}: top 3% hold {row['top_0.03']['kl_share']:.0%}")
    hist_ax.set(xlabel=f"log10 average KL per {granularity} (nats; floored at {FLOOR:g})",
                ylabel=f"{granularity}s", title="histogram: two modes when polarized")
    hist_ax.legend(fontsize=8)
    share_ax.axvline(3, color="0.5", ls="--", lw=0.8)
    share_ax.set(xscale="log", xlabel=f"% of {granularity}s kept (highest average KL first)",
                 ylabel="% of the total KL", ylim=(0, 101), title="KL share against the fraction kept")
    share_ax.grid(alpha=0.3)
    share_ax.legend(fontsize=8, loc="lower right")
    fig.suptitle(title)
    return fig


def table(rows: list[dict], granularity: str) -> str:
    lines = [f"| step | {granularity}s | switched off (< {FLOOR:g} nats) | total avg KL (nats) | "
             + " | ".join(f"top {s:.0%}" for s in SHARES) + " |",
             "|---" * (4 + len(SHARES)) + "|"]
    for r in rows:
        shares = " | ".join(f"{r[f'top_{s:g}']['kl_share']:.1%} ({r[f'top_{s:g}']['dims']})" for s in SHARES)
        lines.append(f"| {r['step']:,} | {r['dims']:,} | {r['off']:,} | {r['total_avg_kl_nats']:.1f} | {shares} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run")
    ap.add_argument("--data", required=True)
    ap.add_argument("--split", default="train")
    ap.add_argument("--limit", type=int, default=2000, help="images the statistics average over")
    ap.add_argument("--granularity", default="variate", choices=("variate", "element"))
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--out", default="polarization-out")
    args = ap.parse_args()
    checkpoints = list_checkpoints(args.run)
    if not checkpoints:
        raise SystemExit(f"{args.run} has no checkpoints")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    images = open_images(args.data, split=args.split, limit=args.limit)
    t0 = time.perf_counter()
    rows = [checkpoint_row(path, step, images, args.granularity, args.batch_size) for step, path in checkpoints]
    seconds = time.perf_counter() - t0
    title = f"{args.run}: {args.granularity}s over training ({len(images):,} {args.data}:{args.split} images)"
    save_figure(figure(rows, args.granularity, title), out / "polarization.png")
    (out / "polarization.json").write_text(json.dumps({"run": args.run, "data": args.data, "split": args.split,
                                                       "images": len(images), "granularity": args.granularity,
                                                       "seconds": seconds, "rows": rows}, indent=2))
    text = table(rows, args.granularity)
    (out / "polarization.md").write_text(text)
    print(text + f"\n{len(rows)} checkpoints in {seconds:.0f} s; figure: {out / 'polarization.png'}")


if __name__ == "__main__":
    main()
