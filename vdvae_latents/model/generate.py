"""One-call jobs over a checkpoint: evaluate, sample, reconstruct.

Each function is what a `vdvl` command does, callable from a notebook: it loads the
checkpoint's EMA weights, checks the data fits the model, runs, and returns a dict
of results (the CLI prints it or emits it as JSON). Every figure is a labelled grid
(:func:`~vdvae_latents.data.grids.save_grid`): a title naming the model and the data,
and a label beside each row of images.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from ..core.errors import UserError
from ..core.outputs import prepare_output
from ..core.runtime import auto_device
from ..data import open_images
from ..data.grids import PAD_VALUE, save_grid, to_uint8
from .checkpoints import load_model
from .inputs import check_images_fit, prepare_batch


def sample_images(path: str | Path, out: str | Path, *, n: int = 16, temperature: float = 1.0, seed: int = 0,
                  device: str = "auto") -> dict:
    """Unconditional samples from the prior at ``temperature``, saved as a PNG grid."""
    if n < 1:
        raise UserError(f"--n must be at least 1, not {n}.")
    if temperature < 0:
        raise UserError(f"--temperature must be non-negative, not {temperature}.")
    prepare_output(out, what="image grid")  # before the model loads
    dev = auto_device(device)
    model, info = load_model(path, ema=True, device=dev)
    g = torch.Generator(device=dev).manual_seed(seed)
    x = model.sample(n, temperature=temperature, generator=g)
    title = f"{n} samples from the prior of {model_label(info)} at temperature {temperature:g} (seed {seed})"
    written = save_grid(out, to_uint8(x, model.cfg.image_bits), title=title)
    return {"checkpoint": str(info["path"]), "out": str(written), "n": n, "temperature": temperature, "seed": seed}


def reconstruct_images(path: str | Path, data: str, out: str | Path, *, n: int = 16, split: str = "test",
                       seed: int = 0, device: str = "auto") -> dict:
    """Originals (top rows) and their deterministic reconstructions (bottom rows) as one grid."""
    if n < 1:
        raise UserError(f"--n must be at least 1, not {n}.")
    prepare_output(out, what="image grid")  # before the model loads
    dev = auto_device(device)
    model, info = load_model(path, ema=True, device=dev)
    images = open_images(data, split=split, limit=n)  # reads only these n images
    check_images_fit(model.cfg, images.shape, data)
    x = prepare_batch(model.cfg, images.read(), device=dev)
    g = torch.Generator(device=dev).manual_seed(seed)
    recon = model.reconstruct(x, posterior="mean", generator=g)
    bits = model.cfg.image_bits
    ncols = min(len(images), 8)
    grid = interleave_rows(scored_pixels(model.cfg, x, bits), to_uint8(recon, bits), ncols)
    title = (f"{data}:{split}, first {len(images)} images: each row of originals above its reconstructions "
             f"by {model_label(info)} (all {model.cfg.n_layers} latent layers, posterior means)")
    written = save_grid(out, grid, ncols=ncols, title=title,
                        row_labels=["original", "reconstruction"] * (len(grid) // (2 * ncols)))
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
    prepare_output(out, what="image grid")  # before the model loads
    dev = auto_device(device)
    model, info = load_model(path, ema=True, device=dev)
    shapes = model.cfg.layer_shapes()
    ks = parse_layer_counts(ks, len(shapes)) if isinstance(ks, str) else parse_layer_counts(
        ",".join(str(k) for k in ks), len(shapes))
    images = open_images(data, split=split, limit=n)  # reads only these n images
    check_images_fit(model.cfg, images.shape, data)
    x = prepare_batch(model.cfg, images.read(), device=dev)
    bits = model.cfg.n_bits if model.cfg.output == "mol" else 8
    rows = [scored_pixels(model.cfg, x, bits)]
    rows += [to_uint8(decoded, bits) for decoded in first_k_decodes(
        model, x, ks, temperature=temperature, posterior=posterior, seed=seed)]
    title = (f"{data}:{split}, first {len(images)} images (top row) decoded by {model_label(info)} with the first K "
             f"of its {len(shapes)} latent layers from the posterior ({posterior}) and the rest sampled from the prior "
             f"at temperature {temperature:g}")
    written = save_grid(out, np.concatenate(rows), ncols=len(images), title=title,
                        row_labels=["original"] + [_k_label(k, len(shapes)) for k in ks])
    return {"checkpoint": str(info["path"]), "out": str(written), "n": len(images), "ks": ks,
            "n_layers": len(shapes), "temperature": temperature, "posterior": posterior, "data": data,
            "split": split}


def model_label(info: dict) -> str:
    """How a figure's title names a loaded checkpoint: its preset (or file name) and training step."""
    name = info.get("preset") or Path(str(info.get("path", "checkpoint"))).name
    return f"{name} (step {info['step']})" if info.get("step") is not None else str(name)


def scored_pixels(cfg, x: torch.Tensor, bits: int) -> np.ndarray:
    """Model-input images ``x`` as uint8 (N, H, W, C), cropped to the scored region (the model's
    padding removed): the originals a reconstruction or decoding is compared with."""
    pad = cfg.pad
    return to_uint8(x[..., pad:x.shape[-2] - pad, pad:x.shape[-1] - pad] if pad else x, bits)


def interleave_rows(a: np.ndarray, b: np.ndarray, ncols: int) -> np.ndarray:
    """Row of ``a`` (originals), the same row of ``b`` (their reconstructions), and so on; the last
    pair of rows is filled with mid-gray cells, as the grid's empty cells are."""
    rows = []
    for start in range(0, len(a), ncols):
        for src in (a, b):
            chunk = src[start:start + ncols]
            if len(chunk) < ncols:
                filler = np.full((ncols - len(chunk), *chunk.shape[1:]), PAD_VALUE, chunk.dtype)
                chunk = np.concatenate([chunk, filler])
            rows.append(chunk)
    return np.concatenate(rows)


def _k_label(k: int, n_layers: int) -> str:
    if k == 0:
        return "K = 0 (prior only)"
    return f"K = {k} (all)" if k == n_layers else f"K = {k}"


