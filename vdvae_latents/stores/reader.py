"""Reading stores: :func:`open_encodings` and the lazy, checked row arrays it hands out.

A row array is read whole chunk by whole chunk: each chunk is checked (present, decodable,
its CRC-32, finite values) by :class:`~vdvae_latents.stores.schema.ChunkChecker` and, for an integer store,
dequantised, so code that reads a store sees verified latent values or a one-sentence
:class:`~vdvae_latents.stores.backends.StoreError` naming the damaged rows.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .backends import Backend, BackendOwner, StoreError, StoreFormat, close_on_error
from .codes import Quantizer
from .schema import (
    DIM_FIELDS,
    FILL_INDEX,
    VALUE_ARRAYS,
    ChunkChecker,
    StoreLayout,
    chunk_bounds,
    corrupt_store,
    error_summary,
    open_layout,
    read_quantizers,
)


class LazyArray:
    """A read-only view of one stored row array; nothing is read until it is indexed.

    Supports ``shape``, ``dtype``, ``ndim``, ``len()``, indexing (an int, a slice, an array of
    ints or booleans, optionally followed by column indices; returns numpy) and ``np.asarray``.
    Whole chunks are read, checked (missing, checksum, NaN) and, for integer stores,
    dequantised: ``dtype`` is float32 there. ``raw`` is the underlying ``zarr.Array`` or
    ``h5py.Dataset`` (integer codes, unchecked).
    """

    def __init__(self, raw: Any, *, name: str, path: Path, checker: ChunkChecker, verify: bool = True,
                 quantizer: Quantizer | None = None, allow_unwritten: bool = False,
                 is_open: Callable[[], bool] = lambda: True) -> None:
        self.raw = raw
        self.name = name
        self._path = path
        self._is_open = is_open
        self._chunks = _ChunkReader(raw, name, checker, verify=verify, quantizer=quantizer,
                                    allow_unwritten=allow_unwritten)

    def _check_open(self) -> None:
        # h5py's own error for a closed file is cryptic ("identifier is not of specified type").
        if not self._is_open():
            raise ValueError(f"cannot read {self.name}: the store {self._path} has been closed")

    @property
    def shape(self) -> tuple[int, ...]:
        self._check_open()
        return tuple(self.raw.shape)

    @property
    def dtype(self) -> np.dtype:
        self._check_open()
        return self._chunks.dtype

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key: Any) -> np.ndarray:
        self._check_open()
        rows, rest = (key[0], key[1:]) if isinstance(key, tuple) else (key, ())
        index, single = _row_index(rows, len(self), self.name)
        out = self._chunks.take(index)
        if single:
            out = out[0]
            return out[rest] if rest else out
        return out[(slice(None), *rest)] if rest else out

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray:
        values = self[:]
        return values if dtype is None else values.astype(dtype, copy=False)

    def __repr__(self) -> str:
        return f"LazyArray({self.name!r}, shape={tuple(self.raw.shape)}, dtype={self.dtype})"


def _row_index(rows: Any, n: int, name: str) -> tuple[np.ndarray, bool]:
    """(the int64 row numbers that ``rows`` selects of ``n``, whether it was a single int); IndexError if
    it is out of range or not an int, a slice, ``...`` or a 1-D int/bool array."""
    if rows is Ellipsis:
        rows = slice(None)
    if isinstance(rows, int | np.integer) and not isinstance(rows, bool):
        i = int(rows) + (n if rows < 0 else 0)
        if not 0 <= i < n:
            raise IndexError(f"row {rows} is out of range for {name} with {n} rows")
        return np.array([i], dtype=np.int64), True
    if isinstance(rows, slice):
        return np.arange(*rows.indices(n), dtype=np.int64), False
    index = np.asarray(rows)
    if index.dtype == np.bool_:
        if index.shape != (n,):
            raise IndexError(f"a boolean row mask for {name} must have {n} entries")
        index = np.flatnonzero(index)
    elif not np.issubdtype(index.dtype, np.integer) or index.ndim != 1:
        raise IndexError(f"rows of {name} are indexed by an int, a slice or a 1-D int/bool array")
    index = np.where(index < 0, index + n, index)
    if len(index) and (index.min() < 0 or index.max() >= n):
        raise IndexError(f"row indices out of range for {name} with {n} rows")
    return index.astype(np.int64), False


class _ChunkReader:
    """The chunks of one row array, each read whole, checked by the store's
    :class:`~vdvae_latents.stores.schema.ChunkChecker` and, in integer stores, dequantised."""

    def __init__(self, raw: Any, name: str, checker: ChunkChecker, *, verify: bool, quantizer: Quantizer | None,
                 allow_unwritten: bool) -> None:
        self.raw, self.name, self.checker = raw, name, checker
        self.verify, self.quantizer, self.allow_unwritten = verify, quantizer, allow_unwritten
        self.cache: dict[int, np.ndarray] = {}

    @property
    def dtype(self) -> np.dtype:
        """The dtype of the values read: float32 for integer codes, object for strings."""
        if self.quantizer is not None:
            return np.dtype(np.float32)
        raw = np.dtype(self.raw.dtype)
        return np.dtype(object) if raw.kind in "OT" else raw

    def chunk(self, i: int) -> np.ndarray:
        if i in self.cache:
            return self.cache[i]
        checker = self.checker
        if not self.verify:  # inspecting a damaged store: read what is there
            lo, hi = checker.layout.chunk_range(i)
            values = np.asarray(self.raw[lo:hi])
        else:
            values, problem = checker.read(self.name, i)
            if problem is not None:
                if not (self.allow_unwritten and checker.flags[i] != 1):
                    raise checker.error(self.name, i, problem)
                values = self._unwritten(i)
        if self.quantizer is not None and values.dtype.kind in "iu":
            values = self.quantizer.dequantize(values)
        if values.dtype.kind == "T":
            values = values.astype(object)
        self.cache = {i: values}  # one chunk: row-by-row reading touches each chunk once
        return values

    def _unwritten(self, i: int) -> np.ndarray:
        """What rows nobody has written read as: NaN features, -1 indices, empty names."""
        lo, hi = self.checker.layout.chunk_range(i)
        shape = (hi - lo, *self.raw.shape[1:])
        if self.name in VALUE_ARRAYS:
            return np.full(shape, np.nan, dtype=np.float32 if self.quantizer else self.raw.dtype)
        if self.name == "source_names":
            return np.full(shape, "", dtype=object)
        return np.full(shape, FILL_INDEX, dtype=np.int64)

    def take(self, index: np.ndarray) -> np.ndarray:
        """Rows ``index`` (int array) in that order, reading each needed chunk once."""
        cr = self.checker.layout.chunk_rows
        chunk_of = index // cr
        out = None
        for c in np.unique(chunk_of):
            block = self.chunk(int(c))
            mask = chunk_of == c
            if out is None:
                out = np.empty((len(index), *block.shape[1:]), dtype=block.dtype)
            out[mask] = block[index[mask] - c * cr]
        if out is None:
            out = np.empty((0, *self.raw.shape[1:]), dtype=self.dtype)
        return out


@dataclass
class Encodings(BackendOwner):
    """An opened store, the same for Zarr and HDF5. Row arrays are lazy; dims are in memory.

    ``source_index`` (int64 per row: the image's position in the source's own order, its
    ``all`` split) is None for schema-1 stores; ``source_names`` (file paths relative to an
    image folder) only exists for image folders. ``quantizers`` maps ``features`` (and
    ``features_std``) to their :class:`~vdvae_latents.stores.codes.Quantizer` in integer stores.
    Keeps an HDF5 file open until :meth:`close` (or the end of a ``with`` block).
    """

    path: Path
    format: StoreFormat
    attrs: dict[str, Any]
    features: LazyArray
    features_std: LazyArray | None
    labels: LazyArray | None
    sample_index: LazyArray
    source_index: LazyArray | None
    source_names: LazyArray | None
    dims: dict[str, np.ndarray]
    quantizers: dict[str, Quantizer] = field(default_factory=dict)
    _backend: Backend | None = field(default=None, repr=False, compare=False)
    _layout: StoreLayout | None = field(default=None, repr=False, compare=False)

    @property
    def n_rows(self) -> int:
        return int(self.attrs["n_rows"])

    @property
    def n_features(self) -> int:
        return int(self.attrs["n_features"])

    @property
    def chunk_rows(self) -> int:
        return int(self.attrs["chunk_rows"])

    @property
    def n_chunks(self) -> int:
        return math.ceil(self.n_rows / self.chunk_rows)

    def chunk_range(self, i: int) -> tuple[int, int]:
        """Rows ``[start, stop)`` of chunk ``i``: reading whole chunks is the cheap access."""
        return chunk_bounds(i, self.chunk_rows, self.n_rows)

    @property
    def complete(self) -> bool:
        return bool(self.attrs["complete"])

    @property
    def dtype(self) -> str:
        """The stored dtype (``int8`` for a quantised store; ``features.dtype`` is then float32)."""
        return str(self.attrs.get("dtype") or np.dtype(self.features.raw.dtype))

    def dims_table(self) -> list[dict[str, Any]]:
        """One dict per feature column: its index and the latent dimension it came from."""
        return [{"feature": j, **{name: self.dims[name][j].item() for name in DIM_FIELDS}}
                for j in range(self.n_features)]

    def error_summary(self) -> dict[str, dict[str, float]]:
        """What storing the values lost (rounding, quantisation), per value array."""
        if self._backend is None or self._layout is None:
            raise ValueError(f"the store {self.path} has been closed")
        return error_summary(self._backend, self._layout)

    def to_numpy(self) -> dict[str, np.ndarray]:
        """Everything in memory, keyed by the store's array names (``dims/layer`` ...)."""
        out: dict[str, np.ndarray] = {}
        for name in ("features", "features_std", "labels", "sample_index", "source_index", "source_names"):
            arr = getattr(self, name)
            if arr is not None:
                out[name] = np.asarray(arr)
        for name, values in self.dims.items():
            out[f"dims/{name}"] = values.copy()
        return out


def open_encodings(path: str | os.PathLike[str], *, allow_incomplete: bool = False,
                   verify: bool = True) -> Encodings:
    """Open a store for reading; StoreError if it is missing, foreign, newer, corrupt or incomplete.

    A chunk whose object is missing is refused here; a chunk that cannot be decoded, fails
    its checksum or holds NaN/inf is refused when it is read, naming its rows. With
    ``allow_incomplete=True`` a store still being written (or killed) opens too; its
    unwritten rows read as NaN features, -1 indices and empty names. ``verify=False``
    skips the per-chunk checks (not recommended; for inspecting a damaged store).
    """
    path = Path(path)
    backend, layout = open_layout(path, writable=False)
    with close_on_error(backend):
        checker = ChunkChecker(backend, layout, path)
        if not layout.complete and not allow_incomplete:
            written = int(np.count_nonzero(checker.flags == 1))
            raise StoreError(f"{path} is incomplete ({written} of {layout.n_chunks} chunks written); "
                             f"re-run `vdvl encode --resume`.")
        if verify:
            _refuse_missing_chunks(checker)
        try:
            dims = {name: np.asarray(backend.array(f"dims/{name}")[...]) for name in DIM_FIELDS}
        except Exception as exc:
            raise corrupt_store(path, f"its dims cannot be read ({exc})") from exc
        quantizers = read_quantizers(backend, layout, path)

        def lazy(name: str) -> LazyArray | None:
            if not layout.has(name):
                return None
            return LazyArray(backend.array(name), name=name, path=path, checker=checker, verify=verify,
                             quantizer=quantizers.get(name), allow_unwritten=allow_incomplete,
                             is_open=backend.is_open)

        features, sample_index = lazy("features"), lazy("sample_index")
        assert features is not None and sample_index is not None  # read_layout checked them
        return Encodings(path=path, format=backend.format, attrs=layout.attrs, features=features,
                         features_std=lazy("features_std"), labels=lazy("labels"), sample_index=sample_index,
                         source_index=lazy("source_index"), source_names=lazy("source_names"), dims=dims,
                         quantizers=quantizers, _backend=backend, _layout=layout)


def _refuse_missing_chunks(checker: ChunkChecker) -> None:
    """StoreError naming the first written chunk whose data object is gone, if there is one."""
    for name in checker.layout.row_arrays:
        gone = checker.missing(name)
        if gone:
            more = f" (and {len(gone) - 1} more chunks)" if len(gone) > 1 else ""
            raise checker.error(name, gone[0], f"are missing{more}: their chunk object was deleted")
