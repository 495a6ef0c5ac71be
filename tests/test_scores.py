"""Per-image scores (model.scores), out-of-distribution metrics and the detector (downstream.ood),
and `vdvl ood`, grouped by behaviour:

* the scores are the bounds they name: each column equals a plain forward pass of the masked
  top-down path (brute force), the importance-weighted bound its log-mean-exp of weights;
* an image's scores do not depend on the batch it is scored in;
* the metrics equal their definitions (pairwise AUROC, FPR at 80% TPR) and the default k is
  the closed-form rule;
* the detector follows scikit-learn's novelty-detection conventions;
* the command reports every score and refuses bad input in one sentence.
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.base import clone
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import FunctionTransformer

from background import subprocess_fixture
from helpers import assert_one_line_error, pixels, run_cli
from store_fixtures import signal_when_written
from vdvae_latents.core.errors import UserError
from vdvae_latents.data.splits import open_images
from vdvae_latents.downstream.ood import LatentOODDetector, choose_k, ood_metrics
from vdvae_latents.model.distributions import RowGenerators
from vdvae_latents.model.checkpoints import load_model
from vdvae_latents.model.evaluation import iw_log_weights
from vdvae_latents.model.inputs import prepare_batch
from vdvae_latents.model.scores import parse_ks, row_seeds, score_batch, score_columns, score_images
from vdvae_latents.model.vae import VAE
from vdvae_latents.report.inputs import check_ood_rows
from vdvae_latents.stores.reader import open_encodings
from vdvae_latents.stores.scores import score_to_store
from vdvae_latents.train.presets import get_preset

ROOT = Path(__file__).resolve().parents[1]
CFG = get_preset("tiny").config            # 5 latent layers, 8x8 grayscale
N_LAYERS = CFG.n_layers


@pytest.fixture(scope="module")
def model() -> VAE:
    """The tiny preset in float64 with posteriors pulled away from their priors (a fresh model's
    KL is 0, which would make every bound the same)."""
    torch.manual_seed(0)
    vae = VAE(CFG).double().eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in vae.named_parameters():
            if name.endswith("posterior_params.bias"):
                p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.7)
    return vae


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return pixels(10, CFG.loss_size, CFG.loss_size, CFG.channels, seed=3)


def forward_bound(model, x, rows, seed, k=0, stream=0):
    """Negative bound in bits/dim of one plain forward pass: the last k layers at the prior mean."""
    active = None
    if k:
        active = [None] * (N_LAYERS - k) + [torch.zeros(s, dtype=torch.bool) for s in CFG.layer_shapes()[-k:]]
    with torch.no_grad():
        out = model(x, active=active, masked="mean", generator=RowGenerators(row_seeds(seed, rows, stream)))
    return out, out.elbo_per_image.numpy() / CFG.dims_per_image / math.log(2)


# ----------------------------------------------------------------------------- the bounds they name


def test_every_column_is_the_forward_pass_it_names(model, images):
    x = prepare_batch(CFG, images).double()
    rows, ks = np.arange(10), [1, 2, N_LAYERS]
    scores = score_batch(model, x, ks, rows=rows, seed=7)
    col = score_columns(N_LAYERS, ks, 0)
    out, neg_elbo = forward_bound(model, x, rows, 7)
    np.testing.assert_allclose(scores[:, col.index("neg_elbo_bpd")], neg_elbo, rtol=1e-12)
    np.testing.assert_allclose(scores[:, col.index("recon_bpd")],
                               out.nll.numpy() / CFG.dims_per_image / math.log(2), rtol=1e-12)
    for i, kl in enumerate(out.kl, start=1):
        np.testing.assert_allclose(scores[:, col.index(f"kl_layer{i}_nats")], kl.sum((1, 2, 3)).numpy(), rtol=1e-12)
    for k in ks:
        _, neg_gt_k = forward_bound(model, x, rows, 7, k=k)
        np.testing.assert_allclose(scores[:, col.index(f"neg_elbo_gt{k}_bpd")], neg_gt_k, rtol=1e-12)
        np.testing.assert_allclose(scores[:, col.index(f"llr_gt{k}_bpd")], neg_gt_k - neg_elbo, rtol=1e-9, atol=1e-12)
    assert (scores[:, col.index("kl_layer1_nats")] > 0).all()


def test_the_prior_layers_carry_no_kl_and_the_others_the_elbo_passes_z(model, images):
    # L^{>k} draws the same posterior noise as the ELBO: above the k prior layers the z agree.
    x = prepare_batch(CFG, images).double()
    rows = np.arange(10)
    full, _ = forward_bound(model, x, rows, 2)
    gt2, _ = forward_bound(model, x, rows, 2, k=2)
    for a, b in zip(full.layers[:-2], gt2.layers[:-2]):
        torch.testing.assert_close(a.z, b.z, rtol=0, atol=0)
    assert all(float(layer.kl.abs().sum()) == 0 for layer in gt2.layers[-2:])


def test_the_importance_weighted_column_is_the_log_mean_of_k_weights(model, images):
    x = prepare_batch(CFG, images).double()
    rows, iw = np.arange(10), 4
    scores = score_batch(model, x, [1], rows=rows, seed=5, iw=iw)
    col = score_columns(N_LAYERS, [1], iw)
    streams = RowGenerators(row_seeds(5, rows, stream=1))
    with torch.no_grad():
        log_w = torch.stack([iw_log_weights(model(x, masked="mean", generator=streams)) for _ in range(iw)])
    neg_iw = -(torch.logsumexp(log_w, 0) - math.log(iw)).numpy() / CFG.dims_per_image / math.log(2)
    np.testing.assert_allclose(scores[:, col.index("neg_iw_bpd")], neg_iw, rtol=1e-12)
    # Jensen: the K-sample bound is at least as tight as one sample on average.
    assert scores[:, col.index("neg_iw_bpd")].mean() <= scores[:, col.index("neg_elbo_bpd")].mean() + 1e-9
    # With --iw the likelihood ratio subtracts the importance-weighted bound.
    np.testing.assert_allclose(scores[:, col.index("llr_gt1_bpd")],
                               scores[:, col.index("neg_elbo_gt1_bpd")] - scores[:, col.index("neg_iw_bpd")])


# ----------------------------------------------------------------------------- per image, whatever the batch


@pytest.mark.parametrize("batch_size", [1, 3, 7])
def test_an_images_scores_do_not_depend_on_its_batch(model, images, batch_size):
    whole = score_images(model, images, [1, 3], iw=2, seed=1, batch_size=10)
    np.testing.assert_allclose(score_images(model, images, [1, 3], iw=2, seed=1, batch_size=batch_size), whole,
                               rtol=1e-12)


def test_another_seed_draws_other_noise(model, images):
    a = score_images(model, images, [1], seed=1)
    b = score_images(model, images, [1], seed=2)
    assert not np.allclose(a[:, 0], b[:, 0])


# ----------------------------------------------------------------------------- parsing --k


@settings(max_examples=200)
@given(st.text(max_size=12), st.integers(1, 12))
def test_any_k_text_parses_within_the_layers_or_is_refused(text, n_layers):
    try:
        ks = parse_ks(text, n_layers)
    except UserError as err:
        assert str(err).startswith("--k ") and "\n" not in str(err)
        return
    assert ks == sorted(set(ks)) and ks and all(1 <= k <= n_layers for k in ks)


def test_k_names_all_layers_or_a_list():
    assert parse_ks("all", 4) == [1, 2, 3, 4]
    assert parse_ks(" 3,1,3 ", 4) == [1, 3]
    assert parse_ks(None, 4) == [1, 2]
    with pytest.raises(UserError, match="between 1 and 4"):
        parse_ks("5", 4)


# ----------------------------------------------------------------------------- metrics and the default k


def test_metrics_equal_their_definitions():
    rng = np.random.default_rng(0)
    inl, outl = rng.normal(0, 1, 300), rng.normal(0.8, 1.3, 200)
    m = ood_metrics(inl, outl)
    pairs = (outl[:, None] > inl[None, :]).mean() + 0.5 * (outl[:, None] == inl[None, :]).mean()
    assert m["auroc"] == pytest.approx(pairs, abs=1e-12)
    # FPR80: flag everything at or above the score that catches 80% of the outliers.
    threshold = np.sort(outl)[::-1][math.ceil(0.8 * len(outl)) - 1]
    assert m["fpr80"] == pytest.approx((inl >= threshold).mean(), abs=1e-12)
    assert ood_metrics(np.zeros(5), np.ones(5)) == {"auroc": 1.0, "auprc": 1.0, "fpr80": 0.0}
    with pytest.raises(UserError, match="at least one image"):
        ood_metrics(np.zeros(0), np.ones(3))


def test_the_default_k_is_the_fewest_bottom_layers_holding_half_the_kl():
    assert choose_k(np.array([[4.0, 3.0, 2.0, 1.0]])) == 3        # 1 + 2 = 3 < 5 <= 1 + 2 + 3
    assert choose_k(np.array([[1.0, 1.0, 1.0, 7.0]])) == 1
    assert choose_k(np.array([[5.0, 0.0, 0.0, 5.0]])) == 1        # exactly half counts
    assert choose_k(np.zeros((3, 4))) == 1


# ----------------------------------------------------------------------------- the detector


def test_the_detector_follows_scikit_learns_novelty_conventions(model, images):
    noise = pixels(6, CFG.loss_size, CFG.loss_size, CFG.channels, seed=9)
    det = LatentOODDetector(model, k=None, fpr=0.2, batch_size=4)
    assert det.fit(images) is det
    assert 1 <= det.k_ <= N_LAYERS and det.kl_per_layer_.shape == (N_LAYERS,)
    assert det.k_ == choose_k(det.kl_per_layer_[None])
    train_pred = det.predict(images)
    assert set(train_pred) <= {-1, 1} and (train_pred == -1).mean() <= 0.2 + 1e-9
    np.testing.assert_allclose(det.decision_function(noise), det.score_samples(noise) - det.offset_)
    assert ((det.decision_function(noise) >= 0) == (det.predict(noise) == 1)).all()
    assert clone(det).get_params()["fpr"] == 0.2
    pipe = make_pipeline(FunctionTransformer(lambda x: x), LatentOODDetector(model, k=1, fpr=0.2)).fit(images)
    assert set(pipe.predict(noise)) <= {-1, 1}
    with pytest.raises(UserError, match="fpr"):
        LatentOODDetector(model, fpr=1.5).fit(images)


# ----------------------------------------------------------------------------- vdvl ood


@pytest.fixture(scope="module")
def ood_sets(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ood-sets")
    np.save(folder / "noise.npy", pixels(12, 8, 8, 1, seed=4))
    np.save(folder / "rgb16.npy", pixels(12, 16, 16, 3, seed=5))
    np.save(folder / "empty.npy", np.zeros((0, 8, 8, 1), np.uint8))
    return folder


def test_ood_reports_every_score_for_every_set(capsys, tiny_digits_run, ood_sets, tmp_path):
    code, out, err = run_cli(capsys, "ood", tiny_digits_run, "--in", "digits:test", "--ood",
                             f"{ood_sets / 'noise.npy'}:all", "--ood", f"{ood_sets / 'rgb16.npy'}:all", "--resize",
                             "--k", "1,2", "--iw", "2", "--limit", "20", "--device", "cpu", "--json",
                             "--plot", tmp_path / "roc.png")
    assert code == 0, err
    report = json.loads(out)
    assert report["in"]["n"] == 20 and [s["n"] for s in report["sets"]] == [12, 12]
    assert list(report["sets"][0]["metrics"]) == ["neg_elbo_bpd", "neg_iw_bpd", "neg_elbo_gt1_bpd",
                                                  "neg_elbo_gt2_bpd", "llr_gt1_bpd", "llr_gt2_bpd"]
    for entry in report["sets"]:
        for m in entry["metrics"].values():
            assert 0 <= m["auroc"] <= 1 and 0 <= m["auprc"] <= 1 and 0 <= m["fpr80"] <= 1
    assert report["k_chosen"] in range(1, N_LAYERS + 1) and (tmp_path / "roc.png").stat().st_size > 0
    # `vdvl report --ood` takes this JSON as it is: a row per (score, set).
    (tmp_path / "ood.json").write_text(out)
    assert len(check_ood_rows(report, tmp_path / "ood.json")) == 12
    code, out, err = run_cli(capsys, "report", tiny_digits_run, "--ood", tmp_path / "ood.json", "--out",
                             tmp_path / "report.html", "--json")
    assert code == 0 and "ood" in json.loads(out)["sections"], err
    code, out, err = run_cli(capsys, "ood", tiny_digits_run, "--in", "digits:test", "--ood",
                             f"{ood_sets / 'noise.npy'}:all", "--limit", "20", "--device", "cpu")
    assert code == 0, err
    assert "<- k from the in-distribution KL" in out and "AUROC / AUPRC / FPR80" in out


@pytest.mark.parametrize("extra, needle", [
    (["--k", "9"], "--k 9"),
    (["--ood", "{sets}/rgb16.npy:all"], "--resize"),
    (["--ood", "{sets}/empty.npy:all"], "is empty"),
    (["--ood", "{sets}/missing.npy"], "missing.npy"),
])
def test_ood_refuses_bad_input_in_one_sentence(capsys, tiny_digits_run, ood_sets, extra, needle):
    extra = [e.format(sets=ood_sets) for e in extra]
    if extra[0] == "--k":
        extra += ["--ood", f"{ood_sets / 'noise.npy'}:all"]
    code, _, err = run_cli(capsys, "ood", tiny_digits_run, "--in", "digits", *extra, "--device", "cpu")
    assert_one_line_error(code, err, needle)


# ----------------------------------------------------------------------------- vdvl score (a store of scores)


SCORE_ARGS = ("--k", "1,2", "--iw", "2", "--device", "cpu", "--workers", "0", "--json")


def stored(path: Path) -> np.ndarray:
    with open_encodings(path) as enc:
        return np.asarray(enc.features[:])


@pytest.fixture(scope="module")
def score_reference(tmp_path_factory, encode_checkpoint, encode_data) -> Path:
    """The test split of ``encode_data`` scored in one process: batches of 8, chunks of 16 (what
    tests/torchrun_worker.py uses on two ranks)."""
    out = tmp_path_factory.mktemp("scores") / "reference.zarr"
    score_to_store(encode_checkpoint, encode_data, out, split="test", ks="1,2", iw=2, chunk_rows=16, batch_size=8,
                   device="cpu", workers=0)
    return out


def test_a_score_store_holds_the_scores_of_its_images(score_reference, encode_checkpoint, encode_data):
    model, _ = load_model(encode_checkpoint, ema=True, device="cpu")
    expected = score_images(model, open_images(encode_data, "test"), [1, 2], iw=2, batch_size=8)
    np.testing.assert_array_equal(stored(score_reference), expected.astype(np.float32))
    with open_encodings(score_reference) as enc:
        attrs, layer, k = dict(enc.attrs), np.asarray(enc.dims["layer"]), np.asarray(enc.dims["y"])
    columns = score_columns(N_LAYERS, [1, 2], 2)
    assert attrs["content"] == "scores" and attrs["columns"] == columns and attrs["complete"] is True
    assert layer.tolist() == [-1, -1, 0, 1, 2, 3, 4, -1, -1, -1, -1, -1] and k.tolist()[-4:] == [1, 2, 1, 2]


@pytest.mark.parametrize("name, batch, chunk", [("s.h5", 7, 25), ("s.zarr", 60, 1024)])
def test_scores_do_not_depend_on_batches_chunks_or_format(capsys, tmp_path, score_reference, encode_checkpoint,
                                                          encode_data, name, batch, chunk):
    code, out, err = run_cli(capsys, "score", encode_checkpoint, "--data", encode_data, "--out", tmp_path / name,
                             "--batch-size", batch, "--chunk-rows", chunk, *SCORE_ARGS)
    assert code == 0, err
    assert json.loads(out)["rows_written"] == 60
    # float32 convolutions sum in another order for another batch size: equal to rounding.
    np.testing.assert_allclose(stored(tmp_path / name), stored(score_reference), rtol=1e-5, atol=1e-6)


def test_two_torchrun_ranks_write_the_one_process_scores(torchrun_session, score_reference):
    assert torchrun_session.returncode == 0, torchrun_session.stderr[-3000:]
    assert (torchrun_session.out / "scores.ok").exists()
    np.testing.assert_array_equal(stored(torchrun_session.out / "scores.zarr"), stored(score_reference))


@subprocess_fixture
def score_killed_midway(request):
    """`python -m vdvae_latents score` of the train split (480 images, 30 chunks of 16) killed with
    SIGKILL once it has written a chunk; on the background thread (tests/background.py)."""
    ckpt, data = request.getfixturevalue("encode_checkpoint"), request.getfixturevalue("encode_data")
    out = request.getfixturevalue("tmp_path_factory").mktemp("killed-scores") / "killed.zarr"
    cmd = [sys.executable, "-m", "vdvae_latents", "score", str(ckpt), "--data", data, "--split", "train", "--out",
           str(out), "--k", "1,2", "--chunk-rows", "16", "--batch-size", "16", "--device", "cpu", "--quiet"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return lambda: signal_when_written(cmd, env, out, 30, signal.SIGKILL)


def test_a_score_store_killed_midway_resumes_to_the_uninterrupted_one(capsys, tmp_path, score_killed_midway,
                                                                      encode_checkpoint, encode_data):
    proc = score_killed_midway
    if proc.signalled_at is None:
        assert proc.returncode == 0, proc.stderr[-2000:]
        pytest.skip("the score job finished before it could be killed")
    assert proc.returncode == -signal.SIGKILL
    with pytest.raises(UserError, match="incomplete"):
        open_encodings(proc.out)
    args = ("--data", encode_data, "--split", "train", "--k", "1,2", "--chunk-rows", "16", "--batch-size", "16",
            "--device", "cpu", "--json")
    code, out, err = run_cli(capsys, "score", encode_checkpoint, "--out", proc.out, "--resume", *args)
    assert code == 0, err
    assert 0 < json.loads(out)["rows_written"] < 480
    assert run_cli(capsys, "score", encode_checkpoint, "--out", tmp_path / "whole.zarr", *args)[0] == 0
    np.testing.assert_array_equal(stored(proc.out), stored(tmp_path / "whole.zarr"))


def test_score_refuses_bad_input_in_one_sentence(capsys, tmp_path, score_reference, encode_checkpoint, encode_data):
    base = ("score", encode_checkpoint, "--data", encode_data, "--device", "cpu")
    assert_one_line_error(*run_cli(capsys, *base, "--out", tmp_path / "a.zarr", "--k", "6")[::2], "--k 6")
    assert_one_line_error(*run_cli(capsys, *base, "--out", score_reference)[::2], "--resume")
    assert_one_line_error(*run_cli(capsys, "decode", score_reference, "--out", tmp_path / "d.png")[::2],
                          "holds per-image scores")


def test_probing_a_score_store_skips_the_latent_baselines(capsys, tmp_path, encode_checkpoint, encode_data):
    store = tmp_path / "train.zarr"  # 480 rows: enough of each class for the probe's folds
    score_to_store(encode_checkpoint, encode_data, store, split="train", ks="1", device="cpu", workers=0)
    code, out, err = run_cli(capsys, "probe", store, "--seeds", "1", "--cv", "2", "--baselines", "random",
                             "--device", "cpu", "--json")
    assert_one_line_error(code, err, "holds per-image scores")
    code, out, err = run_cli(capsys, "probe", store, "--seeds", "1", "--cv", "2", "--device", "cpu", "--json")
    assert code == 0, err
    report = json.loads(out)
    assert [r["name"] for r in report["rows"]] == ["active", "pixels"]
    assert report["skipped"] == [{"name": "random", "reason": f"{store} holds per-image scores, not latent encodings"}]
