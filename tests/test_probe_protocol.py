"""RowSpaceProjection: the exact reparametrisation that makes wide linear probes cheap.

Checked against brute force: the same L2-penalised model fitted directly on all d features
must give the same predictions as the one fitted on the span coordinates."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import LinearSVC

from vdvae_latents.downstream.protocol import RowSpaceProjection, probe_features, probe_pipeline


def wide_problem(n: int = 45, d: int = 300, classes: int = 3, seed: int = 0):
    """More features than rows; the class signal spread thinly over many columns."""
    rng = np.random.default_rng(seed)
    y = np.arange(n + 30) % classes
    means = rng.normal(0, 0.3, (classes, d))
    X = (means[y] + rng.normal(0, 1, (n + 30, d))).astype(np.float32)
    return X[:n], y[:n], X[n:], y[n:]


class TestBasis:
    def test_components_are_orthonormal_and_span_the_rows(self):
        X, *_ = wide_problem()
        proj = RowSpaceProjection().fit(X)
        V = proj.components_.astype(np.float64)
        assert V.shape == (len(X), X.shape[1])  # generic rows: full rank n
        np.testing.assert_allclose(V @ V.T, np.eye(len(V)), atol=1e-5)
        # Projecting a training row onto the span gives the row back.
        np.testing.assert_allclose(proj.transform(X) @ V, X, atol=1e-4)

    def test_centred_rows_lose_exactly_one_direction(self):
        X, *_ = wide_problem()
        Xc = X - X.mean(0)  # rows now sum to zero: rank n - 1
        assert RowSpaceProjection().fit(Xc).components_.shape[0] == len(X) - 1

    def test_rows_outside_the_span_keep_their_in_span_part(self):
        X, _, X_new, _ = wide_problem()
        proj = RowSpaceProjection().fit(X)
        Z = proj.transform(X_new).astype(np.float64)
        # Brute force: least-squares projection of the new rows onto the training rows' span.
        coef, *_ = np.linalg.lstsq(X.T.astype(np.float64), X_new.T.astype(np.float64), rcond=None)
        np.testing.assert_allclose(Z @ proj.components_, (X.T @ coef).T, atol=1e-3)

    def test_fewer_features_than_rows_pass_through(self):
        X = np.random.default_rng(1).normal(size=(50, 8)).astype(np.float32)
        proj = RowSpaceProjection().fit(X)
        assert proj.components_ is None
        np.testing.assert_array_equal(proj.transform(X), X)

    def test_all_zero_rows_give_a_valid_zero_map(self):
        proj = RowSpaceProjection().fit(np.zeros((4, 20), dtype=np.float32))
        assert proj.transform(np.ones((3, 20), dtype=np.float32)).shape == (3, 1)

    def test_transform_refuses_another_feature_count(self):
        X, *_ = wide_problem()
        proj = RowSpaceProjection().fit(X)
        with pytest.raises(ValueError):
            proj.transform(X[:, :10])


class TestSameModelInFewerDimensions:
    @pytest.mark.parametrize("C", [0.01, 1.0])
    def test_logistic_regression_predictions_equal_the_direct_fit(self, C):
        # float64, so both fits can converge far below the tolerance of the comparison.
        X, y, X_test, _ = (a.astype(np.float64) if a.dtype == np.float32 else a for a in wide_problem())
        direct = make_pipeline(StandardScaler(), LogisticRegression(C=C, tol=1e-10, max_iter=20000)).fit(X, y)
        spanned = make_pipeline(StandardScaler(), RowSpaceProjection(),
                                LogisticRegression(C=C, tol=1e-10, max_iter=20000)).fit(X, y)
        np.testing.assert_allclose(spanned.predict_proba(X_test), direct.predict_proba(X_test), atol=1e-4)
        # And the weights, mapped back to the d features, are the direct ones.
        w = spanned[-1].coef_ @ spanned[1].components_
        np.testing.assert_allclose(w, direct[-1].coef_, atol=1e-3 * np.abs(direct[-1].coef_).max())

    def test_linear_svm_decisions_equal_the_direct_fit(self):
        X, y, X_test, _ = (a.astype(np.float64) if a.dtype == np.float32 else a for a in wide_problem(seed=2))
        svm = dict(C=0.05, tol=1e-10, max_iter=200000, random_state=0)
        direct = make_pipeline(StandardScaler(), LinearSVC(**svm)).fit(X, y)
        spanned = make_pipeline(StandardScaler(), RowSpaceProjection(), LinearSVC(**svm)).fit(X, y)
        np.testing.assert_allclose(spanned.decision_function(X_test), direct.decision_function(X_test),
                                   atol=1e-3)


class TestPipeline:
    def test_only_the_penalised_linear_models_get_the_projection(self):
        for model, expected in (("logreg", True), ("linear-svm", True), ("knn", False), ("mlp", False)):
            pipeline, grid = probe_pipeline(model, seed=0, n_train=100, n_classes=2, cv=3)
            assert ("span" in pipeline.named_steps) is expected
            assert all(key.startswith("model__") for key in grid)

    def test_a_wide_probe_runs_with_the_cache_and_leaves_no_warnings(self, recwarn):
        X, y, X_test, y_test = wide_problem(n=60, d=400)
        result = probe_features(X, y, X_test, y_test, model="logreg", seed=0, cv=3)
        assert result["n_features"] == 400 and 0 <= result["test_accuracy"] <= 1
        assert not [w for w in recwarn if "Persisting" in str(w.message)]

    def test_the_basis_is_computed_once_per_fold_not_per_grid_value(self, monkeypatch):
        from vdvae_latents.downstream import protocol as probe_protocol

        calls = []
        fit = probe_protocol.RowSpaceProjection.fit
        monkeypatch.setattr(probe_protocol.RowSpaceProjection, "fit",
                            lambda self, X, y=None: calls.append(len(X)) or fit(self, X, y))
        X, y, X_test, y_test = wide_problem(n=90, d=400)
        probe_features(X, y, X_test, y_test, model="logreg", seed=0, cv=3)
        assert sorted(calls) == [60, 60, 60, 90]  # 3 folds + the refit; the grid has 5 values of C
