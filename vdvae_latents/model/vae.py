"""The hierarchical VAE: bottom-up path, top-down path, output head.

One forward pass gives, per image, the reconstruction NLL (nats) and, per latent
layer, the per-element KL map (B, V, H, W) with the posterior and prior statistics.
The top-down pass takes per-layer masks (active dims use the posterior, pruned dims
the prior mean or a prior sample) and given values, so KL analysis, pruning,
encoding, decoding and unconditional sampling all share one code path.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from .blocks import (
    AvgPoolCell,
    LayerPlan,
    LayerResult,
    ResidualCell,
    StridedPool,
    TopDownBlock,
    Unpool,
    conv,
)
from .config import VDVAE_NO_BIAS_ABOVE, ModelConfig
from .heads import make_head
from .likelihoods import truncate_bits
from .recompute import run_checkpointed

Mask = torch.Tensor | None


@dataclass
class VAEOutput:
    """Result of :meth:`VAE.forward`. Per-image quantities have shape (B,)."""

    nll: torch.Tensor | None                # (B,) reconstruction NLL, nats per image; None: not computed
    layers: list[LayerResult]               # one per latent layer run, top-down order
    features: torch.Tensor | None           # final top-down state (input of the output head); None: stopped early
    dims_per_image: int                     # C*H*W of the scored region
    binary: bool = False                    # True: report nats per image (MNIST convention)
    extras: dict = field(default_factory=dict)

    @property
    def kl(self) -> list[torch.Tensor]:
        """Per-layer per-element KL maps (B, V, H, W), nats."""
        return [layer.kl for layer in self.layers]

    @property
    def kl_per_image(self) -> torch.Tensor:
        return sum(k.sum((1, 2, 3)) for k in self.kl)

    @property
    def elbo_per_image(self) -> torch.Tensor:
        """Negative ELBO in nats per image, (B,)."""
        return self.nll + self.kl_per_image

    @property
    def loss(self) -> torch.Tensor:
        """Mean negative ELBO in nats/dim: the training objective."""
        return self.elbo_per_image.mean() / self.dims_per_image

    def summary(self) -> dict[str, float]:
        """Batch means: negative ELBO / reconstruction / KL in nats/dim and bits/dim."""
        d = self.dims_per_image
        nll, kl = self.nll.mean().item(), self.kl_per_image.mean().item()
        out = {
            "nats_per_dim": (nll + kl) / d,
            "bits_per_dim": (nll + kl) / d / math.log(2),
            "recon_bits_per_dim": nll / d / math.log(2),
            "kl_bits_per_dim": kl / d / math.log(2),
        }
        if self.binary:
            out.update(nats_per_image=nll + kl, recon_nats_per_image=nll, kl_nats_per_image=kl)
        return out


class VAE(nn.Module):
    """Efficient-VDVAE (``architecture="efficient"``) or the original VDVAE (``"vdvae"``).

    Inputs are images in [-1, 1], shape (B, C, image_size, image_size) (already
    padded when ``cfg.pad`` > 0; binary data as -1/1).
    """

    # Recompute each bottom-up cell and top-down block in the backward pass (set by
    # training from train.checkpoint_activations): exact gradients, far less memory.
    checkpoint_activations: bool = False

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        # Built in a fixed order, which fixes two things saved runs rely on: the order the
        # weights draw from the RNG (same seed, same model) and the parameter order the
        # optimiser's state follows.
        self.input_conv, self.down_cells, self.skip_proj, self.pools = _bottom_up_modules(cfg)
        self.initial_state, self.unpools, self.up_blocks, res_biases = _top_down_modules(cfg)
        for i, bias in enumerate(res_biases):
            # A trainable state added after each upsampling (Efficient-VDVAE's unpool bias; VDVAE's
            # bias_xs, which VDVAE leaves out above 64x64 to save memory).
            self.register_parameter(f"res_bias_{i}", bias)
        if cfg.output_gain:
            self.final_gain = nn.Parameter(torch.ones(1, cfg.widths[-1], 1, 1))
            self.final_bias = nn.Parameter(torch.zeros(1, cfg.widths[-1], 1, 1))
        else:
            self.final_gain = self.final_bias = None
        self.head = make_head(cfg, cfg.widths[-1])
        # Which skip (index into bottom_up()'s list) each latent layer reads, top-down order.
        self.skip_of_layer = skip_of_layer(cfg)

    def use_channels_last(self) -> VAE:
        """Weights and activations in NHWC (channels_last), in place: every block keeps that layout."""
        self.to(memory_format=torch.channels_last)
        for module in self.modules():
            if isinstance(module, Unpool):
                # From a 1x1 input interpolate cannot tell the layout; it is told to keep NHWC.
                module.channels_last = True
        return self

    # ------------------------------------------------------------------ paths
    def bottom_up(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The skip activations, in the order the top-down path reads them (lowest first)."""
        self._check_input(x)
        cfg = self.cfg
        if cfg.bit_reduction == "truncate-all" and cfg.n_bits < 8:
            x = truncate_bits(x, cfg.n_bits)  # the official code's encoder sees the truncated image
        if cfg.normalises_input:
            # Applied before the first conv, not folded into it: its zero padding must see
            # zeros in the normalised space for the result to match the reference.
            x = (x + cfg.input_shift) * cfg.input_scale
        h = self.input_conv(x)
        per_res: list[list[torch.Tensor]] = [[] for _ in cfg.resolutions]
        for i in reversed(range(len(cfg.resolutions))):
            cells, projections = self.down_cells[i], self.skip_proj[i]
            if not isinstance(projections, nn.ModuleList):
                for cell in cells:
                    h = self._call(cell, h)
                per_res[i] = [projections(h)]
            else:
                # Groups run last to first: the skip taken nearest the image feeds the
                # resolution's last top-down group (the skips mirror the top-down order).
                start = 0
                down_groups = cfg.skip_groups(i)[1]
                for k in reversed(range(len(down_groups))):
                    for cell in cells[start:start + down_groups[k]]:
                        h = self._call(cell, h)
                    start += down_groups[k]
                    per_res[i].insert(0, projections[k](h))
            h = self.pools[i](h)
        return [skip for skips in per_res for skip in skips]

    def top_down(self, skips: list[torch.Tensor] | None, batch: int, plans: list[LayerPlan], *,
                 stop_after: int | None = None, start: tuple[int, torch.Tensor] | None = None,
                 entering: list[torch.Tensor] | None = None) -> tuple[torch.Tensor | None, list[LayerResult]]:
        """Run the generative path; with ``skips`` the posterior is available.

        ``stop_after=k`` stops after latent layer k (top-down order): the blocks below it never
        run, the results hold layers 0..k only and the returned state is None. Layer k's
        statistics are those of the full pass, and so are later batches' draws: the
        random numbers the skipped layers would have drawn are still taken from their
        generators (see :func:`skip_draws`).

        ``entering`` (a list) receives the state that enters each latent layer run; ``start=(j,
        state)`` begins at layer j with such a state, so passes that share the layers above j
        (per-image scores: model.scores) run them once. The results then hold layers j.. only.
        """
        cfg, n = self.cfg, self.cfg.n_layers
        last = n - 1 if stop_after is None else stop_after
        if not 0 <= last < n:
            raise ValueError(f"stop_after must name a latent layer (0..{n - 1}), got {stop_after}")
        first, state = (0, self.initial_state.expand(batch, -1, -1, -1)) if start is None else start
        results, k, stopping = [], 0, last < n - 1
        for i, blocks in enumerate(self.up_blocks):
            if stopping and k > last:
                break
            if i and k > first:  # a state entering layer `first` has been upsampled already
                state = enter_resolution(self, i, state)
            for block in blocks[:last + 1 - k]:
                if k >= first:
                    if entering is not None:
                        entering.append(state)
                    skip = None if skips is None else skips[self.skip_of_layer[k]]
                    state, result = self._call(block, state, skip, plans[k])
                    results.append(result)
                k += 1
        if stopping:
            skip_draws(cfg.layer_shapes()[last + 1:], plans[last + 1:], batch, posterior=skips is not None,
                       dtype=self.initial_state.dtype, device=self.initial_state.device)
            return None, results
        if self.final_gain is not None:
            state = state * self.final_gain + self.final_bias
        return state, results

    def _call(self, block: nn.Module, *args):
        """Run one block, under activation checkpointing when training asks for it."""
        if not (self.checkpoint_activations and torch.is_grad_enabled()):
            return block(*args)
        plan = args[-1] if isinstance(args[-1], LayerPlan) else None  # top-down blocks sample; cells do not
        generator = plan.generator if plan is not None else None
        return run_checkpointed(block, *args, generator=generator,
                                uses_global_rng=plan is not None and generator is None)

    # ------------------------------------------------------------------ public API
    def forward(self, x: torch.Tensor, *, active: Sequence[Mask] | None = None, posterior: str = "sample",
                masked: str = "mean", temperature: float | Sequence[float] = 1.0,
                given: Sequence[tuple[torch.Tensor, Mask] | None] | None = None,
                generator: torch.Generator | None = None, stop_after: int | None = None,
                likelihood: bool = True, posterior_layers: Sequence[bool] | None = None) -> VAEOutput:
        """Encode ``x`` and score it: negative ELBO pieces per image.

        active: per layer a bool mask (V, H, W) of dims that use the posterior (None
            entries or ``active=None``: all). Pruned dims take the prior mean
            (``masked="mean"``) or a prior sample at ``temperature``; their KL is 0.
        posterior: "sample" (training, ELBO) or "mean" (deterministic encodings).
        given: per layer (values (B, V, H, W), mask (V, H, W) or None) to force z.
        stop_after: run the top-down path down to this latent layer only (encodings of the
            layers above it need nothing below); ``layers`` then ends there and there is no
            likelihood (``nll`` and ``features`` are None).
        likelihood: False skips the output head (``nll`` is None): KL statistics need every
            layer but not p(x | z).
        posterior_layers: per layer whether its posterior net runs (None: every layer's). A
            layer marked False must have no active dim (an all-False ``active`` mask): its z
            is the prior's and its ``q_mean``, ``q_std`` and ``kl`` are None. Encodings need
            the kept layers' posteriors only.
        """
        plans = self.make_plans(active=active, posterior=posterior, masked=masked, temperature=temperature,
                                given=given, generator=generator, batch=x.shape[0], device=x.device,
                                posterior_layers=posterior_layers)
        skips = self.bottom_up(x)
        features, layers = self.top_down(skips, x.shape[0], plans, stop_after=stop_after)
        nll = -self.head.log_prob(features, x) if likelihood and features is not None else None
        return VAEOutput(nll=nll, layers=layers, features=features, dims_per_image=self.cfg.dims_per_image,
                         binary=self.cfg.output == "bernoulli")

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor, *, deterministic: bool = True, **kwargs) -> torch.Tensor:
        """Reconstructions in [-1, 1] (cropped to the scored region); kwargs as :meth:`forward`."""
        out = self.forward(x, **kwargs)
        return self.head.sample(out.features, deterministic=deterministic, generator=kwargs.get("generator"))

    @torch.no_grad()
    def sample(self, n: int, *, temperature: float | Sequence[float] = 1.0, given=None,
               masked: str = "sample", deterministic_output: bool = False,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """Unconditional samples (or decodings when ``given`` values are provided).

        Every latent that is not given comes from the prior: a sample at the layer's
        temperature (one value, or one per layer), or the prior mean with
        ``masked="mean"``.
        """
        device = self.initial_state.device
        plans = self.make_plans(active=None, posterior="sample", masked=masked, temperature=temperature,
                                given=given, generator=generator, batch=n, device=device)
        features, _ = self.top_down(None, n, plans)
        out_t = plans[-1].temperature if masked == "sample" else 1.0
        return self.head.sample(features, temperature=out_t, deterministic=deterministic_output, generator=generator)

    def make_plans(self, *, active, posterior, masked, temperature, given, generator, batch, device,
                   posterior_layers=None) -> list[LayerPlan]:
        """Validate per-layer options and turn them into one :class:`LayerPlan` per layer (see :func:`layer_plans`)."""
        return layer_plans(self.cfg.layer_shapes(), active=active, posterior=posterior, masked=masked,
                           temperature=temperature, given=given, generator=generator, batch=batch, device=device,
                           posterior_layers=posterior_layers)

    def _check_input(self, x: torch.Tensor) -> None:
        c, s = self.cfg.channels, self.cfg.image_size
        if x.ndim != 4 or tuple(x.shape[1:]) != (c, s, s):
            raise ValueError(f"model expects images of shape (B, {c}, {s}, {s}), got {tuple(x.shape)}")



def enter_resolution(model: VAE, i: int, state: torch.Tensor) -> torch.Tensor:
    """The top-down state moving up to resolution ``i`` of ``model``: upsampled, plus its bias."""
    cfg = model.cfg
    if cfg.architecture == "efficient":
        state = model.unpools[i](state)
    else:
        # A narrower resolution keeps the first channels (openai/vdvae's custom widths).
        factor = cfg.resolutions[i] // cfg.resolutions[i - 1]
        state = torch.nn.functional.interpolate(state[:, :cfg.widths[i]], scale_factor=factor, mode="nearest")
    bias = getattr(model, f"res_bias_{i}")
    return state if bias is None else state + bias


def skip_draws(shapes: Sequence[tuple[int, int, int]], plans: Sequence[LayerPlan], batch: int, *, posterior: bool,
               dtype: torch.dtype, device: torch.device) -> None:
    """Take from each plan's generator the normal draws its top-down block would have made.

    A pass that stops early (``stop_after``) must leave the generators where the full pass
    leaves them, or the next batch sharing a generator would see other noise. A block draws,
    in this order, a posterior sample (images given, ``posterior="sample"``) and a prior
    sample (no images, or a mask, with ``masked="sample"`` at a non-zero temperature), each
    of shape (B, V, H, W) in float32 (float64 for a float64 model); see
    :func:`~vdvae_latents.model.distributions.gaussian_sample`.
    """
    noise_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    for shape, plan in zip(shapes, plans):
        draws = int(posterior and plan.posterior == "sample")
        prior_needed = not posterior or plan.active is not None
        draws += int(prior_needed and plan.masked == "sample" and plan.temperature != 0)
        draw_device = plan.generator.device if plan.generator is not None else device
        for _ in range(draws):
            torch.randn((batch, *shape), generator=plan.generator, dtype=noise_dtype, device=draw_device)


def layer_plans(shapes: list[tuple[int, int, int]], *, active, posterior, masked, temperature, given, generator, batch,
                device, posterior_layers=None) -> list[LayerPlan]:
    """The masked top-down path's per-layer instructions, validated: for layer k of ``shapes`` (V, H, W),
    which dims take the posterior (``active[k]``, None: all), whether the posterior is sampled
    or its mean taken, how pruned dims draw from the prior (``masked``, ``temperature``) and
    which values are forced (``given[k]``: values (B, V, H, W) and a mask or None)."""
    n = len(shapes)
    if posterior not in ("sample", "mean"):
        raise ValueError(f"posterior must be 'sample' or 'mean', not {posterior!r}")
    if masked not in ("sample", "mean"):
        raise ValueError(f"masked must be 'sample' or 'mean', not {masked!r}")
    temps = list(temperature) if isinstance(temperature, Sequence) else [float(temperature)] * n
    for name, seq in (("active", active), ("given", given), ("temperature", temps),
                      ("posterior_layers", posterior_layers)):
        if seq is not None and len(seq) != n:
            raise ValueError(f"{name} must have one entry per latent layer ({n}), got {len(seq)}")
    plans = []
    for k, shape in enumerate(shapes):
        a = None if active is None else active[k]
        if a is not None:
            a = torch.as_tensor(a, dtype=torch.bool, device=device)
            if tuple(a.shape) != shape:
                raise ValueError(f"active mask of layer {k} has shape {tuple(a.shape)}, expected {shape}")
        g = None if given is None else given[k]
        if g is not None:
            values, gmask = g
            if tuple(values.shape) != (batch, *shape):
                raise ValueError(f"given values of layer {k} have shape {tuple(values.shape)}, expected {(batch, *shape)}")
            g = (values.to(device), None if gmask is None else torch.as_tensor(gmask, dtype=torch.bool, device=device))
        runs_posterior = True if posterior_layers is None else bool(posterior_layers[k])
        if not runs_posterior and a is None:
            raise ValueError(f"layer {k} cannot skip its posterior net: every dim of it is active (give an "
                             "all-False active mask)")
        plans.append(LayerPlan(active=a, posterior=posterior, masked=masked, temperature=temps[k],
                               given=g, generator=generator, runs_posterior=runs_posterior))
    return plans


def _bottom_up_modules(cfg: ModelConfig) -> tuple[nn.Module, nn.ModuleList, nn.ModuleList, nn.ModuleList]:
    """The encoder: input conv, residual cells, skip projections and pools per resolution
    (index i in cfg order, lowest resolution first)."""
    res, widths, n, init, act = cfg.resolutions, cfg.widths, len(cfg.resolutions), cfg.init, cfg.activation
    efficient = cfg.architecture == "efficient"
    # Bottom-up residual cells get the same last-conv scaling: sqrt(1/L) in Efficient-VDVAE,
    # sqrt(1/number of encoder blocks) in VDVAE.
    n_down = max(1, sum(cfg.down_blocks) + n - 1)
    down_scale = math.sqrt(1.0 / (cfg.n_layers if efficient else n_down))
    input_conv = conv(cfg.channels, widths[-1], 1 if efficient else 3, init=init)
    down_cells, skip_proj, pools = nn.ModuleList(), nn.ModuleList(), nn.ModuleList()
    for i in range(n):
        w, mid = widths[i], cfg.mid_width(i)
        down_cells.append(nn.Sequential(*[
            ResidualCell(w, mid, w, resolution=res[i], activation=act, residual=True, last_scale=down_scale,
                         init=init)
            for _ in range(cfg.down_blocks[i])]))
        if not efficient:
            skip_proj.append(nn.Identity())
        elif cfg.up_skip_groups is None:
            skip_proj.append(conv(w, cfg.skip_widths[i], 1, init=init))
        else:  # one projection per skip group: skip_proj.{i}.{k}
            skip_proj.append(nn.ModuleList([conv(w, cfg.skip_widths[i], 1, init=init) for _ in cfg.skip_groups(i)[0]]))
        if i == 0:
            pools.append(nn.Identity())  # nothing below the lowest resolution
        elif efficient:
            pools.append(StridedPool(w, widths[i - 1], res[i] // res[i - 1], init=init))
        else:
            pools.append(AvgPoolCell(w, mid, res[i] // res[i - 1], resolution=res[i], activation=act,
                                     last_scale=down_scale, out_width=widths[i - 1]))
    return input_conv, down_cells, skip_proj, pools


def _top_down_modules(cfg: ModelConfig) -> tuple[nn.Parameter, nn.ModuleList, nn.ModuleList, list[nn.Parameter | None]]:
    """The decoder: its initial state, the unpools (efficient only), the top-down blocks per
    resolution, and the per-resolution trainable state (None where the architecture has none)."""
    res, widths, init = cfg.resolutions, cfg.widths, cfg.init
    efficient = cfg.architecture == "efficient"
    skip_widths = cfg.skip_widths if efficient else widths
    initial_state = nn.Parameter(torch.zeros(1, widths[0], res[0], res[0]))
    if init == "xavier":  # the official code's initial state (its `trainable_h`)
        nn.init.kaiming_uniform_(initial_state, nonlinearity="linear")
    unpools, up_blocks, biases = nn.ModuleList(), nn.ModuleList(), []
    for i in range(len(res)):
        factor = res[i] // res[i - 1] if i else 1
        if efficient:
            unpools.append(Unpool(widths[i - 1], widths[i], factor, init=init) if i else nn.Identity())
        has_bias = i > 0 and (efficient or res[i] <= VDVAE_NO_BIAS_ABOVE)
        biases.append(nn.Parameter(torch.zeros(1, widths[i], res[i], res[i])) if has_bias else None)
        up_blocks.append(nn.ModuleList([
            TopDownBlock(widths[i], skip_widths[i], cfg.variates[i], res[i], mid=cfg.mid_width(i),
                         n_layers=cfg.n_layers, architecture=cfg.architecture, activation=cfg.activation,
                         latent_beta=cfg.latent_beta, init=init)
            for _ in range(cfg.up_blocks[i])]))
    return initial_state, unpools, up_blocks, biases

def skip_of_layer(cfg: ModelConfig) -> list[int]:
    """For each latent layer (top-down order), the index of the skip it reads."""
    out: list[int] = []
    skip = 0
    for i in range(len(cfg.resolutions)):
        for size in cfg.skip_groups(i)[0]:
            out += [skip] * size
            skip += 1
    return out


# torch.nn.init's initialisers, which nn.Conv2d and :func:`~.blocks.conv` call while a model is built.
_INITIALISERS = ("uniform_", "normal_", "kaiming_uniform_", "xavier_uniform_", "zeros_", "ones_")


def meta_model(cfg: ModelConfig) -> VAE:
    """The model on the meta device: every parameter's name and shape, no memory, no values.

    The weight initialisers are no-ops while it is built: on meta tensors they only cost time
    (their decompositions were over half of ``vdvl presets --json``, which builds every preset).
    They are switched off process-wide while it runs: build real models on other threads meanwhile
    and they would keep torch.empty's values."""
    def skip(tensor, *args, **kwargs):
        return tensor

    saved = {name: getattr(nn.init, name) for name in _INITIALISERS}
    reset = nn.modules.conv._ConvNd.reset_parameters  # computes fans for the initialisers: a quarter of the rest
    try:
        for name in _INITIALISERS:
            setattr(nn.init, name, skip)
        nn.modules.conv._ConvNd.reset_parameters = skip
        with torch.device("meta"):
            return VAE(cfg)
    finally:
        for name, fn in saved.items():
            setattr(nn.init, name, fn)
        nn.modules.conv._ConvNd.reset_parameters = reset


def count_parameters(cfg: ModelConfig) -> int:
    """Parameter count without allocating weights (built on the meta device)."""
    return sum(p.numel() for p in meta_model(cfg).parameters())
