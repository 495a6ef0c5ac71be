"""Diagonal-Gaussian helpers for the latent variables of the VDVAE.

Everything here is elementwise and broadcasts like ordinary tensor arithmetic. The
functions are written for the regimes a hierarchical VAE actually visits during
training: standard deviations that collapse towards zero, posteriors that equal their
priors exactly (inactive latents), and very large pre-activations.
"""

from __future__ import annotations

import math

import torch

__all__ = ["softplus_std", "gaussian_kl", "gaussian_log_prob", "gaussian_sample", "RowGenerators"]

_LOG_2PI = math.log(2.0 * math.pi)


def softplus_std(y: torch.Tensor, beta: float | torch.Tensor = 1.0) -> torch.Tensor:
    """Map an unconstrained pre-activation to a positive standard deviation.

    Returns ``log(1 + exp(beta * y)) / beta``. With ``beta = ln 2`` the map sends
    ``y = 0`` to exactly 1, so a freshly initialised layer whose output is near zero
    starts at unit standard deviation; ``beta = 1`` is the plain softplus.

    The value is computed as ``logaddexp(beta * y, 0) / beta``: ``logaddexp`` never
    forms ``exp`` of a large positive number (no overflow for ``y = 1e4``), returns
    exactly 0 with gradient 0 (not NaN) for very negative ``y``, and is exact on
    both sides, unlike a thresholded softplus that switches to the identity.

    Args:
        y: pre-activation, any shape and floating dtype.
        beta: sharpness, a positive float (or a tensor broadcastable to ``y``).
    """
    if not isinstance(beta, torch.Tensor) and not beta > 0:
        raise ValueError(f"softplus_std: beta must be positive, got {beta!r}")
    z = y * beta
    return torch.logaddexp(z, torch.zeros((), dtype=z.dtype, device=z.device)) / beta


def gaussian_kl(
    mu_q: torch.Tensor, std_q: torch.Tensor, mu_p: torch.Tensor, std_p: torch.Tensor
) -> torch.Tensor:
    """Elementwise ``KL(N(mu_q, std_q^2) || N(mu_p, std_p^2))`` in nats.

    The textbook form ``log(std_p/std_q) + (std_q^2 + (mu_q-mu_p)^2) / (2 std_p^2) - 1/2``
    squares the standard deviations (underflow for std below ~1e-19 in float32) and
    subtracts 1/2 from a number that is close to 1/2 when q is close to p. Writing
    ``d = log std_q - log std_p`` it becomes

        KL = 0.5 * (expm1(2 d) - 2 d) + 0.5 * ((mu_q - mu_p) / std_p)^2

    which only involves a log *difference* (no squares of tiny numbers), is exactly 0
    when q == p (d = 0 and the mean term is 0), and does not go negative in floating
    point: ``2 d`` is exact and ``expm1(x) >= x`` survives (correct) rounding.

    All four arguments broadcast against each other; stds must be positive.
    """
    log_ratio = torch.log(std_q) - torch.log(std_p)
    var_term = torch.expm1(2.0 * log_ratio) - 2.0 * log_ratio
    mean_term = ((mu_q - mu_p) / std_p) ** 2
    return 0.5 * (var_term + mean_term)


def gaussian_log_prob(z: torch.Tensor, mu: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Elementwise log-density of ``z`` under ``N(mu, std^2)`` in nats (broadcasting).

    Uses ``-0.5 * ((z - mu) / std)^2 - log std - 0.5 log(2 pi)``: the standardised
    residual is formed before squaring so that small stds do not underflow.
    """
    return -0.5 * ((z - mu) / std) ** 2 - torch.log(std) - 0.5 * _LOG_2PI


def gaussian_sample(
    mu: torch.Tensor,
    std: torch.Tensor,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Reparameterised sample ``mu + temperature * std * eps`` with ``eps ~ N(0, I)``.

    Gradients flow to ``mu`` and ``std``. The noise has the broadcast shape of ``mu``
    and ``std``. When a ``generator`` is given the noise is drawn on the generator's
    device (a CPU generator cannot fill a CUDA tensor) and then moved to ``mu``'s
    device, so a seeded CPU generator gives the same samples wherever the model runs.
    Low-precision (half/bfloat16) noise is drawn in float32 and cast, so the stream of
    random numbers does not depend on the model's dtype either.

    ``temperature = 0`` returns the mean (broadcast to the output shape).
    """
    shape = torch.broadcast_shapes(mu.shape, std.shape)
    dtype = torch.result_type(mu, std)
    noise_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    if isinstance(generator, RowGenerators):
        eps = generator.randn(shape, dtype=noise_dtype)
    else:
        noise_device = generator.device if generator is not None else mu.device
        eps = torch.randn(shape, generator=generator, dtype=noise_dtype, device=noise_device)
    eps = eps.to(device=mu.device, dtype=dtype)
    return mu + (temperature * std) * eps


class RowGenerators:
    """One seeded generator per image of a batch, usable wherever a ``torch.Generator`` is.

    With one generator per batch an image's noise depends on the batch it shares and its
    place in it; here row ``i`` of every draw comes from ``seeds[i]`` alone, so a per-image
    score is the same whatever the batch size or the torchrun shard that computes it.
    """

    def __init__(self, seeds, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.generators = [torch.Generator(device=self.device).manual_seed(int(s)) for s in seeds]

    def __len__(self) -> int:
        return len(self.generators)

    def randn(self, shape, *, dtype: torch.dtype) -> torch.Tensor:
        """Standard normal noise of ``shape`` (B, ...), row i drawn from generator i."""
        if shape[0] != len(self.generators):
            raise ValueError(f"{len(self.generators)} row generators cannot fill a batch of {shape[0]}")
        return torch.stack([torch.randn(tuple(shape[1:]), generator=g, dtype=dtype, device=self.device)
                            for g in self.generators])
