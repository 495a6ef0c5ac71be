"""Turn uint8 images from :mod:`vdvae_latents.data` into model inputs for a config.

The one place that knows how a config wants its pixels: n-bit quantisation and
scaling to [-1, 1] for the MoL output; binarisation (dynamic for training, fixed for
evaluation) for the Bernoulli output; padding (MNIST 28 -> 32) where ``cfg.pad`` asks.
"""

from __future__ import annotations

import numpy as np
import torch

from .config import ModelConfig
from .data import binarize, to_model_input
from .errors import DataError


def check_images_fit(cfg: ModelConfig, shape_hwc: tuple[int, int, int], spec: str) -> None:
    """Raise :class:`DataError` unless images of ``shape_hwc`` fit the model."""
    h, w, c = shape_hwc
    size = cfg.loss_size
    if (h, w, c) != (size, size, cfg.channels):
        kind = "grayscale" if cfg.channels == 1 else "RGB"
        raise DataError(
            f"images of '{spec}' are {h}x{w}x{c} but the model expects {size}x{size}x{cfg.channels} "
            f"({kind}{', padded to ' + str(cfg.image_size) if cfg.pad else ''})."
        )


def prepare_batch(cfg: ModelConfig, images: torch.Tensor | np.ndarray, *, dynamic_binarize: bool = False,
                  generator: torch.Generator | None = None, device: torch.device | str | None = None) -> torch.Tensor:
    """uint8 images (tensor NCHW, or array NHWC) -> float32 NCHW model input in [-1, 1]."""
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)
    if device is not None:
        images = images.to(device, non_blocking=True)
    pad_to = (cfg.image_size, cfg.image_size) if cfg.pad else None
    if cfg.output == "bernoulli":
        bits = binarize(images.float() / 255.0, generator=generator, fixed=not dynamic_binarize)
        images = (bits * 255).to(torch.uint8)
        x = to_model_input(images, n_bits=8, pad_to=pad_to)
    else:
        x = to_model_input(images, n_bits=cfg.n_bits, pad_to=pad_to)
    # A fresh NCHW allocation: with one channel, a view of NHWC data has strides that torch
    # also reads as channels-last, and convolutions then pick other kernels (outputs differ
    # by float rounding). Copying makes results independent of the caller's memory layout.
    return torch.empty(x.shape, dtype=x.dtype, device=x.device).copy_(x)


FIXED_BINARIZATION_SEED = 101  # any constant: what matters is that every evaluation draws the same bits


def fixed_binarization(images: np.ndarray) -> np.ndarray:
    """One fixed random binarisation of an evaluation split (uint8 NHWC in, 0/255 out).

    The official binarized-MNIST protocol scores val/test on one Bernoulli draw of the
    grey levels, made once, rather than on the 0.5 threshold. Image ``i`` of the split
    gets its own generator seeded with ``FIXED_BINARIZATION_SEED + i``, so its bits do not
    depend on batch sizes, limits or ranks, and every model is scored on the same bits.
    The result (0 or 255) passes the evaluation threshold unchanged.
    """
    images = np.asarray(images)
    flat = torch.from_numpy(np.ascontiguousarray(images)).reshape(len(images), -1).float() / 255.0
    out = torch.empty_like(flat)
    g = torch.Generator()
    for i in range(len(flat)):
        g.manual_seed(FIXED_BINARIZATION_SEED + i)
        out[i] = (torch.rand(flat.shape[1], generator=g) < flat[i]).float()
    return (out * 255).to(torch.uint8).reshape(images.shape).numpy()


def evaluation_images(cfg: ModelConfig, images: np.ndarray, binarization: str = "threshold") -> np.ndarray:
    """The pixels an evaluation scores: binary models with ``binarization="sampled"`` see
    :func:`fixed_binarization`; everything else is passed through unchanged."""
    if cfg.output == "bernoulli" and binarization == "sampled":
        return fixed_binarization(images)
    return images
