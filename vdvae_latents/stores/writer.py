"""Compact-encoding stores: the few active latent dimensions of every image, on disk.

A store is either a Zarr v3 group (a path ending ``.zarr``) or an HDF5 file (``.h5`` /
``.hdf5``) with the same layout (schema version 2):

===========================  ==============  ============================================
name                         shape           contents
===========================  ==============  ============================================
``features``                 (N, K)          float16, float32, or int8/uint8 codes;
                                             chunked ``chunk_rows`` rows x all K columns
``features_std``             (N, K)          same dtype/chunks; only when ``with_std``
``labels``                   (N,)            int64; only when the source has labels
``sample_index``             (N,)            int64: row -> position of the image in its split
``source_index``             (N,)            int64: row -> position of the image in the
                                             source's own order (its ``all`` split)
``source_names``             (N,)            UTF-8 path of the image file relative to the
                                             image folder; only for image folders
``dims/layer`` ...           (K,)            ``layer``, ``variate``, ``y``, ``x`` (int32; y, x
                                             are -1 for variate granularity), ``avg_kl``
``quantization/A/scale``,    (K,)            float64, integer stores only, for A in features
``.../offset``, ``.../spread``               (and features_std): value = offset + scale * code
``chunks_written``           (n_chunks,)     uint8: 1 once chunk i is fully written
``chunk_checksums``          (n_chunks, R)   uint32 CRC-32 of each row array's values in
                                             chunk i (R arrays, named by ``checksum_arrays``)
``chunk_errors``             (n_chunks,      float64: what storing chunk i lost per value
                             V, 4)           array (:data:`~vdvae_latents.stores.codes.ERROR_FIELDS`)
===========================  ==============  ============================================

Root attributes: everything the caller passes in ``attrs`` plus ``schema``
(``"vdvl-encodings"``), ``schema_version``, ``n_rows``, ``n_features``, ``chunk_rows``,
``codec``, ``checksum`` (``"crc32"``), ``checksum_arrays``, ``quantization`` (the scheme,
or None) and ``complete`` (False until :meth:`StoreWriter.finalize`). Zarr arrays carry
``dimension_names``, so ``xarray.open_zarr(path)`` and
``dask.array.from_zarr(path, component="features")`` read them (integer codes, raw).

Integrity: a chunk's values, then its checksums and error record, then its
``chunks_written`` flag are written in that order, so a writer killed at any moment
(``kill -9`` included) leaves only whole flagged chunks. Readers
(:func:`open_encodings`, and through it ``vdvl decode``/``probe``) refuse in one
sentence naming the rows: a missing chunk object (at open), and, on reading, a chunk that
cannot be decoded, fails its checksum or holds NaN/inf. :mod:`~vdvae_latents.stores.verify` checks everything at
once. :meth:`StoreWriter.open` + :meth:`StoreWriter.missing_chunks` (which with
``check_data=True`` includes damaged chunks) + :meth:`StoreWriter.finalize` repair a store.
HDF5 is not crash-safe: the writer flushes (and fsyncs) after every chunk, but a file
killed in the middle of a write can be left unreadable; :meth:`StoreWriter.open` then raises
a :class:`StoreError` saying to start again with ``--overwrite``. One HDF5 file has one
writer at a time; several DDP ranks write one Zarr store (each its own chunks).

Schema version 1 stores (no provenance, checksums or quantisation) are still read; their
``source_index`` is None and their chunks are not checksummed. They cannot be resumed.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from .backends import (
    Backend,
    BackendOwner,
    HDF5Backend,
    StoreError,
    StoreFormat,
    ZarrBackend,
    close_on_error,
    default_codec,
    normalise_attrs,
    os_error_text,
    store_format,
)
from .codes import Quantizer, count_clipped, error_stats
from .create import create_store
from .reader import Encodings, LazyArray, open_encodings
from .schema import (
    DIM_FIELDS,
    FEATURE_DTYPES,
    OWN_ATTRS,
    SCHEMA_NAME,
    SCHEMA_VERSION,
    ChunkChecker,
    StoreLayout,
    as_numpy,
    chunk_checksum,
    disk_bytes,
    error_summary,
    is_count,
    open_layout,
    read_quantizers,
    short_text,
)

__all__ = ["StoreWriter", "StoreError", "Encodings", "LazyArray", "open_encodings", "store_format",
           "SCHEMA_NAME", "SCHEMA_VERSION", "DIM_FIELDS", "FEATURE_DTYPES", "default_codec", "ZarrBackend",
           "HDF5Backend", "ChunkChecker", "chunk_checksum", "disk_bytes", "OWN_ATTRS"]


# ----------------------------------------------------------------------------- writer


class StoreWriter(BackendOwner):
    """Writes a store chunk by chunk; see the module docstring for the layout and guarantees.

    Create a new store with :meth:`create`, or re-open one (to resume, or from another DDP
    rank of a Zarr store) with :meth:`open`. Write each chunk ``i`` of rows
    ``chunk_range(i)`` once with :meth:`write_chunk` (any order, any process for Zarr),
    then call :meth:`finalize` once, from one process, after every chunk is written.
    """

    def __init__(self, path: Path, backend: Backend, layout: StoreLayout, quantizers: dict[str, Quantizer]) -> None:
        self.path = path
        self.format: StoreFormat = backend.format
        self.layout = layout
        self.n_rows = layout.n_rows
        self.n_features = layout.n_features
        self.chunk_rows = layout.chunk_rows
        self.n_chunks = layout.n_chunks
        self.dtype = layout.dtype
        self.with_std = layout.has("features_std")
        self.has_labels = layout.has("labels")
        self.has_source_names = layout.has("source_names")
        self.quantizers = quantizers
        self._complete = layout.complete
        self._backend: Backend | None = backend

    # -- construction

    @classmethod
    def create(cls, path: str | os.PathLike[str], *, n_rows: int, dims: dict[str, np.ndarray],
               attrs: dict[str, Any], dtype: str = "float16", with_std: bool = False, has_labels: bool = False,
               has_source_names: bool = False, quantizers: dict[str, Quantizer] | None = None,
               quantization: dict[str, Any] | None = None, codec: str | None = None, chunk_rows: int = 1024,
               overwrite: bool = False) -> StoreWriter:
        """Create an empty store (``complete = False``) with its dims and attributes written.

        Integer dtypes need ``quantizers`` (one :class:`~vdvae_latents.stores.codes.Quantizer` for
        ``features`` and, with ``with_std``, one for ``features_std``); ``quantization``
        describes how they were chosen (stored as the ``quantization`` attribute).
        """
        path = Path(path)
        backend, layout, quantizers = create_store(
            path, n_rows=n_rows, dims=dims, attrs=attrs, dtype=dtype, with_std=with_std, has_labels=has_labels,
            has_source_names=has_source_names, quantizers=quantizers, quantization=quantization, codec=codec,
            chunk_rows=chunk_rows, overwrite=overwrite)
        return cls(path, backend, layout, quantizers)

    @classmethod
    def open(cls, path: str | os.PathLike[str], *, expect_attrs: dict[str, Any] | None = None) -> StoreWriter:
        """Re-open an existing store for writing (to resume, or from another rank).

        With ``expect_attrs``, each of its keys must equal the stored attribute, so that a
        resume never mixes rows from, say, two different checkpoints in one store.
        """
        path = Path(path)
        backend, layout = open_layout(path, writable=True)
        with close_on_error(backend):
            if layout.version < SCHEMA_VERSION:
                raise StoreError(f"{path} was written with schema version {layout.version}, which cannot be "
                                 f"resumed; re-create it with --overwrite.")
            _check_expected_attrs(path, layout, expect_attrs)
            quantizers = read_quantizers(backend, layout, path)
        return cls(path, backend, layout, quantizers)

    # -- properties and bookkeeping

    @property
    def closed(self) -> bool:
        return self._backend is None

    def _live(self) -> Backend:
        if self._backend is None:
            raise ValueError(f"the store writer for {self.path} is closed")
        return self._backend

    def chunk_range(self, i: int) -> tuple[int, int]:
        """Rows ``[start, stop)`` of chunk ``i``; the last chunk may be shorter."""
        if not is_count(i) or i >= self.n_chunks:
            raise ValueError(f"chunk index {i!r} is out of range for {self.n_chunks} chunks")
        return self.layout.chunk_range(int(i))

    def missing_chunks(self, *, check_data: bool = False) -> list[int]:
        """Chunks to (re)write, in increasing order: not flagged as written, or flagged but with
        a data object gone; with ``check_data``, also those that fail to decode, fail their
        checksum or hold NaN (every chunk is read: costs one pass over the store)."""
        return ChunkChecker(self._live(), self.layout, self.path).to_rewrite(check_data=check_data)

    # -- writing

    def write_chunk(self, i: int, features: Any, *, features_std: Any = None, labels: Any = None,
                    sample_index: Any, source_index: Any, source_names: Any = None) -> None:
        """Write all rows of chunk ``i``, then its checksums and error record, then mark it written.

        Arrays must have exactly the chunk's rows (``chunk_range(i)``). Features are cast to the
        store dtype (float stores) or quantised with the store's quantisers (integer stores).
        ``features_std``, ``labels`` and ``source_names`` are required exactly when the store has them.
        """
        backend = self._live()
        start, stop = self.chunk_range(i)
        given = {"features": features, "features_std": features_std, "labels": labels,
                 "sample_index": sample_index, "source_index": source_index, "source_names": source_names}
        data, errors = _chunk_data(self.path, self.layout, self.quantizers, stop - start, given)
        checksums = np.array([[chunk_checksum(data[name]) for name in self.layout.row_arrays]], dtype=np.uint32)
        try:
            if self._complete:
                # Rewriting a finished store: it must not claim to be complete while a
                # chunk is half rewritten. finalize() sets it back.
                backend.set_attr("complete", False)
                self._complete = False
            _write_in_order(backend, i, start, stop, data, checksums, errors)
        except OSError as exc:
            raise _write_error(self.path, exc) from exc

    def error_summary(self) -> dict[str, dict[str, float]]:
        """What storing the written chunks lost, per value array (see :func:`~vdvae_latents.stores.codes.summarise_errors`)."""
        return error_summary(self._live(), self.layout)

    def finalize(self) -> None:
        """Mark the store complete and close it; every chunk must have been written."""
        backend = self._live()
        missing = self.missing_chunks()
        if missing:
            raise StoreError(f"cannot finalize {self.path}: {len(missing)} of {self.n_chunks} chunks are not "
                             f"written yet (first missing: {missing[0]}).")
        try:
            backend.set_attr("complete", True)
            backend.sync()
        except OSError as exc:
            raise _write_error(self.path, exc) from exc
        self._complete = True
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        return (f"StoreWriter({str(self.path)!r}, {self.format}, rows={self.n_rows}, features={self.n_features}, "
                f"chunks={self.n_chunks}x{self.chunk_rows}, {self.dtype}, {state})")


def _write_error(path: Path, exc: OSError) -> StoreError:
    return StoreError(f"cannot write to {path} ({os_error_text(exc)}).")


# ----------------------------------------------------------------------------- resuming


def _check_expected_attrs(path: Path, layout: StoreLayout, expect_attrs: dict[str, Any] | None) -> None:
    """Refuse a store whose attributes differ from ``expect_attrs`` (say, another checkpoint's)."""
    for key, expected in normalise_attrs(dict(expect_attrs or {})).items():
        if key not in layout.attrs:
            raise StoreError(f"{path} has no attribute {key} (expected {short_text(expected)}); "
                             f"use --overwrite to replace it or choose another output path.")
        if layout.attrs[key] != expected:
            raise StoreError(f"{path} was written with {key}={short_text(layout.attrs[key])}, not "
                             f"{short_text(expected)}; use --overwrite to replace it or choose another "
                             f"output path.")


# ----------------------------------------------------------------------------- one chunk


def _chunk_data(path: Path, layout: StoreLayout, quantizers: dict[str, Quantizer], rows: int,
                given: dict[str, Any]) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """({row array: the chunk's values as stored}, the chunk's error record (value arrays x
    ERROR_FIELDS)) from what the caller gave :meth:`StoreWriter.write_chunk`; ValueError if it does not fit."""
    for name in ("features_std", "labels", "source_names"):
        if layout.has(name) and given[name] is None:
            raise ValueError(f"{path} stores {name}: pass {name} to write_chunk")
        if not layout.has(name) and given[name] is not None:
            raise ValueError(f"{path} was created without {name}")
    data: dict[str, np.ndarray] = {}
    errors = []
    for name in layout.value_arrays:
        values = _value_rows(as_numpy(given[name]), name, (rows, layout.n_features))
        data[name], err = _store_values(values, layout.dtype, quantizers.get(name))
        errors.append(err)
    for name in ("labels", "sample_index", "source_index"):
        if layout.has(name):
            data[name] = _index_rows(as_numpy(given[name]), name, rows)
    if layout.has("source_names"):
        data["source_names"] = _name_rows(given["source_names"], rows)
    return data, np.stack(errors)


def _store_values(values: np.ndarray, dtype: str, q: Quantizer | None) -> tuple[np.ndarray, np.ndarray]:
    """(what is written, its error record) for the float values of a value array."""
    if q is None:
        stored = values.astype(dtype)
        spread = values.std(axis=0) if len(values) > 1 else np.ones(values.shape[1])
        return stored, error_stats(values, stored, np.where(spread > 0, spread, 1.0))
    codes = q.quantize(values)
    return codes, error_stats(values, q.dequantize(codes), q.spread, count_clipped(q, values, codes))


def _value_rows(values: np.ndarray, name: str, shape: tuple[int, int]) -> np.ndarray:
    if values.shape != shape:
        raise ValueError(f"{name} has shape {values.shape}, expected {shape} for this chunk")
    if not (np.issubdtype(values.dtype, np.floating) or np.issubdtype(values.dtype, np.integer)):
        raise ValueError(f"{name} has dtype {values.dtype}, expected a numeric array")
    return values


def _index_rows(values: np.ndarray, name: str, rows: int) -> np.ndarray:
    if values.shape != (rows,):
        raise ValueError(f"{name} has shape {values.shape}, expected ({rows},) for this chunk")
    if not (np.issubdtype(values.dtype, np.integer) or values.dtype == np.bool_):
        raise ValueError(f"{name} has dtype {values.dtype}, expected integers")
    return values.astype(np.int64)


def _name_rows(source_names: Any, rows: int) -> np.ndarray:
    names = [str(v) for v in np.asarray(source_names, dtype=object).ravel()]
    if len(names) != rows:
        raise ValueError(f"source_names has {len(names)} entries, expected {rows} for this chunk")
    return np.asarray(names, dtype=object)


def _write_in_order(backend: Backend, i: int, start: int, stop: int, data: dict[str, np.ndarray],
                    checksums: np.ndarray, errors: np.ndarray) -> None:
    """Chunk ``i``'s values, then its checksums and error record, then its ``chunks_written`` flag:
    a writer killed at any moment leaves only whole flagged chunks."""
    for name, values in data.items():
        backend.write_rows(name, start, stop, values)
    backend.write_rows("chunk_checksums", i, i + 1, checksums)
    backend.write_rows("chunk_errors", i, i + 1, errors[None])
    backend.sync()  # HDF5: the data must be on disk before the flag that vouches for it
    backend.write_rows("chunks_written", i, i + 1, np.ones(1, dtype=np.uint8))
    backend.sync()
