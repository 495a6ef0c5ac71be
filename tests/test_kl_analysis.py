"""Tests for vdvae_latents.latents.active_set: the streamed KL / active-units statistics against
brute-force numpy averages, the selection rules against hand-computed answers, the
active set's masks, counts and persistence, and the two-process reduction.

Models are the ``tiny`` preset (and a model whose latent layers are all 1x1) with
perturbed posterior nets: a freshly initialised posterior almost equals the prior, which
would make the KL and active-units checks vacuous.
"""

from __future__ import annotations

import importlib.util
import json
import math
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch

from vdvae_latents import VAE, ModelConfig, load_images
from vdvae_latents.latents import active_set as kl_analysis
from vdvae_latents.model.inputs import prepare_batch
from vdvae_latents.core.errors import UserError
from vdvae_latents.latents.active_set import (
    ActiveSet, build_active_set, parse_keep, rank_dimensions, select_dimensions,
)
from vdvae_latents.latents.stats import DimTable, LatentKL

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("kl_ddp_worker", ROOT / "tests" / "kl_ddp_worker.py")
worker = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(worker)
build_model = worker.build_model  # the seeded, perturbed tiny model (shared with the DDP worker)

TINY_SHAPES = [(4, 1, 1), (4, 4, 4), (4, 4, 4), (4, 8, 8), (4, 8, 8)]


# ------------------------------------------------------------------------ helpers


@pytest.fixture(scope="module")
def model() -> VAE:
    return build_model()


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return load_images("digits", split="all", limit=40).images


def perturb(model: VAE) -> VAE:
    with torch.no_grad():
        for blocks in model.up_blocks:
            for block in blocks:
                for p in block.posterior.parameters():
                    p.add_(torch.randn_like(p) * 0.3)
                block.posterior_params.bias.normal_(0.0, 0.7)
                block.posterior_params.weight.normal_(0.0, 0.3)
    return model


def brute_force(model: VAE, images: np.ndarray, *, batch_size: int, posterior: str = "mean", seed: int = 0):
    """Per-image KL and posterior-mean maps collected whole, then numpy mean / var in float64.

    Batches and the generator follow LatentKL's documented semantics (one generator seeded
    with ``seed``, consumed batch after batch), so the only difference from the streamed
    estimator is how the float64 sums are formed.
    """
    generator = torch.Generator().manual_seed(seed)
    kls: list[list[np.ndarray]] = []
    mus: list[list[np.ndarray]] = []
    model.eval()
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            x = prepare_batch(model.cfg, images[start:start + batch_size])
            out = model(x, posterior=posterior, generator=generator)
            if not kls:
                kls = [[] for _ in out.layers]
                mus = [[] for _ in out.layers]
            for k, layer in enumerate(out.layers):
                kls[k].append(layer.kl.double().numpy())
                mus[k].append(layer.q_mean.double().numpy())
    kl = [np.concatenate(parts).mean(0) for parts in kls]
    au = [np.concatenate(parts).var(0) for parts in mus]
    return kl, au


def natural_table(shapes, granularity: str, avg_kl=None, active_units=None) -> DimTable:
    """The dimension table written out row by row in natural order (layer, variate, y, x)."""
    rows = []
    for k, (v, h, w) in enumerate(shapes):
        for c in range(v):
            if granularity == "variate":
                rows.append((k, c, -1, -1, h))
            else:
                rows += [(k, c, y, x, h) for y in range(h) for x in range(w)]
    n = len(rows)
    cols = np.array(rows, dtype=np.int32).reshape(n, 5)
    return DimTable(layer=cols[:, 0], variate=cols[:, 1], y=cols[:, 2], x=cols[:, 3], resolution=cols[:, 4],
                    avg_kl=np.zeros(n) if avg_kl is None else np.asarray(avg_kl, dtype=np.float64),
                    active_units=np.zeros(n) if active_units is None else np.asarray(active_units, np.float64))


def active_set(shapes, granularity: str, selected, avg_kl=None, active_units=None, **kw) -> ActiveSet:
    table = natural_table(shapes, granularity, avg_kl, active_units)
    defaults = dict(rule="keep", value=0.5, n_images=10)
    defaults.update(kw)
    return ActiveSet(granularity=granularity, table=table, selected=np.asarray(selected, dtype=np.int64),
                     layer_shapes=list(shapes), **defaults)


def keyed(table: DimTable, idx) -> list[tuple[int, int, int, int]]:
    return [(int(table.layer[i]), int(table.variate[i]), int(table.y[i]), int(table.x[i])) for i in idx]


def assert_user_error(excinfo, *needles: str) -> None:
    msg = str(excinfo.value)
    assert "\n" not in msg.strip()
    for needle in needles:
        assert needle in msg, msg


# ------------------------------------------------------------------------ statistics


class TestStreamedAverages:
    def test_kl_equals_brute_force_mean(self, model, images):
        stats = LatentKL(batch_size=7, posterior="mean").fit(model, images)
        kl, _ = brute_force(model, images, batch_size=7)
        assert stats.n_images_ == len(images)
        assert [a.shape for a in stats.element_kl_] == TINY_SHAPES
        for got, want in zip(stats.element_kl_, kl):
            assert got.dtype == np.float64
            np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-15)
        assert min(float(a.mean()) for a in kl) > 0.05  # not vacuous

    def test_active_units_equal_brute_force_variance(self, model, images):
        stats = LatentKL(batch_size=7, posterior="mean").fit(model, images)
        _, au = brute_force(model, images, batch_size=7)
        for got, want in zip(stats.element_au_, au):
            assert (got >= 0).all()
            np.testing.assert_allclose(got, want, rtol=1e-8, atol=1e-13)
        assert max(float(a.max()) for a in au) > 0.01  # some unit is active by Burda's criterion

    def test_sampled_posterior_equals_brute_force_with_the_same_stream(self, model, images):
        stats = LatentKL(batch_size=16, posterior="sample", seed=5).fit(model, images)
        kl, au = brute_force(model, images, batch_size=16, posterior="sample", seed=5)
        for got, want in zip(stats.element_kl_, kl):
            np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-15)
        for got, want in zip(stats.element_au_, au):
            np.testing.assert_allclose(got, want, rtol=1e-8, atol=1e-13)

    def test_variate_table_averages_over_positions(self, model, images):
        stats = LatentKL(batch_size=40, posterior="mean").fit(model, images)
        kl, au = brute_force(model, images, batch_size=40)
        table = stats.table("variate")
        want_kl = np.concatenate([m.mean(axis=(1, 2)) for m in kl])
        want_au = np.concatenate([m.mean(axis=(1, 2)) for m in au])
        np.testing.assert_allclose(table.avg_kl, want_kl, rtol=1e-12)
        np.testing.assert_allclose(table.active_units, want_au, rtol=1e-8, atol=1e-13)

    def test_element_table_is_every_scalar_in_natural_order(self, model, images):
        stats = LatentKL(batch_size=40, posterior="mean").fit(model, images)
        kl, au = brute_force(model, images, batch_size=40)
        table = stats.table("element")
        ref = natural_table(TINY_SHAPES, "element")
        assert len(table) == 4 + 2 * 4 * 16 + 2 * 4 * 64 == 644
        for col in ("layer", "variate", "y", "x", "resolution"):
            np.testing.assert_array_equal(getattr(table, col), getattr(ref, col))
        np.testing.assert_allclose(table.avg_kl, np.concatenate([m.ravel() for m in kl]), rtol=1e-12)
        np.testing.assert_allclose(table.active_units, np.concatenate([m.ravel() for m in au]), rtol=1e-8,
                                   atol=1e-13)

    def test_variate_table_columns(self, model, images):
        table = LatentKL(batch_size=40, posterior="mean").fit(model, images).table("variate")
        ref = natural_table(TINY_SHAPES, "variate")
        assert len(table) == 20
        for col in ("layer", "variate", "y", "x", "resolution"):
            np.testing.assert_array_equal(getattr(table, col), getattr(ref, col))

    def test_progress_reports_every_image(self, model, images):
        seen = []
        LatentKL(batch_size=16, posterior="mean").fit(model, images, progress=seen.append)
        assert seen == [16, 16, 8]

    def test_model_mode_is_restored(self, model, images):
        model.train()
        LatentKL(batch_size=40, posterior="mean").fit(model, images[:4])
        assert model.training
        model.eval()
        LatentKL(batch_size=40, posterior="mean").fit(model, images[:4])
        assert not model.training


class TestBatchingAndSeeding:
    @pytest.mark.parametrize("batch_size", [1, 6, 40, 64])
    def test_posterior_mean_is_independent_of_batch_size(self, model, images, batch_size):
        # Each image's KL is a deterministic function of that image. The float32
        # convolutions may round differently for different batch shapes (about 1 ulp),
        # so the comparison allows float32 rounding, nothing more.
        ref = LatentKL(batch_size=40, posterior="mean").fit(model, images)
        got = LatentKL(batch_size=batch_size, posterior="mean").fit(model, images)
        assert got.n_images_ == ref.n_images_ == len(images)
        for a, b in zip(got.element_kl_, ref.element_kl_):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-8)
        for a, b in zip(got.element_au_, ref.element_au_):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-9)

    def test_sample_posterior_is_reproducible_for_a_seed(self, model, images):
        a = LatentKL(batch_size=16, posterior="sample", seed=3).fit(model, images)
        b = LatentKL(batch_size=16, posterior="sample", seed=3).fit(model, images)
        for x, y in zip(a.element_kl_ + a.element_au_, b.element_kl_ + b.element_au_):
            np.testing.assert_array_equal(x, y)

    def test_seed_changes_only_layers_conditioned_on_samples(self, model, images):
        # Layer 0 sees only the learned initial state and the image: its KL and posterior
        # mean do not depend on any sample. Later layers are conditioned on sampled z_<i.
        a = LatentKL(batch_size=16, posterior="sample", seed=3).fit(model, images)
        b = LatentKL(batch_size=16, posterior="sample", seed=4).fit(model, images)
        np.testing.assert_array_equal(a.element_kl_[0], b.element_kl_[0])
        for k in range(1, len(TINY_SHAPES)):
            assert not np.allclose(a.element_kl_[k], b.element_kl_[k], rtol=1e-6, atol=0)

    def test_input_forms_agree(self, model, images):
        ref = LatentKL(batch_size=8, posterior="mean").fit(model, images)
        tensor = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
        batches = [(images[i:i + 8], np.zeros(len(images[i:i + 8]))) for i in range(0, len(images), 8)]
        imageset = load_images("digits", split="all", limit=40)
        for source in (tensor, batches, imageset):
            got = LatentKL(batch_size=8, posterior="mean").fit(model, source)
            assert got.n_images_ == len(images)
            for a, b in zip(got.element_kl_, ref.element_kl_):
                np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-15)


class TestEstimatorErrors:
    def test_empty_data_is_a_user_error(self, model):
        with pytest.raises(UserError, match="no images"):
            LatentKL(posterior="mean").fit(model, np.zeros((0, 8, 8, 1), np.uint8))

    def test_unknown_posterior(self, model, images):
        with pytest.raises(ValueError, match="posterior"):
            LatentKL(posterior="mode").fit(model, images[:2])

    def test_table_before_fit(self):
        with pytest.raises(RuntimeError, match="fit"):
            LatentKL().table()

    def test_unknown_granularity_names_the_flag(self, model, images):
        stats = LatentKL(posterior="mean").fit(model, images[:2])
        with pytest.raises(UserError) as exc:
            stats.table("pixel")
        assert_user_error(exc, "--granularity", "pixel")


@pytest.fixture(scope="module")
def stats_1x1() -> LatentKL:
    """A model whose latent layers are all at 1x1 (3 layers at 1x1, none at 4x4), fitted."""
    cfg = ModelConfig(image_size=4, channels=1, n_mixtures=2, resolutions=(1, 4), up_blocks=(3, 0),
                      down_blocks=(1, 1), widths=(16, 8), bottleneck=0.5, variates=3)
    torch.manual_seed(1)
    net = perturb(VAE(cfg))
    x = np.random.default_rng(0).integers(0, 256, size=(12, 4, 4, 1), dtype=np.uint8)
    return LatentKL(batch_size=5, posterior="sample").fit(net, x)


class TestOneByOneLayers:
    """With every latent layer at 1x1 a variate is a single element: both granularities agree."""

    @pytest.fixture
    def stats(self, stats_1x1):
        return stats_1x1

    def test_every_layer_is_1x1(self, stats):
        assert stats.layer_shapes_ == [(3, 1, 1)] * 3
        assert all(a.shape == (3, 1, 1) for a in stats.element_kl_)

    def test_tables_agree(self, stats):
        v, e = stats.table("variate"), stats.table("element")
        assert len(v) == len(e) == 9
        for col in ("layer", "variate", "resolution", "avg_kl", "active_units"):
            np.testing.assert_array_equal(getattr(v, col), getattr(e, col))
        assert (v.y == -1).all() and (v.x == -1).all() and (e.y == 0).all() and (e.x == 0).all()
        assert len(set(v.avg_kl.tolist())) == 9  # distinct values: the ranking below is not a tie test

    def test_selections_and_masks_agree(self, stats):
        v, e = stats.table("variate"), stats.table("element")
        np.testing.assert_array_equal(rank_dimensions(v), rank_dimensions(e))
        for keep in (0.1, 0.34, 0.5, 1.0):
            np.testing.assert_array_equal(select_dimensions(v, keep=keep), select_dimensions(e, keep=keep))
        median = float(np.median(v.avg_kl))
        np.testing.assert_array_equal(select_dimensions(v, threshold=median), select_dimensions(e, threshold=median))
        av = build_active_set(stats, granularity="variate", keep=0.5)
        ae = build_active_set(stats, granularity="element", keep=0.5)
        for mv, me in zip(av.layer_masks(), ae.layer_masks()):
            assert (mv is None) == (me is None)
            if mv is not None:
                assert torch.equal(mv, me)
        assert av.kept_scalars_per_image() == ae.kept_scalars_per_image() == av.n_active
        sv, se = av.summary(), ae.summary()
        for key in ("n_dims", "n_active", "kl_share_active", "total_avg_kl_nats", "n_au_active", "resolutions"):
            assert sv[key] == se[key]


# ------------------------------------------------------------------------ selection rules


class TestParseKeep:
    @pytest.mark.parametrize("text,fraction", [
        ("3%", 0.03), ("0.03", 0.03), ("3", 0.03), (0.03, 0.03), (3, 0.03), ("100%", 1.0), ("2.5%", 0.025),
        (" 7 % ".strip(), 0.07), ("50", 0.5), ("0.5", 0.5), ("1e-4", 1e-4),
    ])
    def test_accepts(self, text, fraction):
        assert parse_keep(text) == pytest.approx(fraction, rel=1e-12)

    @pytest.mark.parametrize("text", [0, "0", "0%", "101%", "150%", -1, "-1", "-3%", "abc", "", "%", "nan", "inf",
                                      "101"])
    def test_rejects_with_one_sentence_naming_the_flag(self, text):
        with pytest.raises(UserError) as exc:
            parse_keep(text)
        assert_user_error(exc, "--keep")


class TestRanking:
    def test_highest_kl_first_ties_by_layer_variate_y_x(self):
        shapes = [(2, 2, 2), (3, 1, 1)]
        table = natural_table(shapes, "element")
        rng = np.random.default_rng(0)
        table.avg_kl = rng.choice([0.0, 0.5, 2.0], size=len(table))
        order = rank_dimensions(table)
        rows = keyed(table, range(len(table)))
        want = sorted(range(len(table)), key=lambda i: (-table.avg_kl[i], *rows[i]))
        assert order.tolist() == want

    def test_ties_follow_coordinates_not_row_order(self):
        table = natural_table([(2, 2, 2), (2, 1, 1)], "element", avg_kl=np.ones(10))
        perm = np.random.default_rng(1).permutation(len(table))
        shuffled = DimTable.from_arrays({k: v[perm] for k, v in table.arrays().items()})
        got = keyed(shuffled, rank_dimensions(shuffled))
        assert got == sorted(keyed(table, range(len(table))))


class TestSelectKeep:
    @pytest.mark.parametrize("keep,n", [(0.03, 20), (0.05, 20), (0.06, 20), (0.5, 20), (1.0, 20), (1e-9, 20),
                                        (0.07, 100), (0.03, 644), (0.29, 100), (0.57, 100), (0.1, 7)])
    def test_keeps_ceil_keep_times_n_top_dimensions(self, keep, n):
        kl = np.random.default_rng(n).permutation(n).astype(np.float64)  # distinct: n-1 ... 0
        table = natural_table([(n, 1, 1)], "variate", avg_kl=kl)
        want_count = max(1, math.ceil(Fraction(str(keep)) * n))
        chosen = select_dimensions(table, keep=keep)
        assert len(chosen) == want_count
        assert chosen.tolist() == sorted(np.flatnonzero(kl >= n - want_count).tolist())

    def test_ties_at_the_cut_go_to_the_earliest_coordinates(self):
        # 2 layers; the cut falls inside a block of equal KL values.
        shapes = [(2, 2, 2), (3, 1, 1)]
        kl = np.array([0.1, 3.0, 1.0, 1.0,  1.0, 0.0, 1.0, 0.2,  1.0, 3.0, 1.0])
        table = natural_table(shapes, "element", avg_kl=kl)
        chosen = select_dimensions(table, keep=4 / 11)  # ceil(4) = 4 dims
        # the two 3.0s, then the first two 1.0s in (layer, variate, y, x) order: indices 2, 3
        assert chosen.tolist() == [1, 2, 3, 9]

    def test_result_is_sorted_natural_order(self):
        kl = np.array([0.0, 5.0, 1.0, 4.0, 3.0])
        chosen = select_dimensions(natural_table([(5, 1, 1)], "variate", avg_kl=kl), keep=0.6)
        assert chosen.tolist() == [1, 3, 4]

    def test_all_equal_keeps_the_first_in_natural_order(self):
        table = natural_table(TINY_SHAPES, "variate", avg_kl=np.full(20, 0.25))
        assert select_dimensions(table, keep=0.25).tolist() == [0, 1, 2, 3, 4]

    @pytest.mark.parametrize("keep", [0.0, -0.1, 1.5, float("nan")])
    def test_out_of_range_fraction(self, keep):
        with pytest.raises(UserError) as exc:
            select_dimensions(natural_table([(4, 1, 1)], "variate", avg_kl=np.ones(4)), keep=keep)
        assert_user_error(exc, "--keep")


class TestSelectThreshold:
    def test_keeps_exactly_kl_strictly_above(self):
        kl = np.array([0.0, 0.01, 0.5, 0.02, 0.01, 1e-9, 3.0])
        table = natural_table([(7, 1, 1)], "variate", avg_kl=kl)
        assert select_dimensions(table, threshold=0.01).tolist() == [2, 3, 6]
        assert select_dimensions(table, threshold=0.0).tolist() == [1, 2, 3, 4, 5, 6]
        assert select_dimensions(table, threshold=-1.0).tolist() == list(range(7))
        assert select_dimensions(table, threshold=2.999).tolist() == [6]

    def test_keeping_nothing_is_a_user_error_naming_the_largest_kl(self):
        kl = np.array([0.0, 0.123456, 0.05])
        table = natural_table([(3, 1, 1)], "variate", avg_kl=kl)
        for threshold in (0.123456, 1e9):
            with pytest.raises(UserError) as exc:
                select_dimensions(table, threshold=threshold)
            assert_user_error(exc, "--threshold", "0.1235")

    @pytest.mark.parametrize("threshold", [float("nan"), float("inf"), float("-inf")])
    def test_non_finite_threshold(self, threshold):
        with pytest.raises(UserError) as exc:
            select_dimensions(natural_table([(3, 1, 1)], "variate", avg_kl=np.ones(3)), threshold=threshold)
        assert_user_error(exc, "--threshold")


class TestExactlyOneRule:
    @pytest.mark.parametrize("kwargs", [{}, {"keep": 0.5, "threshold": 0.1}, {"keep": None, "threshold": None}])
    def test_both_or_neither(self, kwargs):
        table = natural_table([(3, 1, 1)], "variate", avg_kl=np.ones(3))
        with pytest.raises(UserError) as exc:
            select_dimensions(table, **kwargs)
        assert_user_error(exc, "--keep", "--threshold")


# ------------------------------------------------------------------------ the active set


SHAPES = [(2, 1, 1), (3, 2, 2), (2, 4, 4)]  # 7 variates, 2 + 12 + 32 = 46 elements


class TestLayerMasks:
    def test_variate_masks_mark_whole_channels(self):
        # variates in natural order: L0:v0 v1 | L1:v0 v1 v2 | L2:v0 v1
        a = active_set(SHAPES, "variate", selected=[0, 1, 2, 4])
        masks = a.layer_masks()
        assert masks[0] is None  # both variates of layer 0 kept: fully active
        want1 = np.zeros((3, 2, 2), bool)
        want1[[0, 2]] = True
        assert masks[1].dtype == torch.bool and masks[1].shape == (3, 2, 2)
        np.testing.assert_array_equal(masks[1].numpy(), want1)
        np.testing.assert_array_equal(masks[2].numpy(), np.zeros((2, 4, 4), bool))

    def test_element_masks_mark_single_scalars(self):
        table = natural_table(SHAPES, "element")
        pick = {(0, 1, 0, 0), (1, 2, 1, 0), (2, 0, 3, 1), (2, 1, 0, 2)}
        selected = [i for i, key in enumerate(keyed(table, range(len(table)))) if key in pick]
        masks = active_set(SHAPES, "element", selected=selected).layer_masks()
        for k, (v, h, w) in enumerate(SHAPES):
            want = np.zeros((v, h, w), bool)
            for layer, c, y, x in pick:
                if layer == k:
                    want[c, y, x] = True
            assert masks[k] is not None
            np.testing.assert_array_equal(masks[k].numpy(), want)
            assert int(masks[k].sum()) == sum(1 for p in pick if p[0] == k)

    def test_everything_selected_gives_all_none(self):
        for gran, n in (("variate", 7), ("element", 46)):
            assert active_set(SHAPES, gran, selected=range(n)).layer_masks() == [None, None, None]

    def test_masks_follow_the_device_argument(self):
        masks = active_set(SHAPES, "variate", selected=[3]).layer_masks(device="cpu")
        assert all(m.device.type == "cpu" for m in masks)


class TestCounts:
    def test_kept_scalars_variate_closed_form(self):
        # L0 v1 (1x1) + L1 v0, v2 (2x2 each) + L2 v1 (4x4) = 1 + 8 + 16
        a = active_set(SHAPES, "variate", selected=[1, 2, 4, 6])
        assert a.kept_scalars_per_image() == 25
        assert a.total_scalars_per_image() == 46

    def test_kept_scalars_element_is_the_count(self):
        a = active_set(SHAPES, "element", selected=[0, 5, 17, 45])
        assert a.kept_scalars_per_image() == 4 and a.total_scalars_per_image() == 46

    def test_summary_counts_share_and_breakdown(self):
        kl = np.array([4.0, 0.0, 1.0, 0.5, 2.0, 0.25, 0.25])
        au = np.array([0.5, 0.0, 0.02, 0.01, 0.3, 0.0, 0.011])
        a = active_set(SHAPES, "variate", selected=[0, 2, 4], avg_kl=kl, active_units=au, n_images=33)
        s = a.summary()
        assert s["n_dims"] == 7 and s["n_active"] == 3 and s["n_images"] == 33
        assert s["pct_active"] == pytest.approx(300 / 7)
        assert s["total_avg_kl_nats"] == pytest.approx(8.0)
        assert s["kl_share_active"] == pytest.approx(7.0 / 8.0)
        assert s["n_au_active"] == 4  # > 0.01 strictly: 0.5, 0.02, 0.3, 0.011
        assert s["n_au_active_in_set"] == 3
        assert s["kept_scalars_per_image"] == 1 + 4 + 4 and s["total_scalars_per_image"] == 46
        assert [r["dims"] for r in s["layers"]] == [2, 3, 2]
        assert [r["active"] for r in s["layers"]] == [1, 2, 0]
        assert [r["kl_nats"] for r in s["layers"]] == pytest.approx([4.0, 3.5, 0.5])
        assert [r["resolution"] for r in s["resolutions"]] == [1, 2, 4]
        for key, total in (("dims", 7), ("active", 3), ("kl_nats", 8.0), ("au_active", 4)):
            assert sum(r[key] for r in s["layers"]) == pytest.approx(total)
            assert sum(r[key] for r in s["resolutions"]) == pytest.approx(total)
        json.dumps(s)  # plain Python types

    def test_resolution_breakdown_groups_layers(self):
        a = active_set(TINY_SHAPES, "variate", selected=[0, 5, 19], avg_kl=np.arange(20.0))
        res = a.summary()["resolutions"]
        assert [(r["resolution"], r["layers"], r["dims"], r["active"]) for r in res] == \
            [(1, 1, 4, 1), (4, 2, 8, 1), (8, 2, 8, 1)]
        assert [r["kl_nats"] for r in res] == pytest.approx([6.0, sum(range(4, 12)), sum(range(12, 20))])

    def test_zero_total_kl_gives_zero_share(self):
        s = active_set(SHAPES, "variate", selected=[0]).summary()
        assert s["kl_share_active"] == 0.0 and s["total_avg_kl_nats"] == 0.0

    def test_build_active_set_records_the_rule(self, model, images):
        stats = LatentKL(batch_size=40, posterior="mean").fit(model, images)
        a = build_active_set(stats, granularity="element", keep=0.03, data="digits", split="all")
        assert (a.rule, a.value, a.n_images, a.granularity) == ("keep", 0.03, 40, "element")
        assert a.n_dims == 644 and a.n_active == math.ceil(0.03 * 644)
        assert a.layer_shapes == TINY_SHAPES and a.data == "digits"
        b = build_active_set(stats, threshold=0.3)
        assert (b.rule, b.value) == ("threshold", 0.3)
        np.testing.assert_array_equal(b.selected, np.flatnonzero(stats.table("variate").avg_kl > 0.3))
        share = stats.table("variate").avg_kl[b.selected].sum() / stats.table("variate").avg_kl.sum()
        assert b.summary()["kl_share_active"] == pytest.approx(share, rel=1e-12)


# ------------------------------------------------------------------------ persistence


def assert_same_active_set(a: ActiveSet, b: ActiveSet) -> None:
    for key, value in a.table.arrays().items():
        got = getattr(b.table, key)
        assert got.dtype == value.dtype, key
        np.testing.assert_array_equal(got, value)
    np.testing.assert_array_equal(b.selected, a.selected)
    np.testing.assert_array_equal(b.ranking, a.ranking)
    for attr in ("granularity", "rule", "value", "layer_shapes", "n_images", "data", "split", "checkpoint",
                 "checkpoint_sha256", "extra"):
        assert getattr(b, attr) == getattr(a, attr), attr


@pytest.fixture
def rich_set() -> ActiveSet:
    rng = np.random.default_rng(0)
    return active_set(SHAPES, "element", selected=[1, 7, 30, 45], avg_kl=rng.random(46) / 3,
                      active_units=rng.random(46) / 7, rule="threshold", value=0.25, n_images=99,
                      data="digits", split="train", checkpoint="run/ckpt.pt", checkpoint_sha256="ab" * 32,
                      extra={"sweep": {"split": "test", "rows": [{"keep_pct": 3.0, "n_active": 2}]}})


class TestSaveLoad:
    def test_inline_round_trip(self, rich_set, tmp_path):
        path = rich_set.save(tmp_path / "ACTIVE.json")
        assert path == tmp_path / "ACTIVE.json"
        meta = json.loads(path.read_text())
        assert meta["schema"] == "vdvl-active-set" and "sidecar" not in meta["arrays"]
        assert meta["summary"]["n_active"] == 4
        assert sorted(p.name for p in tmp_path.iterdir()) == ["ACTIVE.json"]  # no temp files, no sidecar
        assert_same_active_set(rich_set, ActiveSet.load(path))

    def test_sidecar_round_trip(self, rich_set, tmp_path, monkeypatch):
        monkeypatch.setattr(kl_analysis, "SIDECAR_THRESHOLD", 10)
        path = rich_set.save(tmp_path / "ACTIVE.json")
        meta = json.loads(path.read_text())
        assert meta["arrays"] == {"sidecar": "ACTIVE.npz"}
        assert sorted(p.name for p in tmp_path.iterdir()) == ["ACTIVE.json", "ACTIVE.npz"]
        assert_same_active_set(rich_set, ActiveSet.load(path))

    def test_sidecar_is_used_above_the_threshold_only(self, tmp_path, monkeypatch):
        monkeypatch.setattr(kl_analysis, "SIDECAR_THRESHOLD", 46)
        active_set(SHAPES, "element", selected=[0]).save(tmp_path / "at.json")
        monkeypatch.setattr(kl_analysis, "SIDECAR_THRESHOLD", 45)
        active_set(SHAPES, "element", selected=[0]).save(tmp_path / "above.json")
        assert sorted(p.name for p in tmp_path.iterdir()) == ["above.json", "above.npz", "at.json"]

    def test_loaded_set_gives_the_same_masks(self, rich_set, tmp_path):
        b = ActiveSet.load(rich_set.save(tmp_path / "A.json"))
        for m1, m2 in zip(rich_set.layer_masks(), b.layer_masks()):
            assert torch.equal(m1, m2)
        assert b.summary() == rich_set.summary()

    def test_unwritable_destination(self, rich_set, tmp_path):
        (tmp_path / "a-file").write_text("not a folder")
        with pytest.raises(UserError) as exc:
            rich_set.save(tmp_path / "a-file" / "dir" / "A.json")
        assert_user_error(exc, "A.json")

    def test_missing_folders_are_created(self, rich_set, tmp_path):
        rich_set.save(tmp_path / "new" / "dir" / "A.json")
        assert ActiveSet.load(tmp_path / "new" / "dir" / "A.json").n_active == rich_set.n_active


class TestLoadRejects:
    def _saved(self, tmp_path, monkeypatch=None, sidecar=False) -> Path:
        if sidecar:
            monkeypatch.setattr(kl_analysis, "SIDECAR_THRESHOLD", 10)
        return active_set(SHAPES, "element", selected=[1, 2], avg_kl=np.linspace(0, 1, 46)).save(tmp_path / "A.json")

    def _rejects(self, path: Path) -> None:
        with pytest.raises(UserError) as exc:
            ActiveSet.load(path)
        assert_user_error(exc, path.name)

    def test_missing_file(self, tmp_path):
        self._rejects(tmp_path / "nope.json")

    @pytest.mark.parametrize("content", [b"{not json", b"\xff\xfe\x00\x01", b""])
    def test_not_json(self, tmp_path, content):
        (tmp_path / "A.json").write_bytes(content)
        self._rejects(tmp_path / "A.json")

    @pytest.mark.parametrize("obj", [[1, 2], "text", {"schema": "something-else"}, {"arrays": {}}])
    def test_foreign_json(self, tmp_path, obj):
        (tmp_path / "A.json").write_text(json.dumps(obj))
        self._rejects(tmp_path / "A.json")

    @pytest.mark.parametrize("key", ["arrays", "layer_shapes", "granularity", "rule", "value", "n_images"])
    def test_missing_field(self, tmp_path, key):
        path = self._saved(tmp_path)
        meta = json.loads(path.read_text())
        del meta[key]
        path.write_text(json.dumps(meta))
        self._rejects(path)

    @pytest.mark.parametrize("array", ["avg_kl", "selected", "layer"])
    def test_missing_array(self, tmp_path, array):
        path = self._saved(tmp_path)
        meta = json.loads(path.read_text())
        del meta["arrays"][array]
        path.write_text(json.dumps(meta))
        self._rejects(path)

    @pytest.mark.parametrize("key,value", [("granularity", "pixel"), ("rule", "random"), ("value", "lots"),
                                           ("n_images", None), ("layer_shapes", 7)])
    def test_bad_field_value(self, tmp_path, key, value):
        path = self._saved(tmp_path)
        meta = json.loads(path.read_text())
        meta[key] = value
        path.write_text(json.dumps(meta))
        self._rejects(path)

    def test_arrays_not_a_mapping(self, tmp_path):
        path = self._saved(tmp_path)
        meta = json.loads(path.read_text())
        meta["arrays"] = [1, 2, 3]
        path.write_text(json.dumps(meta))
        self._rejects(path)

    def test_arrays_of_different_lengths(self, tmp_path):
        path = self._saved(tmp_path)
        meta = json.loads(path.read_text())
        meta["arrays"]["avg_kl"] = meta["arrays"]["avg_kl"][:5]
        path.write_text(json.dumps(meta))
        self._rejects(path)

    def test_selection_out_of_range(self, tmp_path):
        path = self._saved(tmp_path)
        meta = json.loads(path.read_text())
        meta["arrays"]["selected"] = [0, 46]
        path.write_text(json.dumps(meta))
        self._rejects(path)

    def test_missing_sidecar(self, tmp_path, monkeypatch):
        path = self._saved(tmp_path, monkeypatch, sidecar=True)
        (tmp_path / "A.npz").unlink()
        self._rejects(path)

    def test_truncated_sidecar(self, tmp_path, monkeypatch):
        path = self._saved(tmp_path, monkeypatch, sidecar=True)
        raw = (tmp_path / "A.npz").read_bytes()
        (tmp_path / "A.npz").write_bytes(raw[: len(raw) // 2])
        self._rejects(path)

    def test_garbage_sidecar(self, tmp_path, monkeypatch):
        path = self._saved(tmp_path, monkeypatch, sidecar=True)
        (tmp_path / "A.npz").write_bytes(b"definitely not an npz file" * 10)
        self._rejects(path)


# ------------------------------------------------------------------------ two processes


@pytest.mark.slow
class TestDistributedReduction:
    def test_two_process_gloo_reduction_equals_single_process(self, torchrun_session):
        """tests/kl_ddp_worker.py, run as a part of the session's one torchrun launch (tests/torchrun_worker.py)."""
        out_dir = torchrun_session.out / "kl"
        assert (torchrun_session.out / "kl.ok").exists(), torchrun_session.stderr[-3000:]

        images = worker.fixed_images()
        assert len(images) == worker.N_IMAGES == 64
        single = LatentKL(batch_size=1, posterior="mean").fit(worker.build_model(), images)
        for rank in range(2):
            with np.load(out_dir / f"rank{rank}.npz") as z:
                assert int(z["shard_images"]) == 32  # each rank saw only its shard ...
                assert int(z["n_images"]) == 64      # ... and ends with the count over both
                for k in range(len(TINY_SHAPES)):
                    np.testing.assert_allclose(z[f"kl{k}"], single.element_kl_[k], rtol=1e-12, atol=1e-15)
                    np.testing.assert_allclose(z[f"au{k}"], single.element_au_[k], rtol=1e-9, atol=1e-15)
