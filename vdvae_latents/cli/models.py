"""Commands about one model: presets, model, info, eval, sample, reconstruct, first-k."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from . import render
from .common import WORKERS_HELP, elbo_text, out, parse_sets, print_json, progress


def presets(
    as_json: bool = typer.Option(False, "--json", help="Print the table as JSON."),
) -> None:
    """List every model preset with its parameter count, image shape and latent sizes."""
    from ..train.presets import PRESETS, describe

    rows = [describe(p) for p in PRESETS.values()]
    print_json(rows) if as_json else render.presets(rows)


def model(
    preset: str = typer.Option("tiny", "--preset", "-p", help="Preset name (see `vdvl presets`)."),
    data: Optional[str] = typer.Option(None, "--data", help="Run an untrained forward pass on these images."),
    n: int = typer.Option(64, "--n", min=1, help="Images for the forward pass."),
    seed: int = typer.Option(0, "--seed", help="Seed for the weights and the posterior samples."),
    set_: list[str] = typer.Option([], "--set", help="Override a model field: key=value (repeatable)."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Describe a preset's model (layers, latent sizes, parameters); with --data, score real images.

    The forward pass uses freshly initialised weights: it checks that the model and the
    data fit together and shows the starting loss, not a trained result.
    """
    overrides = parse_sets(set_)
    from ..train.presets import get_preset

    cfg = get_preset(preset).config  # a wrong name or --set is refused before torch is imported
    if overrides:
        cfg.with_overrides(overrides)
    from ..train.inspect_preset import inspect_model

    result = inspect_model(preset, data=data, n=n, seed=seed, overrides=overrides)
    print_json(result) if as_json else render.model(result)


def info(
    path: Path = typer.Argument(..., help="A run directory or a checkpoint file."),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Describe a run or checkpoint: preset, parameters, step, checkpoints, last metrics."""
    from ..model.checkpoints import describe_run

    result = describe_run(path)
    print_json(result) if as_json else render.run_info(result)


def eval_(
    path: Path = typer.Argument(..., help="A run directory or a checkpoint file."),
    data: str = typer.Option(..., "--data", help="Data spec to evaluate on."),
    split: str = typer.Option("test", "--split", help="train, val, test or all."),
    iw: int = typer.Option(0, "--iw", help="Also estimate the NLL by importance weighting with K samples."),
    batch_size: int = typer.Option(256, "--batch-size", min=1),
    limit: Optional[int] = typer.Option(None, "--limit", min=1, help="Only the first N images of the split."),
    seed: int = typer.Option(0, "--seed"),
    device: str = typer.Option("auto", "--device"),
    workers: Optional[int] = typer.Option(None, "--workers", min=0, help=WORKERS_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print the numbers as JSON."),
) -> None:
    """Negative ELBO (reconstruction + KL) with the EMA weights over a whole split."""
    from ..model.evaluation import eval_checkpoint

    with progress("eval", as_json) as tick:
        result = eval_checkpoint(path, data, split=split, iw_samples=iw, batch_size=batch_size, limit=limit,
                                 seed=seed, device=device, workers=workers, progress=tick)
    if as_json:
        print_json(result)
        return
    out.print(f"{result['data']}:{result['split']} ({result['n_images']} images, step {result['step']}): "
              f"{elbo_text(result)}")
    if iw:
        unit = (f"{result['iw_nats_per_image']:.2f} nats/image" if "iw_nats_per_image" in result
                else f"{result['iw_bits_per_dim']:.4f} bits/dim")
        out.print(f"importance-weighted NLL (K={iw}): {unit}")


def sample(
    path: Path = typer.Argument(..., help="A run directory or a checkpoint file."),
    out_file: Path = typer.Option(..., "--out", help="PNG file for the image grid."),
    n: int = typer.Option(16, "--n", min=1),
    temperature: float = typer.Option(1.0, "--temperature", "-t", min=0.0),
    seed: int = typer.Option(0, "--seed"),
    device: str = typer.Option("auto", "--device"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Unconditional samples from the prior at a temperature, as a PNG grid."""
    from ..model.generate import sample_images

    result = sample_images(path, out_file, n=n, temperature=temperature, seed=seed, device=device)
    print_json(result) if as_json else out.print(f"wrote {result['n']} samples to {result['out']}")


def reconstruct(
    path: Path = typer.Argument(..., help="A run directory or a checkpoint file."),
    data: str = typer.Option(..., "--data", help="Images to reconstruct."),
    out_file: Path = typer.Option(..., "--out", help="PNG file: rows of originals and reconstructions."),
    n: int = typer.Option(16, "--n", min=1),
    split: str = typer.Option("test", "--split"),
    seed: int = typer.Option(0, "--seed"),
    device: str = typer.Option("auto", "--device"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Reconstruct images through the posterior means (originals and reconstructions, row by row)."""
    from ..model.generate import reconstruct_images

    result = reconstruct_images(path, data, out_file, n=n, split=split, seed=seed, device=device)
    print_json(result) if as_json else out.print(f"wrote {result['n']} reconstructions to {result['out']}")


def first_k(
    path: Path = typer.Argument(..., help="A run directory or a checkpoint file."),
    data: str = typer.Option(..., "--data", help="Images whose first layers are kept."),
    ks: str = typer.Option(..., "--k", help="Layer counts K, e.g. 1,5,15 (0 = unconditional, all = reconstruction)."),
    out_file: Path = typer.Option(..., "--out", help="PNG: originals, then one row per K."),
    n: int = typer.Option(8, "--n", min=1, help="Images (columns)."),
    split: str = typer.Option("test", "--split"),
    temperature: float = typer.Option(0.1, "--temperature", "-t", help="Prior temperature of the later layers."),
    posterior: str = typer.Option("sample", "--posterior", help="sample or mean for the first K layers."),
    seed: int = typer.Option(0, "--seed"),
    device: str = typer.Option("auto", "--device"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Images from the posterior of the first K latent layers and the prior for the rest (VDVAE's Figure 4)."""
    from ..model.generate import first_k_images

    result = first_k_images(path, data, out_file, ks=ks, n=n, split=split, temperature=temperature,
                            posterior=posterior, seed=seed, device=device)
    print_json(result) if as_json else out.print(
        f"wrote {result['n']} images x K = {', '.join(map(str, result['ks']))} "
        f"(of {result['n_layers']} layers) to {result['out']}")
