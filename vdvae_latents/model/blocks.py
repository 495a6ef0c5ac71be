"""Building blocks of the (Efficient-)VDVAE: residual cells, pooling, top-down blocks.

Naming follows the paper: the bottom-up path (inference only) turns the image into
skip activations (one per resolution, or one per encoder block as in the official
configs; see ``ModelConfig.up_skip_groups``); the top-down path starts from a trainable state
at the lowest resolution and, block by block, draws a latent layer z_i and adds it
into the residual stream.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .act_conv import act_conv
from .distributions import gaussian_kl, gaussian_sample, softplus_std


def activation_fn(name: str):
    return F.silu if name == "silu" else F.gelu


def conv(in_ch: int, out_ch: int, kernel: int, *, scale: float = 1.0, stride: int = 1,
         init: str = "pytorch") -> nn.Conv2d:
    """A 'same' convolution with zero bias and weights optionally scaled at init.

    ``init="xavier"`` draws the weights Xavier-uniform (the official Efficient-VDVAE
    code's convolutions) instead of PyTorch's default, before the scaling.
    """
    layer = nn.Conv2d(in_ch, out_ch, kernel, stride=stride, padding=(kernel // 2 if stride == 1 else 0))
    if layer.weight.is_meta:  # shapes only (vae.meta_model): no values to set
        return layer
    with torch.no_grad():
        if init == "xavier":
            nn.init.xavier_uniform_(layer.weight)
        layer.bias.zero_()
        if scale != 1.0:
            layer.weight.mul_(scale)
    return layer


class ResidualCell(nn.Module):
    """Pre-activation bottleneck: act -> 1x1 -> act -> 3x3 -> act -> 3x3 -> act -> 1x1.

    No normalisation layers (as in VDVAE). At 1x1 resolution the 3x3 kernels become
    1x1, since there are no neighbours to look at. ``last_scale`` multiplies the last
    conv's initial weights (sqrt(1/L) keeps the residual stream's variance from
    growing with depth); ``zero_last`` zero-initialises it (VDVAE's prior output).
    With ``init="xavier"`` (the official code's) the first 1x1 keeps PyTorch's default
    initialisation, bias included, and the other three are Xavier-uniform.
    """

    def __init__(self, in_ch: int, mid_ch: int, out_ch: int, *, resolution: int, activation: str,
                 residual: bool, last_scale: float = 1.0, zero_last: bool = False, init: str = "pytorch") -> None:
        super().__init__()
        if residual and in_ch != out_ch:
            raise ValueError("a residual cell needs equal input and output widths")
        k = 3 if resolution > 1 else 1
        self.residual = residual
        self.activation = activation
        self.c1 = nn.Conv2d(in_ch, mid_ch, 1) if init == "xavier" else conv(in_ch, mid_ch, 1)
        self.c2 = conv(mid_ch, mid_ch, k, init=init)
        self.c3 = conv(mid_ch, mid_ch, k, init=init)
        self.c4 = conv(mid_ch, out_ch, 1, scale=0.0 if zero_last else last_scale, init=init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = act_conv(self.c1, x, self.activation)  # = c1(act(x)), keeping only x for the backward pass
        h = act_conv(self.c2, h, self.activation)
        h = act_conv(self.c3, h, self.activation)
        h = act_conv(self.c4, h, self.activation)
        return x + h if self.residual else h


class StridedPool(nn.Module):
    """Efficient-VDVAE's trainable pool: strided conv + LeakyReLU(0.1); may change width."""

    def __init__(self, in_ch: int, out_ch: int, factor: int, init: str = "pytorch") -> None:
        super().__init__()
        self.conv = conv(in_ch, out_ch, factor, stride=factor, init=init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.leaky_relu(self.conv(x), 0.1)


class AvgPoolCell(nn.Module):
    """VDVAE's downsampling block: a residual cell followed by average pooling.

    With ``out_width > width`` the pooled activation gets zero channels appended, as
    openai/vdvae does where its ``custom_width_str`` widens the lower resolution.
    """

    def __init__(self, width: int, mid: int, factor: int, *, resolution: int, activation: str,
                 last_scale: float, out_width: int | None = None) -> None:
        super().__init__()
        self.cell = ResidualCell(width, mid, width, resolution=resolution, activation=activation,
                                 residual=True, last_scale=last_scale)
        self.factor = factor
        self.extra = (out_width or width) - width
        if self.extra < 0:
            raise ValueError("an average-pool cell can only widen the activation")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.avg_pool2d(self.cell(x), self.factor)
        return F.pad(h, (0, 0, 0, 0, 0, self.extra)) if self.extra else h


class Unpool(nn.Module):
    """Efficient-VDVAE's unpool: 1x1 conv + LeakyReLU(0.1) + nearest upsampling."""

    def __init__(self, in_ch: int, out_ch: int, factor: int, init: str = "pytorch") -> None:
        super().__init__()
        self.conv = conv(in_ch, out_ch, 1, init=init)
        self.factor = factor
        # From a 1x1 input interpolate cannot tell the layout and returns NCHW; a channels_last
        # model (train.channels_last) asks for NHWC so the blocks above do not mix layouts.
        self.channels_last = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.interpolate(F.leaky_relu(self.conv(x), 0.1), scale_factor=self.factor, mode="nearest")
        return out.contiguous(memory_format=torch.channels_last) if self.channels_last else out


@dataclass
class LayerPlan:
    """How one top-down block chooses its latent z.

    active: bool (V, H, W); True = posterior, False = prior substitute. None = all active.
    posterior: "sample" draws from q, "mean" takes q's mean (deterministic encodings).
    masked: "mean" or "sample" for dims that take the prior (and for every dim when
        there is no posterior, i.e. unconditional sampling / decoding).
    temperature: scales the prior std for prior samples.
    given: (values (B, V, H, W), mask (V, H, W) or None) — values that replace z on
        the masked positions (decoding stored encodings).
    runs_posterior: False (only with an all-False ``active``): the posterior net does not run,
        though a posterior sample's noise is still drawn, so the generator moves as in the
        full pass.
    """

    active: torch.Tensor | None = None
    posterior: str = "sample"
    masked: str = "mean"
    temperature: float = 1.0
    given: tuple[torch.Tensor, torch.Tensor | None] | None = None
    generator: torch.Generator | None = None
    runs_posterior: bool = True


@dataclass
class LayerResult:
    kl: torch.Tensor | None            # (B, V, H, W) nats; zero where pruned; None where no posterior ran
    q_mean: torch.Tensor | None
    q_std: torch.Tensor | None
    p_mean: torch.Tensor
    p_std: torch.Tensor
    z: torch.Tensor


class TopDownBlock(nn.Module):
    """Prior net on the state, posterior net on [state, skip], z projection, residual cell."""

    def __init__(self, width: int, skip_width: int, variates: int, resolution: int, *, mid: int,
                 n_layers: int, architecture: str, activation: str, latent_beta: float,
                 init: str = "pytorch") -> None:
        super().__init__()
        self.variates = variates
        self.efficient = architecture == "efficient"
        self.latent_beta = latent_beta
        scale = math.sqrt(1.0 / n_layers)
        common = dict(resolution=resolution, activation=activation, init=init)
        if self.efficient:
            # Efficient-VDVAE: the prior cell emits [residual (width), features (width)] and a
            # 1x1 latent layer maps features to (mean, std); likewise for the posterior.
            self.prior = ResidualCell(width, mid, 2 * width, residual=False, **common)
            self.prior_params = conv(width, 2 * variates, 1, init=init)
            self.posterior = ResidualCell(width + skip_width, mid, width, residual=False, **common)
            self.posterior_params = conv(width, 2 * variates, 1, init=init)
        else:
            # VDVAE: the prior cell emits [mean, log-std, residual] directly, zero-initialised.
            self.prior = ResidualCell(width, mid, 2 * variates + width, residual=False, zero_last=True, **common)
            self.prior_params = None
            self.posterior = ResidualCell(width + skip_width, mid, 2 * variates, residual=False, **common)
            self.posterior_params = None
        # Scaling the z projection by sqrt(1/L) is what keeps training from diverging at step 1.
        self.z_proj = conv(variates, width, 1, scale=scale, init=init)
        self.cell = ResidualCell(width, mid, width, residual=True, last_scale=scale, **common)

    def prior_stats(self, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(prior mean, prior std, residual added to the state)."""
        v, p = self.variates, self.prior(state)
        if self.efficient:
            width = state.shape[1]
            # split, not two slices: one backward node writes both gradients into one
            # tensor of the input's layout (two slices would each zero-fill a full-size,
            # contiguous-format gradient and add them: slow transposes under channels_last).
            residual, features = p.split([width, width], dim=1)
            mean, raw = self.prior_params(features).split(v, dim=1)
            return mean, self.std(raw), residual
        mean, raw, residual = p.split([v, v, p.shape[1] - 2 * v], dim=1)
        return mean, self.std(raw), residual

    def posterior_stats(self, state: torch.Tensor, skip: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q = self.posterior(torch.cat([state, skip], dim=1))
        if self.efficient:
            q = self.posterior_params(q)
        mean, raw = q.split(self.variates, dim=1)
        return mean, self.std(raw)

    def std(self, raw: torch.Tensor) -> torch.Tensor:
        return softplus_std(raw, self.latent_beta) if self.efficient else torch.exp(raw)

    def forward(self, state: torch.Tensor, skip: torch.Tensor | None,
                plan: LayerPlan) -> tuple[torch.Tensor, LayerResult]:
        p_mean, p_std, residual = self.prior_stats(state)
        kl = q_mean = q_std = None
        if skip is not None and not plan.runs_posterior:
            if plan.posterior == "sample":  # the noise the posterior sample takes, drawn and dropped
                gaussian_sample(p_mean, p_std, generator=plan.generator)
            skip = None  # every dim takes the prior (the plan's active mask is all False)
        if skip is not None:
            q_mean, q_std = self.posterior_stats(state, skip)
            kl = gaussian_kl(q_mean, q_std, p_mean, p_std)
            z_q = q_mean if plan.posterior == "mean" else gaussian_sample(q_mean, q_std, generator=plan.generator)

        prior_needed = skip is None or plan.active is not None
        if prior_needed:
            if plan.masked == "mean" or plan.temperature == 0:
                z_p = p_mean
            else:
                z_p = gaussian_sample(p_mean, p_std, plan.temperature, generator=plan.generator)

        if skip is None:
            z = z_p
        elif plan.active is None:
            z = z_q
        else:
            z = torch.where(plan.active, z_q, z_p)
            kl = kl * plan.active  # pruned dims follow the prior exactly: zero KL
        if plan.given is not None:
            values, mask = plan.given
            z = values.to(z.dtype) if mask is None else torch.where(mask, values.to(z.dtype), z)

        state = self.cell(state + residual + self.z_proj(z))
        return state, LayerResult(kl, q_mean, q_std, p_mean, p_std, z)
