"""The inference shortcuts give the numbers of the full pass (issue 22).

Every job runs the one masked top-down path of ``VAE`` and asks only for what its output
needs: ``encode`` stops after the deepest kept layer, ``analyze-kl`` skips the output head,
``eval`` scores the mixture of logistics a few images at a time; an encoding runs the posterior
nets of its kept layers only. Each shortcut is checked
against the full pass (every layer and the likelihood) on small presets and on an imported
official Efficient-VDVAE layout (the hand-written config of tests/test_import_efficient.py).
"""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch

from test_import_efficient import tiny_hparams
from vdvae_latents.core.errors import UserError
from vdvae_latents.interop.efficient import official_layout
from vdvae_latents.latents.active_set import build_active_set
from vdvae_latents.latents.encoder import Encoder
from vdvae_latents.latents.stats import LatentKL
from vdvae_latents.model import heads
from vdvae_latents.model.evaluation import evaluate
from vdvae_latents.model.inputs import prepare_batch
from vdvae_latents.model.precision import autocast, resolve_precision
from vdvae_latents.model.vae import VAE
from vdvae_latents.train.presets import get_preset

MODELS = ["tiny", "digits-cpu", "official"]


def _config(name: str):
    return official_layout(tiny_hparams()).cfg if name == "official" else get_preset(name).config


@pytest.fixture(scope="module", params=MODELS)
def model(request) -> VAE:
    torch.manual_seed(0)
    vae = VAE(_config(request.param)).eval()
    with torch.no_grad():
        for p in vae.parameters():  # zero-initialised biases and states become distinguishable
            p.add_(0.05 * torch.randn_like(p))
    return vae


def _pixels(cfg, n: int, seed: int = 0) -> np.ndarray:
    g = np.random.default_rng(seed)
    return g.integers(0, 256, (n, cfg.image_size, cfg.image_size, cfg.channels), dtype=np.uint8)


def _images(cfg, n: int, seed: int = 0) -> torch.Tensor:
    x = torch.from_numpy(_pixels(cfg, n, seed)).permute(0, 3, 1, 2).float()
    return x / 127.5 - 1


def _same_layer(a, b) -> None:
    for name in ("kl", "q_mean", "q_std", "p_mean", "p_std", "z"):
        torch.testing.assert_close(getattr(a, name), getattr(b, name), rtol=0, atol=0, msg=name)


def _some_masks(cfg, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(shape, generator=g) < 0.5 for shape in cfg.layer_shapes()]


class TestStopAfter:
    """``stop_after=k``: layers 0..k exactly as in the full pass; nothing below, no likelihood."""

    @pytest.mark.parametrize("posterior,masked", [("sample", "mean"), ("mean", "mean"), ("sample", "sample")])
    def test_kept_layers_equal_the_full_pass(self, model, posterior, masked):
        x, n = _images(model.cfg, 3), model.cfg.n_layers
        active = _some_masks(model.cfg) if masked == "sample" else None
        with torch.no_grad():
            full = model(x, active=active, posterior=posterior, masked=masked,
                         generator=torch.Generator().manual_seed(5))
            for k in range(n):
                short = model(x, active=active, posterior=posterior, masked=masked, stop_after=k,
                              generator=torch.Generator().manual_seed(5))
                assert len(short.layers) == k + 1
                for a, b in zip(full.layers, short.layers):
                    _same_layer(a, b)
                if k < n - 1:
                    assert short.nll is None and short.features is None
                else:
                    torch.testing.assert_close(short.nll, full.nll, rtol=0, atol=0)

    @pytest.mark.parametrize("posterior,masked", [("sample", "mean"), ("sample", "sample")])
    def test_generator_ends_where_the_full_pass_leaves_it(self, model, posterior, masked):
        """The next batch sharing the generator sees the same noise (skipped layers' draws are taken)."""
        x = _images(model.cfg, 2)
        active = _some_masks(model.cfg)
        g_full, g_short = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
        with torch.no_grad():
            model(x, active=active, posterior=posterior, masked=masked, generator=g_full)
            model(x, active=active, posterior=posterior, masked=masked, generator=g_short, stop_after=0)
        assert torch.equal(g_full.get_state(), g_short.get_state())

    def test_no_likelihood_keeps_every_layer(self, model):
        x = _images(model.cfg, 2)
        with torch.no_grad():
            full = model(x, posterior="mean")
            kl_only = model(x, posterior="mean", likelihood=False)
        assert kl_only.nll is None and len(kl_only.layers) == model.cfg.n_layers
        for a, b in zip(full.layers, kl_only.layers):
            _same_layer(a, b)

    def test_layer_out_of_range_is_refused(self, model):
        with pytest.raises(ValueError, match="stop_after"):
            model(_images(model.cfg, 1), stop_after=model.cfg.n_layers)


class TestPosteriorLayers:
    """``posterior_layers``: a layer with no active dim may skip its posterior net; every number
    the pass gives is the full pass's, and the generator moves as in the full pass."""

    @pytest.mark.parametrize("posterior,masked", [("sample", "mean"), ("mean", "mean"), ("sample", "sample")])
    def test_skipped_posteriors_change_nothing_else(self, model, posterior, masked):
        n = model.cfg.n_layers
        runs = [k % 3 == 0 for k in range(n)]  # layer 0, 3, 6, ... keep their posterior
        masks = [m if r else torch.zeros_like(m) for m, r in zip(_some_masks(model.cfg), runs)]
        x = _images(model.cfg, 3)
        g_full, g_skip = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
        with torch.no_grad():
            for _ in range(2):  # a second batch on the same generators sees the same noise
                full = model(x, active=masks, posterior=posterior, masked=masked, generator=g_full)
                skip = model(x, active=masks, posterior=posterior, masked=masked, generator=g_skip,
                             posterior_layers=runs)
                torch.testing.assert_close(skip.nll, full.nll, rtol=0, atol=0)
                for a, b, r in zip(full.layers, skip.layers, runs):
                    if r:
                        _same_layer(a, b)
                    else:
                        assert b.q_mean is None and b.q_std is None and b.kl is None
                        assert not a.kl.any()  # the full pass's KL there is zero too
                        for name in ("p_mean", "p_std", "z"):
                            torch.testing.assert_close(getattr(b, name), getattr(a, name), rtol=0, atol=0)
        assert torch.equal(g_full.get_state(), g_skip.get_state())

    def test_a_layer_with_active_dims_cannot_skip(self, model):
        runs = [True] * model.cfg.n_layers
        runs[0] = False
        with pytest.raises(ValueError, match="layer 0 cannot skip its posterior"):
            model(_images(model.cfg, 1), posterior_layers=runs)
        with pytest.raises(ValueError, match="posterior_layers must have one entry per latent layer"):
            model(_images(model.cfg, 1), posterior_layers=[True])


def _active_set(model, keep_layers: list[int]):
    """An active set keeping variates 0 and 1 of ``keep_layers``."""
    stats = LatentKL(batch_size=8, posterior="mean").fit(model, _pixels(model.cfg, 8))
    active = build_active_set(stats, keep=0.5)
    chosen = np.flatnonzero(np.isin(active.table.layer, keep_layers) & (active.table.variate < 2))
    return dataclasses.replace(active, selected=chosen)


class TestEncoder:
    """Encodings (stopped after the deepest kept layer) equal the kept columns of the full pass."""

    @pytest.mark.parametrize("statistic", ["mean", "sample", "mean+std"])
    def test_encodings_equal_the_full_pass(self, model, statistic):
        n = model.cfg.n_layers
        active = _active_set(model, [0, max(0, n // 2 - 1)])
        enc = Encoder(model, active, statistic=statistic)
        assert enc.deepest_layer == max(0, n // 2 - 1)
        masks = active.layer_masks()
        g_enc, g_full = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
        for seed in (0, 1):  # two batches on one generator: the second one's noise must match too
            x = _images(model.cfg, 3, seed)
            feats, stds = enc.encode(x, generator=g_enc)
            with torch.no_grad():
                full = model(x, active=masks, posterior="mean" if statistic != "sample" else "sample",
                             masked="mean", generator=g_full)
            cols = enc.columns
            want = torch.cat([(layer.z if statistic == "sample" else layer.q_mean)[:, torch.from_numpy(m)]
                              for layer, m in zip(full.layers, cols.masks)], 1)
            torch.testing.assert_close(feats, want, rtol=0, atol=0)
            if statistic == "mean+std":
                want_std = torch.cat([layer.q_std[:, torch.from_numpy(m)] for layer, m in zip(full.layers, cols.masks)], 1)
                torch.testing.assert_close(stds, want_std, rtol=0, atol=0)


class TestKLTable:
    """analyze-kl's statistics (no output head) equal those accumulated from the full pass."""

    def test_latent_kl_equals_full_pass_sums(self, model):
        pixels = _pixels(model.cfg, 6)
        stats = LatentKL(batch_size=3, seed=4).fit(model, pixels)
        g = torch.Generator().manual_seed(4)
        kl = [torch.zeros(s, dtype=torch.float64) for s in model.cfg.layer_shapes()]
        with torch.no_grad():
            for lo in (0, 3):
                x = prepare_batch(model.cfg, pixels[lo:lo + 3], device="cpu")  # as LatentKL scales pixels
                for k, layer in enumerate(model(x, generator=g).layers):
                    kl[k] += layer.kl.double().sum(0)
        for k in range(len(kl)):
            np.testing.assert_allclose(stats.element_kl_[k], (kl[k] / 6).numpy(), rtol=1e-12, atol=0)

    def test_channels_last_gives_the_same_table(self, model):
        pixels = _pixels(model.cfg, 4)
        plain = LatentKL(batch_size=4).fit(model, pixels)
        fast = LatentKL(batch_size=4).fit(copy.deepcopy(model).use_channels_last(), pixels)
        for a, b in zip(plain.element_kl_, fast.element_kl_):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)

    def test_bf16_table_is_close_and_never_negative(self, model):
        pixels = _pixels(model.cfg, 4)
        fp32 = LatentKL(batch_size=4).fit(model, pixels)
        with autocast("bf16", "cpu"):
            bf16 = LatentKL(batch_size=4).fit(model, pixels)
        for a, b in zip(fp32.element_kl_, bf16.element_kl_):
            assert (b >= 0).all()
            np.testing.assert_allclose(b.sum(), a.sum(), rtol=0.05)


class TestEval:
    """eval's numbers: the chunked mixture log-probability and channels_last change nothing."""

    def test_chunked_mixture_equals_one_call(self, model, monkeypatch):
        x = _images(model.cfg, 5)
        h = torch.randn(5, model.cfg.widths[-1], model.cfg.image_size, model.cfg.image_size)
        with torch.enable_grad():
            one_call = model.head.log_prob(h, x).detach()
        monkeypatch.setattr(heads, "_MOL_CHUNK_ELEMENTS", 1)  # one image at a time
        with torch.no_grad():
            chunked = model.head.log_prob(h, x)
        torch.testing.assert_close(chunked, one_call, rtol=0, atol=0)

    def test_channels_last_evaluation_equals_plain(self, model):
        pixels = _pixels(model.cfg, 4)
        plain = evaluate(model, pixels, batch_size=2, seed=1)
        fast = evaluate(copy.deepcopy(model).use_channels_last(), pixels, batch_size=2, seed=1)
        assert fast.nll_nats == pytest.approx(plain.nll_nats, rel=1e-5)
        assert fast.kl_nats == pytest.approx(plain.kl_nats, rel=1e-4)


class TestPrecision:
    def test_names(self):
        assert resolve_precision("fp32", "cpu") == "fp32" and resolve_precision("bf16", "cpu") == "bf16"
        assert resolve_precision("auto", "cpu") in ("fp32", "bf16")
        with pytest.raises(UserError, match="--precision must be one of auto, fp32, bf16"):
            resolve_precision("half", "cpu")

    def test_fp32_runs_without_autocast(self):
        with autocast("fp32", "cpu"):
            assert not torch.is_autocast_enabled("cpu")
        with autocast("bf16", "cpu"):
            assert torch.is_autocast_enabled("cpu")
