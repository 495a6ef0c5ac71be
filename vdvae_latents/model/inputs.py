"""Turn uint8 images from :mod:`vdvae_latents.data` into model inputs for a config.

The one place that knows how a config wants its pixels: n-bit quantisation and
scaling to [-1, 1] for the MoL output; binarisation (dynamic for training, fixed for
evaluation) for the Bernoulli output; padding (MNIST 28 -> 32) where ``cfg.pad`` asks.
"""

from __future__ import annotations

import numpy as np
import torch

from ..core.errors import DataError
from ..data import LazyImages, binarize, to_model_input
from .config import ModelConfig


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
        x = to_model_input(images, n_bits=cfg.image_bits, pad_to=pad_to)
    # A fresh NCHW allocation: with one channel, a view of NHWC data has strides that torch
    # also reads as channels-last, and convolutions then pick other kernels (outputs differ
    # by float rounding). Copying makes results independent of the caller's memory layout.
    return torch.empty(x.shape, dtype=x.dtype, device=x.device).copy_(x)


FIXED_BINARIZATION_SEED = 101  # any constant: what matters is that every evaluation draws the same bits


def fixed_binarization(images: np.ndarray | torch.Tensor, positions=None) -> np.ndarray | torch.Tensor:
    """One fixed random binarisation of evaluation images (uint8 in, 0/255 out, same type and layout).

    The official binarized-MNIST protocol scores val/test on one Bernoulli draw of the
    grey levels, made once, rather than on the 0.5 threshold. Image ``i`` of the split
    gets its own generator seeded with ``FIXED_BINARIZATION_SEED + i``, so its bits do not
    depend on batch sizes, limits, ranks or workers, and every model is scored on the same
    bits. ``positions`` are the images' indices in the split (``0..n-1`` when None), as a
    streamed :class:`~vdvae_latents.data.Batch` carries them. Arrays are NHWC, tensors NCHW;
    the draw is made in NHWC order either way. The result passes the 0.5 threshold unchanged.
    """
    is_tensor = isinstance(images, torch.Tensor)
    nhwc = images.permute(0, 2, 3, 1).cpu() if is_tensor else torch.from_numpy(np.ascontiguousarray(images))
    flat = nhwc.reshape(len(nhwc), -1).float() / 255.0
    if positions is None:
        positions = range(len(flat))
    out = torch.empty_like(flat)
    g = torch.Generator()
    for row, i in enumerate(positions):
        g.manual_seed(FIXED_BINARIZATION_SEED + int(i))
        out[row] = (torch.rand(flat.shape[1], generator=g) < flat[row]).float()
    bits = (out * 255).to(torch.uint8).reshape(nhwc.shape)
    return bits.permute(0, 3, 1, 2).contiguous() if is_tensor else bits.numpy()


class _FixedBinarizedBatches:
    """Re-iterable: each streamed batch's images through :func:`fixed_binarization`, by split
    position (a shard's batch position ``p`` is split position ``rank + world_size * p``);
    ``len`` is the number of images when it is known."""

    def __init__(self, batches, n_images: int | None = None, rank: int = 0, world_size: int = 1) -> None:
        self.batches, self.n_images, self.rank, self.world_size = batches, n_images, rank, world_size

    def __len__(self) -> int:
        if self.n_images is None:
            raise TypeError("the number of images of a streamed loader is not known")
        return self.n_images

    def __iter__(self):
        for batch in self.batches:
            yield fixed_binarization(batch.images, (self.rank + self.world_size * batch.positions).tolist())


def evaluation_images(cfg: ModelConfig, images, binarization: str = "threshold", *, batch_size: int = 256,
                      rank: int = 0, world_size: int = 1):
    """The pixels an evaluation scores: binary models with ``binarization="sampled"`` see
    :func:`fixed_binarization`; everything else is passed through unchanged.

    ``images`` is an NHWC array, a :class:`~vdvae_latents.data.LazyImages` (streamed
    ``batch_size`` at a time) or a loader of :class:`~vdvae_latents.data.Batch` tuples
    (e.g. ``LazyImages.batches``); the last two stay streamed and re-iterable. A loader
    over ``split.shard(rank, world_size)`` says so, so that each image keeps its split's bits.
    """
    if cfg.output != "bernoulli" or binarization != "sampled":
        return images
    if isinstance(images, np.ndarray):
        return fixed_binarization(images)
    if isinstance(images, LazyImages):
        return _FixedBinarizedBatches(images.batches(batch_size), len(images))
    return _FixedBinarizedBatches(images, rank=rank, world_size=world_size)


def eval_binarization(info: dict) -> str:
    """How the run scores binary data (its train setting; the 0.5 threshold for older runs)."""
    return (info.get("train_config") or {}).get("eval_binarization", "threshold")
