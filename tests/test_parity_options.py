"""Model options that openai/vdvae's models need, checked against closed forms and brute force.

* input normalisation: the bottom-up path reads ``(x + shift) * scale``;
* truncated 5-bit data (FFHQ-256): 8-bit input, target with the low bits cleared on the
  8-bit scale, half bin 1/31, only the lowest level an edge bin;
* the PixelCNN++ density fallback for bins with mass <= 1e-5;
* per-resolution widths for the vdvae architecture (zero channels appended at each pool,
  the first channels kept at each upsampling);
* float64 models stay float64 through the output head.
"""

from __future__ import annotations

import math

import mpmath
import numpy as np
import pytest
import torch

from vdvae_latents.model.inputs import prepare_batch
from vdvae_latents.model.blocks import AvgPoolCell
from vdvae_latents.model.config import ModelConfig
from vdvae_latents.model.heads import MixtureOfLogisticsHead
from vdvae_latents.model.likelihoods import discretized_mol_log_prob, quantize, sample_mol, truncate_bits
from vdvae_latents.model.vae import VAE


def vdvae_cfg(**changes) -> ModelConfig:
    """A small RGB vdvae-architecture model with widths narrowing toward the image."""
    base = dict(image_size=8, channels=3, n_mixtures=2, resolutions=(1, 4, 8), up_blocks=(1, 2, 1),
                down_blocks=(1, 1, 1), widths=(24, 16, 8), bottleneck=0.5, variates=3, architecture="vdvae",
                activation="gelu", mol_bounded=True)
    base.update(changes)
    return ModelConfig(**base)


def randomised(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every parameter (zero-initialised ones too) random values, so that all of them matter."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.1 * torch.randn(p.shape, generator=gen))
    return model.eval()


mpmath.mp.dps = 50  # brute force without cancellation: bin masses as CDF differences at 50 digits


def logistic_cdf(t) -> mpmath.mpf:
    return 1 / (1 + mpmath.exp(-mpmath.mpf(t)))


# ------------------------------------------------------------------ input normalisation


def test_bottom_up_reads_the_normalised_input():
    """With shift/scale the encoder sees (x + shift) * scale; the likelihood still scores x."""
    plain, normed = vdvae_cfg(), vdvae_cfg(input_shift=0.25, input_scale=1.75)
    assert not plain.normalises_input and normed.normalises_input
    a = randomised(VAE(plain))
    b = VAE(normed).eval()
    b.load_state_dict(a.state_dict())
    x = quantize(torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1)
    with torch.no_grad():
        for sa, sb in zip(a.bottom_up((x + 0.25) * 1.75), b.bottom_up(x)):
            torch.testing.assert_close(sb, sa, rtol=0, atol=0)
        # Same skips, so the same decoder state; only the scored target differs from a's input.
        out_b = b(x, posterior="mean")
        feats, _ = a.top_down(a.bottom_up((x + 0.25) * 1.75), 2, a.make_plans(
            active=None, posterior="mean", masked="mean", temperature=1.0, given=None, generator=None,
            batch=2, device=x.device))
        torch.testing.assert_close(out_b.nll, -a.head.log_prob(feats, x), rtol=0, atol=0)


def test_normalisation_is_not_a_folded_first_conv():
    """Folding (x + s) * k into the 3x3 input conv changes the border pixels (zero padding)."""
    a = randomised(VAE(vdvae_cfg(input_shift=0.5, input_scale=2.0)))
    conv = a.input_conv
    x = torch.zeros(1, 3, 8, 8)
    folded = torch.nn.functional.conv2d(x, conv.weight * 2.0, conv.bias + (conv.weight * 2.0 * 0.5).sum((1, 2, 3)),
                                        padding=1)
    exact = conv((x + 0.5) * 2.0)
    assert torch.allclose(folded[..., 1:-1, 1:-1], exact[..., 1:-1, 1:-1], atol=1e-6)
    assert not torch.allclose(folded[..., 0, :], exact[..., 0, :], atol=1e-3)


# ------------------------------------------------------------------ truncated 5-bit data


def all_8bit_values() -> torch.Tensor:
    return (torch.arange(256, dtype=torch.float64) - 127.5) / 127.5


def test_truncate_bits_clears_the_low_bits_on_the_8bit_scale():
    """v -> 8 * floor(v / 8), then (t - 127.5) / 127.5, for every 8-bit value (and noisy inputs)."""
    x = all_8bit_values()
    expected = torch.tensor([(8 * (v // 8) - 127.5) / 127.5 for v in range(256)], dtype=torch.float64)
    torch.testing.assert_close(truncate_bits(x, 5), expected, rtol=0, atol=0)
    torch.testing.assert_close(truncate_bits(x.float(), 5), expected.float(), rtol=0, atol=0)
    torch.testing.assert_close(truncate_bits(x + 1e-4, 5), expected, rtol=0, atol=0)
    assert expected.min() == -1 and abs(expected.max().item() - 120.5 / 127.5) < 1e-15  # -1 .. 0.945


TOP_5BIT = 248 / 127.5 - 1  # the truncated grid's highest level, 0.945


def brute_force_truncated_log_prob(t: float, mu: float, s: float, top_edge: bool = False) -> float:
    """log P of level t: a bin of half width 1/31; the lowest level's bin reaches -inf; the highest
    reaches +inf only with ``top_edge`` (the official Efficient-VDVAE code), never in openai/vdvae."""
    h = mpmath.mpf(1) / 31
    upper = 1 if top_edge and abs(t - TOP_5BIT) < 1e-9 else logistic_cdf((t + h - mu) / s)
    lower = 0 if t == -1.0 else logistic_cdf((t - h - mu) / s)
    return float(mpmath.log(upper - lower))


@pytest.mark.parametrize("reduction", ["truncate", "truncate-all"])
@pytest.mark.parametrize("mu,s", [(0.0, 0.3), (0.9, 0.05), (-0.97, 0.1), (0.95, 0.02)])
def test_truncated_head_scores_every_8bit_value_like_brute_force(mu, s, reduction):
    """The head of a truncate config scores 8-bit input by its truncated level, bin by bin."""
    cfg = ModelConfig(image_size=16, channels=1, n_bits=5, bit_reduction=reduction, n_mixtures=1,
                      resolutions=(16,), up_blocks=1, down_blocks=0, widths=4, variates=1,
                      architecture="vdvae", mol_bounded=True)
    head = MixtureOfLogisticsHead(cfg, 4).double()
    with torch.no_grad():  # out conv emits (logit 0, mean mu, log-scale log s) everywhere
        head.out.weight.zero_()
        head.out.bias.copy_(torch.tensor([0.0, mu, math.log(s)], dtype=torch.float64))
    x = all_8bit_values().reshape(1, 1, 16, 16)
    got = head.log_prob(torch.zeros(1, 4, 16, 16, dtype=torch.float64), x)
    levels = truncate_bits(all_8bit_values(), 5).tolist()
    expected = sum(brute_force_truncated_log_prob(t, mu, s, reduction == "truncate-all") for t in levels)
    assert got.dtype == torch.float64
    assert got.item() == pytest.approx(expected, rel=1e-12)


def test_truncate_all_encoder_reads_the_truncated_image():
    """bit_reduction='truncate-all': the bottom-up path sees exactly the truncated image, 'truncate' the 8-bit one."""
    images = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (2, 8, 8, 3), dtype=np.uint8))
    for reduction, see_truncated in (("truncate-all", True), ("truncate", False)):
        cfg = vdvae_cfg(n_bits=5, bit_reduction=reduction)
        model = VAE(cfg).double()
        x = prepare_batch(cfg, images.numpy()).double()
        seen = {}
        model.input_conv.register_forward_pre_hook(lambda mod, args: seen.update(x=args[0]))
        model(x, posterior="mean")
        want = truncate_bits(x, 5) if see_truncated else x
        assert torch.equal(seen["x"], want), reduction


def test_truncated_config_reads_8bit_images_and_writes_8bit_levels():
    cfg = vdvae_cfg(n_bits=5, bit_reduction="truncate")
    assert cfg.image_bits == 8 and vdvae_cfg(n_bits=5).image_bits == 5
    images = np.arange(192, dtype=np.uint8).reshape(1, 8, 8, 3)
    x = prepare_batch(cfg, images)
    torch.testing.assert_close(x, (torch.from_numpy(images).permute(0, 3, 1, 2).float() - 127.5) / 127.5)


def test_quantize_truncated_rounds_to_the_nearest_level():
    x = torch.linspace(-1.2, 1.2, 2001, dtype=torch.float64) + 1e-7  # no ties between two levels
    levels = torch.tensor([(8 * k - 127.5) / 127.5 for k in range(32)], dtype=torch.float64)
    nearest = levels[(x.clamp(-1, 1)[:, None] - levels[None]).abs().argmin(1)]
    torch.testing.assert_close(quantize(x, 5, truncated=True), nearest, rtol=0, atol=1e-15)
    gen = torch.Generator().manual_seed(0)
    w, mu = torch.randn(4, 2, 3, 3, generator=gen), torch.randn(4, 2, 3, 3, 3, generator=gen)
    draws = sample_mol(w, mu, torch.full_like(mu, 0.3), n_bits=5, generator=gen, truncated=True)
    assert torch.isin(draws.double(), levels.float().double()).all()


# ------------------------------------------------------------------ PixelCNN++ tail (density fallback)


def test_pixelcnn_tail_replaces_tiny_interior_bins_only():
    """tail='pixelcnn': bins with mass <= 1e-5 score log(2h * logistic density at x); others keep their mass."""
    h = 1.0 / 255.0
    s = torch.tensor(0.01, dtype=torch.float64)
    xs = torch.tensor([0.0, 0.05, 0.2, -1.0, 1.0], dtype=torch.float64)  # near, near, far, both edges
    mu = torch.tensor(0.0, dtype=torch.float64)
    shape = (1, 1, 1, 1, len(xs))
    args = dict(logit_weights=torch.zeros(1, 1, 1, len(xs), dtype=torch.float64),
                means=mu.expand(shape).clone(), scales=s.expand(shape).clone())
    x = xs.reshape(1, 1, 1, len(xs))
    per_pixel = []
    for tail in ("exact", "pixelcnn"):
        per_pixel.append(torch.stack([
            discretized_mol_log_prob(x[..., i:i + 1], **{k: v[..., i:i + 1] for k, v in args.items()},
                                     tail=tail) for i in range(len(xs))]).squeeze(1))
    exact, fallback = per_pixel
    for i, xv in enumerate(xs.tolist()):
        z = mpmath.mpf(xv) / mpmath.mpf("0.01")
        hs = mpmath.mpf(1) / 255 / mpmath.mpf("0.01")
        if xv == -1.0:
            mass = logistic_cdf(z + hs)
        elif xv == 1.0:
            mass = logistic_cdf(hs - z)  # the upper tail, 1 - cdf(z - hs), without cancellation
        else:
            mass = logistic_cdf(z + hs) - logistic_cdf(z - hs)
        density = mpmath.exp(-z) / (mpmath.mpf("0.01") * (1 + mpmath.exp(-z)) ** 2)
        assert exact[i].item() == pytest.approx(float(mpmath.log(mass)), rel=1e-12)
        if mass <= 1e-5 and abs(xv) < 1:
            assert fallback[i].item() == pytest.approx(float(mpmath.log(2 * h * density)), rel=1e-12)
        else:
            assert fallback[i].item() == pytest.approx(exact[i].item(), rel=1e-12)
    assert (fallback != exact).any()  # the far pixel (x = 0.2) did fall back


# ------------------------------------------------------------------ per-resolution widths


def test_avg_pool_cell_appends_zero_channels():
    torch.manual_seed(0)
    cell = AvgPoolCell(8, 4, 2, resolution=8, activation="gelu", last_scale=1.0, out_width=12)
    x = torch.randn(2, 8, 8, 8)
    y = cell(x)
    assert y.shape == (2, 12, 4, 4)
    torch.testing.assert_close(y[:, :8], torch.nn.functional.avg_pool2d(cell.cell(x), 2))
    assert (y[:, 8:] == 0).all()


def test_upsampling_keeps_the_first_channels_of_a_wider_resolution():
    """The 4x4 state only sees the first 16 channels of the 1x1 state (24 wide)."""
    model = randomised(VAE(vdvae_cfg()))
    plans = model.make_plans(active=None, posterior="mean", masked="mean", temperature=1.0, given=None,
                             generator=None, batch=1, device="cpu")
    with torch.no_grad():
        model.up_blocks[0][0].cell.c4.bias[16:] += 5.0  # change only the dropped channels' output
        perturbed, _ = model.top_down(None, 1, plans)
        model.up_blocks[0][0].cell.c4.bias[16:] -= 5.0
        base, _ = model.top_down(None, 1, plans)
    torch.testing.assert_close(perturbed, base, rtol=0, atol=0)


def test_narrowing_vdvae_model_runs_every_path():
    model = randomised(VAE(vdvae_cfg(n_bits=5, bit_reduction="truncate", input_shift=0.1, input_scale=1.5)))
    x = quantize(torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(2)) * 2 - 1)
    with torch.no_grad():
        out = model(x)
        assert torch.isfinite(out.nll).all() and [k.shape[1] for k in out.kl] == [3, 3, 3, 3]
        assert model.sample(2).shape == (2, 3, 8, 8)
        assert model.reconstruct(x, posterior="mean").shape == (2, 3, 8, 8)


def test_float64_model_stays_float64():
    """The head no longer downcasts: a float64 model scores in float64, close to float32."""
    model = randomised(VAE(vdvae_cfg()))
    x = quantize(torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(3)) * 2 - 1)
    with torch.no_grad():
        out32 = model(x, posterior="mean")
        out64 = model.double()(x.double(), posterior="mean")
    assert out64.nll.dtype == torch.float64 and out64.kl[0].dtype == torch.float64
    torch.testing.assert_close(out64.nll.float(), out32.nll, rtol=1e-5, atol=1e-3)
