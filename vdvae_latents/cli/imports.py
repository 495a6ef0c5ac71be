"""`vdvl import efficient-vdvae | openai-vdvae`: checkpoints of the reference code bases as run directories."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..core.writer_lock import check_run_dir_free
from .common import out, print_json


def efficient_vdvae(
    checkpoint: Path = typer.Argument(..., help="The official code's checkpoints-<run> file."),
    config: Path = typer.Option(..., "--config", help="The run's hparams-<run>.cfg (parsed, never evaluated)."),
    run_dir: Path = typer.Option(..., "--run-dir", help="New run directory to write."),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Import an official Efficient-VDVAE checkpoint (model and EMA weights) as a vdvl run."""
    check_run_dir_free(run_dir)  # at once, before torch loads; the import itself holds the lock
    from ..interop.efficient import import_efficient_vdvae

    result = import_efficient_vdvae(checkpoint, config, run_dir)
    print_json(result) if as_json else out.print(
        f"imported step {result['step']} ({result['parameters']:,} parameters) into {result['run_dir']}")


def openai_vdvae(
    model_file: Path = typer.Argument(..., help="openai/vdvae's NAME-model.th (a lone NAME-model-ema.th works too)."),
    ema: Optional[Path] = typer.Option(None, "--ema", help="NAME-model-ema.th: the EMA weights (eval and encode use them)."),
    hps: str = typer.Option(..., "--hps", help="The hyper-parameter set the weights were trained with: cifar10, "
                            "imagenet32, imagenet64, ffhq256 or ffhq1024."),
    run_dir: Path = typer.Option(..., "--run-dir", help="New run directory to write."),
    step: Optional[int] = typer.Option(None, "--step", min=0, help="Step to record (default: iter-N in the file name, else 0)."),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Import openai/vdvae weights (loaded as tensors only, never executed) as a run every command accepts."""
    check_run_dir_free(run_dir)
    from ..interop.openai import import_openai_vdvae

    result = import_openai_vdvae(model_file, hps=hps, run_dir=run_dir, ema_path=ema, step=step)
    print_json(result) if as_json else out.print(
        f"imported {result['parameters']:,} parameters (--hps {result['hps']}, preset {result['preset']}) "
        f"into {result['run_dir']} at step {result['step']}")
