"""`vdvl probe` and vdvae_latents.downstream.probe: the protocol on plain arrays, the split discipline
(test rows never reach model selection), every baseline, and the exit-code contract."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vdvae_latents.downstream import probe as probes
from vdvae_latents.data import load_images
from vdvae_latents.core.errors import UserError
from vdvae_latents.downstream.inputs import ProbeInputs, StorePart
from vdvae_latents.downstream.probe import plot_probe, run_probe
from vdvae_latents.downstream.protocol import probe_features
from vdvae_latents.stores.schema import OWN_ATTRS
from vdvae_latents.stores.writer import StoreWriter
from vdvae_latents.stores.reader import open_encodings
from helpers import assert_one_line_error, run_cli


# --------------------------------------------------------------------------- helpers


def make_store(path: Path, features: np.ndarray, *, labels: np.ndarray | None = None,
               sample_index: np.ndarray | None = None, attrs: dict | None = None, dtype: str = "float32",
               finalize: bool = True, dims: dict | None = None) -> Path:
    """A synthetic store with the layout `vdvl encode` writes (two chunks, to exercise chunking)."""
    n, k = features.shape
    dims = dims or {"layer": np.zeros(k), "variate": np.arange(k), "y": np.full(k, -1), "x": np.full(k, -1),
                    "avg_kl": np.ones(k)}
    chunk = max(1, (n + 1) // 2)
    writer = StoreWriter.create(path, n_rows=n, dims=dims, attrs=attrs or {}, dtype=dtype,
                                has_labels=labels is not None, chunk_rows=chunk)
    index = np.arange(n) if sample_index is None else sample_index
    # Not finalizing stands for a killed writer: only the first chunk made it.
    for i in range(writer.n_chunks if finalize else 1):
        lo, hi = writer.chunk_range(i)
        writer.write_chunk(i, features[lo:hi], labels=None if labels is None else labels[lo:hi],
                           sample_index=index[lo:hi], source_index=index[lo:hi])
    if finalize:
        writer.finalize()
    else:
        writer.close()
    return path


def blobs(n: int, rng: np.random.Generator, noise_columns: int = 6) -> tuple[np.ndarray, np.ndarray]:
    """Two classes, each two Gaussian blobs in the first 2 columns (linearly separable on
    column 0), plus pure-noise columns."""
    y = np.arange(n) % 2
    centres = np.array([[-4.0, -4.0], [-4.0, 4.0], [4.0, -4.0], [4.0, 4.0]])
    blob = 2 * y + rng.integers(0, 2, n)
    informative = centres[blob] + rng.normal(0, 0.7, (n, 2))
    return np.hstack([informative, rng.normal(0, 1, (n, noise_columns))]).astype(np.float32), y


@pytest.fixture(scope="module")
def digits_test():
    return load_images("digits", split="test")


@pytest.fixture(scope="module")
def separable_store(tmp_path_factory) -> Path:
    X, y = blobs(120, np.random.default_rng(0))
    return make_store(tmp_path_factory.mktemp("sep") / "sep.zarr", X, labels=y)


# --------------------------------------------------------------------------- the protocol


class TestProbeFeatures:
    @pytest.mark.parametrize("model", probes.MODELS)
    def test_separable_features_give_near_perfect_accuracy(self, model):
        X, y = blobs(300, np.random.default_rng(1))
        result = probe_features(X[:200], y[:200], X[200:], y[200:], model=model, seed=0, cv=3)
        assert result["test_accuracy"] >= 0.97
        assert result["cv_accuracy"] >= 0.95
        assert result["n_train"] == 200 and result["n_test"] == 100 and result["n_features"] == 8
        assert result["fit_seconds"] > 0 and isinstance(result["params"], dict) and result["params"]

    def test_pure_noise_gives_chance(self):
        rng = np.random.default_rng(2)
        X, y = rng.normal(size=(900, 10)).astype(np.float32), rng.integers(0, 2, 900)
        result = probe_features(X[:300], y[:300], X[300:], y[300:], model="logreg", seed=0, cv=3)
        assert 0.42 <= result["test_accuracy"] <= 0.58

    def test_chosen_params_come_from_the_small_grid(self):
        X, y = blobs(90, np.random.default_rng(3))
        assert probe_features(X[:60], y[:60], X[60:], y[60:])["params"]["C"] in (0.001, 0.01, 0.1, 1.0, 10.0)
        # KNN cannot use more neighbours than a fold's training part holds (here 6 rows).
        small = probe_features(X[:9], y[:9], X[60:], y[60:], model="knn", cv=3)
        assert small["params"]["n_neighbors"] <= 6

    def test_the_same_seed_gives_the_same_result(self):
        X, y = blobs(120, np.random.default_rng(4))
        a = probe_features(X[:80], y[:80], X[80:], y[80:], seed=0)
        b = probe_features(X[:80], y[:80], X[80:], y[80:], seed=0)
        assert (a["test_accuracy"], a["cv_accuracy"], a["params"]) == (b["test_accuracy"], b["cv_accuracy"],
                                                                      b["params"])

    @pytest.mark.parametrize("y_train,needle", [
        (np.zeros(30, dtype=int), "only one class"),
        (np.r_[np.zeros(28, dtype=int), [1, 1]], "fewer than the 3 cross-validation folds"),
    ])
    def test_unusable_labels_are_user_errors(self, y_train, needle):
        X = np.random.default_rng(5).normal(size=(30, 3))
        with pytest.raises(UserError, match=needle):
            probe_features(X, y_train, X, y_train, cv=3)

    def test_unknown_model_is_a_user_error(self):
        X, y = blobs(30, np.random.default_rng(6))
        with pytest.raises(UserError, match="--model"):
            probe_features(X, y, X, y, model="forest")


# --------------------------------------------------------------------------- split discipline


class _Spy:
    """Records the rows GridSearchCV is fitted on and scored on, in call order."""

    def __init__(self, monkeypatch) -> None:
        from sklearn.model_selection import GridSearchCV

        self.fitted: list[np.ndarray] = []
        self.scored: list[np.ndarray] = []
        fit, score = GridSearchCV.fit, GridSearchCV.score

        def spy_fit(search, X, y=None, **kw):
            self.fitted.append(np.array(X, copy=True))
            return fit(search, X, y, **kw)

        def spy_score(search, X, y=None, **kw):
            self.scored.append(np.array(X, copy=True))
            return score(search, X, y, **kw)

        monkeypatch.setattr(GridSearchCV, "fit", spy_fit)
        monkeypatch.setattr(GridSearchCV, "score", spy_score)


def _row_keys(X: np.ndarray) -> set[bytes]:
    return {row.tobytes() for row in np.ascontiguousarray(X, dtype=np.float32)}


class TestSplits:
    def test_holdout_rows_never_reach_model_selection(self, monkeypatch, separable_store):
        spy = _Spy(monkeypatch)
        report = run_probe(separable_store, baselines=[], seeds=3, cv=3)
        X_all = _row_keys(np.asarray(open_encodings(separable_store).features))
        assert len(spy.fitted) == len(spy.scored) == 3
        held_out = []
        for fitted, scored in zip(spy.fitted, spy.scored):
            train, test = _row_keys(fitted), _row_keys(scored)
            assert not train & test  # no test row in the cross-validated search or the refit
            assert train | test == X_all
            assert len(test) == 24 and len(train) == 96  # a 20% stratified hold-out of 120 rows
            held_out.append(frozenset(test))
        assert len(set(held_out)) == 3  # each seed holds out other rows
        assert report["n_train"] == 96 and report["n_test"] == 24 and report["holdout_fraction"] == 0.2
        assert report["rows"][0]["test_accuracy"] > 0.95

    def test_max_train_uses_the_same_rows_for_every_feature_set(self, monkeypatch, tmp_path, digits_test):
        n = len(digits_test)
        X = np.random.default_rng(7).normal(size=(n, 5)).astype(np.float32)
        store = make_store(tmp_path / "d.zarr", X, labels=digits_test.labels,
                           attrs={"data": "digits", "split": "test"})
        seen: list[tuple[int, np.ndarray, np.ndarray]] = []
        real = probes.probe_features

        def spy(X_train, y_train, X_test, y_test, *, model, seed, cv):
            seen.append((seed, np.array(y_train), np.array(y_test)))
            return real(X_train, y_train, X_test, y_test, model=model, seed=seed, cv=cv)

        monkeypatch.setattr(probes, "probe_features", spy)
        report = run_probe(store, model="knn", baselines="pixels,pca", max_train=60, seeds=2, cv=2)
        assert report["n_train"] == 60 and [r["name"] for r in report["rows"]] == ["active", "pixels", "pca"]
        for seed in (0, 1):
            mine = [(tr, te) for s, tr, te in seen if s == seed]
            assert len(mine) == 3
            for tr, te in mine[1:]:
                np.testing.assert_array_equal(tr, mine[0][0])
                np.testing.assert_array_equal(te, mine[0][1])
            assert len(mine[0][0]) == 60 and len(np.unique(mine[0][0])) == 10  # stratified: all classes

    def test_test_store_rows_are_the_test_set(self, monkeypatch, tmp_path):
        rng = np.random.default_rng(8)
        X, y = blobs(90, rng)
        X_test, y_test = blobs(40, rng)
        train = make_store(tmp_path / "train.zarr", X, labels=y)
        # Flipped test labels: a clean protocol scores ~0 on them while CV on the training rows
        # is ~1; any leak of the test rows into model selection would pull the two together.
        test = make_store(tmp_path / "test.h5", X_test, labels=1 - y_test)
        spy = _Spy(monkeypatch)
        report = run_probe(train, test_store=test, baselines=[], seeds=2)
        row = report["rows"][0]
        assert report["n_train"] == 90 and report["n_test"] == 40 and report["holdout_fraction"] is None
        assert row["test_accuracy"] <= 0.05 and row["cv_accuracy"] >= 0.95
        assert all(_row_keys(s) == _row_keys(X_test) for s in spy.scored)
        assert all(_row_keys(f) == _row_keys(X) for f in spy.fitted)

    def test_test_store_of_another_encoding_is_refused(self, tmp_path):
        X, y = blobs(40, np.random.default_rng(9))
        a = make_store(tmp_path / "a.zarr", X, labels=y, attrs={"checkpoint_sha256": "aa"})
        b = make_store(tmp_path / "b.zarr", X, labels=y, attrs={"checkpoint_sha256": "bb"})
        with pytest.raises(UserError, match="does not match"):
            run_probe(a, test_store=b, baselines=[])


# --------------------------------------------------------------------------- baselines


@pytest.fixture(scope="module")
def digit_store(tmp_path_factory, digits_test):
    """Noise features for digits:test in a scrambled row order (the pixels must follow
    sample_index, not the row order), float16, HDF5."""
    n = len(digits_test)
    order = np.random.default_rng(10).permutation(n)
    X = np.random.default_rng(11).normal(size=(n, 8)).astype(np.float32)
    return make_store(tmp_path_factory.mktemp("px") / "digits.h5", X, labels=digits_test.labels[order],
                      sample_index=order, dtype="float16", attrs={"data": "digits", "split": "test"})


class TestPixelBaselines:
    def test_pixels_and_pca_run_on_the_same_images(self, digit_store):
        # KNN: these tests are about the feature sets, and its fits are instant.
        report = run_probe(digit_store, model="knn", baselines=["pixels", "pca"], seeds=2, cv=3)
        rows = {r["name"]: r for r in report["rows"]}
        assert rows["active"]["features"] == 8 and rows["active"]["bytes_per_image"] == 16  # float16
        assert rows["pixels"]["features"] == 64 and rows["pixels"]["bytes_per_image"] == 64  # uint8 8x8x1
        assert rows["pca"]["features"] == 8 and rows["pca"]["bytes_per_image"] == 32  # float32
        assert rows["pixels"]["test_accuracy"] >= 0.85  # the labels do follow the images
        assert rows["pca"]["test_accuracy"] >= 0.6
        assert rows["active"]["test_accuracy"] <= 0.4  # noise
        assert len(rows["pixels"]["params"]) == 2 and len(rows["pixels"]["test_accuracies"]) == 2

    def test_missing_data_skips_default_baselines_but_fails_named_ones(self, tmp_path, capsys):
        X, y = blobs(60, np.random.default_rng(12))
        store = make_store(tmp_path / "s.zarr", X, labels=y, attrs={"data": str(tmp_path / "gone.npy"),
                                                                     "split": "test"})
        report = run_probe(store, seeds=1)
        assert [r["name"] for r in report["rows"]] == ["active"]
        assert {s["name"] for s in report["skipped"]} == {"pixels", "random"}
        assert any("gone.npy" in note for note in report["notes"])
        code, _, err = run_cli(capsys, "probe", store, "--baselines", "pixels", "--seeds", "1")
        assert_one_line_error(code, err, "gone.npy")


@pytest.fixture(scope="module")
def encoded(tmp_path_factory):
    """A real tiny checkpoint (2 training steps) and its 25% store of digits:test."""
    from vdvae_latents.stores.encode import encode_to_store
    from vdvae_latents.train.run_config import resolve_run_config
    from vdvae_latents.train.loop import train

    root = tmp_path_factory.mktemp("enc")
    run = resolve_run_config(preset="tiny", data="digits")
    run = replace(run, train=replace(run.train, steps=2, batch_size=16, warmup_steps=1, log_every=1,
                                     checkpoint_every=100, val_limit=16, device="cpu"))
    result = train(root / "run", run, quiet=True)
    store = root / "digits.zarr"
    encode_to_store(result.checkpoint, "digits", store, split="test", keep="25%", device="cpu", kl_limit=256)
    return result.checkpoint, store


def clone_store(src: Path, dst: Path, **attr_changes) -> Path:
    """Copy a store through the public API, changing some attributes."""
    with open_encodings(src) as enc:
        data = enc.to_numpy()
        attrs = {k: v for k, v in enc.attrs.items() if k not in OWN_ATTRS}
        attrs.update(attr_changes)
        dims = {name: data[f"dims/{name}"] for name in ("layer", "variate", "y", "x", "avg_kl")}
        dtype = enc.features.dtype.name
    return make_store(dst, data["features"].astype(np.float32), labels=data.get("labels"),
                      sample_index=data["sample_index"], attrs=attrs, dtype=dtype, dims=dims)


class TestModelBaselines:
    def test_full_and_random_from_the_checkpoint(self, encoded, capsys):
        ckpt, store = encoded
        code, out, err = run_cli(capsys, "probe", store, "--baselines", "full,random,random-unpruned", "--seeds",
                                 "2", "--json", "--model", "knn")
        assert code == 0, err
        report = json.loads(out)
        rows = {r["name"]: r for r in report["rows"]}
        attrs = open_encodings(store).attrs
        k = attrs["n_features"]
        assert report["checkpoint"] == str(ckpt) and report["labels"] == "store" and not report["skipped"]
        assert rows["active"]["features"] == k and rows["active"]["bytes_per_image"] == 2 * k  # float16
        assert rows["full"]["features"] == attrs["n_latent_scalars_total"] == 644  # tiny: 4 + 2*64 + 2*256
        assert rows["full"]["bytes_per_image"] == 4 * 644
        assert rows["random-unpruned"]["features"] == k and rows["random-unpruned"]["bytes_per_image"] == 4 * k
        # random keeps as many variates as the store; their sizes (1, 8x8 or 16x16 scalars) vary by draw.
        from vdvae_latents.model.checkpoints import load_model

        shapes = load_model(ckpt, device="cpu")[0].cfg.layer_shapes()
        expected = [probes.random_active_set(shapes, "variate", attrs["n_dims_kept"], seed).kept_scalars_per_image()
                    for seed in (0, 1)]
        assert rows["random"]["features_per_seed"] == expected
        for row in rows.values():
            assert 0.0 <= row["test_accuracy"] <= 1.0 and len(row["test_accuracies"]) == 2

    def test_full_latents_are_the_unpruned_posterior_means(self, encoded):
        import torch

        from vdvae_latents.model.checkpoints import load_model
        from vdvae_latents.latents.encoder import Encoder
        from vdvae_latents.latents.stats import LatentKL
        from vdvae_latents.latents.active_set import build_active_set

        ckpt, store = encoded
        model, _ = load_model(ckpt, device="cpu")
        imgs = load_images("digits", split="test").images[:8]
        enc = open_encodings(store)
        parts = [StorePart(Path(store), enc, np.zeros(8, dtype=np.int64), np.arange(8))]
        inputs = ProbeInputs(parts, np.zeros(8, dtype=int), np.arange(8), np.arange(8))
        full = inputs.full_latents(model, torch.device("cpu"), lambda message: None)
        # The same thing through the library's own all-dimensions active set.
        everything = build_active_set(LatentKL(batch_size=8).fit(model, imgs), keep=1.0)
        from vdvae_latents.model.inputs import prepare_batch

        expected, _ = Encoder(model, everything).encode(prepare_batch(model.cfg, imgs))
        np.testing.assert_allclose(full, expected.numpy(), rtol=1e-5, atol=1e-5)

    def test_random_is_the_store_encoding_of_a_random_active_set(self, encoded):
        import torch

        from vdvae_latents.model.inputs import prepare_batch
        from vdvae_latents.model.checkpoints import load_model
        from vdvae_latents.latents.encoder import Encoder

        ckpt, store = encoded
        model, _ = load_model(ckpt, device="cpu")
        enc = open_encodings(store)
        n_kept, n_total = enc.attrs["n_dims_kept"], enc.attrs["n_dims_total"]
        drawn = [probes.random_active_set(model.cfg.layer_shapes(), "variate", n_kept, seed) for seed in range(6)]
        assert all(a.n_active == n_kept and len(a.table) == n_total for a in drawn)
        assert len({tuple(a.selected) for a in drawn}) > 1  # a new draw per seed, reproducible per seed
        np.testing.assert_array_equal(drawn[0].selected, probes.random_active_set(
            model.cfg.layer_shapes(), "variate", n_kept, 0).selected)
        # The baseline's features are the pruned-pass posterior means of the drawn set, which
        # is what `vdvl encode --active` with that set would store.
        imgs = load_images("digits", split="test").images[:8]
        parts = [StorePart(Path(store), enc, np.zeros(8, dtype=np.int64), np.arange(8))]
        inputs = ProbeInputs(parts, np.zeros(8, dtype=int), np.arange(8), np.arange(8))
        got = inputs.pruned_latents(Encoder(model, drawn[0]), torch.device("cpu"), lambda m: None, "random")
        pruned = model(prepare_batch(model.cfg, imgs), active=drawn[0].layer_masks(), posterior="mean",
                       masked="mean")
        masks = drawn[0].layer_masks()
        by_hand = torch.cat([layer.q_mean[:, m] if m is not None else layer.q_mean.flatten(1)
                             for layer, m in zip(pruned.layers, masks) if m is None or m.any()], 1)
        np.testing.assert_allclose(got, by_hand.detach().numpy(), rtol=1e-5, atol=1e-6)

    def test_random_needs_the_store_dimension_counts(self, encoded, tmp_path, capsys):
        _, store = encoded
        bare = clone_store(store, tmp_path / "bare.zarr")
        import zarr

        group = zarr.open_group(str(bare), mode="r+")
        del group.attrs["n_dims_kept"]
        code, _, err = run_cli(capsys, "probe", bare, "--baselines", "random", "--seeds", "1", "--model", "knn")
        assert_one_line_error(code, err, "bare.zarr")

    def test_missing_checkpoint_is_skipped_with_a_note(self, encoded, tmp_path, capsys):
        _, store = encoded
        gone = tmp_path / "nowhere" / "ckpt.pt"
        moved = clone_store(store, tmp_path / "moved.h5", checkpoint=str(gone))
        code, out, err = run_cli(capsys, "probe", moved, "--seeds", "1", "--json", "--model", "knn")
        assert code == 0, err
        report = json.loads(out)
        assert [r["name"] for r in report["rows"]] == ["active", "pixels"]
        assert report["skipped"][0]["name"] == "random" and str(gone) in report["skipped"][0]["reason"]
        assert any("random skipped" in n and "--ckpt" in n for n in report["notes"])
        # Named explicitly, the missing checkpoint is an error naming it ...
        code, _, err = run_cli(capsys, "probe", moved, "--baselines", "full", "--seeds", "1")
        assert_one_line_error(code, err, str(gone))
        # ... which --ckpt fixes.
        code, out, err = run_cli(capsys, "probe", moved, "--baselines", "random", "--seeds", "1",
                                 "--ckpt", encoded[0], "--json", "--model", "knn")
        assert code == 0, err
        assert [r["name"] for r in json.loads(out)["rows"]] == ["active", "random"]

    def test_checkpoint_with_another_sha256_is_refused(self, encoded, tmp_path, capsys):
        ckpt, store = encoded
        other = tmp_path / "other.pt"
        shutil.copyfile(ckpt, other)
        with open(other, "ab") as f:
            f.write(b"\0")
        code, _, err = run_cli(capsys, "probe", store, "--ckpt", other, "--seeds", "1")
        assert_one_line_error(code, err, "sha256")


# --------------------------------------------------------------------------- the CLI


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory):
    """Inputs `vdvl probe` refuses, made once: the commands of the bad-input test only read them."""
    tmp_path = tmp_path_factory.mktemp("bad_inputs")
    rng = np.random.default_rng(13)
    X, y = blobs(60, rng)
    paths = {
        "ok": make_store(tmp_path / "ok.zarr", X, labels=y),
        "nolabels": make_store(tmp_path / "nolabels.zarr", X),
        "incomplete": make_store(tmp_path / "incomplete.h5", X, labels=y, finalize=False),
        "oneclass": make_store(tmp_path / "oneclass.zarr", X, labels=np.zeros(60, dtype=int)),
        "rare": make_store(tmp_path / "rare.zarr", X, labels=np.r_[np.zeros(57, dtype=int), [1, 1, 1]]),
    }
    np.save(tmp_path / "short.npy", y[:10])
    np.save(tmp_path / "float.npy", y.astype(float))
    return tmp_path, paths


class TestProbeCommand:
    def test_table_output(self, capsys, separable_store):
        code, out, err = run_cli(capsys, "probe", separable_store, "--seeds", "2", "--model", "knn")
        assert code == 0, err
        assert "active" in out and "± " in out and "n_neighbors=" in out
        # The default baselines need images and a checkpoint this synthetic store lacks.
        assert "random skipped" in out and "records no checkpoint" in out
        assert "pixels skipped" in out

    def test_json_and_plot(self, capsys, separable_store, tmp_path):
        png = tmp_path / "probe.png"
        code, out, err = run_cli(capsys, "probe", separable_store, "--seeds", "2", "--baselines", "none",
                                 "--json", "--plot", png)
        assert code == 0, err
        report = json.loads(out)
        for key in ("store", "model", "n_train", "n_test", "labels", "rows", "notes", "chance_accuracy"):
            assert key in report
        assert report["model"] == "logreg" and report["plot"] == str(png)
        row = report["rows"][0]
        for key in ("name", "features", "bytes_per_image", "test_accuracy", "test_accuracy_std", "cv_accuracy",
                    "params", "fit_seconds"):
            assert key in row
        with Image.open(png) as im:
            assert im.format == "PNG" and im.size[0] > 400

    def test_plot_function_draws_every_row(self, tmp_path):
        row = {"name": "a", "features": 10, "bytes_per_image": 20, "test_accuracy": 0.8, "test_accuracy_std": 0.1}
        report = {"rows": [row, {**row, "name": "b", "features": 1000, "bytes_per_image": 4000}], "model": "logreg",
                  "store": "x.zarr", "test_store": None, "n_train": 5, "n_test": 2, "seeds": 3,
                  "chance_accuracy": 0.5}
        assert plot_probe(report, tmp_path / "p.png").stat().st_size > 1000
        with pytest.raises(UserError, match="does not exist"):
            plot_probe(report, tmp_path / "missing" / "p.png")

    def test_labels_from_a_file_and_from_a_data_spec(self, capsys, tmp_path, digits_test):
        n = len(digits_test)
        X = digits_test.images.reshape(n, -1).astype(np.float32)
        store = make_store(tmp_path / "nolabels.zarr", X, attrs={"data": "digits", "split": "test"})
        np.save(tmp_path / "y.npy", digits_test.labels)
        for spec, source in ((tmp_path / "y.npy", f"file {tmp_path / 'y.npy'}"), ("digits", "data digits:test")):
            code, out, err = run_cli(capsys, "probe", store, "--labels", spec, "--baselines", "none", "--seeds",
                                     "1", "--json", "--model", "knn")
            assert code == 0, err
            report = json.loads(out)
            assert report["labels"] == source and report["rows"][0]["test_accuracy"] > 0.85

    @pytest.mark.parametrize("case,extra,needle", [
        ("nolabels", [], "has no labels"),
        ("ok", ["--labels", "{tmp}/short.npy"], "has 10 labels but"),
        ("ok", ["--labels", "{tmp}/float.npy"], "integer class labels"),
        ("ok", ["--labels", "{tmp}/absent.npy"], "does not exist"),
        ("incomplete", [], "incomplete"),
        ("ok", ["--model", "forest"], "--model"),
        ("ok", ["--baselines", "pixels,wavelets"], "wavelets"),
        ("oneclass", [], "only one class"),
        ("rare", [], "fewer than the 3 cross-validation folds"),
        ("ok", ["--cv", "1"], "--cv"),
        ("ok", ["--seeds", "0"], "--seeds"),
        ("ok", ["--test-store", "{tmp}/ok.zarr"], "--test-store"),
        ("ok", ["--test-store", "{tmp}/missing.zarr"], "missing.zarr"),
        ("ok", ["--ckpt", "{tmp}/nope.pt", "--baselines", "full"], "nope.pt"),
        ("ok", ["--plot", "{tmp}/short.npy/p.png"], "p.png"),  # a file where the figure's folder should be
    ])
    def test_bad_input_exits_2_with_one_sentence(self, capsys, bad_inputs, case, extra, needle):
        tmp, paths = bad_inputs
        argv = ["probe", paths[case], "--seeds", "1", *[a.format(tmp=tmp) for a in extra]]
        code, out, err = run_cli(capsys, *argv)
        assert_one_line_error(code, err, needle)

    def test_missing_store_exits_2(self, capsys, tmp_path):
        code, _, err = run_cli(capsys, "probe", tmp_path / "none.zarr")
        assert_one_line_error(code, err, "none.zarr")
