"""One-call jobs over a checkpoint: evaluate, sample, reconstruct.

Each function is what a `vdvl` command does, callable from a notebook: it loads the
checkpoint's EMA weights, checks the data fits the model, runs, and returns a dict
of results (the CLI prints it or emits it as JSON).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from .batches import check_images_fit, evaluation_images, prepare_batch
from .checkpoints import load_model
from .data import open_images, resolve_workers
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


def stream(images, batch_size: int, workers: int | None, dev: torch.device, world_size: int = 1):
    """Batches of a lazy split for a job on ``dev``: ``workers`` processes (None: the default), pinned on CUDA."""
    return images.batches(batch_size, workers=resolve_workers(workers, images, dev.type, world_size),
                          pin_memory=dev.type == "cuda")


def _eval_binarization(info: dict) -> str:
    """How the run scores binary data (its train setting; the 0.5 threshold for older runs)."""
    return (info.get("train_config") or {}).get("eval_binarization", "threshold")


def eval_checkpoint(path: str | Path, data: str, *, split: str = "test", iw_samples: int = 0,
                    batch_size: int = 256, limit: int | None = None, seed: int = 0, device: str = "auto",
                    workers: int | None = None, progress=None) -> dict:
    """Negative ELBO (EMA weights) over a whole split, with an optional IW-NLL estimate (streamed)."""
    if iw_samples < 0:
        raise UserError(f"--iw must be a non-negative number of samples, not {iw_samples}.")
    dev = auto_device(device)
    model, info = load_model(path, ema=True, device=dev)
    images = open_images(data, split=split, limit=limit)
    check_images_fit(model.cfg, images.shape, data)
    start = time.perf_counter()
    pixels = evaluation_images(model.cfg, stream(images, batch_size, workers, dev), _eval_binarization(info))
    result = evaluate(model, pixels, seed=seed, iw_samples=iw_samples,
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
    written = save_grid(out, to_uint8(x, model.cfg.image_bits))
    return {"checkpoint": str(info["path"]), "out": str(written), "n": n, "temperature": temperature, "seed": seed}


def reconstruct_images(path: str | Path, data: str, out: str | Path, *, n: int = 16, split: str = "test",
                       seed: int = 0, device: str = "auto") -> dict:
    """Originals (top rows) and their deterministic reconstructions (bottom rows) as one grid."""
    if n < 1:
        raise UserError(f"--n must be at least 1, not {n}.")
    dev = auto_device(device)
    model, info = load_model(path, ema=True, device=dev)
    images = open_images(data, split=split, limit=n)  # reads only these n images
    check_images_fit(model.cfg, images.shape, data)
    x = prepare_batch(model.cfg, images.read(), device=dev)
    g = torch.Generator(device=dev).manual_seed(seed)
    recon = model.reconstruct(x, posterior="mean", generator=g)
    bits = model.cfg.image_bits
    pad = model.cfg.pad
    original = x[..., pad:x.shape[-2] - pad, pad:x.shape[-1] - pad] if pad else x
    ncols = min(len(images), 8)
    grid = _interleave_rows(to_uint8(original, bits), to_uint8(recon, bits), ncols)
    written = save_grid(out, grid, ncols=ncols)
    return {"checkpoint": str(info["path"]), "out": str(written), "n": len(images), "data": data, "split": split}


def parse_layer_counts(text: str, n_layers: int) -> list[int]:
    """'1,5,15' -> [1, 5, 15]: numbers of top-down layers, each in [0, n_layers]."""
    try:
        ks = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise UserError(f"--k must be comma-separated layer counts like 1,5,15, not '{text}'.") from None
    if not ks or any(not 0 <= k <= n_layers for k in ks):
        raise UserError(f"--k values must be between 0 and the model's {n_layers} latent layers, got '{text}'.")
    return ks


@torch.no_grad()
def first_k_decodes(model, x: torch.Tensor, ks: Sequence[int], *, temperature: float = 0.1,
                    posterior: str = "sample", seed: int = 0) -> list[torch.Tensor]:
    """For each K, the decoding of ``x`` (model scale) with the first K layers from the posterior
    and the rest sampled from the prior at ``temperature``; each K draws from ``seed`` afresh."""
    shapes = model.cfg.layer_shapes()
    decoded = []
    for k in ks:
        g = torch.Generator(device=x.device).manual_seed(seed)
        active = [None if i < k else torch.zeros(shape, dtype=torch.bool) for i, shape in enumerate(shapes)]
        decoded.append(model.reconstruct(x, active=active, posterior=posterior, masked="sample",
                                         temperature=temperature, generator=g))
    return decoded


def first_k_images(path: str | Path, data: str, out: str | Path, *, ks: str | Sequence[int], n: int = 8,
                   split: str = "test", temperature: float = 0.1, posterior: str = "sample", seed: int = 0,
                   device: str = "auto") -> dict:
    """Images decoded from the posterior of the first K latent layers and the prior for the rest.

    openai/vdvae's figure: the top row holds the originals, then one row per K; in each,
    the first K top-down layers take their posterior (``posterior``: a sample or the
    mean), every later layer a prior sample at ``temperature`` conditioned on them.
    K = 0 is an unconditional sample, K = all layers a reconstruction. One masked
    top-down pass per K (the same path as pruning); outputs are the likelihood's mode.
    """
    if n < 1:
        raise UserError(f"--n must be at least 1, not {n}.")
    if temperature < 0:
        raise UserError(f"--temperature must be non-negative, not {temperature}.")
    if posterior not in ("sample", "mean"):
        raise UserError(f"--posterior must be sample or mean, not '{posterior}'.")
    dev = auto_device(device)
    model, info = load_model(path, ema=True, device=dev)
    shapes = model.cfg.layer_shapes()
    ks = parse_layer_counts(ks, len(shapes)) if isinstance(ks, str) else parse_layer_counts(
        ",".join(str(k) for k in ks), len(shapes))
    images = open_images(data, split=split, limit=n)  # reads only these n images
    check_images_fit(model.cfg, images.shape, data)
    x = prepare_batch(model.cfg, images.read(), device=dev)
    bits = model.cfg.n_bits if model.cfg.output == "mol" else 8
    pad = model.cfg.pad
    rows = [to_uint8(x[..., pad:x.shape[-2] - pad, pad:x.shape[-1] - pad] if pad else x, bits)]
    rows += [to_uint8(decoded, bits) for decoded in first_k_decodes(
        model, x, ks, temperature=temperature, posterior=posterior, seed=seed)]
    written = save_grid(out, np.concatenate(rows), ncols=len(images))
    return {"checkpoint": str(info["path"]), "out": str(written), "n": len(images), "ks": ks,
            "n_layers": len(shapes), "temperature": temperature, "posterior": posterior, "data": data,
            "split": split}


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
                       div_stats: str | Path | None = None, workers: int | None = None,
                       progress=None) -> dict:
    """Rank every latent dimension by its average KL over a split and choose the active set.

    Writes ``out`` (ACTIVE.json), optionally a figure, a pruning sweep on ``sweep_split``
    and ``div_stats`` (the official code's ``div_stats.npy``: (layers, variates) in bits).
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
    if div_stats is not None and granularity != "variate":
        raise UserError("--div-stats needs --granularity variate (the official file has one value per variate).")
    dev = auto_device(device)
    dev, rank, world = join_processes(dev)
    distributed = world > 1
    ckpt_path = resolve_checkpoint(path)
    model, info = load_model(ckpt_path, ema=True, device=dev)
    images = open_images(data, split=split, limit=limit)
    check_images_fit(model.cfg, images.shape, data)
    start = time.perf_counter()
    stats = LatentKL(batch_size=batch_size, seed=seed + rank, device=dev).fit(
        model, stream(images.shard(rank, world), batch_size, workers, dev, world), progress=progress)
    active = build_active_set(stats, granularity=granularity, keep=keep_fraction, threshold=threshold,
                              data=data, split=split, checkpoint=str(ckpt_path),
                              checkpoint_sha256=file_sha256(ckpt_path))
    result = {"checkpoint": str(ckpt_path), "step": info["step"], "out": str(out), "seconds": 0.0,
              **active.summary()}
    if rank == 0:
        if sweep:
            test = open_images(data, split=sweep_split, limit=limit)
            check_images_fit(model.cfg, test.shape, data)
            pixels = evaluation_images(model.cfg, test, _eval_binarization(info), batch_size=batch_size)
            rows = pruning_sweep(model, pixels, active, sweep, batch_size=batch_size, seed=seed, device=dev)
            result["sweep"] = {"split": sweep_split, "n_images": len(test), "rows": rows}
            active.extra["sweep"] = result["sweep"]
        active.save(out)
        if div_stats:
            from .atomic import atomic_file

            with atomic_file(Path(div_stats), what="div stats file") as f:
                np.save(f, active.div_stats_bits())
            result["div_stats"] = str(div_stats)
        if plot:
            plot_kl(active, plot, title=f"{Path(str(ckpt_path)).name} on {data}:{split}")
            result["plot"] = str(plot)
    if distributed:
        dist.barrier()
    result["seconds"] = time.perf_counter() - start
    return result
