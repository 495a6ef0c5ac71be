"""Run directories for models trained elsewhere (openai/vdvae, the official Efficient-VDVAE code).

An importer maps foreign weights onto :class:`~vdvae_latents.model.vae.VAE`'s state dict and
hands them here; the result is an ordinary run directory (``config.toml`` plus one
checkpoint) that every command accepts. The checkpoint records where the weights came
from in its ``imported`` entry: the source kind, each source file's sha256, the key
mapping and anything else the importer wants to keep (its hyper-parameters).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from ..core.atomic import write_text
from ..core.errors import CheckpointError
from ..core.outputs import prepare_output
from ..core.writer_lock import writing_run_dir
from ..model import checkpoints as ckpt
from ..model.config import ModelConfig
from ..model.vae import meta_model
from ..train.config import TrainConfig
from ..train.run_config import RunConfig, dump_toml

CONFIG_NAME = "config.toml"


def write_imported_run(run_dir: str | Path, cfg: ModelConfig, weights: dict[str, torch.Tensor],
                       ema_weights: dict[str, torch.Tensor] | None, *, step: int, source: dict[str, Any],
                       train: TrainConfig | None = None, data: str = "", preset: str | None = None) -> Path:
    """Write ``run_dir`` with one checkpoint at ``step`` holding ``weights`` (and EMA weights).

    ``weights`` must be exactly the state dict of ``VAE(cfg)`` (names and shapes); the
    first difference is reported. ``source`` is stored verbatim under ``imported``
    (tensors, dicts, lists, str, numbers only). Refuses a directory that already holds
    checkpoints, so an import never overwrites a run.

    Returns the checkpoint path.
    """
    run_dir = Path(run_dir)
    _refuse_a_run(run_dir)
    expected = meta_state_dict(cfg)
    for which, state in (("model", weights), ("ema", ema_weights)):
        if state is None:
            continue
        problem = ckpt.describe_mismatch(expected, state)
        if problem:
            raise CheckpointError(f"the imported {which} weights do not fit the model configuration ({problem}).")
    run = RunConfig(model=cfg, train=train or TrainConfig(), data=data, preset=preset)
    payload = {
        "step": int(step),
        "preset": preset,
        "data": data,
        "model_config": cfg.to_dict(),
        "train_config": asdict(run.train),
        "model": {k: v.detach().cpu().contiguous() for k, v in weights.items()},
        "ema": None if ema_weights is None else {k: v.detach().cpu().contiguous() for k, v in ema_weights.items()},
        "skips": 0,
        "imported": source,
    }
    run_dir.mkdir(parents=True, exist_ok=True)
    write_text(run_dir / CONFIG_NAME, dump_toml(run.to_dict()), what="run config")
    return ckpt.save_checkpoint(ckpt.checkpoint_path(run_dir, int(step)), payload)


def _refuse_a_run(run_dir: Path) -> None:
    if ckpt.list_checkpoints(run_dir):
        raise CheckpointError(f"run directory {run_dir} already holds checkpoints; choose an empty --run-dir.")


@contextmanager
def claim_new_run_dir(run_dir: str | Path) -> Iterator[Path]:
    """Hold ``run_dir`` for an import from before its source files are read until it is written.

    Refused at once: a file where the folder should be, a run that already holds checkpoints,
    a run another process is writing (the writer lock, held here for the whole import).
    """
    run_dir = prepare_output(run_dir, what="run directory", kind="folder")
    _refuse_a_run(run_dir)
    with writing_run_dir(run_dir):
        _refuse_a_run(run_dir)  # again under the lock: a trainer may have finished a checkpoint meanwhile
        yield run_dir


def meta_state_dict(cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """The model's state dict with shapes only (no memory): enough to check names and shapes."""
    return meta_model(cfg).state_dict()


__all__ = ["write_imported_run", "claim_new_run_dir", "meta_state_dict"]
