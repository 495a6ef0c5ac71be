"""Describe a model, optionally scoring a few real images with untrained weights.

This is what `vdvl model` prints: it checks that a preset builds and that a data
source fits it, and shows the starting loss (not a trained result).
"""

from __future__ import annotations

import math
import time

import torch

from ..data import load_images
from ..model.inputs import check_images_fit, prepare_batch
from ..model.vae import VAE, count_parameters
from .presets import get_preset


def inspect_model(preset: str, *, data: str | None = None, n: int = 64, seed: int = 0,
                  overrides: dict[str, str] | None = None) -> dict:
    cfg = get_preset(preset).config
    if overrides:
        cfg = cfg.with_overrides(overrides)
    result = {
        "preset": preset,
        "architecture": cfg.architecture,
        "image_shape": f"{cfg.channels}x{cfg.image_size}x{cfg.image_size}",
        "parameters": count_parameters(cfg),
        "latent_layers": cfg.n_layers,
        "latent_variates": cfg.n_latent_variates,
        "latent_elements": cfg.n_latent_elements,
        "resolutions": [
            {"resolution": r, "layers": b, "variates": v, "width": w, "elements": b * v * r * r}
            for r, b, v, w in zip(cfg.resolutions, cfg.up_blocks, cfg.variates, cfg.widths)
        ],
        "config": cfg.to_dict(),
    }
    if data is None:
        return result
    images = load_images(data, split="train", limit=n)
    check_images_fit(cfg, images.shape, data)
    torch.manual_seed(seed)
    model = VAE(cfg).eval()
    x = prepare_batch(cfg, images.images)
    start = time.perf_counter()
    with torch.no_grad():
        out = model(x, generator=torch.Generator().manual_seed(seed))
    seconds = time.perf_counter() - start
    summary = out.summary()
    if not math.isfinite(summary["bits_per_dim"]):
        raise RuntimeError("the forward pass produced a non-finite loss")
    result["forward"] = {"data": data, "images": len(images), "seconds": seconds, **summary}
    return result
