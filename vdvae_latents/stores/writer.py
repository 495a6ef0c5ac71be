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

import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from .backends import (
    JSON_KEYS_ATTR,
    ArraySpec,
    Backend,
    HDF5Backend,
    StoreError,
    StoreFormat,
    ZarrBackend,
    create_backend,
    default_codec,
    normalise_attrs,
    open_backend,
    parse_codec,
    store_format,
)
from .codes import ERROR_FIELDS, INT_DTYPES, Quantizer, count_clipped, error_stats
from .reader import Encodings, LazyArray, open_encodings
from .schema import (
    FILL_FEATURES,
    FILL_INDEX,
    DIM_FIELDS,
    FEATURE_DTYPES,
    OWN_ATTRS,
    SCHEMA_NAME,
    SCHEMA_VERSION,
    VALUE_ARRAYS,
    ChunkChecker,
    as_numpy,
    error_summary,
    StoreLayout,
    read_layout,
    read_quantizers,
    remove_existing,
    short_text,
    chunk_checksum,
    disk_bytes,
)

__all__ = ["StoreWriter", "StoreError", "Encodings", "LazyArray", "open_encodings", "store_format",
           "SCHEMA_NAME", "SCHEMA_VERSION", "DIM_FIELDS", "FEATURE_DTYPES", "default_codec", "ZarrBackend",
           "HDF5Backend", "ChunkChecker", "chunk_checksum", "disk_bytes", "OWN_ATTRS"]


# ----------------------------------------------------------------------------- writer


class StoreWriter:
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
        fmt = store_format(path)
        if dtype not in FEATURE_DTYPES:
            raise StoreError(f"cannot create {path} with dtype {dtype!r}: use {', '.join(FEATURE_DTYPES)}.")
        if isinstance(n_rows, bool) or not isinstance(n_rows, int | np.integer) or n_rows < 1:
            raise StoreError(f"cannot create {path} with {n_rows!r} rows: the data split has no images.")
        if isinstance(chunk_rows, bool) or not isinstance(chunk_rows, int | np.integer) or chunk_rows < 1:
            raise StoreError(f"cannot create {path} with chunk_rows={chunk_rows!r}: use a positive integer.")
        n_rows, chunk_rows = int(n_rows), int(chunk_rows)
        codec_name, codec_settings = parse_codec(fmt, codec, dtype)
        dims_arrays = cls._check_dims(path, dims)
        n_features = len(dims_arrays["layer"])
        value_arrays = ["features"] + (["features_std"] if with_std else [])
        quantizers = dict(quantizers or {})
        if dtype in INT_DTYPES:
            for name in value_arrays:
                q = quantizers.get(name)
                if q is None or q.dtype != dtype or q.scale.shape != (n_features,):
                    raise ValueError(f"an {dtype} store needs a {dtype} Quantizer of {n_features} columns for {name}")
        elif quantizers:
            raise ValueError(f"quantizers are for integer dtypes, not {dtype}")
        row_arrays = value_arrays + (["labels"] if has_labels else []) + ["sample_index", "source_index"] \
            + (["source_names"] if has_source_names else [])

        user_attrs = normalise_attrs(dict(attrs))
        own = {"schema": SCHEMA_NAME, "schema_version": SCHEMA_VERSION, "n_rows": n_rows,
               "n_features": n_features, "chunk_rows": chunk_rows, "codec": codec_name, "checksum": "crc32",
               "checksum_arrays": row_arrays, "quantization": normalise_attrs(
                   {"dtype": dtype, **(quantization or {})}) if dtype in INT_DTYPES else None,
               "complete": False}
        assert tuple(own) == OWN_ATTRS
        for key, value in own.items():
            if key in user_attrs and user_attrs[key] != value:
                raise ValueError(f"attrs[{key!r}] = {user_attrs[key]!r} contradicts the store's own value {value!r}")
        if JSON_KEYS_ATTR in user_attrs:
            raise ValueError(f"attrs may not use the reserved name {JSON_KEYS_ATTR!r}")
        all_attrs = {**user_attrs, **own}

        if path.exists() or path.is_symlink():
            if not overwrite:
                raise StoreError(f"{path} exists; use --overwrite or --resume.")
            try:
                remove_existing(path)
            except OSError as exc:
                raise StoreError(f"cannot remove the existing {path} ({exc.strerror or exc}).") from exc
        parent = path.parent
        if not parent.is_dir():
            raise StoreError(f"cannot create {path}: the directory {parent} does not exist.")
        if not os.access(parent, os.W_OK):
            raise StoreError(f"cannot create {path}: the directory {parent} is not writable.")

        specs = cls._specs(n_rows, n_features, chunk_rows, dtype, row_arrays, dims_arrays, quantizers)
        try:
            backend = create_backend(path, specs, all_attrs, codec_settings)
        except Exception as exc:
            # A half-created store would only confuse a later --resume; remove what we made.
            try:
                if path.exists():
                    remove_existing(path)
            except (OSError, StoreError):
                pass
            if isinstance(exc, OSError):
                raise StoreError(f"cannot create {path} ({exc.strerror or exc}).") from exc
            raise
        layout = StoreLayout(attrs=all_attrs, version=SCHEMA_VERSION, n_rows=n_rows, n_features=n_features,
                         chunk_rows=chunk_rows, dtype=dtype, row_arrays=tuple(row_arrays), complete=False)
        return cls(path, backend, layout, quantizers)

    @staticmethod
    def _specs(n_rows: int, n_features: int, chunk_rows: int, dtype: str, row_arrays: list[str],
               dims: dict[str, np.ndarray], quantizers: dict[str, Quantizer]) -> list[ArraySpec]:
        n_chunks = math.ceil(n_rows / chunk_rows)
        specs = []
        for name in row_arrays:
            if name in VALUE_ARRAYS:
                fill = 0 if dtype in INT_DTYPES else FILL_FEATURES
                specs.append(ArraySpec(name, (n_rows, n_features), dtype, chunk_rows, fill, ("row", "feature"), True))
            elif name == "source_names":
                specs.append(ArraySpec(name, (n_rows,), "str", chunk_rows, "", ("row",)))
            else:
                specs.append(ArraySpec(name, (n_rows,), "int64", chunk_rows, FILL_INDEX, ("row",), True))
        specs += [ArraySpec(f"dims/{name}", values.shape, str(values.dtype), dims=("feature",), data=values)
                  for name, values in dims.items()]
        for name, q in quantizers.items():
            specs += [ArraySpec(f"quantization/{name}/{part}", (n_features,), "float64", dims=("feature",),
                                data=values) for part, values in q.arrays().items()]
        # One object per chunk (chunk_rows=1): concurrent writers owning different chunks never
        # rewrite each other's records. Fill 0 means "not written"; uncompressed, they are tiny.
        n_values = sum(a in row_arrays for a in VALUE_ARRAYS)
        specs += [ArraySpec("chunks_written", (n_chunks,), "uint8", 1, 0, ("chunk",)),
                  ArraySpec("chunk_checksums", (n_chunks, len(row_arrays)), "uint32", 1, 0,
                            ("chunk", "checksummed_array")),
                  ArraySpec("chunk_errors", (n_chunks, n_values, len(ERROR_FIELDS)), "float64", 1, 0,
                            ("chunk", "value_array", "error_field"))]
        return specs

    @staticmethod
    def _check_dims(path: Path, dims: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The five dims/ arrays as 1-D arrays of one length K >= 1, in their store dtypes."""
        missing = [name for name in DIM_FIELDS if name not in dims]
        extra = [name for name in dims if name not in DIM_FIELDS]
        if missing or extra:
            raise ValueError(f"dims must have exactly the keys {list(DIM_FIELDS)}; "
                             f"missing {missing}, unexpected {extra}")
        out = {name: as_numpy(dims[name]) for name in DIM_FIELDS}
        n_features = out["layer"].shape[0] if out["layer"].ndim == 1 else -1
        for name, values in out.items():
            if values.ndim != 1 or values.shape[0] != n_features:
                raise ValueError(f"dims[{name!r}] has shape {values.shape}; every dims array must be 1-D "
                                 f"with the length of dims['layer']")
            out[name] = values.astype(DIM_FIELDS[name], casting="same_kind" if name == "avg_kl" else "unsafe")
        if n_features == 0:
            raise StoreError(f"cannot create {path} with no feature dimensions: the selection kept none.")
        return out

    @classmethod
    def open(cls, path: str | os.PathLike[str], *, expect_attrs: dict[str, Any] | None = None) -> StoreWriter:
        """Re-open an existing store for writing (to resume, or from another rank).

        With ``expect_attrs``, each of its keys must equal the stored attribute, so that a
        resume never mixes rows from, say, two different checkpoints in one store.
        """
        path = Path(path)
        backend = open_backend(path, writable=True)
        try:
            layout = read_layout(backend, path)
            if layout.version < SCHEMA_VERSION:
                raise StoreError(f"{path} was written with schema version {layout.version}, which cannot be "
                                 f"resumed; re-create it with --overwrite.")
            for key, expected in normalise_attrs(dict(expect_attrs or {})).items():
                if key not in layout.attrs:
                    raise StoreError(f"{path} has no attribute {key} (expected {short_text(expected)}); "
                                     f"use --overwrite to replace it or choose another output path.")
                if layout.attrs[key] != expected:
                    raise StoreError(f"{path} was written with {key}={short_text(layout.attrs[key])}, not "
                                     f"{short_text(expected)}; use --overwrite to replace it or choose another "
                                     f"output path.")
            quantizers = read_quantizers(backend, layout, path)
        except BaseException:
            backend.close()
            raise
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
        if isinstance(i, bool) or not isinstance(i, int | np.integer) or not 0 <= i < self.n_chunks:
            raise ValueError(f"chunk index {i!r} is out of range for {self.n_chunks} chunks")
        return self.layout.chunk_range(int(i))

    def missing_chunks(self, *, check_data: bool = False) -> list[int]:
        """Chunks to (re)write, in increasing order: not flagged as written, or flagged but with
        a data object gone; with ``check_data``, also those that fail to decode, fail their
        checksum or hold NaN (every chunk is read: costs one pass over the store)."""
        checker = ChunkChecker(self._live(), self.layout, self.path)
        bad = set(np.flatnonzero(checker.flags == 0).tolist())
        for name in self.layout.row_arrays:
            bad.update(checker.missing(name))
        if check_data:
            for i in range(self.n_chunks):
                if i not in bad and any(checker.read(name, i)[1] for name in self.layout.row_arrays):
                    bad.add(i)
        return sorted(int(i) for i in bad)

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
        rows = stop - start
        given = {"features": features, "features_std": features_std, "labels": labels,
                 "sample_index": sample_index, "source_index": source_index, "source_names": source_names}
        for name in ("features_std", "labels", "source_names"):
            if self.layout.has(name) and given[name] is None:
                raise ValueError(f"{self.path} stores {name}: pass {name} to write_chunk")
            if not self.layout.has(name) and given[name] is not None:
                raise ValueError(f"{self.path} was created without {name}")
        data: dict[str, np.ndarray] = {}
        errors = []
        for name in self.layout.value_arrays:
            values = self._rows(as_numpy(given[name]), name, (rows, self.n_features))
            stored, err = self._store_values(name, values)
            data[name] = stored
            errors.append(err)
        for name in ("labels", "sample_index", "source_index"):
            if self.layout.has(name):
                data[name] = self._indices(as_numpy(given[name]), name, rows)
        if self.has_source_names:
            names = [str(v) for v in np.asarray(source_names, dtype=object).ravel()]
            if len(names) != rows:
                raise ValueError(f"source_names has {len(names)} entries, expected {rows} for this chunk")
            data["source_names"] = np.asarray(names, dtype=object)
        checksums = np.array([[chunk_checksum(data[name]) for name in self.layout.row_arrays]], dtype=np.uint32)

        try:
            if self._complete:
                # Rewriting a finished store: it must not claim to be complete while a
                # chunk is half rewritten. finalize() sets it back.
                backend.set_attr("complete", False)
                self._complete = False
            for name, values in data.items():
                backend.write_rows(name, start, stop, values)
            backend.write_rows("chunk_checksums", i, i + 1, checksums)
            backend.write_rows("chunk_errors", i, i + 1, np.stack(errors)[None])
            backend.sync()  # HDF5: the data must be on disk before the flag that vouches for it
            backend.write_rows("chunks_written", i, i + 1, np.ones(1, dtype=np.uint8))
            backend.sync()
        except OSError as exc:
            raise StoreError(f"cannot write to {self.path} ({exc.strerror or exc}).") from exc

    def _store_values(self, name: str, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(what is written, its error record) for float values of a value array."""
        q = self.quantizers.get(name)
        if q is None:
            stored = values.astype(self.dtype)
            spread = values.std(axis=0) if len(values) > 1 else np.ones(values.shape[1])
            return stored, error_stats(values, stored, np.where(spread > 0, spread, 1.0))
        codes = q.quantize(values)
        return codes, error_stats(values, q.dequantize(codes), q.spread, count_clipped(q, values, codes))

    @staticmethod
    def _rows(values: np.ndarray, name: str, shape: tuple[int, int]) -> np.ndarray:
        if values.shape != shape:
            raise ValueError(f"{name} has shape {values.shape}, expected {shape} for this chunk")
        if not (np.issubdtype(values.dtype, np.floating) or np.issubdtype(values.dtype, np.integer)):
            raise ValueError(f"{name} has dtype {values.dtype}, expected a numeric array")
        return values

    @staticmethod
    def _indices(values: np.ndarray, name: str, rows: int) -> np.ndarray:
        if values.shape != (rows,):
            raise ValueError(f"{name} has shape {values.shape}, expected ({rows},) for this chunk")
        if not (np.issubdtype(values.dtype, np.integer) or values.dtype == np.bool_):
            raise ValueError(f"{name} has dtype {values.dtype}, expected integers")
        return values.astype(np.int64)

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
            raise StoreError(f"cannot write to {self.path} ({exc.strerror or exc}).") from exc
        self._complete = True
        self.close()

    def close(self) -> None:
        """Release the store without finalizing it (safe to call twice)."""
        if self._backend is not None:
            self._backend.close()
            self._backend = None

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        return (f"StoreWriter({str(self.path)!r}, {self.format}, rows={self.n_rows}, features={self.n_features}, "
                f"chunks={self.n_chunks}x{self.chunk_rows}, {self.dtype}, {state})")


