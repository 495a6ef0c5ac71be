"""Tests for vdvae_latents.model.distributions against closed forms and Monte Carlo."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vdvae_latents.model.distributions import gaussian_kl, gaussian_log_prob, gaussian_sample, softplus_std

LN2 = math.log(2.0)


# ------------------------------------------------------------------ softplus_std


def test_softplus_std_is_one_at_zero_for_beta_ln2() -> None:
    for dtype in (torch.float32, torch.float64):
        assert softplus_std(torch.zeros(3, dtype=dtype), LN2).tolist() == [1.0, 1.0, 1.0]


@pytest.mark.parametrize("beta", [LN2, 1.0, 3.5])
def test_softplus_std_matches_formula(beta: float) -> None:
    y = np.linspace(-15, 15, 61)
    expected = np.log1p(np.exp(beta * y)) / beta
    got = softplus_std(torch.tensor(y), beta).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-13, atol=1e-300)
    got32 = softplus_std(torch.tensor(y, dtype=torch.float32), beta).double().numpy()
    np.testing.assert_allclose(got32, expected, rtol=1e-6)


def test_softplus_std_extremes_finite_with_finite_gradient() -> None:
    y = torch.tensor([1e4, -1e4, 0.0, 80.0, -80.0], requires_grad=True)
    out = softplus_std(y, LN2)
    assert torch.isfinite(out).all()
    assert out[0].item() == pytest.approx(1e4) and out[1].item() == 0.0
    out.sum().backward()
    assert torch.isfinite(y.grad).all()
    # d/dy = sigmoid(beta * y): 1, 0, and exactly 1/2 at 0.
    assert y.grad[:3].tolist() == [1.0, 0.0, 0.5]


def test_softplus_std_beta_one_is_softplus() -> None:
    y = torch.linspace(-30, 30, 101)
    torch.testing.assert_close(softplus_std(y, 1.0), F.softplus(y))


def test_softplus_std_rejects_nonpositive_beta() -> None:
    with pytest.raises(ValueError):
        softplus_std(torch.zeros(1), 0.0)


# ------------------------------------------------------------------ gaussian_kl


def test_gaussian_kl_hand_computed() -> None:
    t = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    # log 2 + (1 + 0) / 8 - 1/2
    assert gaussian_kl(t(0.0), t(1.0), t(0.0), t(2.0)).item() == pytest.approx(LN2 - 0.375, rel=1e-14)
    # unit variances, means 1 apart: 1/2
    assert gaussian_kl(t(1.0), t(1.0), t(0.0), t(1.0)).item() == pytest.approx(0.5, rel=1e-14)
    # log(1/2) + 4/2 - 1/2
    assert gaussian_kl(t(0.0), t(2.0), t(0.0), t(1.0)).item() == pytest.approx(1.5 - LN2, rel=1e-14)
    # log(3/0.5) + (0.25 + 4) / 18 - 1/2
    expected = math.log(6.0) + 4.25 / 18 - 0.5
    assert gaussian_kl(t(-1.0), t(0.5), t(1.0), t(3.0)).item() == pytest.approx(expected, rel=1e-14)


def test_gaussian_kl_matches_monte_carlo() -> None:
    gen = torch.Generator().manual_seed(0)
    n = 400_000
    params = [(0.3, 0.7, -0.2, 1.3), (2.0, 1.5, 0.0, 1.0), (0.0, 0.1, 0.05, 0.12)]
    for mu_q, std_q, mu_p, std_p in params:
        z = mu_q + std_q * torch.randn(n, generator=gen, dtype=torch.float64)
        # log q(z) - log p(z), written out (not via gaussian_log_prob).
        log_q = -0.5 * ((z - mu_q) / std_q) ** 2 - math.log(std_q)
        log_p = -0.5 * ((z - mu_p) / std_p) ** 2 - math.log(std_p)
        diff = log_q - log_p
        estimate, stderr = diff.mean().item(), diff.std().item() / math.sqrt(n)
        kl = gaussian_kl(*(torch.tensor(v, dtype=torch.float64) for v in (mu_q, std_q, mu_p, std_p))).item()
        assert abs(kl - estimate) < 5 * stderr + 1e-12


def test_gaussian_kl_zero_when_equal_and_nonnegative() -> None:
    gen = torch.Generator().manual_seed(1)
    for dtype in (torch.float32, torch.float64):
        mu = 10 * torch.randn(1000, generator=gen).to(dtype)
        std = torch.exp(8 * torch.randn(1000, generator=gen)).to(dtype)  # ~1e-30 .. 1e30
        std = std.clamp(1e-30, 1e30)
        assert torch.equal(gaussian_kl(mu, std, mu, std), torch.zeros_like(mu))
        mu2 = 10 * torch.randn(1000, generator=gen).to(dtype)
        std2 = torch.exp(8 * torch.randn(1000, generator=gen)).to(dtype).clamp(1e-30, 1e30)
        kl = gaussian_kl(mu, std, mu2, std2)
        assert torch.isfinite(kl).all() and (kl >= 0).all()
        # nearly equal distributions: tiny but still non-negative
        near = gaussian_kl(mu, std * (1 + 1e-6), mu, std)
        assert (near >= 0).all()


def test_gaussian_kl_small_std_and_broadcasting() -> None:
    # std = 1e-30 in float32: the textbook form would square it to 0 and divide by 0.
    kl = gaussian_kl(torch.tensor(1e-30), torch.tensor(1e-30), torch.tensor(0.0), torch.tensor(1e-30))
    assert kl.item() == pytest.approx(0.5, rel=1e-5)
    kl = gaussian_kl(torch.tensor(0.0), torch.tensor(1e-30), torch.tensor(0.0), torch.tensor(2e-30))
    assert kl.item() == pytest.approx(LN2 - 0.375, rel=1e-5)
    out = gaussian_kl(torch.zeros(4, 1, 3), torch.ones(1, 5, 1), torch.zeros(3), torch.ones(()))
    assert out.shape == (4, 5, 3) and torch.equal(out, torch.zeros(4, 5, 3))


# ------------------------------------------------------------------ log prob / sampling


def test_gaussian_log_prob_matches_formula() -> None:
    gen = torch.Generator().manual_seed(2)
    z = torch.randn(50, generator=gen, dtype=torch.float64)
    mu = torch.randn(50, generator=gen, dtype=torch.float64)
    std = torch.exp(torch.randn(50, generator=gen, dtype=torch.float64))
    expected = [
        math.log(1.0 / (s * math.sqrt(2 * math.pi)) * math.exp(-((a - m) ** 2) / (2 * s * s)))
        for a, m, s in zip(z.tolist(), mu.tolist(), std.tolist())
    ]
    np.testing.assert_allclose(gaussian_log_prob(z, mu, std).numpy(), expected, rtol=1e-12, atol=1e-12)
    assert gaussian_log_prob(torch.zeros(2, 1), torch.zeros(3), torch.ones(())).shape == (2, 3)


def test_gaussian_sample_reproducible_and_moments() -> None:
    n = 200_000
    mu = torch.tensor([1.5, -2.0, 0.0])
    std = torch.tensor([0.5, 2.0, 1e-3])
    a = gaussian_sample(mu.expand(n, 3), std.expand(n, 3), generator=torch.Generator().manual_seed(3))
    b = gaussian_sample(mu.expand(n, 3), std.expand(n, 3), generator=torch.Generator().manual_seed(3))
    assert a.shape == (n, 3) and torch.equal(a, b)
    mean, sd = a.double().mean(0), a.double().std(0)
    np.testing.assert_array_less((mean - mu.double()).abs().numpy(), (5 * std.double() / math.sqrt(n)).numpy())
    np.testing.assert_allclose(sd.numpy(), std.double().numpy(), rtol=0.01)
    # temperature scales the noise
    hot = gaussian_sample(mu.expand(n, 3), std.expand(n, 3), temperature=0.5,
                          generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(hot - mu, 0.5 * (a - mu))


def test_gaussian_sample_temperature_zero_is_mean_and_grad_flows() -> None:
    mu = torch.randn(4, 3)
    std = torch.rand(4, 3) + 0.1
    assert torch.equal(gaussian_sample(mu, std, temperature=0.0), mu)
    mu.requires_grad_()
    std.requires_grad_()
    gaussian_sample(mu, std, generator=torch.Generator().manual_seed(0)).sum().backward()
    assert torch.equal(mu.grad, torch.ones(4, 3)) and std.grad is not None
    # broadcasting of mu against std; low-precision inputs keep their dtype
    assert gaussian_sample(torch.zeros(3), torch.ones(2, 1)).shape == (2, 3)
    assert gaussian_sample(torch.zeros(3, dtype=torch.bfloat16), torch.ones(3, dtype=torch.bfloat16)).dtype == (
        torch.bfloat16
    )
