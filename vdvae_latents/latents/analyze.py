"""`vdvl analyze-kl` as a library call: rank every latent dimension of a checkpoint by its average KL."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch.distributed as dist

from ..core.atomic import atomic_file
from ..core.errors import UserError
from ..core.outputs import prepare_output, require_matplotlib
from ..core.runtime import auto_device, join_processes
from ..data.loading import stream
from ..data.splits import open_images
from ..model.checkpoints import load_model, resolve_checkpoint
from ..model.precision import autocast, resolve_precision
from ..model.inputs import check_images_fit, eval_binarization, evaluation_images
from .active_set import ActiveSet, fit_active_set, parse_keep, prepare_active_set_path
from .pruning import plot_kl, pruning_sweep
from .stats import GRANULARITIES


def analyze_checkpoint(path: str | Path, data: str, *, out: str | Path, keep: str | float | None = None,
                       threshold: float | None = None, split: str = "train", granularity: str = "variate",
                       limit: int | None = None, plot: str | Path | None = None, sweep: list[float] | None = None,
                       sweep_split: str = "test", batch_size: int = 256, seed: int = 0, device: str = "auto",
                       div_stats: str | Path | None = None, workers: int | None = None,
                       precision: str = "fp32", progress=None) -> dict:
    """Rank every latent dimension by its average KL over a split and choose the active set.

    Writes ``out`` (ACTIVE.json), optionally a figure, a pruning sweep on ``sweep_split``
    and ``div_stats`` (the official code's ``div_stats.npy``: (layers, variates) in bits).
    Under torchrun each process scores a shard of the split and the sums are reduced;
    process 0 writes the outputs. ``precision`` (auto, fp32, bf16) is the KL pass's; ``auto`` is
    bf16 autocast where the device computes bf16 natively (the KL itself is then taken in fp32
    from the bf16 statistics). The pruning sweep is an evaluation and runs in fp32.
    """
    if (keep is None) == (threshold is None):
        raise UserError("give exactly one of --keep or --threshold.")
    if granularity not in GRANULARITIES:
        raise UserError(f"--granularity must be variate or element, not '{granularity}'.")
    keep_fraction = parse_keep(keep) if keep is not None else None
    if div_stats is not None and granularity != "variate":
        raise UserError("--div-stats needs --granularity variate (the official file has one value per variate).")
    # Everything that can be refused is refused before the model loads and the pass runs.
    prepare_active_set_path(out)
    if plot:
        require_matplotlib("--plot")
        prepare_output(plot, what="figure")
    if div_stats:
        prepare_output(div_stats, what="div stats file")
    resolve_checkpoint(path)  # a missing run or checkpoint is named now; load_model takes the latest then
    images = open_images(data, split=split, limit=limit)
    if sweep:
        open_images(data, split=sweep_split, limit=limit)
    dev, env = join_processes(auto_device(device))
    resolve_precision(precision, dev)
    rank, world = env.rank, env.world_size
    model, info = load_model(path, ema=True, device=dev)
    model.use_channels_last()  # measured faster for inference too (benchmarks/results/inference-*)
    ckpt_path = Path(info["path"])
    check_images_fit(model.cfg, images.shape, data)
    start = time.perf_counter()
    with autocast(precision, dev):
        active = fit_active_set(model, stream(images.shard(rank, world), batch_size, workers, dev, world),
                                granularity=granularity, keep=keep_fraction, threshold=threshold,
                                batch_size=batch_size, seed=seed + rank, device=dev, progress=progress, data=data,
                                split=split, checkpoint=str(ckpt_path), checkpoint_sha256=info["sha256"])
    result = {"checkpoint": str(ckpt_path), "step": info["step"], "out": str(out), "seconds": 0.0,
              **active.summary()}
    if rank == 0:
        if sweep:
            result["sweep"] = _sweep(model, info, active, data, sweep_split, sweep, limit, batch_size, seed, dev)
            active.extra["sweep"] = result["sweep"]
        active.save(out)
        if div_stats:
            with atomic_file(Path(div_stats), what="div stats file") as f:
                np.save(f, active.div_stats_bits())
            result["div_stats"] = str(div_stats)
        if plot:
            plot_kl(active, plot, title=f"{Path(str(ckpt_path)).name} on {data}:{split}")
            result["plot"] = str(plot)
    if world > 1:
        dist.barrier()
    result["seconds"] = time.perf_counter() - start
    return result


def _sweep(model, info: dict, active: ActiveSet, data: str, split: str, percentages: list[float],
           limit: int | None, batch_size: int, seed: int, device) -> dict:
    """The pruning sweep (the paper's Table 5 for this model) on ``data:split``."""
    test = open_images(data, split=split, limit=limit)
    check_images_fit(model.cfg, test.shape, data)
    pixels = evaluation_images(model.cfg, test, eval_binarization(info), batch_size=batch_size)
    rows = pruning_sweep(model, pixels, active, percentages, batch_size=batch_size, seed=seed, device=device)
    return {"split": split, "n_images": len(test), "rows": rows}


__all__ = ["analyze_checkpoint"]
