"""Per-image scores from the latent hierarchy: the ELBO, its parts, and the L^{>k} bounds.

Havtorn, Frellsen, Hauberg and Maaløe ("Hierarchical VAEs Know What They Don't Know", ICML
2021) score an image by how much of its likelihood bound depends on the latent layers nearest
the data. ``L^{>k}`` takes those k layers from the conditional prior's *mean* (they then carry no
KL) and every other layer from the posterior; ``LLR^{>k} = L - L^{>k}``, with ``L`` the ELBO or
the importance-weighted bound, is large for images the model explains through low-level
detail only: out-of-distribution images. In this project's top-down order (layer 1 at the top)
``L^{>k}`` is the pass in which the first N - k layers use the posterior, the masked path that
`vdvl first-k` draws.

Everything here is per image and in *negative* bounds (bits per dimension, lower = more likely),
as `vdvl eval` reports them; so ``llr = neg_elbo_gt_k - neg_elbo`` (or ``- neg_iw``), higher
meaning more likely out of distribution. The KL of each layer is in nats per image.

One bottom-up (encoder) pass per batch serves the ELBO, every k and every importance sample:
the skips are deterministic, so only the top-down path is run again, and an L^{>k} pass runs
only the k layers it changes, from the state the ELBO pass had there. Noise comes from one
generator per image (:class:`~vdvae_latents.model.distributions.RowGenerators`) seeded from the
image's index, so an image gets the same scores in any batch and on any torchrun rank.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from ..core.errors import UserError
from .distributions import RowGenerators
from .evaluation import iw_log_weights
from .vae import VAEOutput

LN2 = math.log(2.0)


def parse_ks(text: str | Sequence[int] | None, n_layers: int) -> list[int]:
    """``--k``: 'all' (1..N), a comma list such as '1,2,3', or None (the default: 1 and 2).

    k counts the latent layers nearest the data that the bound takes from the prior; each must
    lie in 1..N, N the model's latent layers. The list comes back sorted without repeats.
    """
    if text is None:
        ks = [k for k in (1, 2) if k <= n_layers]
    elif isinstance(text, str):
        if text.strip().lower() == "all":
            return list(range(1, n_layers + 1))
        try:
            ks = [int(part) for part in text.split(",") if part.strip()]
        except ValueError:
            raise UserError(f"--k must be 'all' or a comma list of layer counts such as 1,2,3, not '{text}'.") from None
        if not ks:
            raise UserError(f"--k must name at least one layer count, not '{text}'.")
    else:
        ks = [int(k) for k in text]
    bad = [k for k in ks if not 1 <= k <= n_layers]
    if bad:
        raise UserError(f"--k {bad[0]} is not a number of latent layers between 1 and {n_layers} (this model's).")
    return sorted(set(ks))


def score_columns(n_layers: int, ks: Sequence[int], iw: int) -> list[str]:
    """The names of :func:`score_batch`'s columns, in order."""
    names = ["neg_elbo_bpd", "recon_bpd"] + [f"kl_layer{i}_nats" for i in range(1, n_layers + 1)]
    if iw:
        names.append("neg_iw_bpd")
    names += [f"neg_elbo_gt{k}_bpd" for k in ks] + [f"llr_gt{k}_bpd" for k in ks]
    return names


def row_seeds(seed: int, rows: np.ndarray | Sequence[int], stream: int = 0) -> list[int]:
    """One 63-bit seed per image, a hash of (``seed``, ``stream``, its row index): independent streams."""
    return [int(np.random.SeedSequence((int(seed), 3 + stream, int(r))).generate_state(1, dtype=np.uint64)[0] >> 1)
            for r in rows]


@torch.no_grad()
def score_batch(model, x: torch.Tensor, ks: Sequence[int], *, rows: Sequence[int], seed: int = 0,
                iw: int = 0) -> np.ndarray:
    """Scores of a prepared batch ``x`` (model scale) whose images are ``rows`` of their split:
    float64 (B, len(score_columns(...))).

    The ELBO and every L^{>k} pass draw the same posterior noise (each starts the images' own
    streams afresh), so the layers above the k prior ones get the same z in both and LLR^{>k}
    measures the k layers alone; the importance samples draw from a second stream.
    """
    n_layers, dims = model.cfg.n_layers, model.cfg.dims_per_image
    seeds = row_seeds(seed, rows)
    skips = model.bottom_up(x)  # the encoder, once for everything below

    def bound(generators, active=None, **top_down) -> tuple[torch.Tensor, torch.Tensor, list]:
        """(-log p(x | z), KL per layer run (B, layers) in nats, the layers) of one top-down pass."""
        plans = model.make_plans(active=active, posterior="sample", masked="mean", temperature=1.0, given=None,
                                 generator=generators, batch=x.shape[0], device=x.device)
        features, layers = model.top_down(skips, x.shape[0], plans, **top_down)
        nll = -model.head.log_prob(features, x).to(torch.float64)
        kl = torch.stack([layer.kl.to(torch.float64).flatten(1).sum(1) for layer in layers], 1)
        return nll, kl, layers

    entering: list[torch.Tensor] = []
    nll, kl, _ = bound(RowGenerators(seeds), entering=entering)
    neg_elbo = (nll + kl.sum(1)) / dims / LN2
    columns = [neg_elbo, nll / dims / LN2, *kl.T]
    reference = neg_elbo
    if iw:
        streams, log_w = RowGenerators(row_seeds(seed, rows, stream=1)), []
        for _ in range(iw):
            nll_i, _, layers = bound(streams)
            log_w.append(iw_log_weights(VAEOutput(nll=nll_i, layers=layers, features=None, dims_per_image=dims)))
        reference = -(torch.logsumexp(torch.stack(log_w), 0) - math.log(iw)) / dims / LN2
        columns.append(reference)
    shapes = model.cfg.layer_shapes()
    gt_k = []
    for k in ks:
        # The k layers nearest the data (the last k, top-down) take the prior mean and carry no KL.
        # The layers above them drew the ELBO pass's noise, so their z, KL and the state entering
        # layer N - k are the ELBO pass's: the pass starts there. (The prior layers use no noise.)
        j = n_layers - k
        active = [None] * j + [torch.zeros(shape, dtype=torch.bool) for shape in shapes[j:]]
        nll_k, _, _ = bound(RowGenerators(seeds), active, start=(j, entering[j]))
        gt_k.append((nll_k + kl[:, :j].sum(1)) / dims / LN2)
    columns += gt_k + [g - reference for g in gt_k]
    return torch.stack([c.to(torch.float64) for c in columns], 1).cpu().numpy()


def to_channels(batch: np.ndarray, channels: int) -> np.ndarray:
    """uint8 (B, H, W, C) with ``channels`` channels: RGB -> gray by ITU-R 601 luma (what Pillow's
    ``convert('L')`` does), gray -> RGB by repetition; unchanged when C already matches."""
    c = batch.shape[-1]
    if c == channels:
        return batch
    if c == 1 and channels == 3:
        return np.repeat(batch, 3, axis=-1)
    if c == 3 and channels == 1:
        luma = batch.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
        return np.clip(np.rint(luma), 0, 255).astype(np.uint8)[..., None]
    raise UserError(f"cannot convert images with {c} channels to {channels}.")


@torch.no_grad()
def score_images(model, images, ks: Sequence[int], *, iw: int = 0, seed: int = 0, batch_size: int = 128,
                 device: torch.device | str | None = None, convert_channels: bool = False,
                 progress=None) -> np.ndarray:
    """:func:`score_batch` over every image of ``images`` (a LazyImages or ImageSet split, or uint8
    (N, H, W, C)): float64 (N, len(score_columns(...))). Image i's noise comes from (``seed``, i)."""
    from .inputs import prepare_batch  # noqa: PLC0415 - beside its only use

    param = next(model.parameters())
    device = param.device if device is None else device
    n = len(images)
    out = np.empty((n, len(score_columns(model.cfg.n_layers, ks, iw))), dtype=np.float64)
    was_training = model.training
    model.eval()
    try:
        for lo in range(0, n, batch_size):
            rows = np.arange(lo, min(n, lo + batch_size))
            batch = _read(images, rows)
            if convert_channels:
                batch = to_channels(batch, model.cfg.channels)
            x = prepare_batch(model.cfg, batch, device=device).to(param.dtype)  # a float64 model scores in float64
            out[rows] = score_batch(model, x, ks, rows=rows, seed=seed, iw=iw)
            if progress is not None:
                progress(len(rows))
    finally:
        model.train(was_training)
    return out


def _read(images, rows: np.ndarray) -> np.ndarray:
    if isinstance(images, np.ndarray):
        return images[rows]
    if hasattr(images, "read"):  # LazyImages: only these rows are read
        return images.read(rows)
    return images.images[rows]  # ImageSet
