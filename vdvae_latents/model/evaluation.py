"""Test-set evaluation: negative ELBO and the importance-weighted bound.

:func:`evaluate` streams a data set through the model once and returns exact means
over every image it was given (no subsampling, no running averages): per-image
reconstruction NLL and KL are summed in float64 and divided by N at the end, so the
result does not depend on how the data were batched except through the random
posterior samples (see *Seeding* below).

With ``iw_samples=K > 0`` it also computes the importance-weighted bound of Burda et
al. (2016),

    log p(x) >= E[ log (1/K) sum_k w_k ],   log w_k = log p(x|z_k) + log p(z_k) - log q(z_k|x),

with ``z_k`` drawn from the posterior. K = 1 is the ELBO (with a sampled rather than
analytic KL); the bound tightens as K grows. The K passes over a batch run one after
another, so memory stays that of a single forward pass.

Seeding
-------
Posterior samples come from seeded CPU :class:`torch.Generator` objects (the model
draws noise on the generator's device and moves it, so a run on a GPU uses the same
numbers). There are two independent streams, each seeded once and consumed in batch
order:

* the ELBO pass uses ``torch.Generator().manual_seed(seed)``;
* the importance-weighted passes use a generator seeded with :func:`iw_seed` ``(seed)``.

Keeping them apart means the reported ELBO is the same whether or not the IW bound
is requested. Because each stream is consumed batch after batch, changing
``batch_size`` changes which noise each image sees: results are reproducible for a
fixed ``(seed, batch_size)``, and agree across batch sizes only up to Monte Carlo
error.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..core.errors import DataError, UserError
from ..core.runtime import auto_device
from ..data import ImageSet, LazyImages, open_images
from ..data.loading import stream
from .checkpoints import load_model
from .distributions import gaussian_kl, gaussian_log_prob
from .precision import autocast, resolve_precision
from .inputs import (
    check_images_fit,
    eval_binarization,
    evaluation_images,
    prepare_batch,
)
from .vae import VAEOutput

__all__ = ["EvalResult", "evaluate", "iw_log_weights", "iw_seed"]

Mask = torch.Tensor | None
_LN2 = math.log(2.0)
_INPUT_NAME = "evaluation input"  # how DataError messages refer to the images handed to evaluate()


@dataclass
class EvalResult:
    """Means over a data set, in nats per image (see :meth:`as_dict` for per-dim units)."""

    n_images: int
    dims_per_image: int
    binary: bool
    nll_nats: float                   # mean reconstruction NLL -log p(x|z), nats per image
    kl_nats: float                    # mean KL(q(z|x) || p(z)), nats per image
    iw_nll_nats: float | None = None  # mean importance-weighted bound on -log p(x), nats per image
    iw_samples: int | None = None
    # Under pruning, two KL conventions: ``kl_nats`` charges pruned dimensions 0 (they follow
    # the prior, so the pruned pass is a valid bound: the project's convention); ``kl_all_nats``
    # is KL(q || p) of every dimension, pruned ones included, in the same pruned pass (the
    # official Efficient-VDVAE code's convention, the paper's Table 5). Equal without pruning.
    kl_all_nats: float | None = None

    @property
    def elbo_nats(self) -> float:
        """Negative ELBO in nats per image (reconstruction + KL)."""
        return self.nll_nats + self.kl_nats

    def as_dict(self) -> dict[str, float | int | None]:
        """The usual reporting units.

        ``bits_per_dim`` is the negative ELBO in bits per sub-pixel (nats / dims / ln 2),
        split into ``recon_bits_per_dim`` and ``kl_bits_per_dim``; ``nats_per_dim`` is the
        same in nats. Binary data are conventionally reported in nats per image, so for
        them ``nats_per_image``, ``recon_nats_per_image`` and ``kl_nats_per_image`` are
        added. ``iw_bits_per_dim`` (and ``iw_nats_per_image`` for binary data) appear
        when the importance-weighted bound was computed.
        """
        d = self.dims_per_image
        out: dict[str, float | int | None] = {
            "n_images": self.n_images,
            "bits_per_dim": self.elbo_nats / d / _LN2,
            "recon_bits_per_dim": self.nll_nats / d / _LN2,
            "kl_bits_per_dim": self.kl_nats / d / _LN2,
            "nats_per_dim": self.elbo_nats / d,
        }
        if self.binary:
            out.update(nats_per_image=self.elbo_nats, recon_nats_per_image=self.nll_nats,
                       kl_nats_per_image=self.kl_nats)
        if self.kl_all_nats is not None:
            out["kl_all_bits_per_dim"] = self.kl_all_nats / d / _LN2
            out["bits_per_dim_kl_all"] = (self.nll_nats + self.kl_all_nats) / d / _LN2
            if self.binary:
                out["kl_all_nats_per_image"] = self.kl_all_nats
                out["nats_per_image_kl_all"] = self.nll_nats + self.kl_all_nats
        if self.iw_nll_nats is not None:
            out["iw_bits_per_dim"] = self.iw_nll_nats / d / _LN2
            if self.binary:
                out["iw_nats_per_image"] = self.iw_nll_nats
        out["iw_samples"] = self.iw_samples
        return out


def iw_seed(seed: int) -> int:
    """Seed of the importance-weighted passes' generator, derived from ``seed``.

    A :class:`numpy.random.SeedSequence` hash rather than e.g. ``seed + 1``, so that
    the IW stream of one seed is never the ELBO stream of another.
    """
    if seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed}")
    return int(np.random.SeedSequence((seed, 1)).generate_state(1, dtype=np.uint64)[0])


def iw_log_weights(out: VAEOutput, active: Sequence[Mask] | None = None) -> torch.Tensor:
    """Per-image log importance weight of one posterior-sampled forward pass, (B,) float64.

    ``log w = -nll + sum over layers and elements of [log p(z | prior) - log q(z | x)]``,
    evaluated at the ``z`` the pass actually used. Only *active* positions contribute to
    the log-ratio (every position when ``active`` is None, or when a layer's entry is
    None): a pruned position took a sample from the prior itself, so its proposal equals
    its prior and the two terms cancel exactly. Leaving them out (rather than adding
    two large numbers that cancel) keeps the sum exact, and is also right when the
    posterior would give the prior sample almost zero density.

    The densities are computed in float64: the log-ratio is a sum of many terms of both
    signs, which float32 would round noticeably for large models.
    """
    if active is not None and len(active) != len(out.layers):
        raise ValueError(f"active must have one entry per latent layer ({len(out.layers)}), got {len(active)}")
    log_w = -out.nll.to(torch.float64)
    for k, layer in enumerate(out.layers):
        if layer.q_mean is None or layer.q_std is None:
            raise ValueError(f"latent layer {k} has no posterior: iw_log_weights needs a forward pass on images")
        z = layer.z.to(torch.float64)
        log_p = gaussian_log_prob(z, layer.p_mean.to(torch.float64), layer.p_std.to(torch.float64))
        log_q = gaussian_log_prob(z, layer.q_mean.to(torch.float64), layer.q_std.to(torch.float64))
        ratio = log_p - log_q
        mask = None if active is None else active[k]
        if mask is not None:
            mask = torch.as_tensor(mask, dtype=torch.bool, device=ratio.device)
            # where(), not a multiply: masking must give exact zeros even if a term is inf.
            ratio = torch.where(mask, ratio, torch.zeros((), dtype=ratio.dtype, device=ratio.device))
        log_w = log_w + ratio.flatten(1).sum(1)
    return log_w


@torch.no_grad()
def evaluate(
    model: nn.Module,
    images: torch.Tensor | np.ndarray | ImageSet | Iterable,
    *,
    batch_size: int = 256,
    seed: int = 0,
    iw_samples: int = 0,
    active: Sequence[Mask] | None = None,
    masked: str = "sample",
    temperature: float | Sequence[float] = 1.0,
    device: torch.device | str | None = None,
    progress: Callable[[int], None] | None = None,
) -> EvalResult:
    """Negative ELBO (and optionally the importance-weighted bound) over all ``images``.

    Args:
        model: a :class:`~vdvae_latents.model.vae.VAE`; put in eval mode for the run and
            returned to its previous mode afterwards.
        images: uint8 pixels as a tensor (N, C, H, W), an array (N, H, W, C), an
            :class:`~vdvae_latents.data.ImageSet`, a lazy
            :class:`~vdvae_latents.data.LazyImages` (read ``batch_size`` at a time), or an
            iterable of such batches (e.g. ``LazyImages.batches(...)`` or a DataLoader;
            tuples/lists such as ``(images, labels)`` use their first element). An
            iterable is taken batch by batch as it comes; ``batch_size`` then has no
            effect.
        batch_size: images per forward pass when ``images`` is one tensor/array.
        seed: seeds the posterior-sample generators (see the module docstring).
        iw_samples: K > 0 also computes the K-sample importance-weighted bound.
        active / masked / temperature: passed to ``model.forward`` (the pruned forward
            pass: pruned positions take a prior sample and contribute zero KL). The
            numbers are bounds on -log p(x) only with ``masked="sample"`` and
            ``temperature=1``, where a pruned position's proposal is its prior.
        device: where to run; defaults to the model's device.
        progress: called after each batch with the number of images in that batch.

    Pixels go through :func:`~vdvae_latents.model.inputs.prepare_batch`, which binarises
    binary data at the fixed 0.5 threshold (the evaluation convention).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if iw_samples < 0:
        raise ValueError(f"iw_samples must be >= 0, got {iw_samples}")
    if seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed}")
    cfg = model.cfg
    if device is None:
        device = next(model.parameters()).device
    elbo_gen = torch.Generator().manual_seed(seed)
    iw_gen = torch.Generator().manual_seed(iw_seed(seed)) if iw_samples else None
    forward_kwargs = dict(active=active, posterior="sample", masked=masked, temperature=temperature)

    n = 0
    nll_sum = kl_sum = kl_all_sum = iw_sum = 0.0  # Python floats: float64 accumulators
    pruned = active is not None and any(a is not None for a in active)
    was_training = model.training
    model.eval()
    try:
        for batch in iter_batches(images, batch_size):
            if batch.shape[0] == 0:
                continue
            _check_batch(cfg, batch)
            x = prepare_batch(cfg, batch, device=device)
            out = model(x, generator=elbo_gen, **forward_kwargs)
            nll_sum += out.nll.to(torch.float64).sum().item()
            kl_sum += sum(layer.kl.to(torch.float64).sum() for layer in out.layers).item()
            if pruned:
                kl_all_sum += sum(gaussian_kl(*(t.to(torch.float64) for t in (
                    layer.q_mean, layer.q_std, layer.p_mean, layer.p_std))).sum() for layer in out.layers).item()
            del out  # free the activations before the IW passes
            if iw_samples:
                # K sequential passes: memory stays that of one pass; only (K, B) weights are kept.
                log_w = torch.stack([
                    iw_log_weights(model(x, generator=iw_gen, **forward_kwargs), active)
                    for _ in range(iw_samples)
                ])
                log_px = torch.logsumexp(log_w, dim=0) - math.log(iw_samples)
                iw_sum += log_px.sum().item()
            n += x.shape[0]
            if progress is not None:
                progress(int(x.shape[0]))
    finally:
        model.train(was_training)

    if n == 0:
        raise DataError(f"the {_INPUT_NAME} holds no images")
    return EvalResult(
        n_images=n,
        dims_per_image=cfg.dims_per_image,
        binary=cfg.output == "bernoulli",
        nll_nats=nll_sum / n,
        kl_nats=kl_sum / n,
        iw_nll_nats=-iw_sum / n if iw_samples else None,
        iw_samples=iw_samples or None,
        kl_all_nats=kl_all_sum / n if pruned else None,
    )


# ------------------------------------------------------------------------- helpers


def iter_batches(images, batch_size: int) -> Iterator[torch.Tensor | np.ndarray]:
    """Yield uint8 batches (tensor NCHW or array NHWC) from any accepted input."""
    if isinstance(images, LazyImages):  # read batch by batch in this process
        images = images.batches(batch_size)
    if isinstance(images, ImageSet):
        images = images.images
    if isinstance(images, (torch.Tensor, np.ndarray)):
        if images.ndim != 4:
            layout = "(N, C, H, W) tensor" if isinstance(images, torch.Tensor) else "(N, H, W, C) array"
            raise DataError(f"the {_INPUT_NAME} must be a {layout}, got shape {tuple(images.shape)}")
        for start in range(0, images.shape[0], batch_size):
            yield images[start:start + batch_size]
        return
    for item in images:
        if isinstance(item, (tuple, list)):  # (images, labels) from a DataLoader
            item = item[0]
        if not isinstance(item, (torch.Tensor, np.ndarray)) or item.ndim != 4:
            what = f"shape {tuple(item.shape)}" if hasattr(item, "shape") else type(item).__name__
            raise DataError(f"each batch of the {_INPUT_NAME} must be a 4-d uint8 tensor or array, got {what}")
        yield item


def _check_batch(cfg, batch: torch.Tensor | np.ndarray) -> None:
    """Turn wrong pixel types and sizes into one-sentence DataErrors before the model sees them."""
    if isinstance(batch, torch.Tensor):
        is_uint8 = batch.dtype == torch.uint8
        _, c, h, w = batch.shape
    else:
        is_uint8 = batch.dtype == np.uint8
        _, h, w, c = batch.shape
    if not is_uint8:
        raise DataError(f"the {_INPUT_NAME} must hold uint8 pixels (0..255), got {batch.dtype}")
    check_images_fit(cfg, (h, w, c), _INPUT_NAME)


def eval_checkpoint(path: str | Path, data: str, *, split: str = "test", iw_samples: int = 0,
                    batch_size: int = 256, limit: int | None = None, seed: int = 0, device: str = "auto",
                    workers: int | None = None, precision: str = "fp32", progress=None) -> dict:
    """Negative ELBO (EMA weights) over a whole split, with an optional IW-NLL estimate (streamed).

    fp32 unless ``precision`` asks otherwise (auto, bf16): these are the numbers compared
    with papers and other code."""
    if iw_samples < 0:
        raise UserError(f"--iw must be a non-negative number of samples, not {iw_samples}.")
    dev = auto_device(device)
    resolve_precision(precision, dev)
    model, info = load_model(path, ema=True, device=dev)
    model.use_channels_last()  # measured faster for inference too (benchmarks/results/inference-*)
    images = open_images(data, split=split, limit=limit)
    check_images_fit(model.cfg, images.shape, data)
    start = time.perf_counter()
    pixels = evaluation_images(model.cfg, stream(images, batch_size, workers, dev), eval_binarization(info))
    with autocast(precision, dev):
        result = evaluate(model, pixels, seed=seed, iw_samples=iw_samples, device=dev, progress=progress)
    out = {"checkpoint": str(info["path"]), "step": info["step"], "data": data, "split": split,
           "seconds": time.perf_counter() - start, **result.as_dict()}
    return out
