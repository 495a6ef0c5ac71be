"""A store as a ``torch.utils.data.Dataset``, for downstream PyTorch models of any size.

:class:`EncodingsDataset` gives ``(features, label)`` pairs (float32 tensor of K values,
int64 scalar tensor) of a store's rows, dequantised and checked chunk by chunk like every
reader. Reading one row means decoding its whole chunk, so the dataset keeps the last few
decoded chunks, and :class:`ChunkShuffleSampler` orders an epoch so that each chunk is
decoded about once: chunks in a seeded random order, taken a few at a time, their rows
shuffled together. With ``DataLoader(..., num_workers=N)`` each worker process opens the
store itself (an open HDF5 file must not cross a fork), so the dataset is worker-safe::

    ds = EncodingsDataset("train.zarr")
    loader = DataLoader(ds, batch_size=256, sampler=ChunkShuffleSampler(ds, seed=0), num_workers=2)
    for epoch in range(10):
        loader.sampler.set_epoch(epoch)
        for x, y in loader: ...
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from ..core.errors import UserError
from ..stores.reader import open_encodings


class EncodingsDataset(Dataset):
    """Rows of a store (all, or ``rows``) as ``(features, label)``; ``labels=False`` gives
    features only. ``cache_chunks`` decoded chunks are kept per process."""

    def __init__(self, store: str | os.PathLike[str], *, rows: Sequence[int] | np.ndarray | None = None,
                 labels: bool = True, cache_chunks: int = 8) -> None:
        self.path = Path(store)
        with open_encodings(self.path) as enc:  # refuses missing, foreign or incomplete stores now
            self.n_features = enc.n_features
            self.chunk_rows = enc.chunk_rows
            n = enc.n_rows
            if labels and enc.labels is None:
                raise UserError(f"{self.path} has no labels; use EncodingsDataset(..., labels=False).")
            self.n_classes = int(np.asarray(enc.labels).max()) + 1 if labels else None
        self.rows = np.arange(n) if rows is None else np.asarray(rows, dtype=np.int64)
        if self.rows.ndim != 1 or (len(self.rows) and (self.rows.min() < 0 or self.rows.max() >= n)):
            raise UserError(f"rows must be a 1-D array of row numbers of {self.path} (0..{n - 1}).")
        self.with_labels = labels
        self.cache_chunks = max(1, int(cache_chunks))
        self._enc: Any = None
        self._pid: int | None = None
        self._cache: OrderedDict[int, tuple[np.ndarray, np.ndarray | None]] = OrderedDict()

    def __len__(self) -> int:
        return len(self.rows)

    def __getstate__(self) -> dict:
        # Workers get the path, never an open handle.
        state = self.__dict__.copy()
        state.update(_enc=None, _pid=None, _cache=OrderedDict())
        return state

    def _store(self) -> Any:
        if self._enc is None or self._pid != os.getpid():
            self._enc = open_encodings(self.path)
            self._pid = os.getpid()
            self._cache = OrderedDict()
        return self._enc

    def _chunk(self, i: int) -> tuple[np.ndarray, np.ndarray | None]:
        if i in self._cache:
            self._cache.move_to_end(i)
            return self._cache[i]
        enc = self._store()
        lo, hi = enc.chunk_range(i)
        values = (np.asarray(enc.features[lo:hi], dtype=np.float32),
                  np.asarray(enc.labels[lo:hi], dtype=np.int64) if self.with_labels else None)
        self._cache[i] = values
        if len(self._cache) > self.cache_chunks:
            self._cache.popitem(last=False)
        return values

    def chunk_of(self, index: int | np.ndarray) -> np.ndarray:
        """The store chunk of dataset item(s) ``index`` (what ChunkShuffleSampler groups by)."""
        return self.rows[index] // self.chunk_rows

    def __getitems__(self, indices: Sequence[int]) -> list:
        """A batch, reading each of its chunks once (``DataLoader`` calls this when present)."""
        store_rows = self.rows[np.asarray(indices, dtype=np.int64)]
        features = np.empty((len(store_rows), self.n_features), dtype=np.float32)
        labels = np.empty(len(store_rows), dtype=np.int64)
        chunk = store_rows // self.chunk_rows
        for c in np.unique(chunk):
            mask = chunk == c
            x, y = self._chunk(int(c))
            offset = store_rows[mask] - int(c) * self.chunk_rows
            features[mask] = x[offset]
            if y is not None:
                labels[mask] = y[offset]
        xs = torch.from_numpy(features)
        if not self.with_labels:
            return list(xs)
        return list(zip(xs, torch.from_numpy(labels)))

    def __getitem__(self, index: int) -> Any:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} is out of range for {len(self)} rows")
        return self.__getitems__([index % len(self)])[0]

    def moments(self) -> tuple[np.ndarray, np.ndarray]:
        """Mean and standard deviation of every feature over the dataset's rows (float64
        sums, one chunk at a time): the standardisation a downstream model usually wants."""
        total = np.zeros(self.n_features)
        squares = np.zeros(self.n_features)
        chunk = self.chunk_of(np.arange(len(self)))
        for c in np.unique(chunk):
            x, _ = self._chunk(int(c))
            block = x[self.rows[chunk == c] - int(c) * self.chunk_rows].astype(np.float64)
            total += block.sum(0)
            squares += np.square(block).sum(0)
        mean = total / len(self)
        std = np.sqrt(np.maximum(squares / len(self) - mean**2, 0.0))
        return mean, np.where(std > 0, std, 1.0)


class ChunkShuffleSampler(Sampler[int]):
    """Dataset items in a seeded order that decodes each chunk about once per epoch.

    The dataset's chunks are shuffled and taken ``chunks_per_group`` at a time; the rows of a
    group are shuffled together. Call :meth:`set_epoch` before each epoch for a new order
    (as with ``DistributedSampler``). ``shuffle=False`` gives the dataset order.
    """

    def __init__(self, dataset: EncodingsDataset, *, chunks_per_group: int = 4, seed: int = 0,
                 shuffle: bool = True) -> None:
        self.dataset = dataset
        self.chunks_per_group = max(1, int(chunks_per_group))
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.dataset)

    def __iter__(self) -> Iterator[int]:
        n = len(self.dataset)
        if not self.shuffle:
            return iter(range(n))
        rng = np.random.default_rng([self.seed, self.epoch])
        chunk = self.dataset.chunk_of(np.arange(n))
        chunks = np.unique(chunk)
        rng.shuffle(chunks)
        order = []
        for g in range(0, len(chunks), self.chunks_per_group):
            items = np.flatnonzero(np.isin(chunk, chunks[g:g + self.chunks_per_group]))
            order.append(rng.permutation(items))
        return iter(np.concatenate(order).tolist() if order else [])
