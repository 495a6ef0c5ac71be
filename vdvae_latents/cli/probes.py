"""`vdvl probe`: scikit-learn probes on a store beside pixel and latent baselines."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from ..core.outputs import prepare_output, require_matplotlib
from . import render
from .common import print_json


def probe(
    store: Path = typer.Argument(..., help="A store written by `vdvl encode` (.zarr, .h5 or .hdf5)."),
    labels: Optional[str] = typer.Option(None, "--labels", help="A .npy file with one integer label per row, or a "
                                         "data spec whose split (the store's) has labels (default: the store's)."),
    model_name: str = typer.Option("logreg", "--model", help="logreg, linear-svm, knn or mlp."),
    baselines: Optional[str] = typer.Option(None, "--baselines", help="Comma list of pixels, full, random, "
                                            "random-unpruned, pca, or none (default: pixels,random, skipped when "
                                            "their inputs are missing)."),
    test_store: Optional[Path] = typer.Option(None, "--test-store", help="The test split's store: its rows are the "
                                              "test set (default: a seeded stratified 20% hold-out)."),
    ckpt: Optional[Path] = typer.Option(None, "--ckpt", help="Checkpoint for full/random/random-unpruned "
                                        "(default: the store's)."),
    max_train: Optional[int] = typer.Option(None, "--max-train", help="Use at most N training rows (seeded, "
                                            "stratified; the same rows for every feature set; default: all)."),
    stream: str = typer.Option("auto", "--stream", help="auto: stream (SGD, chunk by chunk) the feature sets "
                               "that exceed --memory-budget; always; never."),
    memory_budget: float = typer.Option(4.0, "--memory-budget", help="GB a feature set may take in memory "
                                        "before it is streamed."),
    epochs: Optional[int] = typer.Option(None, "--epochs", help="Passes of a streamed fit (default: about "
                                         "500,000 row updates, 1-10 passes)."),
    seeds: int = typer.Option(3, "--seeds", help="Seeds: hold-out split, CV shuffling, random draw, MLP init."),
    cv: int = typer.Option(3, "--cv", help="Cross-validation folds for choosing hyper-parameters."),
    device: str = typer.Option("auto", "--device", help="Where the full latents are computed."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="PNG: test accuracy vs features and vs bytes per image."),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """Probe the stored features with a scikit-learn classifier, beside pixel and latent baselines.

    Hyper-parameters are chosen by stratified cross-validation on the training rows only; the
    test rows are scored once. Accuracies are mean ± std over --seeds runs.
    """
    if plot is not None:  # fail before the fits, not after them
        require_matplotlib("--plot")
        prepare_output(plot, what="figure")
    from ..downstream.probe import plot_probe, run_probe

    # A spinner rather than an image counter: the long steps here are model fits.
    status = None if quiet or as_json or not sys.stderr.isatty() else Console(stderr=True).status("probe")
    if status is not None:
        status.start()
    try:
        report = run_probe(store, labels=labels, model=model_name, baselines=baselines, test_store=test_store,
                           ckpt=ckpt, max_train=max_train, seeds=seeds, cv=cv, device=device, stream=stream,
                           memory_budget=memory_budget * 1e9, epochs=epochs,
                           progress=status.update if status is not None else None)
    finally:
        if status is not None:
            status.stop()
    if plot is not None:
        report["plot"] = str(plot_probe(report, plot))
    print_json(report) if as_json else render.probe_report(report)
