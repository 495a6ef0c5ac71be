"""Behaviour of the VAE model core: ELBO pieces, pruned forward passes, sampling, decoding.

Everything is checked against closed forms (Gaussian KL, Bernoulli log-likelihood,
the nats/dim formula), brute force over the returned tensors, or invariants the design
requires (pruned dims carry zero KL and take the prior; a compact encoding decodes to
the pruned reconstruction). Models are tiny so that the whole file runs in seconds.
"""

from __future__ import annotations

import math

import pytest
import torch

from vdvae_latents.model.config import ModelConfig
from vdvae_latents.train.presets import get_preset
from vdvae_latents.model.vae import VAE


CONFIGS = {
    "efficient-mol-gray": get_preset("tiny").config,
    "vdvae-mol-gray": ModelConfig(image_size=8, channels=1, n_mixtures=3, resolutions=(1, 4, 8), up_blocks=(1, 2, 1),
                                  down_blocks=(1, 1, 1), widths=16, bottleneck=0.5, variates=3,
                                  architecture="vdvae", activation="gelu", mol_bounded=True),
    "efficient-mol-rgb": ModelConfig(image_size=4, channels=3, n_mixtures=2, resolutions=(1, 2, 4), up_blocks=(1, 1, 2),
                                     down_blocks=(1, 1, 1), widths=(16, 16, 8), skip_widths=(8, 4, 4), bottleneck=0.5,
                                     variates=(3, 2, 2)),
    "vdvae-mol-rgb": ModelConfig(image_size=4, channels=3, n_mixtures=2, n_bits=5, resolutions=(1, 4), up_blocks=(1, 2),
                                 down_blocks=(1, 1), widths=16, bottleneck=0.5, variates=2, architecture="vdvae",
                                 activation="gelu", mol_bounded=True),
    "efficient-bernoulli-pad": ModelConfig(image_size=8, channels=1, output="bernoulli", pad=1, resolutions=(1, 4, 8),
                                           up_blocks=(1, 1, 2), down_blocks=(1, 0, 1), widths=(16, 16, 8),
                                           bottleneck=0.5, variates=2),
}
NAMES = list(CONFIGS)


def build(cfg: ModelConfig, seed: int = 0) -> VAE:
    torch.manual_seed(seed)
    return VAE(cfg)


def images(cfg: ModelConfig, batch: int = 6, seed: int = 0) -> torch.Tensor:
    """Structured inputs in [-1, 1]: blocky images on the n-bit grid (or -1/1 for binary data)."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(batch, cfg.channels, 2, 2, generator=g)
    x = torch.nn.functional.interpolate(coarse, size=(cfg.image_size, cfg.image_size), mode="nearest")
    x = (x + 0.15 * torch.rand(x.shape, generator=g)).clamp(0, 1)
    if cfg.output == "bernoulli":
        x = torch.where(x > 0.5, 1.0, -1.0)
        if cfg.pad:  # padding is background (-1), as the data pipeline pads
            p = cfg.pad
            inner = x[..., p:-p, p:-p].clone()
            x = torch.full_like(x, -1.0)
            x[..., p:-p, p:-p] = inner
        return x
    top = 2**cfg.n_bits - 1
    return torch.round(x * top) / top * 2 - 1


def random_masks(cfg: ModelConfig, density: float, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(shape, generator=g) < density for shape in cfg.layer_shapes()]


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def textbook_kl(mq, sq, mp, sp) -> torch.Tensor:
    """KL(N(mq, sq^2) || N(mp, sp^2)) in float64, the textbook formula."""
    mq, sq, mp, sp = (t.double() for t in (mq, sq, mp, sp))
    return torch.log(sp / sq) + (sq**2 + (mq - mp) ** 2) / (2 * sp**2) - 0.5


def on_pixel_grid(x: torch.Tensor, n_bits: int) -> bool:
    k = (x.double() + 1) / 2 * (2**n_bits - 1)
    return bool(((k - k.round()).abs() < 1e-4).all())


@pytest.fixture(params=NAMES)
def cfg(request) -> ModelConfig:
    return CONFIGS[request.param]


class TestForwardShapes:
    """A forward pass returns finite per-image NLLs and one KL map per latent layer."""

    def test_finite_loss_and_kl_maps_match_layer_shapes(self, cfg):
        model, x = build(cfg), images(cfg, batch=5)
        out = model(x, generator=gen(0))
        assert out.nll.shape == (5,)
        assert torch.isfinite(out.loss) and torch.isfinite(out.nll).all()
        shapes = cfg.layer_shapes()
        assert len(out.layers) == len(shapes) == len(out.kl)
        for layer, shape in zip(out.layers, shapes):
            for t in (layer.kl, layer.q_mean, layer.q_std, layer.p_mean, layer.p_std, layer.z):
                assert tuple(t.shape) == (5, *shape)
                assert torch.isfinite(t).all()
            assert (layer.q_std > 0).all() and (layer.p_std > 0).all()

    def test_kl_maps_are_non_negative(self, cfg):
        model, x = build(cfg), images(cfg)
        # Perturb the weights so that posterior and prior differ noticeably.
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=gen(1)))
        out = model(x, generator=gen(0))
        assert all((k >= 0).all() for k in out.kl)
        assert out.kl_per_image.gt(0).all()

    def test_batch_items_are_independent(self, cfg):
        """Image i's NLL and KL do not depend on the other images in the batch."""
        model, x = build(cfg), images(cfg, batch=4)
        full = model(x, posterior="mean")
        part = model(x[1:3], posterior="mean")
        torch.testing.assert_close(part.nll, full.nll[1:3], rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(part.kl_per_image, full.kl_per_image[1:3], rtol=1e-5, atol=1e-5)


class TestLossClosedForm:
    """The loss is the negative ELBO in nats/dim, built from the returned pieces."""

    def test_loss_is_mean_negative_elbo_per_dim(self, cfg):
        model, x = build(cfg), images(cfg)
        out = model(x, generator=gen(0))
        kl = sum(layer.kl.double().sum(dim=(1, 2, 3)) for layer in out.layers)
        dims = cfg.channels * (cfg.image_size - 2 * cfg.pad) ** 2  # un-padded crop
        assert out.dims_per_image == dims
        expected = (out.nll.double() + kl).mean() / dims
        assert out.loss.item() == pytest.approx(expected.item(), rel=1e-5)
        torch.testing.assert_close(out.kl_per_image.double(), kl, rtol=1e-5, atol=1e-6)
        s = out.summary()
        assert s["nats_per_dim"] == pytest.approx(expected.item(), rel=1e-5)
        assert s["bits_per_dim"] == pytest.approx(expected.item() / math.log(2), rel=1e-5)
        assert s["recon_bits_per_dim"] + s["kl_bits_per_dim"] == pytest.approx(s["bits_per_dim"], rel=1e-6)
        if cfg.output == "bernoulli":  # binary data is reported per image, as the paper does
            assert s["nats_per_image"] == pytest.approx(expected.item() * dims, rel=1e-5)

    def test_kl_matches_gaussian_closed_form(self, cfg):
        model, x = build(cfg), images(cfg)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=gen(2)))
        out = model(x, generator=gen(0))
        for layer in out.layers:
            ref = textbook_kl(layer.q_mean, layer.q_std, layer.p_mean, layer.p_std)
            torch.testing.assert_close(layer.kl.double(), ref, rtol=1e-4, atol=1e-6)

    def test_bernoulli_nll_scores_only_the_crop(self):
        """NLL = sum over the un-padded crop of -log sigmoid(+-logit), computed by hand."""
        cfg = CONFIGS["efficient-bernoulli-pad"]
        model, x = build(cfg), images(cfg)
        captured = {}
        model.head.out.register_forward_hook(lambda m, i, o: captured.__setitem__("logits", o.detach()))
        with torch.no_grad():
            out = model(x, posterior="mean")
        p = cfg.pad
        logits = captured["logits"][..., p:-p, p:-p].double()
        target = x[..., p:-p, p:-p] > 0
        sign = torch.where(target, 1.0, -1.0).double()
        ref = -torch.nn.functional.logsigmoid(sign * logits).sum(dim=(1, 2, 3))
        torch.testing.assert_close(out.nll.double(), ref, rtol=1e-5, atol=1e-5)

    def test_posterior_mean_mode_uses_q_mean(self, cfg):
        model, x = build(cfg), images(cfg)
        out = model(x, posterior="mean")
        for layer in out.layers:
            assert torch.equal(layer.z, layer.q_mean)

    def test_posterior_samples_are_reparameterised_gaussians(self):
        """(z - q_mean) / q_std over many elements looks like N(0, 1)."""
        cfg = CONFIGS["efficient-mol-gray"]
        model, x = build(cfg), images(cfg, batch=16)
        with torch.no_grad():
            out = model(x, generator=gen(3))
        eps = torch.cat([((l.z - l.q_mean) / l.q_std).flatten() for l in out.layers])
        assert eps.numel() > 5000
        assert abs(eps.mean().item()) < 0.08
        assert abs(eps.std().item() - 1) < 0.08


class TestTraining:
    """A few optimiser steps on one batch reduce the loss: gradients reach the parameters."""

    def test_30_adamax_steps_reduce_loss(self, cfg):
        model, x = build(cfg), images(cfg, batch=6)
        opt = torch.optim.Adamax(model.parameters(), lr=1e-2)

        def evaluate() -> float:
            with torch.no_grad():
                return model(x, generator=gen(123)).loss.item()

        before = evaluate()
        for step in range(30):
            opt.zero_grad()
            loss = model(x, generator=gen(step)).loss
            loss.backward()
            opt.step()
        after = evaluate()
        assert math.isfinite(after)
        assert after < 0.95 * before, f"loss {before:.4f} -> {after:.4f}"

    def test_every_parameter_gets_a_gradient(self, cfg):
        model, x = build(cfg), images(cfg)
        model(x, generator=gen(0)).loss.backward()
        missing = [n for n, p in model.named_parameters() if p.grad is None]
        assert not missing


class TestPrunedForwardPass:
    """Pruned dims take the prior (mean, or a tempered sample) and contribute exactly 0 KL."""

    def test_all_pruned_gives_exactly_zero_kl(self, cfg):
        model, x = build(cfg), images(cfg)
        out = model(x, active=random_masks(cfg, 0.0), generator=gen(0))
        assert all(torch.count_nonzero(k) == 0 for k in out.kl)
        assert torch.count_nonzero(out.kl_per_image) == 0
        assert out.loss.item() == pytest.approx(out.nll.mean().item() / cfg.dims_per_image, rel=1e-6)

    def test_partial_mask_zero_kl_at_pruned_and_layer0_unchanged(self, cfg):
        model, x = build(cfg), images(cfg)
        masks = random_masks(cfg, 0.5, seed=1)
        masks[0][0] = True  # make sure layer 0 has active and pruned positions
        masks[0][-1] = False
        pruned = model(x, active=masks, posterior="mean")
        full = model(x, posterior="mean")
        for layer, mask in zip(pruned.layers, masks):
            assert torch.count_nonzero(layer.kl[:, ~mask]) == 0
        # layer 0 is conditioned on nothing that was pruned
        assert torch.equal(pruned.layers[0].kl[:, masks[0]], full.layers[0].kl[:, masks[0]])
        assert (full.layers[0].kl[:, masks[0]] > 0).any()

    def test_all_active_masks_equal_no_masks(self, cfg):
        model, x = build(cfg), images(cfg)
        masked = model(x, active=random_masks(cfg, 1.1), masked="mean", generator=gen(5))
        plain = model(x, generator=gen(5))
        torch.testing.assert_close(masked.nll, plain.nll, rtol=0, atol=0)
        for a, b in zip(masked.layers, plain.layers):
            assert torch.equal(a.z, b.z) and torch.equal(a.kl, b.kl)

    def test_masked_mean_pruned_z_equal_prior_mean(self, cfg):
        model, x = build(cfg), images(cfg)
        masks = random_masks(cfg, 0.4, seed=2)
        out = model(x, active=masks, posterior="sample", masked="mean", generator=gen(0))
        for layer, mask in zip(out.layers, masks):
            assert torch.equal(layer.z[:, ~mask], layer.p_mean[:, ~mask])

    def test_active_z_follow_the_posterior(self, cfg):
        model, x = build(cfg), images(cfg)
        masks = random_masks(cfg, 0.4, seed=2)
        out = model(x, active=masks, posterior="mean", masked="mean")
        for layer, mask in zip(out.layers, masks):
            assert torch.equal(layer.z[:, mask], layer.q_mean[:, mask])

    def test_masked_sample_at_temperature_zero_is_prior_mean(self, cfg):
        model, x = build(cfg), images(cfg)
        masks = random_masks(cfg, 0.4, seed=3)
        out = model(x, active=masks, masked="sample", temperature=0.0, generator=gen(0))
        for layer, mask in zip(out.layers, masks):
            torch.testing.assert_close(layer.z[:, ~mask], layer.p_mean[:, ~mask], rtol=0, atol=0)

    @pytest.mark.parametrize("temperature", [1.0, 0.5])
    def test_masked_sample_follows_tempered_prior(self, temperature):
        """(z - p_mean) / p_std at pruned dims has standard deviation ~ temperature."""
        cfg = CONFIGS["efficient-mol-gray"]
        model, x = build(cfg), images(cfg, batch=16)
        masks = random_masks(cfg, 0.0)
        with torch.no_grad():
            out = model(x, active=masks, masked="sample", temperature=temperature, generator=gen(4))
        eps = torch.cat([((l.z - l.p_mean) / l.p_std).flatten() for l in out.layers])
        assert abs(eps.mean().item()) < 0.08 * temperature + 1e-3
        assert abs(eps.std().item() - temperature) < 0.08 * temperature

    def test_per_layer_temperatures(self):
        """A per-layer list: layers at temperature 0 take the prior mean, others do not."""
        cfg = CONFIGS["efficient-mol-gray"]
        model, x = build(cfg), images(cfg)
        temps = [0.0 if k % 2 == 0 else 1.0 for k in range(cfg.n_layers)]
        out = model(x, active=random_masks(cfg, 0.0), masked="sample", temperature=temps, generator=gen(0))
        for k, layer in enumerate(out.layers):
            assert torch.equal(layer.z, layer.p_mean) == (temps[k] == 0.0)


class TestDeterminism:
    """Seeds fix weights and samples; posterior means need no seed."""

    def test_same_seeds_give_identical_outputs(self, cfg):
        x = images(cfg)
        a = build(cfg, seed=7)(x, generator=gen(11))
        b = build(cfg, seed=7)(x, generator=gen(11))
        assert torch.equal(a.nll, b.nll)
        for la, lb in zip(a.layers, b.layers):
            assert torch.equal(la.z, lb.z) and torch.equal(la.kl, lb.kl)

    def test_different_generator_seed_gives_different_z(self, cfg):
        model, x = build(cfg), images(cfg)
        a = model(x, generator=gen(1))
        b = model(x, generator=gen(2))
        assert all(not torch.equal(la.z, lb.z) for la, lb in zip(a.layers, b.layers))

    def test_different_weight_seed_gives_different_model(self, cfg):
        x = images(cfg)
        a = build(cfg, seed=1)(x, posterior="mean")
        b = build(cfg, seed=2)(x, posterior="mean")
        assert not torch.equal(a.nll, b.nll)

    def test_posterior_mean_is_deterministic(self, cfg):
        model, x = build(cfg), images(cfg)
        a = model(x, posterior="mean")
        torch.randn(100)  # moving the global RNG must not matter
        b = model(x, posterior="mean")
        assert torch.equal(a.nll, b.nll)
        assert all(torch.equal(la.z, lb.z) for la, lb in zip(a.layers, b.layers))

    def test_seeded_sampling_is_reproducible(self, cfg):
        model = build(cfg)
        a = model.sample(3, generator=gen(9))
        b = model.sample(3, generator=gen(9))
        c = model.sample(3, generator=gen(10))
        assert torch.equal(a, b)
        assert not torch.equal(a, c)


class TestArgumentValidation:
    """Bad arguments raise ValueError with a message that says what was expected."""

    def test_temperature_list_of_wrong_length(self, cfg):
        model, x = build(cfg), images(cfg)
        with pytest.raises(ValueError, match="temperature"):
            model(x, temperature=[1.0] * (cfg.n_layers + 1))
        with pytest.raises(ValueError, match="temperature"):
            model.sample(2, temperature=[1.0] * (cfg.n_layers - 1))

    def test_wrong_input_shape_names_expected_shape(self, cfg):
        model = build(cfg)
        c, s = cfg.channels, cfg.image_size
        expected = f"{c}, {s}, {s}"
        for bad in [(2, c, s + 1, s + 1), (2, 2 if c == 1 else 1, s, s), (c, s, s), (2, c, s, s, 1)]:
            with pytest.raises(ValueError, match=expected):
                model(torch.zeros(bad))

    def test_wrong_number_of_masks(self, cfg):
        model, x = build(cfg), images(cfg)
        with pytest.raises(ValueError, match="active"):
            model(x, active=random_masks(cfg, 0.5)[:-1])

    def test_mask_of_wrong_shape(self, cfg):
        model, x = build(cfg), images(cfg)
        masks = random_masks(cfg, 0.5)
        v, h, w = masks[-1].shape
        masks[-1] = torch.ones(v + 1, h, w, dtype=torch.bool)
        with pytest.raises(ValueError, match=str((v, h, w))):
            model(x, active=masks)

    def test_given_values_of_wrong_shape(self, cfg):
        model = build(cfg)
        v, h, w = cfg.layer_shapes()[0]
        given = [None] * cfg.n_layers
        given[0] = (torch.zeros(3, v, h, w), None)
        with pytest.raises(ValueError, match="given"):
            model.sample(2, given=given)

    @pytest.mark.parametrize("kwargs", [dict(posterior="mode"), dict(masked="zero")])
    def test_unknown_modes(self, cfg, kwargs):
        model, x = build(cfg), images(cfg)
        with pytest.raises(ValueError, match=next(iter(kwargs))):
            model(x, **kwargs)


class TestSampling:
    """Samples and reconstructions are images on the data's pixel grid, cropped to the scored region."""

    def test_sample_shape_and_pixel_grid(self, cfg):
        model = build(cfg)
        s = model.sample(7, generator=gen(0))
        assert tuple(s.shape) == (7, cfg.channels, cfg.loss_size, cfg.loss_size)
        assert s.min() >= -1 and s.max() <= 1
        if cfg.output == "bernoulli":
            assert set(s.unique().tolist()) <= {-1.0, 1.0}
        else:
            assert on_pixel_grid(s, cfg.n_bits)
            assert s.unique().numel() > 2

    def test_reconstruction_shape_and_pixel_grid(self, cfg):
        model, x = build(cfg), images(cfg, batch=3)
        r = model.reconstruct(x, posterior="mean")
        assert tuple(r.shape) == (3, cfg.channels, cfg.loss_size, cfg.loss_size)
        assert r.min() >= -1 and r.max() <= 1
        assert on_pixel_grid(r, cfg.n_bits if cfg.output == "mol" else 1)

    def test_prior_mean_decoding_is_the_same_for_every_sample(self, cfg):
        """With no randomness anywhere, all n decodings coincide."""
        model = build(cfg)
        s = model.sample(4, masked="mean", deterministic_output=True)
        assert all(torch.equal(s[0], s[i]) for i in range(4))

    def test_zero_temperature_equals_prior_mean_decoding(self, cfg):
        model = build(cfg)
        a = model.sample(3, temperature=[0.0] * cfg.n_layers, deterministic_output=True, generator=gen(0))
        b = model.sample(3, masked="mean", deterministic_output=True)
        assert torch.equal(a, b)

    def test_sampling_tracks_no_gradients(self, cfg):
        model, x = build(cfg), images(cfg, batch=2)
        assert not model.sample(2).requires_grad
        assert not model.reconstruct(x).requires_grad


def encode_compact(model: VAE, x: torch.Tensor, masks: list[torch.Tensor]) -> torch.Tensor:
    """A store-like compact encoding: (B, K) posterior means of the active dims, layer by layer."""
    out = model(x, active=masks, posterior="mean", masked="mean")
    return torch.cat([layer.z[:, mask] for layer, mask in zip(out.layers, masks)], dim=1)


def decode_given(cfg: ModelConfig, compact: torch.Tensor, masks: list[torch.Tensor], fill: float = 1e3):
    """Scatter compact rows back into per-layer tensors; pruned positions hold junk that must be ignored."""
    given, start = [], 0
    g = gen(99)
    for shape, mask in zip(cfg.layer_shapes(), masks):
        values = fill * torch.randn((compact.shape[0], *shape), generator=g)
        k = int(mask.sum())
        values[:, mask] = compact[:, start:start + k]
        start += k
        given.append((values, mask))
    assert start == compact.shape[1]
    return given


class TestDecodeInvariant:
    """Decoding a compact encoding (pruned dims from the prior mean) reproduces the pruned reconstruction."""

    @pytest.mark.parametrize("density", [0.0, 0.25, 0.6, 1.1])
    def test_compact_encoding_decodes_to_pruned_reconstruction(self, cfg, density):
        model, x = build(cfg), images(cfg, batch=5)
        with torch.no_grad():  # perturb so that layers really depend on each other
            for p in model.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=gen(6)))
        masks = random_masks(cfg, density, seed=int(density * 100))
        features = []
        model.head.out.register_forward_hook(lambda m, i, o: features.append(i[0].detach().clone()))

        with torch.no_grad():
            compact = encode_compact(model, x, masks)
        assert compact.shape == (5, sum(int(m.sum()) for m in masks))
        features.clear()
        recon = model.reconstruct(x, active=masks, posterior="mean", masked="mean", deterministic=True)
        recon_features = features[-1]
        decoded = model.sample(5, given=decode_given(cfg, compact, masks), masked="mean", deterministic_output=True)
        decoded_features = features[-1]

        torch.testing.assert_close(decoded_features, recon_features, rtol=0, atol=1e-5)
        assert torch.equal(decoded, recon)

    def test_decoding_does_not_depend_on_the_batch(self, cfg):
        """Decoding a subset of compact rows gives the same features as decoding them all."""
        model, x = build(cfg), images(cfg, batch=4)
        masks = random_masks(cfg, 0.5, seed=8)
        with torch.no_grad():
            compact = encode_compact(model, x, masks)
        features = []
        model.head.out.register_forward_hook(lambda m, i, o: features.append(i[0].detach().clone()))
        model.sample(4, given=decode_given(cfg, compact, masks), masked="mean", deterministic_output=True)
        model.sample(2, given=decode_given(cfg, compact[1:3], masks), masked="mean", deterministic_output=True)
        torch.testing.assert_close(features[1], features[0][1:3], rtol=0, atol=1e-5)

    def test_pruned_reconstruction_with_all_dims_pruned_ignores_the_image(self, cfg):
        """With every dim pruned the reconstruction is the prior-mean decoding, whatever x is."""
        model = build(cfg)
        masks = random_masks(cfg, 0.0)
        a = model.reconstruct(images(cfg, batch=3, seed=1), active=masks, posterior="mean", masked="mean")
        b = model.reconstruct(images(cfg, batch=3, seed=2), active=masks, posterior="mean", masked="mean")
        prior = model.sample(3, masked="mean", deterministic_output=True)
        assert torch.equal(a, b) and torch.equal(a, prior)
