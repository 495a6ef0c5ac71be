"""Tests for vdvae_latents.latents.pruning: the sweep against `evaluate`, direct masked forward
passes and closed forms (dimension counts, kept scalars, encoded bytes), parse_sweep,
and the KL figure.

The model is the ``tiny`` preset with perturbed posterior nets (see kl_ddp_worker.py).
Active sets are built from hand-written KL tables, so which dimension survives a cut
is known in advance.
"""

from __future__ import annotations

import importlib.util
import math
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch

from vdvae_latents import load_images
from vdvae_latents.model.inputs import prepare_batch
from vdvae_latents.core.errors import UserError
from vdvae_latents.model.evaluation import evaluate
from vdvae_latents.latents.active_set import ActiveSet
from vdvae_latents.latents.stats import DimTable, LatentKL
from vdvae_latents.latents.pruning import DEFAULT_SWEEP, parse_sweep, plot_kl, pruning_sweep

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("kl_ddp_worker", ROOT / "tests" / "kl_ddp_worker.py")
_worker = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_worker)

TINY_SHAPES = [(4, 1, 1), (4, 4, 4), (4, 4, 4), (4, 8, 8), (4, 8, 8)]
N_VARIATES, N_ELEMENTS = 20, 644
LN2 = math.log(2.0)


@pytest.fixture(scope="module")
def model():
    return _worker.build_model()


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return load_images("digits", split="test", limit=24).images


def natural_table(granularity: str, avg_kl) -> DimTable:
    rows = []
    for k, (v, h, w) in enumerate(TINY_SHAPES):
        for c in range(v):
            rows += [(k, c, -1, -1, h)] if granularity == "variate" else \
                [(k, c, y, x, h) for y in range(h) for x in range(w)]
    cols = np.array(rows, dtype=np.int32)
    avg_kl = np.asarray(avg_kl, dtype=np.float64)
    return DimTable(layer=cols[:, 0], variate=cols[:, 1], y=cols[:, 2], x=cols[:, 3], resolution=cols[:, 4],
                    avg_kl=avg_kl, active_units=np.zeros(len(rows)))


def make_active(granularity: str, avg_kl, selected=(0,)) -> ActiveSet:
    return ActiveSet(granularity=granularity, table=natural_table(granularity, avg_kl),
                     selected=np.asarray(selected, dtype=np.int64), rule="keep", value=0.05,
                     layer_shapes=list(TINY_SHAPES), n_images=100)


def kl_nats(row: dict, dims_per_image: int = 64) -> float:
    """The sweep reports KL in bits/dim for 8-bit data: back to nats per image."""
    return row["kl_bits_per_dim"] * LN2 * dims_per_image


def direct_masked_pass(model, images, masks, *, batch_size: int, seed: int):
    """The pruned forward pass written out: posterior samples for active dims, prior samples
    (temperature 1) for pruned ones, one generator consumed batch after batch.
    Returns (per-layer KL maps concatenated over images, mean NLL, mean KL) in float64."""
    generator = torch.Generator().manual_seed(seed)
    kls, nll = None, 0.0
    model.eval()
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            x = prepare_batch(model.cfg, images[start:start + batch_size])
            out = model(x, active=masks, posterior="sample", masked="sample", temperature=1.0, generator=generator)
            nll += out.nll.double().sum().item()
            parts = [layer.kl.double().numpy() for layer in out.layers]
            kls = parts if kls is None else [np.concatenate([a, b]) for a, b in zip(kls, parts)]
    n = len(images)
    return kls, nll / n, sum(float(k.sum()) for k in kls) / n


# ------------------------------------------------------------------------ parse_sweep


class TestParseSweep:
    @pytest.mark.parametrize("text,values", [
        ("2.5,3,4,100", [2.5, 3.0, 4.0, 100.0]), ("3%,100%", [3.0, 100.0]), (" 3 , 100 ", [3.0, 100.0]),
        ("100", [100.0]), ("0.1,", [0.1]),
    ])
    def test_accepts(self, text, values):
        assert parse_sweep(text) == values

    @pytest.mark.parametrize("text", ["0,200", "0", "101", "-1,5", "abc", "3,x", "", ",", "nan", "inf"])
    def test_rejects_naming_the_flag(self, text):
        with pytest.raises(UserError) as exc:
            parse_sweep(text)
        assert "--sweep" in str(exc.value) and "\n" not in str(exc.value)

    def test_default_sweep_is_the_papers(self):
        assert tuple(DEFAULT_SWEEP) == (2.5, 3.0, 4.0, 5.0, 7.0, 100.0)


# ------------------------------------------------------------------------ keep 100%


class TestFullKeep:
    def test_100_percent_equals_unpruned_evaluate(self, model, images):
        active = make_active("variate", np.linspace(1.0, 0.05, N_VARIATES))
        (row,) = pruning_sweep(model, images, active, [100.0], batch_size=10, seed=3)
        ref = evaluate(model, images, batch_size=10, seed=3).as_dict()
        for key, value in ref.items():
            assert row[key] == value, key
        assert row["n_active"] == N_VARIATES and row["kl_share_active"] == 1.0
        assert row["kept_scalars_per_image"] == N_ELEMENTS
        assert row["encoded_bytes_float16"] == row["full_latents_bytes_float16"] == 24 * N_ELEMENTS * 2
        assert row["encoded_bytes_float32"] == row["full_latents_bytes_float32"] == 24 * N_ELEMENTS * 4

    def test_all_selected_masks_reproduce_the_unpruned_elbo(self, model, images):
        active = make_active("element", np.ones(N_ELEMENTS), selected=np.arange(N_ELEMENTS))
        masks = active.layer_masks()
        assert masks == [None] * len(TINY_SHAPES)
        got = evaluate(model, images, batch_size=8, seed=1, active=masks).as_dict()
        assert got == evaluate(model, images, batch_size=8, seed=1).as_dict()


# ------------------------------------------------------------------------ keep ~0%


class TestZeroKeep:
    def test_nothing_active_gives_exactly_zero_kl(self, model, images):
        active = make_active("variate", np.ones(N_VARIATES), selected=[])
        masks = active.layer_masks()
        assert all(m is not None and not m.any() for m in masks)
        result = evaluate(model, images, batch_size=10, seed=0, active=masks)
        assert result.kl_nats == 0.0
        assert math.isfinite(result.nll_nats) and result.nll_nats > 0
        kls, _, kl = direct_masked_pass(model, images, masks, batch_size=10, seed=0)
        assert kl == 0.0 and all((k == 0).all() for k in kls)

    def test_smallest_keep_leaves_one_dimension(self, model, images):
        kl = np.linspace(1.0, 0.01, N_VARIATES)
        (row,) = pruning_sweep(model, images, make_active("variate", kl), [0.001], batch_size=24)
        assert row["n_active"] == 1 and row["kl_share_active"] == pytest.approx(1.0 / kl.sum())


class TestOneDimensionKept:
    def test_layer0_variate_closed_form(self, model, images):
        # The first layer's KL depends only on the image (its prior sees the learned initial
        # state, no sample), so with only variate 2 of layer 0 kept the pruned KL per image
        # is exactly that variate's average KL measured without pruning.
        kl = np.full(N_VARIATES, 0.1)
        kl[2] = 5.0
        active = make_active("variate", kl)
        (row,) = pruning_sweep(model, images, active, [5.0], batch_size=24, seed=7)  # ceil(0.05 * 20) = 1
        assert row["n_active"] == 1 and row["kept_scalars_per_image"] == 1
        stats = LatentKL(batch_size=24, posterior="mean").fit(model, images)
        want = float(stats.element_kl_[0][2].sum())
        assert want > 0.01
        assert kl_nats(row) == pytest.approx(want, rel=1e-9)
        assert row["encoded_bytes_float16"] == 24 * 1 * 2 and row["encoded_bytes_float32"] == 24 * 1 * 4

    def test_deep_element_equals_the_direct_masked_pass(self, model, images):
        table = natural_table("element", np.zeros(N_ELEMENTS))
        target = int(np.flatnonzero((table.layer == 3) & (table.variate == 1) & (table.y == 2) & (table.x == 5))[0])
        kl = np.full(N_ELEMENTS, 0.01)
        kl[target] = 2.0
        active = make_active("element", kl)
        (row,) = pruning_sweep(model, images, active, [0.1], batch_size=10, seed=4)  # ceil(0.644) = 1
        assert row["n_active"] == 1 and row["kept_scalars_per_image"] == 1

        masks = [torch.zeros(s, dtype=torch.bool) for s in TINY_SHAPES]
        masks[3][1, 2, 5] = True
        kls, nll, kl_mean = direct_masked_pass(model, images, masks, batch_size=10, seed=4)
        for k, m in enumerate(kls):  # every pruned scalar contributes exactly 0
            outside = m.copy()
            if k == 3:
                outside[:, 1, 2, 5] = 0.0
            assert (outside == 0).all()
        assert kl_mean == pytest.approx(float(kls[3][:, 1, 2, 5].mean()), rel=1e-12) and kl_mean > 0
        assert kl_nats(row) == pytest.approx(kl_mean, rel=1e-9)
        assert row["recon_bits_per_dim"] * LN2 * 64 == pytest.approx(nll, rel=1e-9)

    def test_deep_variate_keeps_its_whole_map(self, model, images):
        kl = np.full(N_VARIATES, 0.1)
        kl[4 + 4 + 3] = 3.0  # layer 2 (4x4), variate 3
        (row,) = pruning_sweep(model, images, make_active("variate", kl), [5.0], batch_size=12, seed=2)
        assert row["kept_scalars_per_image"] == 16
        assert row["encoded_bytes_float16"] == 24 * 16 * 2 and row["encoded_bytes_float32"] == 24 * 16 * 4
        masks = [torch.zeros(s, dtype=torch.bool) for s in TINY_SHAPES]
        masks[2][3] = True
        _, nll, kl_mean = direct_masked_pass(model, images, masks, batch_size=12, seed=2)
        assert kl_nats(row) == pytest.approx(kl_mean, rel=1e-9) and kl_mean > 0
        assert row["recon_bits_per_dim"] * LN2 * 64 == pytest.approx(nll, rel=1e-9)


# ------------------------------------------------------------------------ rows and closed forms


@pytest.fixture(scope="module")
def sweep(model, images):
    """(KL table, active set, rows) of a four-point sweep over distinct hand-written KL values."""
    kl = np.random.default_rng(3).permutation(N_VARIATES).astype(np.float64) / 10  # distinct
    active = make_active("variate", kl, selected=[0, 1])
    rows = pruning_sweep(model, images, active, [2.5, 12.0, 50.0, 100.0], batch_size=24, seed=0)
    return kl, active, rows


class TestSweepRows:

    def test_rows_follow_the_ranking(self, sweep):
        kl, _, rows = sweep
        order = np.argsort(-kl)  # distinct values: no ties
        resolution = np.repeat([1, 4, 4, 8, 8], 4)
        assert [r["keep_pct"] for r in rows] == [2.5, 12.0, 50.0, 100.0]
        for row in rows:
            n = max(1, math.ceil(Fraction(str(row["keep_pct"])) / 100 * N_VARIATES))
            top = order[:n]
            assert row["n_active"] == n
            assert row["kl_share_active"] == pytest.approx(kl[top].sum() / kl.sum(), rel=1e-12)
            scalars = int((resolution[top] ** 2).sum())
            assert row["kept_scalars_per_image"] == scalars
            assert row["encoded_bytes_float16"] == 24 * scalars * 2
            assert row["encoded_bytes_float32"] == 24 * scalars * 4
            assert row["full_latents_bytes_float16"] == 24 * N_ELEMENTS * 2
            assert row["full_latents_bytes_float32"] == 24 * N_ELEMENTS * 4
            assert row["n_images"] == 24
            assert row["bits_per_dim"] == pytest.approx(row["recon_bits_per_dim"] + row["kl_bits_per_dim"])
            assert row["kl_bits_per_dim"] >= 0

    def test_the_given_active_set_is_not_changed(self, sweep):
        _, active, _ = sweep
        assert active.selected.tolist() == [0, 1]


# ------------------------------------------------------------------------ the figure


class TestPlot:
    @pytest.fixture(autouse=True)
    def _matplotlib(self):
        pytest.importorskip("matplotlib")

    def _check_png(self, path: Path) -> None:
        from PIL import Image

        with Image.open(path) as im:
            assert im.format == "PNG" and im.width > 100 and im.height > 100
            im.load()

    def test_writes_a_png(self, tmp_path):
        kl = np.concatenate([np.full(N_VARIATES - 3, 1e-5), [0.5, 2.0, 3.0]])
        active = make_active("variate", kl, selected=[17, 18, 19])
        path = plot_kl(active, tmp_path / "kl.png", title="tiny")
        assert path == tmp_path / "kl.png"
        self._check_png(path)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["kl.png"]  # no temp file left

    def test_all_zero_kl_and_element_granularity(self, tmp_path):
        active = make_active("element", np.zeros(N_ELEMENTS), selected=[0])
        self._check_png(plot_kl(active, tmp_path / "zero.png"))

    def test_unwritable_destination(self, tmp_path):
        active = make_active("variate", np.linspace(0, 1, N_VARIATES))
        with pytest.raises(UserError) as exc:
            plot_kl(active, tmp_path / "missing" / "kl.png")
        assert "kl.png" in str(exc.value)


# ------------------------------------------------------------------------ KL conventions


class TestKLConventions:
    """The sweep reports the project's KL (pruned dims charged 0) and the official one
    (every dim's KL(q || p) in the pruned pass), checked against torch.distributions."""

    def brute_force_kl_all(self, model, images, masks, *, batch_size: int, seed: int) -> float:
        generator = torch.Generator().manual_seed(seed)
        total = 0.0
        with torch.no_grad():
            for start in range(0, len(images), batch_size):
                x = prepare_batch(model.cfg, images[start:start + batch_size])
                out = model(x, active=masks, posterior="sample", masked="sample", temperature=1.0,
                            generator=generator)
                for layer in out.layers:
                    q = torch.distributions.Normal(layer.q_mean.double(), layer.q_std.double())
                    p = torch.distributions.Normal(layer.p_mean.double(), layer.p_std.double())
                    total += torch.distributions.kl_divergence(q, p).sum().item()
        return total / len(images)

    def test_both_conventions_agree_without_pruning(self, model, images):
        active = make_active("variate", np.linspace(1.0, 0.05, N_VARIATES))
        (row,) = pruning_sweep(model, images, active, [100.0], batch_size=12, seed=2)
        assert row["kl_all_bits_per_dim"] == row["kl_bits_per_dim"]
        assert row["bits_per_dim_kl_all"] == row["bits_per_dim"]

    def test_official_kl_charges_pruned_dims(self, model, images):
        active = make_active("variate", np.ones(N_VARIATES), selected=[])
        masks = active.layer_masks()
        result = evaluate(model, images, batch_size=10, seed=4, active=masks)
        want = self.brute_force_kl_all(model, images, masks, batch_size=10, seed=4)
        assert result.kl_nats == 0.0 and want > 0.1
        assert result.kl_all_nats == pytest.approx(want, rel=1e-9)
        d = result.as_dict()
        assert d["kl_all_bits_per_dim"] == pytest.approx(want / 64 / LN2, rel=1e-9)
        assert d["bits_per_dim_kl_all"] == pytest.approx((result.nll_nats + want) / 64 / LN2, rel=1e-9)

    def test_layer0_is_charged_in_full_whatever_is_kept(self, model, images):
        # Layer 0's KL does not depend on any sample, so under the official convention its
        # share is the unpruned layer-0 KL of all its variates, however few are kept.
        kl = np.full(N_VARIATES, 0.1)
        kl[2] = 5.0
        active = make_active("variate", kl)
        (row,) = pruning_sweep(model, images, active, [5.0], batch_size=24, seed=7)
        stats = LatentKL(batch_size=24, posterior="mean").fit(model, images)
        layer0_all = float(stats.element_kl_[0].sum())
        kept_only = float(stats.element_kl_[0][2].sum())
        official = row["kl_all_bits_per_dim"] * LN2 * 64
        assert kl_nats(row) == pytest.approx(kept_only, rel=1e-9)
        assert official > layer0_all > kept_only


# ------------------------------------------------------------------------ first K layers


class TestFirstK:
    """first_k_decodes: K = all layers is the reconstruction, K = 0 at temperature 0 the
    prior-mean decoding, and layers below K see exactly the unpruned posterior."""

    def test_all_layers_is_the_reconstruction(self, model, images):
        from vdvae_latents.model.generate import first_k_decodes

        x = prepare_batch(model.cfg, images[:6])
        (got,) = first_k_decodes(model, x, [len(TINY_SHAPES)], posterior="mean")
        assert torch.equal(got, model.reconstruct(x, posterior="mean"))

    def test_no_layers_at_temperature_zero_is_the_prior_mean_decoding(self, model, images):
        from vdvae_latents.model.generate import first_k_decodes

        x = prepare_batch(model.cfg, images[:6])
        (got,) = first_k_decodes(model, x, [0], temperature=0.0)
        want = model.sample(6, temperature=0.0, deterministic_output=True)
        assert torch.allclose(got, want, atol=1e-6)
        assert (got == got[:1]).all()  # nothing of the image is left

    def test_first_layers_follow_the_posterior(self, model, images):
        x = prepare_batch(model.cfg, images[:6])
        full = model(x, posterior="mean")
        k = 3
        masks = [None if i < k else torch.zeros(s, dtype=torch.bool) for i, s in enumerate(TINY_SHAPES)]
        part = model(x, active=masks, posterior="mean", masked="sample", temperature=0.0)
        for i in range(len(TINY_SHAPES)):
            want = full.layers[i].z if i < k else part.layers[i].p_mean
            assert torch.equal(part.layers[i].z, want), i
