"""The feature sets of a probe report (the store's columns and each baseline), each usable
in memory (all used rows at once) or streamed (block by block, :mod:`~vdvae_latents.downstream.streaming`).

A set in memory computes its values for every used row once, lazily, and hands out the
training and test rows of each seed. A streamed set hands out, per seed, a function of pool
rows; nothing larger than a block is ever held.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

FLOAT32_BYTES = 4
#: Bytes an in-memory fit needs per feature value of the used rows: the values, their
#: training/test copies and the scaled or projected copy the pipeline makes.
IN_MEMORY_FACTOR = 3 * FLOAT32_BYTES

RowsFn = Callable[[np.ndarray], np.ndarray]


@dataclass
class FeatureSet:
    """One report row's features.

    ``arrays(split, train_positions, test_positions)`` gives (X_train, X_test) in memory
    (positions index the used rows); ``rows_for(split)`` gives a function of pool rows for
    the streaming probe. ``streaming`` says which one the run uses.
    """

    name: str
    description: str
    n_features: int
    dtype: str
    bytes_per_image: int
    arrays: Callable[[Any, np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]
    rows_for: Callable[[Any], RowsFn]
    streaming: bool = False
    features_per_seed: list[int] = field(default_factory=list)
    disk_bytes_per_image: float | None = None


class UsedValues:
    """Values of every used row, computed on first use and kept (one per key)."""

    def __init__(self) -> None:
        self._values: dict[Any, np.ndarray] = {}

    def get(self, key: Any, compute: Callable[[], np.ndarray], keep_one_of: str | None = None) -> np.ndarray:
        if key not in self._values:
            if keep_one_of is not None:  # e.g. one random draw at a time: drop the previous seed's
                for old in [k for k in self._values if isinstance(k, tuple) and k[0] == keep_one_of]:
                    del self._values[old]
            self._values[key] = compute()
        return self._values[key]


def fixed_set(name: str, description: str, dtype: str, itemsize: int, width: int, used: Callable[[], np.ndarray],
              rows: RowsFn, streaming: bool) -> FeatureSet:
    """Features that do not depend on the seed: the store's, the pixels, the full latents."""
    def arrays(split: Any, tr: np.ndarray, te: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        X = used()
        return X[tr], X[te]

    return FeatureSet(name, description, width, dtype, width * itemsize, arrays, lambda split: rows, streaming)


def pca_set(k: int, n_pixels: int, used_pixels: Callable[[], np.ndarray], pixel_rows: RowsFn,
            train_blocks: Callable[[Any], list[np.ndarray]], notes: list[str], streaming: bool) -> FeatureSet:
    """PCA of the pixels to ``k`` components, fitted on each seed's training rows only
    (``PCA`` in memory, ``IncrementalPCA`` over the training blocks when streamed)."""
    from sklearn.decomposition import PCA, IncrementalPCA

    fs = FeatureSet("pca", "PCA of the pixels (fitted on the training rows)", k, "float32", k * FLOAT32_BYTES,
                    lambda *a: (np.empty(0), np.empty(0)), lambda split: pixel_rows, streaming)

    def components(split: Any) -> int:
        # Components are capped by what the training rows can span.
        n = min(k, len(split.train), n_pixels)
        if n < k:
            limit = f"the images have {n_pixels} pixel values" if n == n_pixels \
                else f"there are {len(split.train)} training rows"
            note = f"pca: {n} components instead of {k}, as {limit}."
            if note not in notes:
                notes.append(note)
        fs.features_per_seed.append(n)
        return n

    def arrays(split: Any, tr: np.ndarray, te: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        pixels = used_pixels()
        pca = PCA(n_components=components(split), random_state=split.seed).fit(pixels[tr])
        return pca.transform(pixels[tr]).astype(np.float32), pca.transform(pixels[te]).astype(np.float32)

    def rows_for(split: Any) -> RowsFn:
        n = components(split)
        ipca = IncrementalPCA(n_components=n)
        batches = train_blocks(split)
        # Every partial fit needs at least n rows: a short last block joins the one before it.
        while len(batches) > 1 and len(batches[-1]) < n:
            batches[-2:] = [np.concatenate(batches[-2:])]
        for rows in batches:
            ipca.partial_fit(pixel_rows(rows))
        return lambda rows: ipca.transform(pixel_rows(rows)).astype(np.float32)

    fs.arrays, fs.rows_for = arrays, rows_for
    return fs


def _random_columns(seed: int, total: int, k: int) -> np.ndarray:
    return np.sort(np.random.default_rng([seed, 3]).choice(total, k, replace=False))


def random_unpruned_set(k: int, total: int, used_full: Callable[[], np.ndarray], full_rows: RowsFn,
                        streaming: bool) -> FeatureSet:
    """``k`` columns of the full latents drawn at random per seed."""
    def arrays(split: Any, tr: np.ndarray, te: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        full, cols = used_full(), _random_columns(split.seed, total, k)
        return full[np.ix_(tr, cols)], full[np.ix_(te, cols)]  # no copy of the unused columns

    def rows_for(split: Any) -> RowsFn:
        cols = _random_columns(split.seed, total, k)
        return lambda rows: full_rows(rows)[:, cols]

    return FeatureSet("random-unpruned", f"{k} random latent scalars of the unpruned pass", k, "float32",
                      k * FLOAT32_BYTES, arrays, rows_for, streaming)


def random_pruned_set(n_dims: int, granularity: str, counts: list[int], used_of_seed: Callable[[int], np.ndarray],
                      rows_of_seed: Callable[[int], RowsFn], streaming: bool) -> FeatureSet:
    """The encodings of each seed's random active set; variates differ in size, so the
    feature count (``counts``, per seed) varies by draw."""
    def arrays(split: Any, tr: np.ndarray, te: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        X = used_of_seed(split.seed)
        return X[tr], X[te]

    return FeatureSet("random", f"{n_dims} random {granularity}s kept in place of the active ones (pruned pass)",
                      counts[0], "float32", counts[0] * FLOAT32_BYTES, arrays, lambda split: rows_of_seed(split.seed),
                      streaming, features_per_seed=list(counts))


def random_active_set(layer_shapes: Sequence[tuple[int, int, int]], granularity: str, n_active: int,
                      seed: int) -> Any:
    """An :class:`~vdvae_latents.latents.active_set.ActiveSet` of ``n_active`` dimensions drawn uniformly (seeded)."""
    from ..latents.active_set import ActiveSet
    from ..latents.stats import dimension_table

    table = dimension_table(layer_shapes, granularity)
    selected = np.sort(np.random.default_rng([seed, 4]).choice(len(table), n_active, replace=False))
    return ActiveSet(granularity=granularity, table=table, selected=selected, rule="keep",
                     value=n_active / len(table), layer_shapes=[tuple(s) for s in layer_shapes], n_images=0)
