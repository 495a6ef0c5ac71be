"""One-call jobs over a checkpoint: evaluate, sample, reconstruct.

Each function is what a `vdvl` command does, callable from a notebook: it loads the
checkpoint's EMA weights, checks the data fits the model, runs, and returns a dict
of results (the CLI prints it or emits it as JSON).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from .batches import check_images_fit, evaluation_images, prepare_batch
from .checkpoints import load_model
from .data import load_images
from .errors import UserError
from .evaluate import evaluate
from .images import save_grid, to_uint8


def join_processes(dev: torch.device) -> tuple[torch.device, int, int]:
    """Join torchrun's process group if there is one: (device for this rank, rank, world size).

    The same mechanism training uses; on CUDA each rank takes its own local GPU.
    """
    from .training import init_distributed

    env = init_distributed(dev.type)
    if env.world_size > 1 and dev.type == "cuda":
        dev = torch.device("cuda", env.local_rank)
    return dev, env.rank, env.world_size


def auto_device(name: str = "auto") -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but no CUDA device is available.")
    return torch.device("cuda" if name in ("auto", "cuda") and torch.cuda.is_available() else "cpu")


def _eval_binarization(info: dict) -> str:
    """How the run scores binary data (its train setting; the 0.5 threshold for older runs)."""
    return (info.get("train_config") or {}).get("eval_binarization", "threshold")


def eval_checkpoint(path: str | Path, data: str, *, split: str = "test", iw_samples: int = 0,
                    batch_size: int = 256, limit: int | None = None, seed: int = 0, device: str = "auto",
                    progress=None) -> dict:
    """Negative ELBO (EMA weights) over a whole split, with an optional IW-NLL estimate."""
    if iw_samples < 0:
        raise UserError(f"--iw must be a non-negative number of samples, not {iw_samples}.")
    dev = auto_device(device)
    model, info = load_model(path, ema=True, device=dev)
    images = load_images(data, split=split, limit=limit)
    check_images_fit(model.cfg, images.shape, data)
    start = time.perf_counter()
    pixels = evaluation_images(model.cfg, images.images, _eval_binarization(info))
    result = evaluate(model, pixels, batch_size=batch_size, seed=seed, iw_samples=iw_samples,
                      device=dev, progress=progress)
    out = {"checkpoint": str(info["path"]), "step": info["step"], "data": data, "split": split,
           "seconds": time.perf_counter() - start, **result.as_dict()}
    return out


def sample_images(path: str | Path, out: str | Path, *, n: int = 16, temperature: float = 1.0, seed: int = 0,
                  device: str = "auto") -> dict:
    """Unconditional samples from the prior at ``temperature``, saved as a PNG grid."""
    if n < 1:
        raise UserError(f"--n must be at least 1, not {n}.")
    if temperature < 0:
        raise UserError(f"--temperature must be non-negative, not {temperature}.")
    dev = auto_device(device)
    model, info = load_model(path, ema=True, device=dev)
    g = torch.Generator(device=dev).manual_seed(seed)
    x = model.sample(n, temperature=temperature, generator=g)
    written = save_grid(out, to_uint8(x, model.cfg.n_bits if model.cfg.output == "mol" else 8))
    return {"checkpoint": str(info["path"]), "out": str(written), "n": n, "temperature": temperature, "seed": seed}


def reconstruct_images(path: str | Path, data: str, out: str | Path, *, n: int = 16, split: str = "test",
                       seed: int = 0, device: str = "auto") -> dict:
    """Originals (top rows) and their deterministic reconstructions (bottom rows) as one grid."""
    if n < 1:
        raise UserError(f"--n must be at least 1, not {n}.")
    dev = auto_device(device)
    model, info = load_model(path, ema=True, device=dev)
    images = load_images(data, split=split, limit=n)
    check_images_fit(model.cfg, images.shape, data)
    x = prepare_batch(model.cfg, images.images, device=dev)
    g = torch.Generator(device=dev).manual_seed(seed)
    recon = model.reconstruct(x, posterior="mean", generator=g)
    bits = model.cfg.n_bits if model.cfg.output == "mol" else 8
    pad = model.cfg.pad
    original = x[..., pad:x.shape[-2] - pad, pad:x.shape[-1] - pad] if pad else x
    ncols = min(len(images), 8)
    grid = _interleave_rows(to_uint8(original, bits), to_uint8(recon, bits), ncols)
    written = save_grid(out, grid, ncols=ncols)
    return {"checkpoint": str(info["path"]), "out": str(written), "n": len(images), "data": data, "split": split}


def _interleave_rows(a: np.ndarray, b: np.ndarray, ncols: int) -> np.ndarray:
    """Row of originals, row of reconstructions, and so on (pads the last row)."""
    rows = []
    for start in range(0, len(a), ncols):
        for src in (a, b):
            chunk = src[start:start + ncols]
            if len(chunk) < ncols:
                chunk = np.concatenate([chunk, np.zeros((ncols - len(chunk), *chunk.shape[1:]), chunk.dtype)])
            rows.append(chunk)
    return np.concatenate(rows)


def analyze_checkpoint(path: str | Path, data: str, *, out: str | Path, keep: str | float | None = None,
                       threshold: float | None = None, split: str = "train", granularity: str = "variate",
                       limit: int | None = None, plot: str | Path | None = None, sweep: list[float] | None = None,
                       sweep_split: str = "test", batch_size: int = 256, seed: int = 0, device: str = "auto",
                       progress=None) -> dict:
    """Rank every latent dimension by its average KL over a split and choose the active set.

    Writes ``out`` (ACTIVE.json), optionally a figure and a pruning sweep on ``sweep_split``.
    Under torchrun each process scores a shard of the split and the sums are reduced;
    process 0 writes the outputs.
    """
    import torch.distributed as dist

    from .checkpoints import file_sha256, resolve_checkpoint
    from .kl_analysis import GRANULARITIES, LatentKL, build_active_set, parse_keep
    from .pruning import plot_kl, pruning_sweep

    if (keep is None) == (threshold is None):
        raise UserError("give exactly one of --keep or --threshold.")
    if granularity not in GRANULARITIES:
        raise UserError(f"--granularity must be variate or element, not '{granularity}'.")
    keep_fraction = parse_keep(keep) if keep is not None else None
    dev = auto_device(device)
    dev, rank, world = join_processes(dev)
    distributed = world > 1
    ckpt_path = resolve_checkpoint(path)
    model, info = load_model(ckpt_path, ema=True, device=dev)
    images = load_images(data, split=split, limit=limit)
    check_images_fit(model.cfg, images.shape, data)
    start = time.perf_counter()
    stats = LatentKL(batch_size=batch_size, seed=seed + rank, device=dev).fit(
        model, images.images[rank::world], progress=progress)
    active = build_active_set(stats, granularity=granularity, keep=keep_fraction, threshold=threshold,
                              data=data, split=split, checkpoint=str(ckpt_path),
                              checkpoint_sha256=file_sha256(ckpt_path))
    result = {"checkpoint": str(ckpt_path), "step": info["step"], "out": str(out), "seconds": 0.0,
              **active.summary()}
    if rank == 0:
        if sweep:
            test = load_images(data, split=sweep_split, limit=limit)
            check_images_fit(model.cfg, test.shape, data)
            pixels = evaluation_images(model.cfg, test.images, _eval_binarization(info))
            rows = pruning_sweep(model, pixels, active, sweep, batch_size=batch_size, seed=seed, device=dev)
            result["sweep"] = {"split": sweep_split, "n_images": len(test), "rows": rows}
            active.extra["sweep"] = result["sweep"]
        active.save(out)
        if plot:
            plot_kl(active, plot, title=f"{Path(str(ckpt_path)).name} on {data}:{split}")
            result["plot"] = str(plot)
    if distributed:
        dist.barrier()
    result["seconds"] = time.perf_counter() - start
    return result
