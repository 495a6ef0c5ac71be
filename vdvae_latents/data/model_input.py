"""Turning uint8 batches into model input: n-bit levels in [-1, 1], padding, binarisation.

Pixels stay uint8 (N, H, W, C) or (N, C, H, W) everywhere in the data pipeline and become
float only here, one batch at a time.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["to_model_input", "binarize"]


def to_model_input(
    images: np.ndarray | torch.Tensor,
    n_bits: int = 8,
    pad_to: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Turn a uint8 batch into float32 NCHW model input in [-1, 1].

    Pixels are reduced to ``n_bits`` bits (``k = x >> (8 - n_bits)``) and mapped to
    ``2k / (2**n_bits - 1) - 1``, so every value lies on the 2**n_bits-level grid.
    A numpy array is taken as NHWC (the layout of :attr:`ImageSet.images`); a torch
    tensor is taken as NCHW (the layout :class:`ImageDataset` yields) and stays on its
    device. ``pad_to`` (H, W) pads symmetrically with -1 (the lowest level), any odd
    remainder going to the bottom/right, e.g. 28 -> 32 adds 2 on each side.
    """
    if not 1 <= n_bits <= 8:
        raise ValueError(f"n_bits must be between 1 and 8, got {n_bits}")
    if isinstance(images, np.ndarray):
        if images.ndim != 4 or images.dtype != np.uint8:
            raise ValueError(f"expected a uint8 NHWC array, got {images.dtype} of shape {images.shape}")
        # np.require copies only when needed (read-only or strided input).
        batch = torch.from_numpy(np.require(images, requirements=["C", "W"])).permute(0, 3, 1, 2)
    elif isinstance(images, torch.Tensor):
        if images.ndim != 4:
            raise ValueError(f"expected a uint8 NCHW tensor, got shape {tuple(images.shape)}")
        batch = images
    else:
        raise TypeError(f"expected a numpy array or torch tensor, got {type(images).__name__}")
    if batch.dtype != torch.uint8:
        raise ValueError(f"expected uint8 pixels, got {batch.dtype}")

    levels = 2**n_bits - 1
    k = batch >> (8 - n_bits)
    x = (k.to(torch.float32) * 2.0) / levels - 1.0
    if pad_to is not None:
        x = _pad(x, pad_to)
    return x.contiguous()


def binarize(
    images_01: torch.Tensor,
    generator: torch.Generator | None = None,
    fixed: bool = False,
) -> torch.Tensor:
    """Binarise pixel intensities in [0, 1] to {0, 1} (same dtype and device).

    By default each pixel is an independent Bernoulli(p) draw (dynamic binarisation,
    for training; pass ``generator`` for reproducible draws, on the tensor's device).
    With ``fixed=True`` the result is deterministic for evaluation: a pixel is 1 when
    its intensity is >= 0.5 and 0 otherwise.
    """
    if not images_01.is_floating_point():
        raise TypeError(f"binarize expects float intensities in [0, 1], got {images_01.dtype}")
    if fixed:
        return (images_01 >= 0.5).to(images_01.dtype)
    return torch.bernoulli(images_01, generator=generator)


def _pad(x: torch.Tensor, pad_to: tuple[int, int]) -> torch.Tensor:
    """Pad NCHW ``x`` symmetrically to ``pad_to`` (H, W) with the lowest value, -1."""
    height, width = x.shape[2], x.shape[3]
    target_h, target_w = pad_to
    if target_h < height or target_w < width:
        raise ValueError(f"pad_to {pad_to} is smaller than the images ({height}, {width})")
    top, left = (target_h - height) // 2, (target_w - width) // 2
    bottom, right = target_h - height - top, target_w - width - left
    return torch.nn.functional.pad(x, (left, right, top, bottom), value=-1.0)
