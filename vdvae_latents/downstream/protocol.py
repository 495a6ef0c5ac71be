"""One probe on plain arrays: the protocol every row of a `vdvl probe` report is made of.

``probe_features`` fits ``Pipeline(StandardScaler, [RowSpaceProjection,] model)`` with its
hyper-parameters chosen by seeded, stratified K-fold cross-validation on the training rows
only, refits on all of them and scores the test rows once.

For the L2-penalised linear models (``logreg``, ``linear-svm``) the pipeline projects the
scaled rows onto an orthonormal basis of the span of the rows it is fitted on
(:class:`RowSpaceProjection`). That is an exact reparametrisation, not an approximation:
the optimal weights of such a model lie in that span, so the decision function on any row
is unchanged, while each solver iteration costs about r/d of the original, r <= n_rows.
The basis is computed once per fold and reused for every C of the grid. On the
Fashion-MNIST full latents (3,333 rows x 20,400 scalars) a 5-value grid costs 71 s per
fold this way against 139 s directly (``benchmarks/probe_fit.py``). lbfgs stops at its
tolerance, so weakly regularised fits (large C, a flat objective) may stop at different
points in the two parameterisations (there: the same predictions on 96-100% of test rows,
100% at the C that cross-validation chose). With fewer features than rows it does nothing.
"""

from __future__ import annotations

import math
import tempfile
import time
import warnings
from contextlib import ExitStack
from typing import Any

import numpy as np
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.utils.validation import check_is_fitted, validate_data

from ..core.errors import UserError

MODELS = ("logreg", "linear-svm", "knn", "mlp")
#: Models with an L2 penalty on a linear weight vector, for which RowSpaceProjection is exact.
LINEAR_MODELS = ("logreg", "linear-svm")
#: The C grids of the linear models (the streaming probe uses the same ones).
C_GRIDS = {"logreg": [0.001, 0.01, 0.1, 1.0, 10.0], "linear-svm": [0.01, 0.1, 1.0]}


class RowSpaceProjection(TransformerMixin, BaseEstimator):
    """Coordinates of rows in an orthonormal basis of the span of the fitted rows.

    With ``n`` fitted rows of ``d > n`` features, ``fit`` finds the basis from the
    eigen-decomposition of the ``n x n`` Gram matrix (directions whose squared singular
    value is below ``rtol`` times the largest are dropped as numerically null) and
    ``transform`` maps any row ``x`` to ``x @ components_.T`` (``r`` values, ``r <= n``).
    For a model ``f(Xw + b) + ||w||^2 / (2C)`` the gradient in ``w`` is ``X^T(...) + w / C``,
    so the optimum lies in the span: fitting on the coordinates gives the same predictions.
    With ``d <= n`` there is nothing to gain and rows pass through (``components_`` is None).

    Fitted attributes: ``components_`` (``r x d`` float32, orthonormal rows, or None),
    ``n_features_in_``.
    """

    def __init__(self, rtol: float = 1e-9):
        self.rtol = rtol

    def fit(self, X: Any, y: Any = None) -> RowSpaceProjection:
        X = validate_data(self, X, dtype=[np.float32, np.float64])
        n, d = X.shape
        if d <= n:
            self.components_ = None
            return self
        # A float64 Gram: products of float32 values are exact in float64, so the null
        # direction that centring creates stays ~1e-13 (relative) instead of ~1e-6.
        X32 = np.asarray(X, dtype=np.float32)
        X64 = X32.astype(np.float64)
        gram = X64 @ X64.T
        del X64
        eigvals, eigvecs = np.linalg.eigh(gram)
        keep = eigvals > self.rtol * max(float(eigvals[-1]), np.finfo(np.float64).tiny)
        if not keep.any():  # all-zero rows: a one-dimensional zero map keeps shapes valid
            self.components_ = np.zeros((1, d), dtype=np.float32)
            return self
        scaled = eigvecs[:, keep] / np.sqrt(eigvals[keep])  # (n, r): V = X^T U S^-1
        self.components_ = (X32.T @ scaled.astype(np.float32)).T.copy()
        return self

    def transform(self, X: Any) -> np.ndarray:
        check_is_fitted(self, "components_")
        X = validate_data(self, X, reset=False, dtype=[np.float32, np.float64])
        if self.components_ is None:
            return X
        return X @ self.components_.T.astype(X.dtype, copy=False)  # float32 in, float32 out


def _fold_train_rows(n_train: int, cv: int) -> int:
    """Rows in the smallest training part of a ``cv``-fold split of ``n_train`` rows."""
    return n_train - math.ceil(n_train / cv)


def _model_and_grid(model: str, *, seed: int, n_train: int, n_classes: int, cv: int) -> tuple[Any, dict]:
    """A fresh estimator and its (small) grid, sized so every fit is quick on 2 cores."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.neural_network import MLPClassifier
    from sklearn.svm import LinearSVC

    # The smallest training part of a CV fold: KNN cannot ask for more neighbours than it has,
    # and MLP early stopping needs a validation slice with room for every class.
    fold_train = _fold_train_rows(n_train, cv)
    if model == "logreg":
        # Five decades. Standardised wide features want strong regularisation: on 5,000
        # Fashion-MNIST rows every feature set chose the lowest C of a 0.1..10 grid, and then
        # of a 0.01..10 one; small C values also converge fastest.
        return LogisticRegression(max_iter=1000), {"C": C_GRIDS["logreg"]}
    if model == "linear-svm":
        return LinearSVC(max_iter=5000, random_state=seed), {"C": C_GRIDS["linear-svm"]}
    if model == "knn":
        ks = [k for k in (5, 15) if k <= fold_train] or [max(1, fold_train)]
        return KNeighborsClassifier(), {"n_neighbors": ks}
    if model == "mlp":
        # Early stopping holds out 10% of each fit; below ~1000 rows that slice is too small and
        # noisy (it stops far too soon), and 300 epochs of a small set are cheap anyway.
        early = fold_train >= max(1000, 20 * n_classes)
        return (MLPClassifier(hidden_layer_sizes=(128,), early_stopping=early, max_iter=200 if early else 300,
                              random_state=seed), {"alpha": [1e-4, 1e-2]})
    raise UserError(f"--model must be one of {', '.join(MODELS)}, not '{model}'.")


def check_model(model: str) -> str:
    if model not in MODELS:
        raise UserError(f"--model must be one of {', '.join(MODELS)}, not '{model}'.")
    return model


def _plain(value: Any) -> Any:
    """numpy scalars -> Python numbers so reports are JSON-serialisable."""
    return value.item() if isinstance(value, np.generic) else value


def _as_matrix(x: Any, name: str) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise UserError(f"{name} must be a 2-D array of features, not shape {x.shape}.")
    if not np.isfinite(x).all():
        raise UserError(f"{name} contains NaN or infinite values.")
    return x


def check_training_labels(y_train: np.ndarray, cv: int, where: str = "the training rows") -> None:
    """UserError unless ``y_train`` has two classes or more, each with at least ``cv`` members."""
    classes, counts = np.unique(y_train, return_counts=True)
    if len(classes) < 2:
        shown = f" ({classes[0]})" if len(classes) else ""
        raise UserError(f"{where} have only one class{shown}; a probe needs at least 2.")
    if counts.min() < cv:
        c = classes[np.argmin(counts)]
        raise UserError(f"class {c} has only {counts.min()} of {where}, fewer than the {cv} cross-validation "
                        f"folds; use a smaller --cv or more rows.")


def probe_pipeline(model: str, *, seed: int, n_train: int, n_classes: int, cv: int,
                   memory: str | None = None) -> tuple[Any, dict]:
    """The unfitted ``Pipeline`` of a probe and its grid (keys prefixed for GridSearchCV).

    ``memory``: a cache directory for the fitted transformers (scaler, row-space basis), so a
    grid search computes each fold's basis once rather than once per hyper-parameter value.
    """
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    estimator, grid = _model_and_grid(model, seed=seed, n_train=n_train, n_classes=n_classes, cv=cv)
    steps = [("scale", StandardScaler())]
    if model in LINEAR_MODELS:
        steps.append(("span", RowSpaceProjection()))
    steps.append(("model", estimator))
    return Pipeline(steps, memory=memory), {f"model__{key}": values for key, values in grid.items()}


def probe_features(X_train: Any, y_train: Any, X_test: Any, y_test: Any, *, model: str = "logreg",
                   seed: int = 0, cv: int = 3) -> dict:
    """Fit and score one probe on plain arrays: the protocol every report row is made of.

    Hyper-parameters are chosen by ``cv``-fold stratified cross-validation (shuffled with
    ``seed``) on the training rows only; the test rows are used exactly once, to score the
    refitted best pipeline.

    Returns ``test_accuracy``, ``cv_accuracy`` (mean CV accuracy of the chosen
    hyper-parameters), ``params`` (the chosen ones), ``fit_seconds`` (cross-validation
    plus refit), ``n_train``, ``n_test``, ``n_features`` and ``convergence_warnings``.
    """
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.model_selection import GridSearchCV, StratifiedKFold

    check_model(model)
    if isinstance(cv, bool) or not isinstance(cv, int | np.integer) or cv < 2:
        raise UserError(f"--cv must be an integer of at least 2 folds, not {cv!r}.")
    X_train, X_test = _as_matrix(X_train, "X_train"), _as_matrix(X_test, "X_test")
    y_train, y_test = np.asarray(y_train), np.asarray(y_test)
    if y_train.shape != (len(X_train),) or y_test.shape != (len(X_test),):
        raise UserError("the labels must be 1-D with one entry per row of features.")
    if X_train.shape[1] != X_test.shape[1] or len(X_test) == 0:
        raise UserError("the test rows must be non-empty and have the training rows' features.")
    check_training_labels(y_train, cv)

    # Worth caching only when the basis is computed at all: more features than fold rows.
    wide = model in LINEAR_MODELS and X_train.shape[1] > _fold_train_rows(len(y_train), cv)
    start = time.perf_counter()
    with ExitStack() as stack, warnings.catch_warnings(record=True) as caught:
        cache = stack.enter_context(tempfile.TemporaryDirectory(prefix="vdvl-probe-")) if wide else None
        pipeline, grid = probe_pipeline(model, seed=seed, n_train=len(y_train),
                                        n_classes=len(np.unique(y_train)), cv=cv, memory=cache)
        search = GridSearchCV(pipeline, grid, cv=StratifiedKFold(n_splits=cv, shuffle=True, random_state=seed),
                              scoring="accuracy", refit=True, error_score="raise")
        # Probes at max_iter may stop short of full convergence; that is reported as a count
        # in the row rather than as dozens of warnings on stderr.
        warnings.simplefilter("always", ConvergenceWarning)
        # joblib's note that hashing a large input took a while is about the cache, not the probe.
        warnings.filterwarnings("ignore", message="Persisting input arguments")
        search.fit(X_train, y_train)
    seconds = time.perf_counter() - start
    others = [w for w in caught if not issubclass(w.category, ConvergenceWarning)]
    for w in others:
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return {
        "test_accuracy": float(search.score(X_test, y_test)),
        "cv_accuracy": float(search.best_score_),
        "params": {key.removeprefix("model__"): _plain(v) for key, v in search.best_params_.items()},
        "fit_seconds": seconds,
        "n_train": int(len(y_train)),
        "n_test": int(len(y_test)),
        "n_features": int(X_train.shape[1]),
        "convergence_warnings": len(caught) - len(others),
    }
