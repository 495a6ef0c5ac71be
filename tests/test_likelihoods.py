"""Tests for vdvae_latents.model.likelihoods against closed forms and brute-force sums.

References are written out here in float64 numpy/math (logistic CDF differences with
infinite outer edges), never by calling the code under test a second time.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from vdvae_latents.model.likelihoods import (
    bernoulli_log_prob, discretized_mol_log_prob, quantize, sample_bernoulli, sample_mol,
)

# ---------------------------------------------------------------- reference helpers


def grid(n_bits: int) -> np.ndarray:
    """All grid values 2k/(2^n - 1) - 1."""
    top = 2**n_bits - 1
    return 2.0 * np.arange(top + 1) / top - 1.0


def sigmoid(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-z)) if z >= 0 else math.exp(z) / (1.0 + math.exp(z))


def ref_bin_prob(x: float, mu: float, s: float, n_bits: int) -> float:
    """P(bin of x) for a logistic(mu, s), float64; edge bins reach to -inf / +inf.

    Below the mean the CDF difference is used, above it the survival difference, so
    that no term is a difference of two numbers close to 1 (accurate in both tails).
    """
    h = 1.0 / (2**n_bits - 1)
    lo_inf, hi_inf = x < -1 + h, x > 1 - h
    if x <= mu:
        hi = 1.0 if hi_inf else sigmoid((x + h - mu) / s)
        lo = 0.0 if lo_inf else sigmoid((x - h - mu) / s)
        return hi - lo
    sf_lo = 1.0 if lo_inf else sigmoid(-(x - h - mu) / s)
    sf_hi = 0.0 if hi_inf else sigmoid(-(x + h - mu) / s)
    return sf_lo - sf_hi


def ref_quantize(v: float, n_bits: int) -> float:
    top = 2**n_bits - 1
    return 2.0 * round((min(max(v, -1.0), 1.0) + 1.0) / 2.0 * top) / top - 1.0


def random_mol(gen: torch.Generator, batch: int, n_mix: int, channels: int, hw: int = 1,
               dtype: torch.dtype = torch.float32, rgb_coeffs: bool = False):
    """Random MoL parameters with scales spanning sharp to broad components."""
    w = torch.randn(batch, n_mix, hw, hw, generator=gen, dtype=torch.float64)
    mu = 1.2 * (2 * torch.rand(batch, n_mix, channels, hw, hw, generator=gen, dtype=torch.float64) - 1)
    s = torch.exp(-4.5 + 4 * torch.rand(batch, n_mix, channels, hw, hw, generator=gen, dtype=torch.float64))
    c = torch.tanh(torch.randn(batch, n_mix, 3, hw, hw, generator=gen, dtype=torch.float64)) if rgb_coeffs else None
    cast = (lambda t: None if t is None else t.to(dtype))
    return cast(w), cast(mu), cast(s), cast(c)


def softmax(w: np.ndarray) -> np.ndarray:
    e = np.exp(w - w.max())
    return e / e.sum()


# ------------------------------------------------------------------ normalisation


@pytest.mark.parametrize("n_bits", [8, 5])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_grayscale_probabilities_sum_to_one(n_bits: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    w, mu, s, _ = random_mol(gen, 1, 4, 1)
    values = torch.tensor(grid(n_bits), dtype=torch.float32)
    k = values.numel()
    x = values.view(k, 1, 1, 1)
    lp = discretized_mol_log_prob(x, w.expand(k, -1, -1, -1), mu.expand(k, -1, -1, -1, -1),
                                  s.expand(k, -1, -1, -1, -1), n_bits=n_bits)
    assert lp.shape == (k,) and lp.dtype == torch.float32
    assert abs(lp.double().exp().sum().item() - 1.0) < 1e-5


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.float64, 1e-10)])
def test_rgb_with_coeffs_sums_to_one_bruteforce(dtype: torch.dtype, tol: float) -> None:
    n_bits = 3
    gen = torch.Generator().manual_seed(3)
    w, mu, s, c = random_mol(gen, 1, 3, 3, dtype=dtype, rgb_coeffs=True)
    combos = torch.tensor(list(itertools.product(grid(n_bits), repeat=3)), dtype=dtype)  # (512, 3)
    n = combos.shape[0]
    x = combos.view(n, 3, 1, 1)
    lp = discretized_mol_log_prob(x, w.expand(n, -1, -1, -1), mu.expand(n, -1, -1, -1, -1),
                                  s.expand(n, -1, -1, -1, -1), c.expand(n, -1, -1, -1, -1), n_bits=n_bits)
    assert abs(lp.double().exp().sum().item() - 1.0) < tol


# ------------------------------------------------------------------ closed forms


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-9), (torch.float32, 2e-5)])
def test_single_logistic_matches_closed_form(dtype: torch.dtype, tol: float) -> None:
    n_bits = 8
    values = grid(n_bits)
    xs = [values[0], values[1], values[100], values[127], values[128], values[254], values[255]]
    rng = np.random.default_rng(0)
    for x in xs:
        for mu, s in [(0.0, 0.1), (-0.95, 0.02), (0.97, 0.3), (rng.uniform(-1, 1), rng.uniform(0.01, 1))]:
            expected = math.log(ref_bin_prob(x, mu, s, n_bits))
            got = discretized_mol_log_prob(
                torch.tensor(x, dtype=dtype).view(1, 1, 1, 1), torch.zeros(1, 1, 1, 1, dtype=dtype),
                torch.tensor(mu, dtype=dtype).view(1, 1, 1, 1, 1), torch.tensor(s, dtype=dtype).view(1, 1, 1, 1, 1),
                n_bits=n_bits)
            assert got.item() == pytest.approx(expected, abs=tol, rel=tol), (x, mu, s)


@pytest.mark.parametrize("x, mu, s", [(-0.5, 0.9, 0.01), (0.7, -0.8, 0.005), (-1.0, 0.5, 0.01), (1.0, -0.2, 0.004)])
def test_tiny_bin_mass_is_accurate_in_float32(x: float, mu: float, s: float) -> None:
    """Masses far below float32's range (e^-140 .. e^-375) are still exact in log space."""
    expected = math.log(ref_bin_prob(x, mu, s, 8))
    assert expected < -100
    got = discretized_mol_log_prob(torch.tensor(x).view(1, 1, 1, 1), torch.zeros(1, 1, 1, 1),
                                   torch.tensor(mu).view(1, 1, 1, 1, 1), torch.tensor(s).view(1, 1, 1, 1, 1))
    assert got.item() == pytest.approx(expected, rel=1e-5)


def ref_mol_log_prob(x, w, mu, s, c, n_bits) -> np.ndarray:
    """float64 brute force of the full model (numpy arrays), PixelCNN++ coupling."""
    x, w, mu, s = (np.asarray(t, dtype=np.float64) for t in (x, w, mu, s))
    batch, n_mix, channels, height, width = mu.shape
    out = np.zeros(batch)
    for b, i, j in itertools.product(range(batch), range(height), range(width)):
        weights = softmax(w[b, :, i, j])
        px = x[b, :, i, j]
        total = 0.0
        for m in range(n_mix):
            means = mu[b, m, :, i, j].copy()
            if c is not None:
                cc = np.asarray(c, dtype=np.float64)[b, m, :, i, j]
                means[1] += cc[0] * px[0]
                means[2] += cc[1] * px[0] + cc[2] * px[1]
            prob = 1.0
            for ch in range(channels):
                prob *= ref_bin_prob(px[ch], means[ch], s[b, m, ch, i, j], n_bits)
            total += weights[m] * prob
        out[b] += math.log(total)
    return out


def random_grid_images(gen: torch.Generator, shape: tuple[int, ...], n_bits: int, dtype=torch.float64):
    top = 2**n_bits - 1
    k = torch.randint(0, top + 1, shape, generator=gen)
    return (2.0 * k / top - 1.0).to(dtype)


def test_rgb_coeffs_match_closed_form() -> None:
    gen = torch.Generator().manual_seed(4)
    w, mu, s, c = random_mol(gen, 2, 3, 3, hw=2, dtype=torch.float64, rgb_coeffs=True)
    x = random_grid_images(gen, (2, 3, 2, 2), 8)
    # Put the means near the data so the coefficients matter and masses are moderate.
    mu = 0.7 * mu + 0.3 * x.unsqueeze(1)
    got = discretized_mol_log_prob(x, w, mu, s, c)
    expected = ref_mol_log_prob(x.numpy(), w.numpy(), mu.numpy(), s.numpy(), c.numpy(), 8)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-9, atol=1e-9)

    without = discretized_mol_log_prob(x, w, mu, s, None)
    np.testing.assert_allclose(without.numpy(), ref_mol_log_prob(x, w, mu, s, None, 8), rtol=1e-9, atol=1e-9)
    zero = discretized_mol_log_prob(x, w, mu, s, torch.zeros_like(c))
    assert torch.equal(zero, without)
    assert (got - without).abs().min() > 1e-3

    got32 = discretized_mol_log_prob(x.float(), w.float(), mu.float(), s.float(), c.float())
    assert got32.dtype == torch.float32
    np.testing.assert_allclose(got32.double().numpy(), expected, rtol=1e-5, atol=1e-4)


def test_grayscale_mixture_matches_closed_form_multi_pixel() -> None:
    gen = torch.Generator().manual_seed(5)
    w, mu, s, _ = random_mol(gen, 3, 5, 1, hw=3, dtype=torch.float64)
    x = random_grid_images(gen, (3, 1, 3, 3), 5)
    got = discretized_mol_log_prob(x, w, mu, s, n_bits=5)
    np.testing.assert_allclose(got.numpy(), ref_mol_log_prob(x, w, mu, s, None, 5), rtol=1e-9)


# ------------------------------------------------------------------ robustness


@pytest.mark.parametrize("scale", [1e-30, 1e-8, 1e8])
@pytest.mark.parametrize("mean", [-100.0, 100.0, None])  # None: the mean sits exactly on x
@pytest.mark.parametrize("channels", [1, 3])
def test_extreme_parameters_are_finite(scale: float, mean: float | None, channels: int) -> None:
    x = torch.tensor([-1.0, 1.0, 2 * 100 / 255 - 1, -1.0]).view(4, 1, 1, 1).repeat(1, channels, 1, 1)
    means = (x.unsqueeze(1).repeat(1, 2, 1, 1, 1) if mean is None else torch.full((4, 2, channels, 1, 1), mean))
    means = means.clone().requires_grad_()
    scales = torch.full((4, 2, channels, 1, 1), scale, requires_grad=True)
    weights = torch.tensor([3.0, -3.0]).view(1, 2, 1, 1).repeat(4, 1, 1, 1).requires_grad_()
    coeffs = torch.full((4, 2, 3, 1, 1), 0.9, requires_grad=True) if channels == 3 else None
    lp = discretized_mol_log_prob(x, weights, means, scales, coeffs)
    assert torch.isfinite(lp).all()
    lp.sum().backward()
    for t in (means, scales, weights) + ((coeffs,) if coeffs is not None else ()):
        assert torch.isfinite(t.grad).all()


def test_collapsed_component_on_the_data_gives_its_weight() -> None:
    """A component with a vanishing scale centred on x has probability 1 for that bin."""
    x = torch.tensor([-1.0, 1.0, 2 * 77 / 255 - 1]).view(3, 1, 1, 1)
    far = -50.0 * torch.sign(x)  # far outside x's bin (edge bins reach to +-inf)
    means = torch.stack([x, far], dim=1)  # (3, 2, 1, 1, 1)
    scales = torch.full((3, 2, 1, 1, 1), 1e-30)
    weights = torch.tensor([0.0, 0.0]).view(1, 2, 1, 1).repeat(3, 1, 1, 1)
    lp = discretized_mol_log_prob(x, weights, means, scales)
    np.testing.assert_allclose(lp.numpy(), math.log(0.5), rtol=1e-6)


def test_half_precision_inputs_are_upcast() -> None:
    gen = torch.Generator().manual_seed(6)
    w, mu, s, c = random_mol(gen, 2, 3, 3, hw=2, rgb_coeffs=True)
    x = random_grid_images(gen, (2, 3, 2, 2), 8, dtype=torch.float32)
    for low in (torch.float16, torch.bfloat16):
        args = [t.to(low) for t in (w, mu, s, c)]
        ref = discretized_mol_log_prob(x, *[t.float() for t in args])
        lp = discretized_mol_log_prob(x, *args)
        assert lp.dtype == torch.float32
        torch.testing.assert_close(lp, ref)


@pytest.mark.parametrize("channels", [1, 3])
def test_gradients_match_finite_differences(channels: int) -> None:
    """Analytic gradients (incl. edge bins and the where-branches) vs finite differences."""
    gen = torch.Generator().manual_seed(14)
    w, mu, s, c = random_mol(gen, 2, 3, channels, hw=2, dtype=torch.float64, rgb_coeffs=channels == 3)
    x = random_grid_images(gen, (2, channels, 2, 2), 5)
    x[0, :, 0, 0], x[1, :, 1, 1] = -1.0, 1.0  # include both edge bins
    s = s + 0.05  # keep the finite-difference steps well inside the smooth regime
    inputs = [t.requires_grad_() for t in (w, mu, s) + ((c,) if c is not None else ())]
    fn = lambda *args: discretized_mol_log_prob(x, *args, n_bits=5)  # noqa: E731
    assert torch.autograd.gradcheck(fn, inputs)


def test_bad_shapes_raise() -> None:
    x = torch.zeros(2, 1, 4, 4)
    w, mu, s = torch.zeros(2, 3, 4, 4), torch.zeros(2, 3, 1, 4, 4), torch.ones(2, 3, 1, 4, 4)
    with pytest.raises(ValueError, match="C == 3"):
        discretized_mol_log_prob(x, w, mu, s, coeffs=torch.zeros(2, 3, 3, 4, 4))
    with pytest.raises(ValueError, match="logit_weights"):
        discretized_mol_log_prob(x, torch.zeros(2, 2, 4, 4), mu, s)
    with pytest.raises(ValueError, match="x must be"):
        discretized_mol_log_prob(torch.zeros(2, 3, 4, 4), w, mu, s)
    with pytest.raises(ValueError, match="scales"):
        discretized_mol_log_prob(x, w, mu, torch.ones(2, 3, 1, 4, 5))
    with pytest.raises(ValueError, match="means"):
        discretized_mol_log_prob(x, w, mu[:, :, 0], s)
    x3, mu3, s3 = torch.zeros(2, 3, 4, 4), torch.zeros(2, 3, 3, 4, 4), torch.ones(2, 3, 3, 4, 4)
    with pytest.raises(ValueError, match="coeffs"):
        discretized_mol_log_prob(x3, w, mu3, s3, coeffs=torch.zeros(2, 3, 2, 4, 4))
    with pytest.raises(ValueError, match="n_bits"):
        discretized_mol_log_prob(x, w, mu, s, n_bits=0)
    with pytest.raises(ValueError, match="C == 3"):
        sample_mol(w, mu, s, coeffs=torch.zeros(2, 3, 3, 4, 4))


# ------------------------------------------------------------------ quantize / sampling


def test_quantize() -> None:
    for n_bits in (1, 3, 8):
        values = torch.tensor(grid(n_bits))
        assert torch.equal(quantize(values, n_bits), values)  # grid values are fixed points
    x = torch.tensor([-3.0, -1.0, -0.999, 0.2, 0.9985, 1.0, 7.0], dtype=torch.float64)
    expected = [ref_quantize(v, 8) for v in x.tolist()]
    np.testing.assert_allclose(quantize(x, 8).numpy(), expected, atol=1e-12)


def assert_on_grid(x: torch.Tensor, n_bits: int) -> None:
    top = 2**n_bits - 1
    k = (x.double() + 1) / 2 * top
    assert x.min() >= -1 and x.max() <= 1
    assert (k - k.round()).abs().max() < 1e-4


def test_samples_are_on_grid_and_reproducible() -> None:
    gen = torch.Generator().manual_seed(7)
    w, mu, s, c = random_mol(gen, 4, 5, 3, hw=6, rgb_coeffs=True)
    mu = 3 * mu  # many draws fall outside [-1, 1] and must be clamped
    for n_bits in (8, 5):
        x = sample_mol(w, mu, s, c, n_bits=n_bits, generator=torch.Generator().manual_seed(1))
        assert x.shape == (4, 3, 6, 6)
        assert_on_grid(x, n_bits)
        again = sample_mol(w, mu, s, c, n_bits=n_bits, generator=torch.Generator().manual_seed(1))
        assert torch.equal(x, again)
        assert_on_grid(sample_mol(w, mu, s, c, n_bits=n_bits, deterministic=True), n_bits)


def test_deterministic_sample_is_dominant_components_rounded_mean() -> None:
    gen = torch.Generator().manual_seed(8)
    _, mu, s, c = random_mol(gen, 2, 3, 3, hw=2, rgb_coeffs=True)
    w = torch.zeros(2, 3, 2, 2)
    w[:, 1] = 10.0
    x = sample_mol(w, mu, s, c, deterministic=True)
    for b, i, j in itertools.product(range(2), range(2), range(2)):
        m = mu[b, 1, :, i, j].tolist()
        cc = c[b, 1, :, i, j].tolist()
        r = ref_quantize(m[0], 8)
        g = ref_quantize(m[1] + cc[0] * r, 8)
        bl = ref_quantize(m[2] + cc[1] * r + cc[2] * g, 8)
        np.testing.assert_allclose(x[b, :, i, j].numpy(), [r, g, bl], atol=1e-6)
    # Without coefficients and in grayscale: just the rounded mean.
    x1 = sample_mol(w, mu[:, :, :1], s[:, :, :1], deterministic=True, n_bits=5)
    expected = [[[ref_quantize(v, 5) for v in row] for row in img] for img in mu[:, 1, 0].tolist()]
    np.testing.assert_allclose(x1[:, 0].numpy(), expected, atol=1e-6)
    # Temperature 0 with a single component is the same as deterministic.
    x0 = sample_mol(w[:, :1], mu[:, :1], s[:, :1], c[:, :1], temperature=0.0,
                    generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(x0, sample_mol(w[:, :1], mu[:, :1], s[:, :1], c[:, :1], deterministic=True))


def check_histogram(indices: torch.Tensor, probs: np.ndarray) -> None:
    """Empirical frequencies within 5 standard errors (+ truncation slack) of probs."""
    n = indices.numel()
    freq = np.bincount(indices.numpy(), minlength=probs.size) / n
    bound = 5 * np.sqrt(probs * (1 - probs) / n) + 5e-5
    assert np.all(np.abs(freq - probs) <= bound), np.abs(freq - probs).max()


def test_grayscale_sample_histogram_matches_likelihood() -> None:
    n_bits, n = 4, 200_000
    gen = torch.Generator().manual_seed(9)
    w, mu, s, _ = random_mol(gen, 1, 3, 1)
    s = s + 0.1  # spread the mass over several levels
    values = torch.tensor(grid(n_bits), dtype=torch.float32)
    k = values.numel()
    probs = discretized_mol_log_prob(values.view(k, 1, 1, 1), w.expand(k, -1, -1, -1),
                                     mu.expand(k, -1, -1, -1, -1), s.expand(k, -1, -1, -1, -1),
                                     n_bits=n_bits).double().exp().numpy()
    x = sample_mol(w.expand(n, -1, -1, -1), mu.expand(n, -1, -1, -1, -1), s.expand(n, -1, -1, -1, -1),
                   n_bits=n_bits, generator=torch.Generator().manual_seed(10))
    idx = torch.round((x.flatten().double() + 1) / 2 * (2**n_bits - 1)).long()
    check_histogram(idx, probs)


def test_rgb_sample_histogram_matches_likelihood_with_coeffs() -> None:
    """The autoregressive sampler draws from the joint the likelihood scores."""
    n_bits, n = 2, 200_000
    gen = torch.Generator().manual_seed(11)
    w, mu, s, c = random_mol(gen, 1, 2, 3, rgb_coeffs=True)
    s = s + 0.2
    combos = torch.tensor(list(itertools.product(grid(n_bits), repeat=3)), dtype=torch.float32)
    k = combos.shape[0]
    expand = (lambda t, size: t.expand(size, *t.shape[1:]))
    probs = discretized_mol_log_prob(combos.view(k, 3, 1, 1), expand(w, k), expand(mu, k), expand(s, k),
                                     expand(c, k), n_bits=n_bits).double().exp().numpy()
    x = sample_mol(expand(w, n), expand(mu, n), expand(s, n), expand(c, n), n_bits=n_bits,
                   generator=torch.Generator().manual_seed(12))
    levels = torch.round((x[:, :, 0, 0].double() + 1) / 2 * (2**n_bits - 1)).long()  # (n, 3)
    base = 2**n_bits
    check_histogram(levels[:, 0] * base * base + levels[:, 1] * base + levels[:, 2], probs)


# ------------------------------------------------------------------ Bernoulli


def test_bernoulli_log_prob_matches_closed_form() -> None:
    gen = torch.Generator().manual_seed(13)
    logits = 4 * torch.randn(3, 2, 4, 4, generator=gen, dtype=torch.float64)
    x = (torch.rand(3, 2, 4, 4, generator=gen) < 0.5).double()
    p = 1 / (1 + np.exp(-logits.numpy()))
    expected = (x.numpy() * np.log(p) + (1 - x.numpy()) * np.log1p(-p)).sum(axis=(1, 2, 3))
    got = bernoulli_log_prob(x, logits)
    assert got.shape == (3,)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-10)
    np.testing.assert_allclose(bernoulli_log_prob(x.float(), logits.float()).numpy(), expected, rtol=1e-5)


def test_bernoulli_extremes_and_errors() -> None:
    logits = torch.tensor([-1e4, 1e4, -100.0, 100.0]).view(1, 1, 1, 4).requires_grad_()
    x = torch.tensor([1.0, 0.0, 0.0, 1.0]).view(1, 1, 1, 4)
    lp = bernoulli_log_prob(x, logits)
    assert lp.item() == pytest.approx(-2e4, rel=1e-6)
    lp.backward()
    assert torch.isfinite(logits.grad).all()
    with pytest.raises(ValueError, match="0 and 1"):
        bernoulli_log_prob(torch.full((1, 1, 1, 4), -1.0), logits.detach())
    with pytest.raises(ValueError, match="same"):
        bernoulli_log_prob(x, torch.zeros(1, 1, 4, 1))


def test_sample_bernoulli() -> None:
    logits = torch.tensor([-3.0, -0.5, 0.0, 0.7, 2.0]).view(1, 1, 1, 5)
    det = sample_bernoulli(logits, deterministic=True)
    assert torch.equal(det, torch.tensor([0.0, 0.0, 0.0, 1.0, 1.0]).view(1, 1, 1, 5))
    n = 100_000
    many = sample_bernoulli(logits.expand(n, 1, 1, 5), generator=torch.Generator().manual_seed(0))
    assert many.dtype == torch.float32 and set(many.unique().tolist()) <= {0.0, 1.0}
    p = 1 / (1 + np.exp(-logits.flatten().numpy().astype(np.float64)))
    freq = many.mean(dim=0).flatten().double().numpy()
    assert np.all(np.abs(freq - p) <= 5 * np.sqrt(p * (1 - p) / n))
    again = sample_bernoulli(logits.expand(n, 1, 1, 5), generator=torch.Generator().manual_seed(0))
    assert torch.equal(many, again)
