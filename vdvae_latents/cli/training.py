"""`vdvl train`: train or resume a run directory."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import typer

from ..core.writer_lock import check_run_dir_free
from .common import WORKERS_HELP, elbo_text, out, parse_sets, print_json


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
    workers: Optional[int] = typer.Option(None, "--workers", min=0, help=WORKERS_HELP),
    set_: list[str] = typer.Option([], "--set", help="Override: model_field=value or train.setting=value."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress output."),
    as_json: bool = typer.Option(False, "--json", help="Print the final result as JSON."),
) -> None:
    """Train (or resume) a model with its preset's training recipe, EMA, update skipping, checkpoints.

    Under `torchrun --nproc_per_node N vdvl train ...` it trains with DDP (NCCL on GPUs, gloo on CPUs).
    Ctrl-C / SIGTERM saves a checkpoint and exits cleanly.
    """
    overrides = parse_sets(set_)
    if os.environ.get("RANK", "0") == "0":  # torchrun's other ranks share rank 0's lock
        check_run_dir_free(run_dir)  # at once, before torch loads; training itself holds the lock
    from ..train.loop import train as train_run
    from ..train.run_config import resolve_run_config

    run = resolve_run_config(
        preset=preset, config_file=config, data=data, overrides=overrides,
        train_overrides={"steps": steps, "batch_size": batch_size, "lr": lr, "device": device,
                         "checkpoint_every": checkpoint_every, "num_workers": workers})
    result = train_run(run_dir, run, quiet=quiet or as_json)
    summary = result.summary()
    if as_json:
        print_json(summary)
        return
    state = "interrupted; re-run the same command to resume" if result.interrupted else "done"
    out.print(f"{state}: step {result.step}, {result.skips} skipped updates, checkpoint {summary['checkpoint']}")
    if result.validation:
        v = result.validation
        out.print(f"validation ({v['images']} images, EMA weights): {elbo_text(v)}")
