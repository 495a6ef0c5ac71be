"""`vdvl analyze-kl`: rank every latent dimension by its average KL and choose the active set."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import typer

from ..core.errors import UserError
from . import render
from .common import WORKERS_HELP, print_json, progress


def analyze_kl(
    path: Path = typer.Argument(..., help="A run directory or a checkpoint file."),
    data: str = typer.Option(..., "--data", help="Data spec whose split is analysed."),
    out_file: Path = typer.Option(..., "--out", help="ACTIVE.json to write (a .npz sidecar when large)."),
    keep: Optional[str] = typer.Option(None, "--keep", help="Keep the top P% by average KL: 3% or 0.03."),
    threshold: Optional[float] = typer.Option(None, "--threshold", help="Keep dims with average KL > T nats."),
    split: str = typer.Option("train", "--split", help="Split the statistics are computed on."),
    granularity: str = typer.Option("variate", "--granularity", help="variate (the paper's unit) or element."),
    limit: Optional[int] = typer.Option(None, "--limit", min=1, help="Only the first N images (default: all)."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="PNG: log10 KL histogram and cumulative KL share."),
    sweep: Optional[str] = typer.Option(None, "--sweep", help="Pruning sweep on the test split, e.g. 2.5,3,4,5,7,100."),
    sweep_split: str = typer.Option("test", "--sweep-split"),
    units: str = typer.Option("nats", "--units", help="nats, or bits as the official code reports KL."),
    div_stats: Optional[Path] = typer.Option(None, "--div-stats",
                                             help="Also write the official code's div_stats.npy (bits)."),
    batch_size: int = typer.Option(256, "--batch-size", min=1),
    precision: str = typer.Option("fp32", "--precision", help="fp32, bf16 (autocast), or auto: bf16 where the CPU or GPU computes it natively, else fp32."),
    seed: int = typer.Option(0, "--seed"),
    device: str = typer.Option("auto", "--device"),
    workers: Optional[int] = typer.Option(None, "--workers", min=0, help=WORKERS_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
) -> None:
    """Rank every latent dimension by its average KL over a split; choose and save the active set."""
    if units not in ("nats", "bits"):
        raise UserError(f"--units must be nats or bits, not '{units}'.")
    from ..latents.analyze import analyze_checkpoint
    from ..latents.pruning import parse_sweep

    sweep_values = parse_sweep(sweep) if sweep else None
    with progress("analyze-kl", as_json) as tick:
        result = analyze_checkpoint(path, data, out=out_file, keep=keep, threshold=threshold, split=split,
                                    granularity=granularity, limit=limit, plot=plot, sweep=sweep_values,
                                    sweep_split=sweep_split, batch_size=batch_size, seed=seed, device=device,
                                    div_stats=div_stats, workers=workers, precision=precision,
                                    progress=tick)
    per_nat = 1 / math.log(2) if units == "bits" else 1.0
    if units == "bits":
        result["total_avg_kl_bits"] = result["total_avg_kl_nats"] * per_nat
        for row in result["layers"] + result["resolutions"]:
            row["kl_bits"] = row["kl_nats"] * per_nat
    if as_json:
        print_json(result)
        return
    render.kl_analysis(result, data=data, split=split, units=units, per_nat=per_nat)
