"""Output heads: map the top-down path's final state to p(x | z).

``MixtureOfLogisticsHead`` is the discretised mixture of logistics (PixelCNN++ style
RGB coupling) used for 8-bit and 5-bit images; ``BernoulliHead`` is for binary data.
Both score only the un-padded centre of the image (MNIST is padded 28 -> 32 for the
network but scored on 28 x 28, as the paper does).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .config import ModelConfig
from .distributions import softplus_std
from .likelihoods import (
    bernoulli_log_prob,
    discretized_mol_log_prob,
    sample_bernoulli,
    sample_mol,
    truncate_bits,
)


# Mixture elements (images x M x C x H x W) scored at once in inference: 8 CIFAR images.
_MOL_CHUNK_ELEMENTS = 2**18


def _crop(t: torch.Tensor, pad: int) -> torch.Tensor:
    return t[..., pad:t.shape[-2] - pad, pad:t.shape[-1] - pad] if pad else t


def _widen(t: torch.Tensor) -> torch.Tensor:
    """At least float32 (half precision is upcast; float64 stays float64)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


class MixtureOfLogisticsHead(nn.Module):
    def __init__(self, cfg: ModelConfig, width: int) -> None:
        super().__init__()
        self.m, self.c, self.n_bits, self.pad = cfg.n_mixtures, cfg.channels, cfg.n_bits, cfg.pad
        self.scale_kind = cfg.mol_scale_kind
        # openai/vdvae's 5-bit data: the input carries 8 bits, the target their top n_bits.
        self.truncated = cfg.bit_reduction in ("truncate", "truncate-all") and cfg.n_bits < 8
        self.top_edge = cfg.bit_reduction == "truncate-all"
        self.beta = cfg.output_beta
        self.floor = cfg.mol_floor
        self.tail = cfg.mol_tail
        n_coeffs = 3 if self.c == 3 else 0
        self.out = nn.Conv2d(width, self.m * (1 + 2 * self.c + n_coeffs), 1)

    def params(self, h: torch.Tensor) -> dict[str, torch.Tensor | None]:
        """Split the conv output into the mixture parameters (cropped to the scored region)."""
        raw = _widen(_crop(self.out(h), self.pad))
        b, _, hh, ww = raw.shape
        m, c = self.m, self.c
        # One split (not slices): its backward fills one gradient tensor in the input's layout.
        logits, means, scale_raw, coeff_raw = raw.split([m, m * c, m * c, raw.shape[1] - m * (1 + 2 * c)], dim=1)
        means = means.reshape(b, m, c, hh, ww)
        scale_raw = scale_raw.reshape(b, m, c, hh, ww)
        if self.scale_kind == "exp":
            scales = torch.exp(scale_raw.clamp(min=self.floor))
        elif self.scale_kind == "logstd":
            scales = torch.exp(self.beta * scale_raw.clamp(min=self.floor))
        else:
            scales = softplus_std(scale_raw, self.beta)
            scales = scales.clamp(min=math.exp(self.floor))
        coeffs = torch.tanh(coeff_raw.reshape(b, m, 3, hh, ww)) if c == 3 else None
        return dict(logit_weights=logits, means=means, scales=scales, coeffs=coeffs)

    def log_prob(self, h: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """log p(x | z) in nats per image, x in [-1, 1] (padded like the network input)."""
        target = _widen(_crop(x, self.pad))
        if self.truncated:
            target = truncate_bits(target, self.n_bits)
        params = self.params(h)
        options = dict(n_bits=self.n_bits, tail=self.tail, truncated=self.truncated, top_edge=self.top_edge)
        if torch.is_grad_enabled():  # training: one call, autograd keeps what it needs anyway
            return discretized_mol_log_prob(target, **options, **params)
        # Inference: a few images at a time keeps the dozen (B, M, C, H, W) temporaries of the
        # mixture small (they stay in cache and off the peak); each image's sum is unchanged.
        rows = max(1, _MOL_CHUNK_ELEMENTS // params["means"][0].numel())
        return torch.cat([
            discretized_mol_log_prob(target[lo:lo + rows], **options,
                                     **{k: None if v is None else v[lo:lo + rows] for k, v in params.items()})
            for lo in range(0, target.shape[0], rows)])

    def sample(self, h: torch.Tensor, *, temperature: float = 1.0, deterministic: bool = False,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """An image in [-1, 1] on the pixel grid (cropped to the scored region)."""
        return sample_mol(**self.params(h), n_bits=self.n_bits, temperature=temperature,
                          deterministic=deterministic, generator=generator, truncated=self.truncated)


class BernoulliHead(nn.Module):
    def __init__(self, cfg: ModelConfig, width: int) -> None:
        super().__init__()
        self.pad = cfg.pad
        self.out = nn.Conv2d(width, cfg.channels, 1)

    def log_prob(self, h: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """x holds binary pixels as -1/1 (the network's input scale); scored as 0/1."""
        logits = _widen(_crop(self.out(h), self.pad))
        target = (_crop(x, self.pad) > 0).to(logits.dtype)
        return bernoulli_log_prob(target, logits)

    def sample(self, h: torch.Tensor, *, temperature: float = 1.0, deterministic: bool = False,
               generator: torch.Generator | None = None) -> torch.Tensor:
        bits = sample_bernoulli(_widen(_crop(self.out(h), self.pad)), deterministic=deterministic,
                                generator=generator)
        return bits * 2 - 1


def make_head(cfg: ModelConfig, width: int) -> nn.Module:
    head = BernoulliHead(cfg, width) if cfg.output == "bernoulli" else MixtureOfLogisticsHead(cfg, width)
    if cfg.init == "xavier":  # the official code's output conv
        with torch.no_grad():
            nn.init.xavier_uniform_(head.out.weight)
            head.out.bias.zero_()
    return head
