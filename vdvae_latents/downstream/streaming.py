"""The probe protocol for feature sets that do not fit in memory: block by block, with
scikit-learn's ``SGDClassifier.partial_fit``.

Same rows, same hyper-parameter choice, same scoring as :func:`~vdvae_latents.downstream.protocol.probe_features`;
only the optimiser differs. For one seed:

1. The training rows get the fold labels ``StratifiedKFold(cv, shuffle=True,
   random_state=seed)`` gives them (the folds of the in-memory grid search).
2. One pass sums each fold's features and squares (float64): the standardisation of every
   fold's training part and of all training rows, exactly what ``StandardScaler`` computes.
3. ``epochs`` passes in a seeded order of blocks (each a few whole store chunks, its rows
   shuffled) update, for every C of the grid, one model per fold (on the rows outside the
   fold) and one on all training rows: ``SGDClassifier(loss="log_loss"`` for logreg,
   ``"hinge"`` for linear-svm``, alpha=1/(C n))``, which minimises the same L2-penalised
   objective as ``LogisticRegression(C)`` / ``LinearSVC(C)`` scaled by ``1/(C n)``
   (one-vs-rest for more than two classes).
4. One pass scores each fold's models on the fold's rows; the C with the best mean fold
   accuracy is chosen (the first on ties, like ``GridSearchCV``), and its all-rows model is
   scored once on the test rows.

Memory is a few blocks of features (``block_rows`` rows, plus the scaled copies) and the
models; a block reads whole chunks, so every chunk is decoded once per pass.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from ..core.errors import UserError
from .protocol import C_GRIDS, check_training_labels

STREAM_MODELS = tuple(C_GRIDS)
#: Feature bytes per block: a block is whole chunks totalling about this much (float32).
BLOCK_BYTES = 32 * 2**20
#: Sample updates a streaming fit aims for: epochs = clip(this / training rows, 1, MAX_EPOCHS).
TARGET_UPDATES = 500_000
MAX_EPOCHS = 10

RowsFn = Callable[[np.ndarray], np.ndarray]


def default_epochs(n_train: int) -> int:
    """Enough passes for about :data:`TARGET_UPDATES` updates, between 1 and :data:`MAX_EPOCHS`."""
    return int(min(MAX_EPOCHS, max(1, math.ceil(TARGET_UPDATES / max(n_train, 1)))))


def block_rows_for(n_features: int, block_bytes: int = BLOCK_BYTES) -> int:
    return max(1, block_bytes // (4 * max(n_features, 1)))


def blocks(rows: np.ndarray, unit: np.ndarray, block_rows: int, rng: np.random.Generator | None = None
           ) -> list[np.ndarray]:
    """``rows`` (pool positions) cut into blocks of whole units (store chunks) of about
    ``block_rows`` rows; units in a seeded random order when ``rng`` is given, rows within
    a block sorted (so each chunk is read once)."""
    rows = np.asarray(rows)
    if len(rows) == 0:
        return []
    sorted_rows = rows[np.argsort(unit[rows], kind="stable")]
    groups = np.split(sorted_rows, np.flatnonzero(np.diff(unit[sorted_rows])) + 1)
    if rng is not None:
        groups = [groups[i] for i in rng.permutation(len(groups))]
    out, current, size = [], [], 0
    for g in groups:
        current.append(g)
        size += len(g)
        if size >= block_rows:
            out.append(np.sort(np.concatenate(current)))
            current, size = [], 0
    if current:
        out.append(np.sort(np.concatenate(current)))
    return out


def _finite(X: np.ndarray, what: str) -> np.ndarray:
    if not np.isfinite(X).all():
        raise UserError(f"{what} contains NaN or infinite values.")
    return X


class _Moments:
    """Per-fold sums of features and squares, combined into StandardScaler's mean and scale."""

    def __init__(self, n_folds: int, n_features: int) -> None:
        self.s = np.zeros((n_folds, n_features))
        self.q = np.zeros((n_folds, n_features))
        self.n = np.zeros(n_folds)

    def add(self, X: np.ndarray, fold: np.ndarray) -> None:
        for k in range(len(self.n)):
            part = X[fold == k].astype(np.float64)
            self.s[k] += part.sum(0)
            self.q[k] += np.square(part).sum(0)
            self.n[k] += len(part)

    def scaler(self, leave_out: int | None) -> tuple[np.ndarray, np.ndarray]:
        keep = np.ones(len(self.n), bool)
        if leave_out is not None:
            keep[leave_out] = False
        n = self.n[keep].sum()
        mean = self.s[keep].sum(0) / n
        var = np.maximum(self.q[keep].sum(0) / n - mean**2, 0.0)
        scale = np.sqrt(var)
        scale[scale < 10 * np.finfo(np.float64).eps * np.maximum(np.abs(mean), 1.0)] = 1.0  # constant columns
        return mean.astype(np.float32), scale.astype(np.float32)


class _FoldModels:
    """The SGD models of one streamed fit, one per (fit, C) of the grid: fit None learns from
    all training rows, fit k from the rows outside fold k, each on rows standardised as
    ``StandardScaler`` fitted on its own rows would."""

    def __init__(self, moments: _Moments, model: str, cv: int, seed: int) -> None:
        from sklearn.linear_model import SGDClassifier

        self.cv = cv
        self.fits = [None, *range(cv)]  # None: all training rows; k: the rows outside fold k
        self.scalers = {k: moments.scaler(k) for k in self.fits}
        self.n_fit = {k: int(moments.n.sum() - (0 if k is None else moments.n[k])) for k in self.fits}
        self.grid = C_GRIDS[model]
        loss = "log_loss" if model == "logreg" else "hinge"
        self.models = {(k, c): SGDClassifier(loss=loss, alpha=1.0 / (c * self.n_fit[k]), random_state=seed)
                       for k in self.fits for c in self.grid}

    def scaled(self, X: np.ndarray, k: int | None) -> np.ndarray:
        mean, scale = self.scalers[k]
        return (X - mean) / scale

    def partial_fit(self, X: np.ndarray, y: np.ndarray, fold: np.ndarray, classes: np.ndarray) -> None:
        """One update of every model on the block's rows it learns from."""
        for k in self.fits:
            mask = slice(None) if k is None else fold != k
            Xk, yk = self.scaled(X[mask], k), y[mask]
            if len(yk):
                for c in self.grid:
                    self.models[k, c].partial_fit(Xk, yk, classes=classes)

    def fold_hits(self, X: np.ndarray, y: np.ndarray, fold: np.ndarray) -> np.ndarray:
        """(cv, len(grid)) correct predictions of each fold's models on the block's rows of that fold."""
        hits = np.zeros((self.cv, len(self.grid)))
        for k in range(self.cv):
            mask = fold == k
            if mask.any():
                Xk = self.scaled(X[mask], k)
                for j, c in enumerate(self.grid):
                    hits[k, j] += np.count_nonzero(self.models[k, c].predict(Xk) == y[mask])
        return hits


def _fold_labels(train: np.ndarray, y_train: np.ndarray, n_pool: int, cv: int, seed: int) -> np.ndarray:
    """The fold of each pool row (-1 outside ``train``): the folds of the in-memory grid search."""
    from sklearn.model_selection import StratifiedKFold

    fold = np.full(n_pool, -1)
    splitter = StratifiedKFold(n_splits=cv, shuffle=True, random_state=seed)
    for k, (_, held) in enumerate(splitter.split(np.zeros(len(train)), y_train)):
        fold[train[held]] = k
    return fold


def _training_moments(features_of: RowsFn, train: np.ndarray, unit: np.ndarray, block_rows: int, fold: np.ndarray,
                      cv: int) -> _Moments:
    """One pass: the standardisation of every fold's training part and of all training rows."""
    moments = None
    for rows in blocks(train, unit, block_rows):
        X = _finite(features_of(rows), "the training features")
        moments = moments or _Moments(cv, X.shape[1])
        moments.add(X, fold[rows])
    assert moments is not None
    return moments


def stream_probe(features_of: RowsFn, y_pool: np.ndarray, train: np.ndarray, test: np.ndarray, unit: np.ndarray, *,
                 model: str = "logreg", seed: int = 0, cv: int = 3, epochs: int | None = None,
                 block_rows: int = 8192, say: Callable[[str], None] = lambda m: None) -> dict[str, Any]:
    """Fit and score one probe, reading features block by block: ``features_of(pool rows)``.

    ``train``/``test`` are pool positions, ``unit[pool position]`` the store chunk a row
    lives in. Returns the keys :func:`~vdvae_latents.downstream.protocol.probe_features` returns, with
    ``params`` ``{"C": ..., "alpha": ...}``, plus ``epochs``.
    """
    if model not in STREAM_MODELS:
        raise UserError(f"--model {model} needs its training rows in memory; streaming fits {', '.join(STREAM_MODELS)}.")
    start = time.perf_counter()
    train, test = np.asarray(train), np.asarray(test)
    y_train = y_pool[train]
    check_training_labels(y_train, cv)
    classes = np.unique(y_train)
    epochs = default_epochs(len(train)) if epochs is None else int(epochs)
    fold = _fold_labels(train, y_train, len(y_pool), cv, seed)
    moments = _training_moments(features_of, train, unit, block_rows, fold, cv)
    models = _FoldModels(moments, model, cv, seed)

    # ---- the passes
    for epoch in range(epochs):
        say(f"epoch {epoch + 1}/{epochs}")
        rng = np.random.default_rng([seed, 5, epoch])
        for rows in blocks(train, unit, block_rows, rng):
            X = features_of(rows)
            order = rng.permutation(len(rows))
            X, rows = X[order], rows[order]
            models.partial_fit(X, y_pool[rows], fold[rows], classes)
    correct = np.zeros((cv, len(models.grid)))
    for rows in blocks(train, unit, block_rows):
        correct += models.fold_hits(features_of(rows), y_pool[rows], fold[rows])
    fold_sizes = np.bincount(fold[train], minlength=cv)
    cv_acc = (correct / fold_sizes[:, None]).mean(0)
    best = int(np.argmax(cv_acc))
    c_best = models.grid[best]
    chosen = models.models[None, c_best]
    seconds = time.perf_counter() - start  # fitting and model selection, as probe_features counts it
    hits = 0
    for rows in blocks(test, unit, block_rows):
        X = _finite(features_of(rows), "the test features")
        hits += int(np.count_nonzero(chosen.predict(models.scaled(X, None)) == y_pool[rows]))
    return {
        "test_accuracy": hits / len(test),
        "cv_accuracy": float(cv_acc[best]),
        "params": {"C": c_best, "alpha": 1.0 / (c_best * models.n_fit[None])},
        "fit_seconds": seconds,
        "n_train": int(len(train)),
        "n_test": int(len(test)),
        "n_features": int(moments.s.shape[1]),
        "convergence_warnings": 0,
        "epochs": epochs,
    }
