"""`vdvl score` and `vdvl ood`: per-image scores of the latent hierarchy (the ELBO, its parts,
Havtorn et al.'s L^{>k} and LLR^{>k}) and out-of-distribution detection with them."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from .common import WORKERS_HELP, out, print_json, progress


def score(
    path: Path = typer.Argument(..., help="A run directory or a checkpoint file."),
    data: str = typer.Option(..., "--data", help="Data spec to score."),
    out_file: Path = typer.Option(..., "--out", help="SCORES.zarr (default format) or SCORES.h5."),
    split: str = typer.Option("test", "--split"),
    ks: Optional[str] = typer.Option(None, "--k", help="Layers nearest the data taken from the prior in L^{>k}: "
                                     "all, or a comma list such as 1,2,3 (default: 1,2)."),
    iw: int = typer.Option(0, "--iw", min=0, help="Also the K-sample importance-weighted bound (LLR then uses it)."),
    batch_size: int = typer.Option(128, "--batch-size", min=1),
    chunk_rows: int = typer.Option(1024, "--chunk-rows", min=1, help="Rows per store chunk (the resume unit)."),
    resume: bool = typer.Option(False, "--resume", help="Finish an interrupted store (writes only missing chunks)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing store."),
    seed: int = typer.Option(0, "--seed", min=0, help="Image i's noise comes from (seed, i)."),
    device: str = typer.Option("auto", "--device"),
    workers: Optional[int] = typer.Option(None, "--workers", min=0, help=WORKERS_HELP),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Per-image negative ELBO (bits/dim), its reconstruction part, each latent layer's KL, the IW
    bound with --iw, and L^{>k} and LLR^{>k} for each --k, into a Zarr or HDF5 store."""
    from ..stores.scores import score_to_store

    with progress("score", quiet or as_json) as tick:
        result = score_to_store(path, data, out_file, split=split, ks=ks, iw=iw, seed=seed, batch_size=batch_size,
                                chunk_rows=chunk_rows, resume=resume, overwrite=overwrite, device=device,
                                workers=workers, progress=tick)
    if as_json:
        print_json(result)
        return
    out.print(f"{result['store']}: {result['rows']:,} images x {len(result['columns'])} scores "
              f"({result['rows_written']:,} written, {result['images_per_s']:.1f} images/s, "
              f"{result['bytes_on_disk']:,} bytes on disk)")
    out.print("columns: " + ", ".join(result["columns"]))


def ood(
    path: Path = typer.Argument(..., help="A run directory or a checkpoint file."),
    inliers: str = typer.Option(..., "--in", help="In-distribution data: SPEC[:split] (default split: test)."),
    outliers: list[str] = typer.Option(..., "--ood", help="Out-of-distribution data, SPEC[:split] (default split: "
                                       "test); repeat for several sets."),
    ks: str = typer.Option("all", "--k", help="Layers nearest the data taken from the prior in L^{>k}: all, or a "
                           "comma list such as 1,2,3."),
    iw: int = typer.Option(0, "--iw", min=0, help="Importance samples for the likelihood term of LLR (0: the ELBO)."),
    resize: bool = typer.Option(False, "--resize", help="Resize (Pillow bicubic) and convert the channels (luma or "
                                "repeated gray) of sets that do not match the model's input; refused without it."),
    limit: Optional[int] = typer.Option(None, "--limit", min=1, help="Only the first N images of every set."),
    batch_size: int = typer.Option(128, "--batch-size", min=1),
    seed: int = typer.Option(0, "--seed", min=0),
    device: str = typer.Option("auto", "--device"),
    plot: Optional[Path] = typer.Option(None, "--plot", help="PNG: ROC curves of the ELBO and LLR^{>k}."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """AUROC, AUPRC and FPR80 of the ELBO and of every L^{>k} and LLR^{>k} (Havtorn et al., 2021)
    for each out-of-distribution set, the in-distribution split as negatives.
    """
    from ..downstream.ood_report import run_ood

    with progress("ood", as_json) as tick:
        report = run_ood(path, inliers, outliers, ks=ks, iw=iw, resize=resize, limit=limit, batch_size=batch_size,
                         seed=seed, device=device, plot=plot, progress=tick)
    print_json(report) if as_json else render_ood(report)


def render_ood(report: dict) -> None:
    """One table: a row per score, AUROC / AUPRC / FPR80 per out-of-distribution set."""
    inl = report["in"]
    k = report["k_chosen"]
    table = Table(title=f"out-of-distribution detection: {inl['data']}:{inl['split']} ({inl['n']:,} images) as "
                        f"negatives; AUROC / AUPRC / FPR80")
    table.add_column("score (higher = more unusual)", no_wrap=True)
    for entry in report["sets"]:
        table.add_column(f"{entry['data']}:{entry['split']} ({entry['n']:,})", justify="right", no_wrap=True)
    for name in report["sets"][0]["metrics"]:
        label = _label(name) + ("  <- k from the in-distribution KL" if name == f"llr_gt{k}_bpd" else "")
        cells = [entry["metrics"][name] for entry in report["sets"]]
        table.add_row(label, *(f"{m['auroc']:.3f} / {m['auprc']:.3f} / {m['fpr80']:.3f}" for m in cells))
    out.print(table)
    kl = report["kl_per_layer_nats"]
    out.print(f"k = {k}: the {k} layer(s) nearest the data hold {sum(kl[-k:]) / max(sum(kl), 1e-300):.0%} of the "
              f"in-distribution KL ({sum(kl):.1f} nats per image over {report['n_layers']} layers).")
    if "plot" in report:
        out.print(f"ROC curves: {report['plot']}")


def _label(name: str) -> str:
    if name == "neg_elbo_bpd":
        return "-ELBO (bits/dim)"
    if name == "neg_iw_bpd":
        return "-log p IW (bits/dim)"
    kind, k = name.removesuffix("_bpd").rsplit("_gt", 1)
    return f"LLR>{k}" if kind == "llr" else f"-L>{k} (bits/dim)"
