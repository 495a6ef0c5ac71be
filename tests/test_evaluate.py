"""Tests for vdvae_latents.model.evaluation against manual float64 loops and closed forms.

The model is the ``tiny`` preset (8x8 grayscale) with its posterior biases perturbed:
a freshly initialised posterior almost equals the prior (KL ~ 1e-3 nats), which would
make the KL and importance-weighting checks vacuous.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from vdvae_latents import VAE, get_preset
from vdvae_latents.model.inputs import prepare_batch
from vdvae_latents.model.blocks import LayerResult
from vdvae_latents.data import ImageDataset, ImageSet
from vdvae_latents.core.errors import DataError
from vdvae_latents.model.evaluation import EvalResult, evaluate, iw_log_weights, iw_seed
from vdvae_latents.model.vae import VAEOutput

LN2 = math.log(2.0)


# ------------------------------------------------------------------------ helpers


def make_model(output: str = "mol", seed: int = 0) -> VAE:
    cfg = get_preset("tiny").config
    if output != "mol":
        cfg = cfg.replace(output=output)
    torch.manual_seed(seed)
    model = VAE(cfg)
    with torch.no_grad():
        for blocks in model.up_blocks:
            for block in blocks:
                block.posterior_params.bias.normal_(0.0, 0.7)
    return model


@pytest.fixture(scope="module")
def model() -> VAE:
    return make_model()


def random_images(n: int, seed: int = 0) -> np.ndarray:
    """uint8 (N, 8, 8, 1): the tiny preset's input shape."""
    return np.random.default_rng(seed).integers(0, 256, size=(n, 8, 8, 1), dtype=np.uint8)


def manual(model: VAE, images: np.ndarray, batch_size: int, seed: int, iw_samples: int = 0,
           active=None) -> tuple[float, float, float | None]:
    """The documented semantics written out: (mean nll, mean kl, iw nll or None)."""
    cfg = model.cfg
    elbo_gen = torch.Generator().manual_seed(seed)
    iw_gen = torch.Generator().manual_seed(iw_seed(seed))
    nll = kl = iw = 0.0
    model.eval()
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            x = prepare_batch(cfg, images[start:start + batch_size])
            out = model(x, active=active, posterior="sample", masked="sample", generator=elbo_gen)
            nll += out.nll.double().sum().item()
            kl += sum(layer.kl.double().sum().item() for layer in out.layers)
            if iw_samples:
                log_w = torch.stack([
                    iw_log_weights(model(x, active=active, posterior="sample", masked="sample", generator=iw_gen),
                                   active)
                    for _ in range(iw_samples)])
                iw += (torch.logsumexp(log_w, 0) - math.log(iw_samples)).sum().item()
    n = len(images)
    return nll / n, kl / n, (-iw / n if iw_samples else None)


def normal_logpdf(z: np.ndarray, mu: np.ndarray, std: np.ndarray) -> np.ndarray:
    return -0.5 * ((z - mu) / std) ** 2 - np.log(std) - 0.5 * math.log(2 * math.pi)


# -------------------------------------------------------------- exact streaming


@pytest.mark.parametrize("iw_samples", [0, 1, 3])
def test_streamed_result_matches_manual_float64_loop(model: VAE, iw_samples: int) -> None:
    images = random_images(40)
    result = evaluate(model, images, batch_size=16, seed=3, iw_samples=iw_samples)
    nll, kl, iw = manual(model, images, batch_size=16, seed=3, iw_samples=iw_samples)
    assert result.n_images == 40
    assert result.dims_per_image == 64 and result.binary is False
    assert result.nll_nats == pytest.approx(nll, rel=1e-12)
    assert result.kl_nats == pytest.approx(kl, rel=1e-12)
    assert result.kl_nats > 1.0  # the perturbed posterior makes the KL non-trivial
    if iw_samples:
        assert result.iw_samples == iw_samples
        assert result.iw_nll_nats == pytest.approx(iw, rel=1e-12)
    else:
        assert result.iw_nll_nats is None and result.iw_samples is None


def test_seed_reproducible_and_elbo_independent_of_iw(model: VAE) -> None:
    images = random_images(24)
    a = evaluate(model, images, batch_size=8, seed=1)
    b = evaluate(model, images, batch_size=8, seed=1)
    c = evaluate(model, images, batch_size=8, seed=2)
    d = evaluate(model, images, batch_size=8, seed=1, iw_samples=2)
    assert (a.nll_nats, a.kl_nats) == (b.nll_nats, b.kl_nats)
    assert a.nll_nats != c.nll_nats
    # The IW passes draw from their own stream, so asking for them leaves the ELBO alone.
    assert (a.nll_nats, a.kl_nats) == (d.nll_nats, d.kl_nats)
    assert iw_seed(1) != 1 and iw_seed(1) == iw_seed(1) and iw_seed(1) != iw_seed(2)


def test_eval_mode_during_run_and_training_mode_restored(model: VAE) -> None:
    seen: list[bool] = []
    handle = model.register_forward_pre_hook(lambda module, args: seen.append(module.training))
    try:
        model.train()
        evaluate(model, random_images(4))
        assert seen == [False] and model.training
        model.eval()
        evaluate(model, random_images(4))
        assert not model.training
    finally:
        handle.remove()


def test_progress_reports_batch_counts(model: VAE) -> None:
    counts: list[int] = []
    evaluate(model, random_images(21), batch_size=8, progress=counts.append)
    assert counts == [8, 8, 5] and sum(counts) == 21


def test_input_forms_give_identical_numbers(model: VAE) -> None:
    images = random_images(20)
    tensor_nchw = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
    image_set = ImageSet(images, np.arange(20) % 10, spec="test", split="all")
    loader = DataLoader(ImageDataset(image_set), batch_size=8, shuffle=False)
    results = [
        evaluate(model, images, batch_size=8, seed=5, iw_samples=2),
        evaluate(model, tensor_nchw, batch_size=8, seed=5, iw_samples=2),
        evaluate(model, image_set, batch_size=8, seed=5, iw_samples=2),
        evaluate(model, loader, seed=5, iw_samples=2),  # (images, labels) batches
        evaluate(model, (tensor_nchw[i:i + 8] for i in range(0, 20, 8)), seed=5, iw_samples=2),
    ]
    first = results[0]
    for r in results[1:]:
        assert r.n_images == 20
        assert r.nll_nats == pytest.approx(first.nll_nats, rel=1e-12)
        assert r.kl_nats == pytest.approx(first.kl_nats, rel=1e-12)
        assert r.iw_nll_nats == pytest.approx(first.iw_nll_nats, rel=1e-12)


def test_bad_inputs_raise_data_errors(model: VAE) -> None:
    with pytest.raises(DataError, match="uint8"):
        evaluate(model, random_images(2).astype(np.float32))
    with pytest.raises(DataError, match="8x8x1"):
        evaluate(model, np.zeros((2, 6, 6, 1), dtype=np.uint8))
    with pytest.raises(DataError, match="no images"):
        evaluate(model, np.zeros((0, 8, 8, 1), dtype=np.uint8))
    with pytest.raises(DataError, match="4-d"):
        evaluate(model, [np.zeros((8, 8, 1), dtype=np.uint8)])
    with pytest.raises(ValueError, match="batch_size"):
        evaluate(model, random_images(2), batch_size=0)


# ------------------------------------------------------------------- reporting


def test_as_dict_unit_conversions_closed_form() -> None:
    r = EvalResult(n_images=10, dims_per_image=784, binary=False, nll_nats=500.0, kl_nats=40.0,
                   iw_nll_nats=530.0, iw_samples=50)
    d = r.as_dict()
    assert r.elbo_nats == 540.0
    assert d["n_images"] == 10 and d["iw_samples"] == 50
    assert d["bits_per_dim"] == pytest.approx(540.0 / 784 / LN2, rel=1e-15)
    assert d["recon_bits_per_dim"] == pytest.approx(500.0 / 784 / LN2, rel=1e-15)
    assert d["kl_bits_per_dim"] == pytest.approx(40.0 / 784 / LN2, rel=1e-15)
    assert d["nats_per_dim"] == pytest.approx(540.0 / 784, rel=1e-15)
    assert d["iw_bits_per_dim"] == pytest.approx(530.0 / 784 / LN2, rel=1e-15)
    assert "nats_per_image" not in d and "iw_nats_per_image" not in d

    b = EvalResult(n_images=3, dims_per_image=784, binary=True, nll_nats=60.0, kl_nats=25.0).as_dict()
    assert (b["nats_per_image"], b["recon_nats_per_image"], b["kl_nats_per_image"]) == (85.0, 60.0, 25.0)
    assert "iw_bits_per_dim" not in b and "iw_nats_per_image" not in b and b["iw_samples"] is None
    bi = EvalResult(3, 784, True, 60.0, 25.0, iw_nll_nats=80.0, iw_samples=5).as_dict()
    assert bi["iw_nats_per_image"] == 80.0


def test_binary_model_uses_fixed_binarisation_and_nats_per_image() -> None:
    model = make_model("bernoulli")
    images = random_images(16)
    result = evaluate(model, images, batch_size=8, iw_samples=2)
    assert result.binary and result.dims_per_image == 64
    d = result.as_dict()
    assert d["nats_per_image"] == pytest.approx(result.elbo_nats, rel=1e-15)
    assert d["iw_nats_per_image"] == result.iw_nll_nats
    # Fixed threshold at 0.5: pixels >= 128 are on, so pre-thresholded images score the same.
    thresholded = np.where(images >= 128, 255, 0).astype(np.uint8)
    again = evaluate(model, thresholded, batch_size=8, iw_samples=2)
    assert (again.nll_nats, again.kl_nats, again.iw_nll_nats) == (result.nll_nats, result.kl_nats,
                                                                  result.iw_nll_nats)


# ---------------------------------------------------------- importance weighting


def test_iw_log_weights_closed_form_on_hand_built_layers() -> None:
    rng = np.random.default_rng(0)
    batch = 3
    shapes = [(2, 1, 1), (1, 2, 2)]
    mask = np.array([[[True, False], [False, True]]])

    def f32(a: np.ndarray) -> np.ndarray:
        """Round like the model's float32 tensors, so the float64 reference sees the same values."""
        return a.astype(np.float32).astype(np.float64)

    nll = f32(rng.uniform(10, 20, size=batch))
    expected_masked, expected_full = -nll.copy(), -nll.copy()
    layers = []
    for k, shape in enumerate(shapes):
        z, qm, pm = (f32(rng.normal(size=(batch, *shape))) for _ in range(3))
        qs, ps = (f32(rng.uniform(0.3, 2.0, size=(batch, *shape))) for _ in range(2))
        ratio = normal_logpdf(z, pm, ps) - normal_logpdf(z, qm, qs)
        expected_full += ratio.reshape(batch, -1).sum(1)
        expected_masked += (ratio * mask if k == 1 else ratio).reshape(batch, -1).sum(1)
        t = lambda a: torch.tensor(a, dtype=torch.float32)  # noqa: E731
        layers.append(LayerResult(kl=torch.zeros(batch, *shape), q_mean=t(qm), q_std=t(qs),
                                  p_mean=t(pm), p_std=t(ps), z=t(z)))
    out = VAEOutput(nll=torch.tensor(nll, dtype=torch.float32), layers=layers,
                    features=torch.zeros(batch, 1, 1, 1), dims_per_image=4)

    got = iw_log_weights(out, [None, torch.from_numpy(mask)])
    assert got.dtype == torch.float64 and got.shape == (batch,)
    np.testing.assert_allclose(got.numpy(), expected_masked, rtol=0, atol=1e-10)
    np.testing.assert_allclose(iw_log_weights(out).numpy(), expected_full, rtol=0, atol=1e-10)

    with pytest.raises(ValueError, match="one entry per latent layer"):
        iw_log_weights(out, [None])
    layers[0].q_mean = None
    with pytest.raises(ValueError, match="no posterior"):
        iw_log_weights(out)


def test_sampled_log_ratio_is_unbiased_for_the_kl(model: VAE) -> None:
    """E_q[-log w] = E_q[nll] + KL: K = 1 importance weighting is the ELBO in expectation."""
    x = prepare_batch(model.cfg, random_images(8))
    gen = torch.Generator().manual_seed(0)
    diffs = []
    with torch.no_grad():
        for _ in range(100):
            out = model(x, generator=gen)
            # -log w - (nll + analytic KL) = (log q - log p) - KL, mean zero per pass
            diffs.append((-iw_log_weights(out) - out.nll.double() - out.kl_per_image.double()).numpy())
    diffs = np.concatenate(diffs)
    kl = out.kl_per_image.double().mean().item()
    assert kl > 1.0
    se = diffs.std(ddof=1) / math.sqrt(diffs.size)
    assert abs(diffs.mean()) < 4 * se


def test_iw_bound_with_k20_is_tighter_than_elbo(model: VAE) -> None:
    result = evaluate(model, random_images(16), batch_size=16, iw_samples=20)
    # Analytic KL keeps the ELBO's noise small; the gap here is several nats per image.
    assert math.isfinite(result.iw_nll_nats)
    assert result.iw_nll_nats < result.elbo_nats - 0.5


def test_all_dims_pruned_gives_zero_kl_and_zero_log_ratio(model: VAE) -> None:
    active = [torch.zeros(shape, dtype=torch.bool) for shape in model.cfg.layer_shapes()]
    images = random_images(12)
    result = evaluate(model, images, batch_size=8, iw_samples=3, active=active)
    assert result.kl_nats == 0.0
    nll, kl, iw = manual(model, images, batch_size=8, seed=0, iw_samples=3, active=active)
    assert result.nll_nats == pytest.approx(nll, rel=1e-12) and kl == 0.0
    assert result.iw_nll_nats == pytest.approx(iw, rel=1e-12)

    with torch.no_grad():
        out = model(prepare_batch(model.cfg, images), active=active, masked="sample",
                    generator=torch.Generator().manual_seed(0))
    assert torch.equal(iw_log_weights(out, active), -out.nll.double())
    assert not torch.equal(iw_log_weights(out), -out.nll.double())  # unmasked, the ratio would count
