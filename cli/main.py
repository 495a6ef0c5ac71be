"""`vdvl`: a thin typer app over the `vdvae_latents` library.

Contract (shared with every command): exit 0 on success; exit 2 with one plain
sentence on stderr for bad usage or bad input (no traceback); exit 1 for internal
errors. ``--json`` prints a machine-readable result on stdout.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from vdvae_latents.errors import UserError
from vdvae_latents.quantize import DEFAULT_STEP as DEFAULT_QUANT_STEP

app = typer.Typer(
    name="vdvl",
    help="Efficient-VDVAE latents: train, rank latent dimensions by KL, prune, encode, probe.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
# `vdvl import <kind> ...`: models trained by other code bases become ordinary run directories.
import_app = typer.Typer(help="Turn checkpoints of other code bases into vdvl run directories.",
                         no_args_is_help=True)
app.add_typer(import_app, name="import")
# Wide enough for the tables when piped (rich falls back to 80 columns off a terminal).
out = Console(width=None if sys.stdout.isatty() else 140)


def _print_json(obj) -> None:
    sys.stdout.write(json.dumps(obj, indent=2) + "\n")


def _leave_process_group() -> None:
    """End the torchrun process group the library joined (train, analyze-kl, encode), before exit."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@app.command()
def presets(
    as_json: bool = typer.Option(False, "--json", help="Print the table as JSON."),
) -> None:
    """List every model preset with its parameter count, image shape and latent sizes."""
    from vdvae_latents.presets import PRESETS, describe

    rows = [describe(p) for p in PRESETS.values()]
    if as_json:
        _print_json(rows)
        return
    table = Table(title="vdvl presets (paper = Table 3 parameter count)")
    table.add_column("name", no_wrap=True)
    for col in ("params", "paper", "image", "layers", "variates", "arch", "output"):
        table.add_column(col, justify="right", no_wrap=True)
    for r in rows:
        paper = f"{r['paper_parameters_m']}M" if "paper_parameters_m" in r else ""
        c, h, w = r["image_shape"]
        output = f"mol/{r['n_bits']}b" if r["output"] == "mol" else "bern"
        table.add_row(r["name"], f"{r['parameters'] / 1e6:.1f}M", paper, f"{c}x{h}x{w}",
                      str(r["latent_layers"]), str(r["latent_variates"]), r["architecture"], output)
    out.print(table)


@app.command()
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
    from vdvae_latents.summary import inspect_model

    overrides = _parse_sets(set_)
    result = inspect_model(preset, data=data, n=n, seed=seed, overrides=overrides)
    if as_json:
        _print_json(result)
        return
    out.print(f"[bold]{result['preset']}[/bold]: {result['parameters']:,} parameters, "
              f"{result['architecture']} architecture, image {result['image_shape']}")
    table = Table(title="latent layers per resolution")
    for col in ("resolution", "layers", "variates/layer", "width", "elements/image"):
        table.add_column(col, justify="right")
    for r in result["resolutions"]:
        table.add_row(f"{r['resolution']}x{r['resolution']}", str(r["layers"]), str(r["variates"]),
                      str(r["width"]), f"{r['elements']:,}")
    out.print(table)
    out.print(f"total: {result['latent_layers']} latent layers, {result['latent_variates']:,} variates, "
              f"{result['latent_elements']:,} latent elements per image")
    if "forward" in result:
        f = result["forward"]
        out.print(f"untrained forward pass on {f['images']} images of '{f['data']}' "
                  f"({f['seconds']:.2f} s): negative ELBO {f['bits_per_dim']:.3f} bits/dim "
                  f"(reconstruction {f['recon_bits_per_dim']:.3f}, KL {f['kl_bits_per_dim']:.4f})")


@app.command()
def train(
    run_dir: Path = typer.Option(..., "--run-dir", help="Directory for config, checkpoints and metrics; "
                                 "re-running the same command there resumes."),
    preset: Optional[str] = typer.Option(None, "--preset", "-p", help="Preset name (see `vdvl presets`)."),
    config: Optional[Path] = typer.Option(None, "--config", help="A TOML run config instead of --preset."),
    data: Optional[str] = typer.Option(None, "--data", help="Training data spec (default: the config's, or digits)."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Total optimisation steps."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Global batch size."),
    lr: Optional[float] = typer.Option(None, "--lr", help="Peak learning rate."),
    device: Optional[str] = typer.Option(None, "--device", help="auto, cpu or cuda."),
    checkpoint_every: Optional[int] = typer.Option(None, "--checkpoint-every", help="Steps between checkpoints."),
    workers: Optional[int] = typer.Option(None, "--workers", min=0, help="Data-loading processes "
                                          "(default: 0 on CPU or for in-memory data, up to 8 on CUDA)."),
    set_: list[str] = typer.Option([], "--set", help="Override: model_field=value or train.setting=value."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress output."),
    as_json: bool = typer.Option(False, "--json", help="Print the final result as JSON."),
) -> None:
    """Train (or resume) a model with its preset's training recipe, EMA, update skipping, checkpoints.

    Under `torchrun --nproc_per_node N vdvl train ...` it trains with DDP (NCCL on GPUs, gloo on CPUs).
    Ctrl-C / SIGTERM saves a checkpoint and exits cleanly.
    """
    from vdvae_latents.runconfig import resolve_run_config
    from vdvae_latents.training import train as train_run

    run = resolve_run_config(
        preset=preset, config_file=config, data=data, overrides=_parse_sets(set_),
        train_overrides={"steps": steps, "batch_size": batch_size, "lr": lr, "device": device,
                         "checkpoint_every": checkpoint_every, "num_workers": workers})
    result = train_run(run_dir, run, quiet=quiet or as_json)
    summary = {"run_dir": str(result.run_dir), "step": result.step, "skips": result.skips,
               "interrupted": result.interrupted,
               "checkpoint": str(result.checkpoint) if result.checkpoint else None,
               "last_metrics": result.last_metrics, "validation": result.validation}
    if as_json:
        _print_json(summary)
        return
    state = "interrupted; re-run the same command to resume" if result.interrupted else "done"
    out.print(f"{state}: step {result.step}, {result.skips} skipped updates, checkpoint {summary['checkpoint']}")
    if result.validation:
        v = result.validation
        out.print(f"validation ({v['images']} images, EMA weights): {_elbo_text(v)}")


@import_app.command("efficient-vdvae")
def import_efficient_vdvae(
    checkpoint: Path = typer.Argument(..., help="The official code's checkpoints-<run> file."),
    config: Path = typer.Option(..., "--config", help="The run's hparams-<run>.cfg (parsed, never evaluated)."),
    run_dir: Path = typer.Option(..., "--run-dir", help="New run directory to write."),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Import an official Efficient-VDVAE checkpoint (model and EMA weights) as a vdvl run."""
    from vdvae_latents.import_efficient import import_efficient_vdvae as run_import

    result = run_import(checkpoint, config, run_dir)
    _print_json(result) if as_json else out.print(
        f"imported step {result['step']} ({result['parameters']:,} parameters) into {result['run_dir']}")


@app.command("eval")
def eval_(
    path: Path = typer.Argument(..., help="A run directory or a checkpoint file."),
    data: str = typer.Option(..., "--data", help="Data spec to evaluate on."),
    split: str = typer.Option("test", "--split", help="train, val, test or all."),
    iw: int = typer.Option(0, "--iw", help="Also estimate the NLL by importance weighting with K samples."),
    batch_size: int = typer.Option(256, "--batch-size", min=1),
    limit: Optional[int] = typer.Option(None, "--limit", min=1, help="Only the first N images of the split."),
    seed: int = typer.Option(0, "--seed"),
    device: str = typer.Option("auto", "--device"),
    workers: Optional[int] = typer.Option(None, "--workers", min=0, help="Data-loading processes "
                                          "(default: 0 on CPU or for in-memory data, up to 8 on CUDA)."),
    as_json: bool = typer.Option(False, "--json", help="Print the numbers as JSON."),
) -> None:
    """Negative ELBO (reconstruction + KL) with the EMA weights over a whole split."""
    from vdvae_latents.pipeline import eval_checkpoint

    with _progress("eval", as_json) as tick:
        result = eval_checkpoint(path, data, split=split, iw_samples=iw, batch_size=batch_size, limit=limit,
                                 seed=seed, device=device, workers=workers, progress=tick)
    if as_json:
        _print_json(result)
        return
    out.print(f"{result['data']}:{result['split']} ({result['n_images']} images, step {result['step']}): "
              f"{_elbo_text(result)}")
    if iw:
        unit = (f"{result['iw_nats_per_image']:.2f} nats/image" if "iw_nats_per_image" in result
                else f"{result['iw_bits_per_dim']:.4f} bits/dim")
        out.print(f"importance-weighted NLL (K={iw}): {unit}")


@app.command()
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
    from vdvae_latents.pipeline import sample_images

    result = sample_images(path, out_file, n=n, temperature=temperature, seed=seed, device=device)
    _print_json(result) if as_json else out.print(f"wrote {result['n']} samples to {result['out']}")


@app.command()
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
    from vdvae_latents.pipeline import reconstruct_images

    result = reconstruct_images(path, data, out_file, n=n, split=split, seed=seed, device=device)
    _print_json(result) if as_json else out.print(f"wrote {result['n']} reconstructions to {result['out']}")


@app.command("first-k")
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
    from vdvae_latents.pipeline import first_k_images

    result = first_k_images(path, data, out_file, ks=ks, n=n, split=split, temperature=temperature,
                            posterior=posterior, seed=seed, device=device)
    _print_json(result) if as_json else out.print(
        f"wrote {result['n']} images x K = {', '.join(map(str, result['ks']))} "
        f"(of {result['n_layers']} layers) to {result['out']}")


@app.command()
def info(
    path: Path = typer.Argument(..., help="A run directory or a checkpoint file."),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Describe a run or checkpoint: preset, parameters, step, checkpoints, last metrics."""
    from vdvae_latents.checkpoints import describe_run

    result = describe_run(path)
    if as_json:
        _print_json(result)
        return
    for key, value in result.items():
        if key in ("model_config", "train_config") or (key == "imported" and value is None):
            continue  # long; shown with --json
        if key == "imported":
            value = f"from {value['kind']}: " + "; ".join(
                f"{f['role']} {f['path']} (sha256 {f['sha256'][:12]}...)" for f in value["files"])
        elif isinstance(value, dict):
            value = ", ".join(f"{k}={_fmt(v)}" for k, v in value.items())
        elif isinstance(value, list):
            value = ", ".join(str(v) for v in value)
        out.print(f"[bold]{key}[/bold]: {_fmt(value)}")


@app.command("analyze-kl")
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
    seed: int = typer.Option(0, "--seed"),
    device: str = typer.Option("auto", "--device"),
    workers: Optional[int] = typer.Option(None, "--workers", min=0, help="Data-loading processes "
                                          "(default: 0 on CPU or for in-memory data, up to 8 on CUDA)."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
) -> None:
    """Rank every latent dimension by its average KL over a split; choose and save the active set."""
    from vdvae_latents.pipeline import analyze_checkpoint
    from vdvae_latents.pruning import parse_sweep

    sweep_values = parse_sweep(sweep) if sweep else None
    if units not in ("nats", "bits"):
        raise UserError(f"--units must be nats or bits, not '{units}'.")
    with _progress("analyze-kl", as_json) as tick:
        result = analyze_checkpoint(path, data, out=out_file, keep=keep, threshold=threshold, split=split,
                                    granularity=granularity, limit=limit, plot=plot, sweep=sweep_values,
                                    sweep_split=sweep_split, batch_size=batch_size, seed=seed, device=device,
                                    div_stats=div_stats, workers=workers, progress=tick)
    per_nat = 1 / math.log(2) if units == "bits" else 1.0
    if units == "bits":
        result["total_avg_kl_bits"] = result["total_avg_kl_nats"] * per_nat
        for row in result["layers"] + result["resolutions"]:
            row["kl_bits"] = row["kl_nats"] * per_nat
    if as_json:
        _print_json({k: v for k, v in result.items()})
        return
    rule = (f"top {result['value'] * 100:g}%" if result["rule"] == "keep" else f"average KL > {result['value']:g} nats")
    out.print(f"{result['n_dims']:,} {result['granularity']} dimensions over {result['n_images']:,} images "
              f"of {data}:{split}; rule: {rule}")
    out.print(f"active: {result['n_active']:,} ({result['pct_active']:.2f}%) carrying "
              f"{result['kl_share_active'] * 100:.2f}% of the total average KL "
              f"({result['total_avg_kl_nats'] * per_nat:.2f} {units}); "
              f"Burda active units (Var > 0.01): {result['n_au_active']:,}, of which {result['n_au_active_in_set']:,} "
              f"in the set")
    table = Table(title="active dimensions per resolution")
    for col in ("resolution", "layers", "dims", "active", f"KL {units}", "AU active"):
        table.add_column(col, justify="right")
    for r in result["resolutions"]:
        table.add_row(f"{r['resolution']}x{r['resolution']}", str(r["layers"]), f"{r['dims']:,}",
                      f"{r['active']:,}", f"{r['kl_nats'] * per_nat:.3f}", f"{r['au_active']:,}")
    out.print(table)
    if "sweep" in result:
        binary = "nats_per_image" in result["sweep"]["rows"][0]
        unit = "nats/image" if binary else "bits/dim"
        t = Table(title=f"pruning sweep on {data}:{result['sweep']['split']} ({result['sweep']['n_images']:,} images, "
                        f"{unit})")
        for col in ("% kept", "dims", "neg. ELBO", "recon", "KL", "neg. ELBO*", "KL*", "float16 bytes",
                    "float32 bytes"):
            t.add_column(col, justify="right")
        for r in result["sweep"]["rows"]:
            e, rc, k, e_all, k_all = (
                (r["nats_per_image"], r["recon_nats_per_image"], r["kl_nats_per_image"],
                 r["nats_per_image_kl_all"], r["kl_all_nats_per_image"]) if binary else
                (r["bits_per_dim"], r["recon_bits_per_dim"], r["kl_bits_per_dim"], r["bits_per_dim_kl_all"],
                 r["kl_all_bits_per_dim"]))
            t.add_row(f"{r['keep_pct']:g}", f"{r['n_active']:,}", f"{e:.4f}", f"{rc:.4f}", f"{k:.4f}",
                      f"{e_all:.4f}", f"{k_all:.4f}", f"{r['encoded_bytes_float16']:,}",
                      f"{r['encoded_bytes_float32']:,}")
        out.print(t)
        out.print("KL: pruned dimensions charged 0 (they follow the prior; a bound on -log p(x)). "
                  "KL*: every dimension's KL(q||p) in the pruned pass, pruned ones included "
                  "(the official code's convention, as in the paper's Table 5).")
    written = [result["out"]] + [result[k] for k in ("div_stats", "plot") if result.get(k)]
    out.print("wrote " + ", ".join(written))


@app.command()
def encode(
    path: Path = typer.Argument(..., help="A run directory or a checkpoint file."),
    data: str = typer.Option(..., "--data", help="Data spec to encode."),
    out_file: Path = typer.Option(..., "--out", help="STORE.zarr (default format) or STORE.h5."),
    split: str = typer.Option("test", "--split"),
    keep: Optional[str] = typer.Option(None, "--keep", help="Keep the top P% by average KL (ranked on the train split)."),
    threshold: Optional[float] = typer.Option(None, "--threshold", help="Keep dims with average KL > T nats."),
    active: Optional[Path] = typer.Option(None, "--active", help="Reuse an ACTIVE.json from `vdvl analyze-kl`."),
    stat: str = typer.Option("mean", "--stat", help="mean (deterministic), sample, or mean+std."),
    dtype: str = typer.Option("float16", "--dtype", help="float16, float32, or int8/uint8 codes (quantised "
                              "per column; see --quantize)."),
    quantize: str = typer.Option("std-step", "--quantize", help="With int8/uint8: std-step (a step of "
                                 "--quant-step column stds), prior-step (--quant-step prior stds) or range (each "
                                 "column's calibration range over 256 levels)."),
    quant_step: float = typer.Option(DEFAULT_QUANT_STEP, "--quant-step", help="With std-step/prior-step: the step "
                                     "in standard deviations."),
    codec: Optional[str] = typer.Option(None, "--codec", help="Compression, e.g. zstd:9+transpose (Zarr) or "
                                        "gzip:9:shuffle (HDF5); default: the measured best."),
    granularity: str = typer.Option("variate", "--granularity", help="With --keep/--threshold: variate or element."),
    batch_size: int = typer.Option(256, "--batch-size", min=1),
    chunk_rows: int = typer.Option(1024, "--chunk-rows", min=1, help="Rows per store chunk (the resume unit)."),
    resume: bool = typer.Option(False, "--resume", help="Finish an interrupted store (writes only missing chunks)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing store."),
    seed: int = typer.Option(0, "--seed"),
    device: str = typer.Option("auto", "--device"),
    workers: Optional[int] = typer.Option(None, "--workers", min=0, help="Data-loading processes "
                                          "(default: 0 on CPU or for in-memory data, up to 8 on CUDA)."),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Write the active dimensions of every image of a split to a Zarr or HDF5 store."""
    from vdvae_latents.encode_job import encode_to_store

    with _progress("encode", quiet or as_json) as tick:
        result = encode_to_store(path, data, out_file, split=split, keep=keep, threshold=threshold,
                                 active_file=active, statistic=stat, dtype=dtype, quantize=quantize,
                                 quant_step=quant_step, codec=codec, batch_size=batch_size,
                                 chunk_rows=chunk_rows, resume=resume, overwrite=overwrite,
                                 granularity=granularity, seed=seed, device=device, workers=workers,
                                 progress=tick)
    if as_json:
        _print_json(result)
        return
    out.print(f"{result['store']}: {result['rows']:,} rows x {result['features']:,} features "
              f"({result['dims_kept']:,} of {result['dims_total']:,} dims, {result['kl_share_kept'] * 100:.1f}% of the KL), "
              f"{result['statistic']}, {result['dtype']}, codec {result['codec']}")
    out.print(f"size on disk {result['bytes_on_disk']:,} B ({result['bytes_per_image']:,.0f} B/image); "
              f"{result['full_latents_dtype']} full latents {result['full_latents_bytes']:,} B "
              f"({result['full_latents_bytes'] / max(result['bytes_on_disk'], 1):.1f}x larger); raw pixels "
              f"{result['raw_pixel_bytes']:,} B; {result['images_per_s']:.0f} images/s")
    for key, what in (("error", "features"), ("error_std", "features_std")):
        e = result.get(key)
        if e:
            q = result["quantization"]
            unit = "prior std" if q and q["scheme"] == "prior-step" else "column std"
            how = (f"{result['dtype']} {q['scheme']}" + (f" step {q['step']:g} {unit}" if q["step"] else "")
                   if q else f"{result['dtype']} rounding")
            out.print(f"{what} error ({how}): RMS {e['rmse']:.3g} ({e['relative_rmse']:.3g} of the columns' std), "
                      f"max {e['max_abs_error']:.3g}, clipped {e['clipped_fraction'] * 100:.3g}% of values")
    for note in result["notes"]:
        out.print(f"note: {note}")


@app.command()
def pack(
    source: str = typer.Argument(..., help="Data spec to pack: an image folder, downsampled-ImageNet files, ..."),
    out_file: Path = typer.Option(..., "--out", help="DATA.zarr to write (then use --data DATA.zarr)."),
    resize: Optional[int] = typer.Option(None, "--resize", min=1, help="Resize every image to S x S "
                                         "(needed when the images differ in size)."),
    workers: Optional[int] = typer.Option(None, "--workers", min=0, help="Processes decoding images "
                                          "(default: one per core, at most 8; 0: decode in this process)."),
    skip_bad: bool = typer.Option(False, "--skip-bad", help="Skip and count unreadable files instead of stopping."),
    resume: bool = typer.Option(False, "--resume", help="Finish an interrupted pack (writes only missing blocks)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing store."),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Pack a data source into one chunked, compressed uint8 Zarr store with labels and file names.

    Epochs then read chunks instead of decoding files; an interrupted pack is refused by every
    command until `--resume` finishes it.
    """
    from vdvae_latents.data import pack_images

    with _progress("pack", quiet or as_json) as tick:
        result = pack_images(source, out_file, resize=resize, workers=workers, skip_bad=skip_bad, resume=resume,
                             overwrite=overwrite, progress=tick)
    if as_json:
        _print_json(result)
        return
    n, h, w, c = result["shape"]
    out.print(f"{result['store']}: {n:,} images of {h}x{w}x{c}"
              + (", labels" if result["labels"] else "") + (", file names" if result["names"] else "")
              + (f", own split at row {result['n_train']:,}" if result["n_train"] is not None else "")
              + f"; {result['bytes_on_disk']:,} B on disk ({result['raw_bytes']:,} B of pixels), "
              f"{result['images_per_s']:.0f} images/s")
    if result["skipped"]:
        out.print(f"skipped {result['skipped']:,} unreadable files, e.g. {', '.join(result['skipped_files'][:3])}")


@app.command()
def decode(
    store: Path = typer.Argument(..., help="A store written by `vdvl encode`."),
    out_file: Path = typer.Option(..., "--out", help="PNG file for the decoded images."),
    ckpt: Optional[Path] = typer.Option(None, "--ckpt", help="Checkpoint (default: the one recorded in the store)."),
    rows: str = typer.Option("0:16", "--rows", help="Rows to decode, start:stop."),
    temperature: float = typer.Option(0.0, "--temperature", "-t", help="0: pruned dims at the prior mean; "
                                      "T > 0: a prior sample at temperature T."),
    seed: int = typer.Option(0, "--seed"),
    device: str = typer.Option("auto", "--device"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Rebuild images from stored active dimensions (pruned dimensions from the prior)."""
    from vdvae_latents.encode_job import decode_store

    result = decode_store(store, out_file, ckpt=ckpt, rows=rows, temperature=temperature, seed=seed, device=device)
    _print_json(result) if as_json else out.print(
        f"decoded rows {result['rows'][0]}:{result['rows'][1]} of {result['store']} to {result['out']}")


@app.command()
def verify(
    store: Path = typer.Argument(..., help="A store written by `vdvl encode`."),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """Check every chunk of a store: complete, present, checksums, finite values (exit 2 if not)."""
    from vdvae_latents.verify import PROBLEMS, verify_store

    with _progress("verify", quiet or as_json) as tick:
        report = verify_store(store, progress=tick)
    if as_json:
        _print_json(report)
    else:
        out.print(f"{report['store']}: {report['format']}, schema {report['schema_version']}, {report['dtype']}, "
                  f"{report['n_rows']:,} rows in {report['n_chunks']} chunks, {report['chunks_written']} written")
        for key in PROBLEMS:
            for item in report[key][:20]:
                out.print(f"  {key}: rows {item['rows'][0]}-{item['rows'][1] - 1} of {item['array']}"
                          + (f" ({item['count']} values)" if "count" in item else ""))
        if report["ok"]:
            out.print(report["summary"])
    if not report["ok"]:
        raise UserError(report["summary"])


class _progress:
    """A rich progress bar over images on a terminal (nothing otherwise); yields a tick(n) callback."""

    def __init__(self, label: str, quiet: bool) -> None:
        self.label, self.quiet, self.bar = label, quiet or not sys.stderr.isatty(), None

    def __enter__(self):
        if self.quiet:
            return None
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        self.bar = Progress(TextColumn(self.label), BarColumn(), TextColumn("{task.completed} images"),
                            TimeElapsedColumn(), console=Console(stderr=True))
        self.bar.start()
        task = self.bar.add_task(self.label, total=None)
        return lambda n: self.bar.advance(task, n)

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.stop()


@app.command()
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
    from vdvae_latents.probes import plot_probe, run_probe

    if plot is not None and not plot.parent.is_dir():  # fail before the fits, not after them
        raise UserError(f"cannot write --plot {plot}: the directory {plot.parent} does not exist.")
    # A spinner rather than _progress's image counter: the long steps here are model fits.
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
    if as_json:
        _print_json(report)
        return
    split = f"test store {report['test_store']}" if report["test_store"] else "20% hold-out"
    table = Table(title=f"{report['model']} probe on {report['store']}: {report['n_train']:,} train / "
                        f"{report['n_test']:,} test rows ({split}), {report['n_classes']} classes, labels from "
                        f"{report['labels']}; mean ± std over {report['seeds']} seeds")
    for col in ("name", "features", "bytes/image", "test acc", "CV acc", "params", "fit s"):
        table.add_column(col, justify="left" if col in ("name", "params") else "right")
    for r in report["rows"]:
        params = sorted({", ".join(f"{k}={_fmt(v)}" for k, v in p.items() if k != "alpha") for p in r["params"]})
        if r["fit"] == "streaming":
            params.append(f"streamed, {r['epochs']} epochs")
        table.add_row(r["name"], f"{r['features']:,}", f"{r['bytes_per_image']:,}",
                      f"{r['test_accuracy']:.3f} ± {r['test_accuracy_std']:.3f}",
                      f"{r['cv_accuracy']:.3f} ± {r['cv_accuracy_std']:.3f}", " | ".join(params),
                      f"{r['fit_seconds']:.2f}")
    out.print(table)
    active = report["rows"][0]
    out.print(f"majority class: {report['chance_accuracy']:.3f} test accuracy; the store takes "
              f"{active['disk_bytes_per_image']:,.0f} B/image on disk ({active['dtype']})")
    for note in report["notes"]:
        out.print(f"note: {note}")
    if plot is not None:
        out.print(f"wrote {report['plot']}")


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


@import_app.command("openai-vdvae")
def import_openai_vdvae(
    model_file: Path = typer.Argument(..., help="openai/vdvae's NAME-model.th (a lone NAME-model-ema.th works too)."),
    ema: Optional[Path] = typer.Option(None, "--ema", help="NAME-model-ema.th: the EMA weights (eval and encode use them)."),
    hps: str = typer.Option(..., "--hps", help="The hyper-parameter set the weights were trained with: cifar10, "
                            "imagenet32, imagenet64, ffhq256 or ffhq1024."),
    run_dir: Path = typer.Option(..., "--run-dir", help="New run directory to write."),
    step: Optional[int] = typer.Option(None, "--step", min=0, help="Step to record (default: iter-N in the file name, else 0)."),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Import openai/vdvae weights (loaded as tensors only, never executed) as a run every command accepts."""
    from vdvae_latents.import_openai import import_openai_vdvae as run_import

    result = run_import(model_file, hps=hps, run_dir=run_dir, ema_path=ema, step=step)
    _print_json(result) if as_json else out.print(
        f"imported {result['parameters']:,} parameters (--hps {result['hps']}, preset {result['preset']}) "
        f"into {result['run_dir']} at step {result['step']}")


def _elbo_text(r: dict) -> str:
    if "nats_per_image" in r:
        return (f"negative ELBO {r['nats_per_image']:.2f} nats/image (reconstruction "
                f"{r['recon_nats_per_image']:.2f}, KL {r['kl_nats_per_image']:.2f})")
    return (f"negative ELBO {r['bits_per_dim']:.4f} bits/dim (reconstruction {r['recon_bits_per_dim']:.4f}, "
            f"KL {r['kl_bits_per_dim']:.4f})")


def _parse_sets(items: list[str]) -> dict[str, str]:
    pairs = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserError(f"--set expects key=value, got '{item}'.")
        pairs[key.strip()] = value.strip()
    return pairs


def main(argv: list[str] | None = None) -> int:
    """Console-script entry point: maps errors to the exit-code contract."""
    try:
        result = app(args=argv, prog_name="vdvl", standalone_mode=False)
        _leave_process_group()  # only after success: a rank that failed must not wait on the others
        return result if isinstance(result, int) else 0
    except UserError as err:
        _fail(str(err))
        return 2
    except typer.Abort:
        _fail("vdvl: aborted.")
        return 130
    except typer.Exit as err:
        return err.exit_code
    except BrokenPipeError:
        return 0
    except Exception as err:
        # Usage errors (unknown option, bad value) come from typer's bundled click; they
        # carry exit_code 2 and a one-line format_message(). Matched by shape, not class,
        # so the CLI works with typer versions that bundle click and those that import it.
        if type(err).__name__ == "NoArgsIsHelpError":
            return 0  # `vdvl` alone: the help was printed, nothing went wrong
        if getattr(err, "exit_code", None) == 2 and hasattr(err, "format_message"):
            ctx = getattr(err, "ctx", None)
            where = f"{ctx.command_path}: " if ctx is not None else "vdvl: "
            _fail(where + _sentence(err.format_message()) + " (see --help).")
            return 2
        raise


def _sentence(text: str) -> str:
    text = " ".join(text.split())
    return text[:1].lower() + text[1:] if text else text


def _fail(message: str) -> None:
    sys.stderr.write(message.rstrip() + "\n")


def run() -> None:
    sys.exit(main())


if __name__ == "__main__":
    run()
