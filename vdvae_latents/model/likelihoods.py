"""Pixel likelihoods of the decoder: discretized mixture of logistics and Bernoulli.

Pixels live in [-1, 1] on the grid of ``2**n_bits`` levels: level ``k`` is the value
``2 k / (2**n_bits - 1) - 1``. Neighbouring levels are ``2 h`` apart with the half bin
width ``h = 1 / (2**n_bits - 1)``; the lowest bin extends to -inf and the highest to
+inf so that the probabilities of all levels sum to one.

Conventions shared by the mixture-of-logistics (MoL) functions, for ``M`` components:

* ``logit_weights``: (B, M, H, W) unnormalised log mixture weights, one set per pixel.
* ``means``, ``scales``: (B, M, C, H, W); the logistic with mean ``mu`` and scale
  ``s > 0`` has CDF ``sigmoid((x - mu) / s)``.
* ``coeffs``: optional (B, M, 3, H, W), only for RGB (C = 3), already squashed to
  (-1, 1). They make the channels autoregressive as in PixelCNN++:
  ``mean_g += c0 * x_r`` and ``mean_b += c1 * x_r + c2 * x_g``.

The *truncated* grid (``truncated=True``) is openai/vdvae's 5-bit FFHQ-256 data: an
8-bit value ``v`` becomes ``2**(8 - n_bits) * floor(v / 2**(8 - n_bits))`` and then
``(v - 127.5) / 127.5`` as 8-bit data would, so the levels are ``16 k / 255 - 1`` at 5
bits (-1 to 0.945). The half bin stays ``1 / (2**n_bits - 1)`` (1/31: neighbouring
bins overlap slightly, as in the reference); which bins are edge bins is judged on the
8-bit grid, so the lowest level's bin extends to -inf and the highest level (below 1)
is an ordinary bin. The official Efficient-VDVAE code uses the same grid for its 5-bit
models but treats the highest level as the top edge bin, extending to +inf
(``top_edge=True``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = [
    "quantize",
    "truncate_bits",
    "discretized_mol_log_prob",
    "sample_mol",
    "bernoulli_log_prob",
    "sample_bernoulli",
]

# Scales below this put a component's whole mass into one bin (the bin is ~1e10 times
# wider even at 8 bits), so flooring them changes no representable probability of the
# bin holding the mean. It bounds 1/s, which keeps the (otherwise ~|x - mu| / s^2)
# gradients finite for collapsed components.
_MIN_SCALE = 1e-12
# |x - mean| beyond this is as impossible as it gets; clamping keeps |x - mu| / s and
# the per-image sums far below the float32 range even at the scale floor.
_MAX_RESIDUAL = 1e4
# Logistic noise is drawn from U(eps, 1 - eps) so that logit(u) stays finite
# (truncates the logistic at about +-11.5 scales, as PixelCNN++ does).
_UNIFORM_EPS = 1e-5
_LN2 = math.log(2.0)
# PixelCNN++ (and both VDVAE references) score a bin whose mass is below this by the
# density at its centre times its width (``tail="pixelcnn"``).
_FALLBACK_MASS = 1e-5

# Channel coupling: channel -> ((coefficient index, earlier channel it multiplies), ...).
_COUPLING: dict[int, tuple[tuple[int, int], ...]] = {1: ((0, 0),), 2: ((1, 0), (2, 1))}


def quantize(x: torch.Tensor, n_bits: int = 8, *, truncated: bool = False) -> torch.Tensor:
    """Round values to the nearest of the ``2**n_bits`` grid levels in [-1, 1].

    Values outside [-1, 1] are clamped first, so the result is always a grid value.
    ``truncated`` rounds to the truncated grid's levels instead (see the module doc).
    """
    top = _top_level(n_bits)
    if truncated:
        if n_bits > 8:
            raise ValueError(f"the truncated grid needs n_bits <= 8, got {n_bits}")
        step = 2 ** (8 - n_bits)
        k = torch.round((x.clamp(-1.0, 1.0) + 1.0) * (127.5 / step)).clamp(0, top)
        return (k * step - 127.5) / 127.5
    k = torch.round((x.clamp(-1.0, 1.0) + 1.0) * (top / 2.0))
    return 2.0 * k / top - 1.0


def truncate_bits(x: torch.Tensor, n_bits: int) -> torch.Tensor:
    """8-bit data in [-1, 1] with the low ``8 - n_bits`` bits of each value cleared.

    ``x`` holds ``(v - 127.5) / 127.5`` for 8-bit values ``v`` (rounding noise is
    tolerated); the result is ``(2**(8-n) floor(v / 2**(8-n)) - 127.5) / 127.5``, a
    level of the truncated grid, in the dtype of ``x``.
    """
    if not 1 <= n_bits <= 8:
        raise ValueError(f"n_bits must be between 1 and 8 to truncate 8-bit data, got {n_bits}")
    step = 2 ** (8 - n_bits)
    v = torch.round((x.clamp(-1.0, 1.0) + 1.0) * 127.5)
    return (torch.div(v, step, rounding_mode="floor") * step - 127.5) / 127.5


def discretized_mol_log_prob(
    x: torch.Tensor,
    logit_weights: torch.Tensor,
    means: torch.Tensor,
    scales: torch.Tensor,
    coeffs: torch.Tensor | None = None,
    n_bits: int = 8,
    tail: str = "exact",
    *,
    truncated: bool = False,
    top_edge: bool = False,
) -> torch.Tensor:
    """Log-likelihood (nats) of images under a discretized mixture of logistics.

    Args:
        x: (B, C, H, W) images in [-1, 1] on the ``2**n_bits`` grid (see module doc).
        logit_weights: (B, M, H, W) unnormalised mixture logits per pixel.
        means: (B, M, C, H, W) logistic means.
        scales: (B, M, C, H, W) logistic scales ``s > 0`` (CDF ``sigmoid((x-mu)/s)``).
        coeffs: optional (B, M, 3, H, W) channel-coupling coefficients in (-1, 1),
            only valid for C = 3; green's mean gets ``+ c0 * x_r`` and blue's
            ``+ c1 * x_r + c2 * x_g`` using the true pixel values. ``None`` means the
            channels are independent given the component (any C is then allowed).
        n_bits: bit depth of the grid (>= 1).
        tail: ``"exact"`` (below) or ``"pixelcnn"``: the inner bins as PixelCNN++ and
            both reference implementations compute them, ``log(max(cdf difference,
            1e-12))`` and, where that difference is at most 1e-5, the density at the
            bin centre times the bin width instead. Imported models use it so that
            their NLL agrees with the reference code to rounding.
        truncated: ``x`` lies on the truncated grid (openai/vdvae's 5-bit data, see
            the module doc) rather than the ``2**n_bits``-level grid.
        top_edge: with ``truncated``, the highest truncated level's bin extends to +inf
            (the official Efficient-VDVAE code) instead of being an ordinary bin.

    Returns:
        (B,) tensor: for each image, the sum over pixels of
        ``log sum_m softmax(w)_m * prod_c P_mc(bin of x_c)``. Computed in float32, or
        in float64 if any input is float64 (half/bfloat16 inputs are upcast).

    Numerics: with ``a`` and ``b`` the standardised upper and lower bin edges, the bin
    mass is computed through the exact identity

        sigmoid(a) - sigmoid(b) = sigmoid(a) * sigmoid(-b) * (1 - exp(-(a - b)))

    whose logarithm is a sum of three non-positive, stably computable terms
    (``logsigmoid(a) + logsigmoid(-b) + log1mexp(2h/s)``): no cancellation and no
    underflow, however small the mass. PixelCNN++ needs a fallback to the density at
    the bin centre when the plain CDF difference underflows; this form never
    underflows, so no (approximate, discontinuous) fallback branch is needed. The
    edge bins drop the factor for their infinite edge. Scales are floored at 1e-12 and
    ``|x - mean|`` clamped at 1e4 so that values and gradients stay finite for
    degenerate parameters.
    """
    _check_mol_shapes(logit_weights, means, scales, coeffs, x=x)
    top = _top_level(n_bits)
    dtype = _working_dtype(x, logit_weights, means, scales, coeffs)
    x, logit_weights, means, scales = (t.to(dtype) for t in (x, logit_weights, means, scales))

    x = x.unsqueeze(1)  # (B, 1, C, H, W): broadcasts over the components
    if coeffs is not None:
        means = _couple_means(means, coeffs.to(dtype), x)

    half_bin = 1.0 / top
    inv_scale = 1.0 / scales.clamp_min(_MIN_SCALE)
    centred = (x - means).clamp(-_MAX_RESIDUAL, _MAX_RESIDUAL)
    upper = (centred + half_bin) * inv_scale  # standardised bin edges: a and b
    lower = (centred - half_bin) * inv_scale
    # a - b computed directly (not by subtracting two possibly huge numbers); the
    # floor avoids log(0) when the scale is so large that the width underflows.
    width = (2.0 * half_bin * inv_scale).clamp_min(torch.finfo(dtype).tiny)

    # Bin membership by midpoints between levels, robust to rounding of x (on the
    # 8-bit grid for truncated data, whose top level is below 1).
    edge = 1.0 / 255.0 if truncated else half_bin
    highest = 1.0
    if truncated and top_edge:
        step = 2 ** (8 - n_bits)
        highest = (step * top - 127.5) / 127.5  # the truncated grid's top level (0.945 at 5 bits)
    is_bottom = x < -1.0 + edge  # lower edge is -inf: P = sigmoid(a)
    is_top = x > highest - edge  # upper edge is +inf: P = sigmoid(-b)
    log_cdf_upper = torch.where(is_top, 0.0, F.logsigmoid(upper))
    log_sf_lower = torch.where(is_bottom, 0.0, F.logsigmoid(-lower))
    log_gap = torch.where(is_bottom | is_top, 0.0, _log1mexp(width))
    log_p_channels = log_cdf_upper + log_sf_lower + log_gap  # (B, M, C, H, W)
    if tail == "pixelcnn":
        inner = _pixelcnn_inner_bins(upper, lower, centred * inv_scale, scales, top)
        log_p_channels = torch.where(is_bottom | is_top, log_p_channels, inner)
    elif tail != "exact":
        raise ValueError(f"tail must be 'exact' or 'pixelcnn', not {tail!r}")

    log_p_components = log_p_channels.sum(dim=2) + F.log_softmax(logit_weights, dim=1)
    log_p_pixels = torch.logsumexp(log_p_components, dim=1)  # (B, H, W)
    return log_p_pixels.sum(dim=(1, 2))


@torch.no_grad()
def sample_mol(
    logit_weights: torch.Tensor,
    means: torch.Tensor,
    scales: torch.Tensor,
    coeffs: torch.Tensor | None = None,
    n_bits: int = 8,
    temperature: float = 1.0,
    deterministic: bool = False,
    generator: torch.Generator | None = None,
    *,
    truncated: bool = False,
) -> torch.Tensor:
    """Draw images (B, C, H, W) on the ``2**n_bits`` grid in [-1, 1] from a MoL.

    Arguments are as in :func:`discretized_mol_log_prob`. Stochastic mode picks one
    component per pixel by Gumbel-max (an exact categorical draw), then per channel
    draws ``mean + s * temperature * logit(u)`` with ``u ~ U(1e-5, 1 - 1e-5)``,
    clamps to [-1, 1] and rounds to the grid. Rounding a continuous logistic draw to
    the nearest level (after clamping) gives exactly the discretized distribution,
    edge bins included.

    Channels are sampled in order R, G, B and the coupling uses the already *rounded*
    earlier channels, i.e. the same values the likelihood conditions on, so that at
    ``temperature = 1`` the sampler draws from the distribution that
    :func:`discretized_mol_log_prob` scores (up to the 1e-5 noise truncation).

    ``deterministic=True`` takes the most probable component's mean instead (coupled
    to the rounded earlier channels), clamped and rounded. ``generator`` makes draws
    reproducible; noise is drawn on its device and moved. Returns float32 (float64 if
    the parameters are float64). ``truncated`` rounds to the truncated grid's nearest
    level instead (see the module doc).
    """
    batch, _, channels, height, width = _check_mol_shapes(logit_weights, means, scales, coeffs)
    dtype = _working_dtype(logit_weights, means, scales, coeffs)
    logit_weights, means, scales = (t.to(dtype) for t in (logit_weights, means, scales))
    device = means.device

    if deterministic:
        component = logit_weights.argmax(dim=1)
    else:
        u = _uniform(logit_weights.shape, generator, device, dtype)
        gumbel = -torch.log(-torch.log(u.clamp_min(torch.finfo(dtype).tiny)))  # rand can return 0
        component = (logit_weights + gumbel).argmax(dim=1)  # Gumbel-max: exact categorical draw

    def pick(t: torch.Tensor) -> torch.Tensor:
        """(B, M, K, H, W) -> (B, K, H, W): the chosen component's parameters."""
        index = component[:, None, None].expand(batch, 1, t.shape[2], height, width)
        return t.gather(1, index).squeeze(1)

    mu, s = pick(means), pick(scales)
    c = pick(coeffs.to(dtype)) if coeffs is not None else None
    noise: torch.Tensor | None = None
    if not deterministic:
        u = _uniform((batch, channels, height, width), generator, device, dtype)
        u = _UNIFORM_EPS + (1.0 - 2.0 * _UNIFORM_EPS) * u
        noise = temperature * (torch.log(u) - torch.log1p(-u))  # standard logistic draw

    out: list[torch.Tensor] = []
    for ch in range(channels):
        mean = mu[:, ch]
        if c is not None:
            for k, source in _COUPLING.get(ch, ()):
                mean = mean + c[:, k] * out[source]
        value = mean if noise is None else mean + s[:, ch] * noise[:, ch]
        out.append(quantize(value, n_bits, truncated=truncated))
    return torch.stack(out, dim=1)


def bernoulli_log_prob(x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Log-likelihood (nats) of binary images under independent Bernoulli pixels.

    Args:
        x: (B, C, H, W) with values in {0, 1} only (binarise [-1, 1] data first, e.g.
            ``(x > 0).float()``); anything else raises ``ValueError``.
        logits: (B, C, H, W) logits of ``P(x = 1)``.

    Returns:
        (B,) sum over pixels and channels of ``x log sigmoid(l) + (1-x) log sigmoid(-l)``,
        computed as minus the (overflow-free) binary cross-entropy with logits, in
        float32 or wider.
    """
    if x.dim() != 4 or x.shape != logits.shape:
        raise ValueError(
            "bernoulli_log_prob: x and logits must both be (B, C, H, W) with the same "
            f"shape, got {tuple(x.shape)} and {tuple(logits.shape)}"
        )
    # Checked on the CPU only: on an accelerator the check would force a sync every call.
    if x.device.type == "cpu" and not bool(((x == 0) | (x == 1)).all()):
        raise ValueError("bernoulli_log_prob: x must contain only 0 and 1 (binarise it first)")
    dtype = _working_dtype(x, logits)
    bce = F.binary_cross_entropy_with_logits(logits.to(dtype), x.to(dtype), reduction="none")
    return -bce.sum(dim=(1, 2, 3))


@torch.no_grad()
def sample_bernoulli(
    logits: torch.Tensor, deterministic: bool = False, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Sample {0, 1} pixels (float tensor, same shape as ``logits``).

    Stochastic: ``1`` with probability ``sigmoid(logits)``; deterministic: ``logits > 0``.
    """
    out_dtype = logits.dtype if logits.is_floating_point() else torch.float32
    if deterministic:
        return (logits > 0).to(out_dtype)
    dtype = _working_dtype(logits)
    u = _uniform(logits.shape, generator, logits.device, dtype)
    return (u < torch.sigmoid(logits.to(dtype))).to(out_dtype)


# --------------------------------------------------------------------------- helpers


def _top_level(n_bits: int) -> int:
    """Index of the highest grid level, ``2**n_bits - 1`` (validates ``n_bits``)."""
    if isinstance(n_bits, bool) or not isinstance(n_bits, int) or not 1 <= n_bits <= 16:
        raise ValueError(f"n_bits must be an integer in [1, 16], got {n_bits!r}")
    return 2**n_bits - 1


def _working_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    """float32, or float64 if any tensor is float64: never compute in half precision."""
    dtype = torch.float32
    for t in tensors:
        if t is not None:
            dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def _pixelcnn_inner_bins(upper: torch.Tensor, lower: torch.Tensor, middle: torch.Tensor, scales: torch.Tensor,
                         top: int) -> torch.Tensor:
    """Log mass of inner bins as PixelCNN++ computes it (see ``tail`` above)."""
    cdf_delta = torch.sigmoid(upper) - torch.sigmoid(lower)
    log_pdf_mid = middle - torch.log(scales) - 2.0 * F.softplus(middle)
    return torch.where(cdf_delta > _FALLBACK_MASS, torch.log(cdf_delta.clamp_min(1e-12)), log_pdf_mid - math.log(top / 2.0))


def _log1mexp(d: torch.Tensor) -> torch.Tensor:
    """``log(1 - exp(-d))`` for ``d > 0``, accurate for small and large ``d``.

    ``log(-expm1(-d))`` is accurate for d <= ln 2, ``log1p(-exp(-d))`` above (Maechler,
    "Accurately computing log(1 - exp(-|a|))"). Each branch gets an argument clamped
    into its own range so the branch that ``where`` discards cannot produce an
    infinite gradient (0 * inf = NaN in the backward pass).
    """
    small = torch.log(-torch.expm1(-d.clamp(max=_LN2)))
    large = torch.log1p(-torch.exp(-d.clamp(min=_LN2)))
    return torch.where(d <= _LN2, small, large)


def _couple_means(means: torch.Tensor, coeffs: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Shift the G and B means by the coefficients times the earlier channels' values.

    ``means``/``coeffs``: (B, M, 3, H, W); ``x``: (B, 1, 3, H, W) pixel values.
    """
    shifted = list(means.unbind(dim=2))
    for ch, terms in _COUPLING.items():
        for k, source in terms:
            shifted[ch] = shifted[ch] + coeffs[:, :, k] * x[:, :, source]
    return torch.stack(shifted, dim=2)


def _uniform(
    shape: tuple[int, ...] | torch.Size,
    generator: torch.Generator | None,
    device: torch.device,
    dtype: torch.dtype,
) -> torch.Tensor:
    """U[0, 1) noise drawn on the generator's device (if any), then moved to ``device``."""
    draw_device = generator.device if generator is not None else device
    return torch.rand(shape, generator=generator, device=draw_device, dtype=dtype).to(device)


def _check_mol_shapes(
    logit_weights: torch.Tensor,
    means: torch.Tensor,
    scales: torch.Tensor,
    coeffs: torch.Tensor | None,
    x: torch.Tensor | None = None,
) -> tuple[int, int, int, int, int]:
    """Validate the MoL parameter shapes (and ``x``); return (B, M, C, H, W)."""
    if means.dim() != 5:
        raise ValueError(f"MoL: means must be (B, M, C, H, W), got shape {tuple(means.shape)}")
    batch, n_mix, channels, height, width = means.shape
    if scales.shape != means.shape:
        raise ValueError(
            f"MoL: scales must have the shape of means {tuple(means.shape)}, "
            f"got {tuple(scales.shape)}"
        )
    if logit_weights.shape != (batch, n_mix, height, width):
        raise ValueError(
            f"MoL: logit_weights must be (B, M, H, W) = {(batch, n_mix, height, width)}, "
            f"got {tuple(logit_weights.shape)}"
        )
    if x is not None and x.shape != (batch, channels, height, width):
        raise ValueError(
            f"MoL: x must be (B, C, H, W) = {(batch, channels, height, width)}, "
            f"got {tuple(x.shape)}"
        )
    if coeffs is not None:
        if channels != 3:
            raise ValueError(
                f"MoL: coeffs couple the R, G, B channels and need C == 3, got C = {channels}"
            )
        if coeffs.shape != (batch, n_mix, 3, height, width):
            raise ValueError(
                f"MoL: coeffs must be (B, M, 3, H, W) = {(batch, n_mix, 3, height, width)}, "
                f"got {tuple(coeffs.shape)}"
            )
    return batch, n_mix, channels, height, width
