"""One optimisation step, the callable that both ``vdvl train`` and the benchmarks run.

:class:`TrainStep` does forward -> loss (KL weight and KL balancing) -> backward ->
gradient norm (clip, skip) -> optimiser update -> EMA, and returns the step's numbers
as device tensors, so the only host synchronisation in a step is the skip decision
(the gradient norm has to reach the host to decide whether to update). Nothing of the
step outlives it: outputs and gradients are released before the next forward pass.
"""

from __future__ import annotations

import contextlib
import gc
import math
import warnings
from dataclasses import dataclass

import torch
from torch.nn.parallel import DistributedDataParallel

from ..model.precision import cpu_has_native_bf16  # noqa: F401 (also this module's API)
from ..model.vae import VAE
from .config import TrainConfig
from .run_config import RunConfig
from .schedules import kl_balancing, kl_weight, learning_rate


# ----------------------------------------------------------------------------- EMA
class EMA:
    """Exponential moving average of the weights (the weights used for evaluation).

    With ``warmup`` (the project's default) the decay is min(decay, (1 + n) / (10 + n))
    over the n updates so far, so that a short run's EMA is not stuck near the initial
    weights (with 0.9999 the average would need ~10k updates to forget them). Without
    it every update uses ``decay``, as the official Efficient-VDVAE and VDVAE code do.
    """

    def __init__(self, model: torch.nn.Module, decay: float, warmup: bool = True) -> None:
        self.decay = decay
        self.warmup = warmup
        self.updates = 0
        self.shadow = {k: v.detach().clone() for k, v in model.state_dict().items()}

    def current_decay(self) -> float:
        return min(self.decay, (1 + self.updates) / (10 + self.updates)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        decay = self.current_decay()
        self.updates += 1
        state = model.state_dict()
        floats = [(self.shadow[k], v) for k, v in state.items() if v.dtype.is_floating_point]
        if floats:
            torch._foreach_lerp_([a for a, _ in floats], [b.detach() for _, b in floats], 1.0 - decay)
        for k, v in state.items():
            if not v.dtype.is_floating_point:
                self.shadow[k].copy_(v)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.shadow

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for k, v in state.items():
            self.shadow[k].copy_(v)


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    kwargs = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, weight_decay=cfg.weight_decay)
    kind = {"adamax": torch.optim.Adamax, "adamw": torch.optim.AdamW, "adam": torch.optim.Adam}[cfg.optimizer]
    return kind(model.parameters(), **kwargs)


def build_model(run: RunConfig, device: torch.device) -> tuple[VAE, EMA, torch.optim.Optimizer]:
    """The model (seeded init), its EMA and optimiser, placed and configured for ``device``."""
    tcfg = run.train
    torch.manual_seed(tcfg.seed)
    model = VAE(run.model)
    model.to(device)
    model.checkpoint_activations = tcfg.checkpoint_activations
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = tcfg.tf32
        torch.backends.cudnn.allow_tf32 = tcfg.tf32
    if tcfg.channels_last:  # NHWC: oneDNN (CPU) and cuDNN convolutions skip layout reorders
        model.use_channels_last()
    # Made last, so the averages share the weights' device and layout (the per-step lerp
    # then runs on matching strides).
    ema = EMA(model, tcfg.ema_decay, warmup=tcfg.ema_warmup)
    return model, ema, make_optimizer(model, tcfg)


def autocast_for(device: torch.device, tcfg: TrainConfig):
    """bf16 autocast on CUDA (``bf16``) or on a CPU with native bf16 (``cpu_bf16``); fp32 otherwise."""
    if device.type == "cuda" and tcfg.bf16:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    if device.type == "cpu" and tcfg.cpu_bf16 and cpu_has_native_bf16():
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


# ----------------------------------------------------------------------------- KL balancing
def balanced_kl(kl_per_layer: torch.Tensor, elements: torch.Tensor | None) -> torch.Tensor:
    """NVAE's KL balancing ("gamma"), as Efficient-VDVAE computes it.

    ``kl_per_layer`` (L,) is each layer's KL in nats per image (batch mean). Each layer
    gets the weight ``alpha_l = L * a_l / sum(a)``, with ``a_l`` the layer's KL per
    latent element (``elements`` (L,) given: the official ``scaled_gamma``) or the
    layer's KL itself (``elements=None``); the weights are constants for the gradient.
    Returns ``sum_l alpha_l * KL_l``: the total KL when all ``a_l`` are equal, more
    weight on the layers that carry more KL, so that collapsing layers are not pushed
    further towards the prior. (If every layer's KL is exactly 0 the weights are 0.)
    """
    a = (kl_per_layer / elements if elements is not None else kl_per_layer).detach()
    alpha = len(a) * a / a.sum().clamp_min(torch.finfo(a.dtype).tiny)
    return (alpha * kl_per_layer).sum()


# ----------------------------------------------------------------------------- the step
@dataclass
class StepStats:
    """One step's numbers. ``nll``/``kl`` are 0-d device tensors (batch means, nats per image)."""

    nll: torch.Tensor
    kl: torch.Tensor
    grad_norm: float
    skipped: bool


def gradient_norm(parameters, max_norm: float) -> torch.Tensor:
    """Total 2-norm of the gradients; they are clipped to ``max_norm`` when it is > 0."""
    if max_norm > 0:
        return torch.nn.utils.clip_grad_norm_(parameters, max_norm)
    # Without clipping, clip_grad_norm_ would still multiply every gradient by 1.
    return torch.nn.utils.get_total_norm([p.grad for p in parameters if p.grad is not None])


class TrainStep:
    """The training step of ``vdvl train``: ``step_fn(x, step, generator) -> StepStats``.

    ``model`` is the bare :class:`VAE` (its parameters are clipped, updated and averaged);
    the forward pass goes through DDP when the process group has several ranks and
    through ``torch.compile`` when the run asks for it.
    """

    def __init__(self, model: VAE, ema: EMA, optimizer: torch.optim.Optimizer, run: RunConfig,
                 device: torch.device, world_size: int = 1) -> None:
        self.model, self.ema, self.optimizer, self.tcfg = model, ema, optimizer, run.train
        self.dims = run.model.dims_per_image
        self.params = [p for p in model.parameters() if p.requires_grad]
        shapes = run.model.layer_shapes()
        self.elements = torch.tensor([v * h * w for v, h, w in shapes], dtype=torch.float32, device=device)
        net: torch.nn.Module = model
        if world_size > 1:
            net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        self.net = net
        # Compiled lazily: inductor builds its kernels in the first step (minutes on a small CPU);
        # where it cannot (no C++ compiler, no Triton, an unsupported op) the step runs eagerly.
        self.compiled = torch.compile(net) if self.tcfg.compile else None
        self.compile_checked = False
        self.autocast = autocast_for(device, self.tcfg)

    def forward(self, x: torch.Tensor, generator: torch.Generator | None):
        if self.compiled is None:
            return self.net(x, generator=generator)
        if self.compile_checked:
            return self.compiled(x, generator=generator)
        state = generator.get_state() if generator is not None else None
        try:
            out = self.compiled(x, generator=generator)
        except Exception as err:  # noqa: BLE001 - any compiler failure: run eagerly instead
            reason = str(err).splitlines()[0] if str(err) else ""
            warnings.warn(f"torch.compile failed ({type(err).__name__}: {reason}); training continues without it.",
                          RuntimeWarning, stacklevel=2)
            self.compiled = None
            if state is not None:
                generator.set_state(state)  # the eager pass draws the noise the compiled one would have
            return self.net(x, generator=generator)
        self.compile_checked = True
        return out

    def loss(self, out, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(training loss in nats/dim, per-image NLL (B,), per-image KL (B,))."""
        tcfg = self.tcfg
        nll = out.nll.float()
        # sum over (V, H, W), not flatten(1): flattening a channels_last tensor copies it to NCHW,
        # and the KL's backward pass would then run in NCHW against NHWC inputs.
        kl_layers = torch.stack([layer.kl.float().sum((1, 2, 3)) for layer in out.layers], dim=1)  # (B, L)
        if kl_balancing(tcfg, step):
            kl_term = balanced_kl(kl_layers.mean(0), self.elements if tcfg.kl_balance_scaled else None)
        else:
            kl_term = kl_layers.sum(1).mean()
        loss = (nll.mean() + kl_weight(tcfg, step) * kl_term) / self.dims
        return loss, nll, kl_layers.sum(1)

    def __call__(self, x: torch.Tensor, step: int, generator: torch.Generator | None = None) -> StepStats:
        tcfg = self.tcfg
        if tcfg.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        for group in self.optimizer.param_groups:
            group["lr"] = learning_rate(tcfg, step)
        with self.autocast:
            out = self.forward(x, generator)
        loss, nll, kl = self.loss(out, step)
        del out  # the graph holds what backward needs; the rest goes now
        loss.backward()
        norm = float(gradient_norm(self.params, tcfg.grad_clip))  # the step's one host sync
        skipped = not math.isfinite(norm) or (tcfg.grad_skip_threshold > 0 and norm >= tcfg.grad_skip_threshold)
        if not skipped:  # grads are all-reduced, so every rank takes the same decision
            self.optimizer.step()
            self.ema.update(self.model)
        self.optimizer.zero_grad(set_to_none=True)  # no gradients held through the next forward pass
        return StepStats(nll.detach().mean(), kl.detach().mean(), norm, skipped)

    def close(self) -> None:
        """Drop the DDP wrapper now, while the interpreter is fully alive.

        Its reducer keeps gloo work objects that hold tensors; left for interpreter
        shutdown, their destruction needs the GIL of a finalising interpreter and aborts
        the process (SIGABRT, "terminate called without an active exception") in about one
        run of ten, after training has finished. DDP's hooks form reference cycles, hence
        the collection.
        """
        if self.net is not self.model:
            self.net = self.compiled = None
            gc.collect()


__all__ = ["EMA", "make_optimizer", "build_model", "balanced_kl", "gradient_norm", "StepStats", "TrainStep"]
