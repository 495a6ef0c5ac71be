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
                             V, 4)           array (:data:`.quantize.ERROR_FIELDS`)
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
cannot be decoded, fails its checksum or holds NaN/inf. :mod:`.verify` checks everything at
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
import shutil
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .quantize import ERROR_FIELDS, INT_DTYPES, Quantizer, count_clipped, error_stats, summarise_errors
from .store_backends import (
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

SCHEMA_NAME = "vdvl-encodings"
SCHEMA_VERSION = 2

#: Names of the per-dimension arrays under ``dims/`` and their dtypes.
DIM_FIELDS: dict[str, np.dtype] = {
    "layer": np.dtype(np.int32),
    "variate": np.dtype(np.int32),
    "y": np.dtype(np.int32),
    "x": np.dtype(np.int32),
    "avg_kl": np.dtype(np.float64),
}
FLOAT_DTYPES = ("float16", "float32")
FEATURE_DTYPES = FLOAT_DTYPES + tuple(INT_DTYPES)
VALUE_ARRAYS = ("features", "features_std")
#: Attributes the store sets itself (the caller's ``attrs`` may not contradict them).
OWN_ATTRS = ("schema", "schema_version", "n_rows", "n_features", "chunk_rows", "codec", "checksum",
             "checksum_arrays", "quantization", "complete")
QUANT_FIELDS = ("scale", "offset", "spread")

# Values that mark rows nobody has written yet.
_FILL_FEATURES = float("nan")
_FILL_INDEX = -1
_FILL = {"float": _FILL_FEATURES, "int": _FILL_INDEX, "str": ""}

__all__ = ["StoreWriter", "StoreError", "Encodings", "LazyArray", "open_encodings", "store_format",
           "SCHEMA_NAME", "SCHEMA_VERSION", "DIM_FIELDS", "FEATURE_DTYPES", "default_codec", "ZarrBackend",
           "HDF5Backend", "ChunkChecker", "chunk_checksum", "disk_bytes", "OWN_ATTRS"]


def _short(value: Any, limit: int = 60) -> str:
    """A repr short enough to sit inside a one-sentence error message."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _as_numpy(value: Any) -> np.ndarray:
    """Accept numpy arrays, lists and (CPU or GPU) torch tensors without importing torch."""
    if hasattr(value, "detach") and hasattr(value, "cpu"):
        value = value.detach().cpu().numpy()
    return np.asarray(value)


def disk_bytes(path: str | os.PathLike[str]) -> int:
    """Bytes a store takes on disk (an HDF5 file, or every file of a Zarr directory)."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def chunk_checksum(values: np.ndarray) -> int:
    """CRC-32 of an array's values (numbers little-endian, strings as NUL-separated UTF-8)."""
    values = np.asarray(values)
    if values.dtype.kind in "OUT":
        data = "\x00".join(str(v) for v in values.ravel()).encode("utf-8")
    else:
        data = np.ascontiguousarray(values, dtype=values.dtype.newbyteorder("<")).tobytes()
    return zlib.crc32(data)


# ----------------------------------------------------------------------------- the layout


@dataclass(frozen=True)
class _Layout:
    """What a store says about itself, checked against the arrays it actually holds."""

    attrs: dict[str, Any]
    version: int
    n_rows: int
    n_features: int
    chunk_rows: int
    dtype: str
    row_arrays: tuple[str, ...]  # in checksum order
    complete: bool

    @property
    def n_chunks(self) -> int:
        return math.ceil(self.n_rows / self.chunk_rows)

    @property
    def quantized(self) -> bool:
        return self.dtype in INT_DTYPES

    @property
    def value_arrays(self) -> tuple[str, ...]:
        return tuple(a for a in VALUE_ARRAYS if a in self.row_arrays)

    def has(self, name: str) -> bool:
        return name in self.row_arrays

    def chunk_range(self, i: int) -> tuple[int, int]:
        start = int(i) * self.chunk_rows
        return start, min(start + self.chunk_rows, self.n_rows)


def _corrupt(path: Path, what: str) -> StoreError:
    return StoreError(f"{path} is corrupt: {what}; re-create it with --overwrite.")


def _read_layout(backend: Backend, path: Path) -> _Layout:
    """Check the schema and the shapes/dtypes of every array; StoreError on any mismatch."""
    try:
        attrs = backend.read_attrs()
    except Exception as exc:
        raise StoreError(f"{path} has unreadable attributes ({exc}).") from exc
    schema = attrs.get("schema")
    if schema != SCHEMA_NAME:
        raise StoreError(f"{path} is not a {SCHEMA_NAME} store (its schema attribute is {_short(schema)}).")
    version = attrs.get("schema_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise _corrupt(path, f"schema_version is {_short(version)}")
    if version > SCHEMA_VERSION:
        raise StoreError(f"{path} uses {SCHEMA_NAME} schema version {version}, newer than the version "
                         f"{SCHEMA_VERSION} this vdvae_latents reads; upgrade vdvae_latents to read it.")

    def whole(key: str, minimum: int) -> int:
        value = attrs.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
            raise _corrupt(path, f"attribute {key} is {_short(value)}")
        return value

    n_rows, n_features, chunk_rows = whole("n_rows", 1), whole("n_features", 1), whole("chunk_rows", 1)
    n_chunks = math.ceil(n_rows / chunk_rows)
    if not isinstance(attrs.get("complete"), bool):
        raise _corrupt(path, f"attribute complete is {_short(attrs.get('complete'))}")

    def check(name: str, shape: tuple[int, ...], dtypes: tuple[str, ...], required: bool = True) -> str | None:
        try:
            present = backend.has(name)
        except Exception as exc:  # e.g. a damaged zarr.json of a child node
            raise _corrupt(path, f"the array {name} cannot be opened ({exc})") from exc
        if not present:
            if required:
                raise _corrupt(path, f"the array {name} is missing")
            return None
        try:
            arr = backend.array(name)
            got_shape, got_dtype = tuple(arr.shape), np.dtype(arr.dtype)
        except Exception as exc:
            raise _corrupt(path, f"the array {name} cannot be opened ({exc})") from exc
        kind = "str" if got_dtype.kind in "OUT" else str(got_dtype)
        if got_shape != shape or kind not in dtypes:
            raise _corrupt(path, f"the array {name} is {kind}{list(got_shape)}, expected {'|'.join(dtypes)}"
                                 f"{list(shape)}")
        return kind

    dtype = check("features", (n_rows, n_features), FEATURE_DTYPES if version >= 2 else FLOAT_DTYPES)
    assert dtype is not None
    rows = (n_rows,)
    present = ["features"]
    if check("features_std", (n_rows, n_features), (dtype,), required=False):
        present.append("features_std")
    if check("labels", rows, ("int64",), required=False):
        present.append("labels")
    check("sample_index", rows, ("int64",))
    present.append("sample_index")
    for name, dim_dtype in DIM_FIELDS.items():
        check(f"dims/{name}", (n_features,), (str(dim_dtype),))
    check("chunks_written", (n_chunks,), ("uint8",))
    if version >= 2:
        check("source_index", rows, ("int64",))
        present.append("source_index")
        if check("source_names", rows, ("str",), required=False):
            present.append("source_names")
        if attrs.get("checksum_arrays") != present:
            raise _corrupt(path, f"its checksum_arrays attribute {_short(attrs.get('checksum_arrays'))} does not "
                                 f"list its row arrays {present}")
        check("chunk_checksums", (n_chunks, len(present)), ("uint32",))
        n_values = sum(a in present for a in VALUE_ARRAYS)
        check("chunk_errors", (n_chunks, n_values, len(ERROR_FIELDS)), ("float64",))
        if dtype in INT_DTYPES:
            for name in (a for a in VALUE_ARRAYS if a in present):
                for part in QUANT_FIELDS:
                    check(f"quantization/{name}/{part}", (n_features,), ("float64",))
    return _Layout(attrs=attrs, version=version, n_rows=n_rows, n_features=n_features, chunk_rows=chunk_rows,
                   dtype=dtype, row_arrays=tuple(present), complete=attrs["complete"])


def _read_per_chunk(backend: Backend, name: str, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
    """A per-chunk array; an object cut short by a kill reads as zeros (= not written)."""
    arr = backend.array(name)
    try:
        return np.asarray(arr[...], dtype=dtype)
    except Exception:
        out = np.zeros(shape, dtype=dtype)
        for i in range(shape[0]):
            try:
                out[i] = arr[i]
            except Exception:
                out[i] = 0
        return out


def _read_quantizers(backend: Backend, layout: _Layout, path: Path) -> dict[str, Quantizer]:
    if not layout.quantized:
        return {}
    out = {}
    for name in layout.value_arrays:
        try:
            parts = {p: np.asarray(backend.array(f"quantization/{name}/{p}")[...]) for p in QUANT_FIELDS}
            out[name] = Quantizer(dtype=layout.dtype, **parts)
        except Exception as exc:
            raise _corrupt(path, f"its quantization parameters of {name} cannot be used ({exc})") from exc
    return out


def _remove_existing(path: Path) -> None:
    """Delete an old store for --overwrite, refusing to delete a directory that is not one."""
    if path.is_dir() and not path.is_symlink():
        # A mistyped path must not wipe an unrelated directory: a Zarr store has zarr.json.
        if any(path.iterdir()) and not (path / "zarr.json").exists():
            raise StoreError(f"{path} is a directory that is not a Zarr store; refusing to delete it "
                             f"for --overwrite.")
        shutil.rmtree(path)
    else:
        path.unlink()


# ----------------------------------------------------------------------------- chunk checks


def _rows_text(layout: _Layout, i: int) -> str:
    lo, hi = layout.chunk_range(i)
    return f"rows {lo}-{hi - 1}" if hi - lo > 1 else f"row {lo}"


class ChunkChecker:
    """Reads whole chunks of a store's row arrays and says what is wrong with each.

    Shared by every reader and by :mod:`.verify`. ``flags``/``checksums`` are read once.
    """

    def __init__(self, backend: Backend, layout: _Layout, path: Path) -> None:
        self.backend, self.layout, self.path = backend, layout, path
        n = layout.n_chunks
        self.flags = _read_per_chunk(backend, "chunks_written", (n,), np.uint8)
        self.checksums = (_read_per_chunk(backend, "chunk_checksums", (n, len(layout.row_arrays)), np.uint32)
                          if layout.version >= 2 else None)

    def missing(self, name: str) -> list[int]:
        """Written chunks of ``name`` whose data object is gone."""
        return [i for i in np.flatnonzero(self.flags == 1).tolist() if not self.backend.chunk_present(name, i)]

    def read(self, name: str, i: int, *, finite: bool = True) -> tuple[np.ndarray | None, str | None]:
        """(raw values of chunk ``i`` of ``name``, None) or (None, what is wrong with it)."""
        lo, hi = self.layout.chunk_range(i)
        if self.flags[i] != 1:
            return None, "are not written yet (the store is incomplete)"
        if not self.backend.chunk_present(name, i):
            return None, "are missing (their chunk object was deleted)"
        try:
            values = np.asarray(self.backend.array(name)[lo:hi])
        except Exception as exc:
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            return None, f"cannot be decoded ({_short(reason, 80)})"
        if self.checksums is not None:
            col = self.layout.row_arrays.index(name)
            if chunk_checksum(values) != int(self.checksums[i, col]):
                return None, "fail their checksum (the data changed after it was written)"
        if finite and values.dtype.kind == "f" and not np.isfinite(values).all():
            return None, "hold NaN or infinite values"
        return values, None

    def error(self, name: str, i: int, problem: str) -> StoreError:
        return StoreError(f"{self.path} is damaged: {_rows_text(self.layout, i)} of {name} {problem}; "
                          f"`vdvl verify {self.path}` lists every damaged chunk and `vdvl encode ... --resume` "
                          f"rewrites them.")


# ----------------------------------------------------------------------------- writer


class StoreWriter:
    """Writes a store chunk by chunk; see the module docstring for the layout and guarantees.

    Create a new store with :meth:`create`, or re-open one (to resume, or from another DDP
    rank of a Zarr store) with :meth:`open`. Write each chunk ``i`` of rows
    ``chunk_range(i)`` once with :meth:`write_chunk` (any order, any process for Zarr),
    then call :meth:`finalize` once, from one process, after every chunk is written.
    """

    def __init__(self, path: Path, backend: Backend, layout: _Layout, quantizers: dict[str, Quantizer]) -> None:
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

        Integer dtypes need ``quantizers`` (one :class:`~.quantize.Quantizer` for
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
                _remove_existing(path)
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
                    _remove_existing(path)
            except (OSError, StoreError):
                pass
            if isinstance(exc, OSError):
                raise StoreError(f"cannot create {path} ({exc.strerror or exc}).") from exc
            raise
        layout = _Layout(attrs=all_attrs, version=SCHEMA_VERSION, n_rows=n_rows, n_features=n_features,
                         chunk_rows=chunk_rows, dtype=dtype, row_arrays=tuple(row_arrays), complete=False)
        return cls(path, backend, layout, quantizers)

    @staticmethod
    def _specs(n_rows: int, n_features: int, chunk_rows: int, dtype: str, row_arrays: list[str],
               dims: dict[str, np.ndarray], quantizers: dict[str, Quantizer]) -> list[ArraySpec]:
        n_chunks = math.ceil(n_rows / chunk_rows)
        specs = []
        for name in row_arrays:
            if name in VALUE_ARRAYS:
                fill = 0 if dtype in INT_DTYPES else _FILL_FEATURES
                specs.append(ArraySpec(name, (n_rows, n_features), dtype, chunk_rows, fill, ("row", "feature"), True))
            elif name == "source_names":
                specs.append(ArraySpec(name, (n_rows,), "str", chunk_rows, "", ("row",)))
            else:
                specs.append(ArraySpec(name, (n_rows,), "int64", chunk_rows, _FILL_INDEX, ("row",), True))
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
        out = {name: _as_numpy(dims[name]) for name in DIM_FIELDS}
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
            layout = _read_layout(backend, path)
            if layout.version < SCHEMA_VERSION:
                raise StoreError(f"{path} was written with schema version {layout.version}, which cannot be "
                                 f"resumed; re-create it with --overwrite.")
            for key, expected in normalise_attrs(dict(expect_attrs or {})).items():
                if key not in layout.attrs:
                    raise StoreError(f"{path} has no attribute {key} (expected {_short(expected)}); "
                                     f"use --overwrite to replace it or choose another output path.")
                if layout.attrs[key] != expected:
                    raise StoreError(f"{path} was written with {key}={_short(layout.attrs[key])}, not "
                                     f"{_short(expected)}; use --overwrite to replace it or choose another "
                                     f"output path.")
            quantizers = _read_quantizers(backend, layout, path)
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
            values = self._rows(_as_numpy(given[name]), name, (rows, self.n_features))
            stored, err = self._store_values(name, values)
            data[name] = stored
            errors.append(err)
        for name in ("labels", "sample_index", "source_index"):
            if self.layout.has(name):
                data[name] = self._indices(_as_numpy(given[name]), name, rows)
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
        """What storing the written chunks lost, per value array (see :func:`.quantize.summarise_errors`)."""
        return _error_summary(self._live(), self.layout)

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


def _error_summary(backend: Backend, layout: _Layout) -> dict[str, dict[str, float]]:
    if layout.version < 2:
        return {}
    n = layout.n_chunks
    flags = _read_per_chunk(backend, "chunks_written", (n,), np.uint8)
    errors = _read_per_chunk(backend, "chunk_errors", (n, len(layout.value_arrays), len(ERROR_FIELDS)), np.float64)
    written = flags == 1
    n_values = sum(layout.chunk_range(i)[1] - layout.chunk_range(i)[0] for i in np.flatnonzero(written))
    return {name: summarise_errors(errors[written, k], n_values * layout.n_features)
            for k, name in enumerate(layout.value_arrays)}


# ----------------------------------------------------------------------------- reader


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
        self._checker = checker
        self._verify = verify
        self._quantizer = quantizer
        self._allow_unwritten = allow_unwritten
        self._is_open = is_open
        self._cache: dict[int, np.ndarray] = {}

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
        if self._quantizer is not None:
            return np.dtype(np.float32)
        raw = np.dtype(self.raw.dtype)
        return np.dtype(object) if raw.kind in "OT" else raw

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __len__(self) -> int:
        return self.shape[0]

    # -- chunk access

    def _chunk(self, i: int) -> np.ndarray:
        if i in self._cache:
            return self._cache[i]
        checker = self._checker
        if not self._verify:  # inspecting a damaged store: read what is there
            lo, hi = checker.layout.chunk_range(i)
            values = np.asarray(self.raw[lo:hi])
        else:
            values, problem = checker.read(self.name, i)
            if problem is not None:
                if not (self._allow_unwritten and checker.flags[i] != 1):
                    raise checker.error(self.name, i, problem)
                values = self._unwritten(i)
        if self._quantizer is not None and values.dtype.kind in "iu":
            values = self._quantizer.dequantize(values)
        if values.dtype.kind == "T":
            values = values.astype(object)
        self._cache = {i: values}  # one chunk: row-by-row reading touches each chunk once
        return values

    def _unwritten(self, i: int) -> np.ndarray:
        """What rows nobody has written read as: NaN features, -1 indices, empty names."""
        lo, hi = self._checker.layout.chunk_range(i)
        shape = (hi - lo, *self.raw.shape[1:])
        if self.name in VALUE_ARRAYS:
            return np.full(shape, np.nan, dtype=np.float32 if self._quantizer else self.raw.dtype)
        if self.name == "source_names":
            return np.full(shape, "", dtype=object)
        return np.full(shape, _FILL_INDEX, dtype=np.int64)

    def _take(self, index: np.ndarray) -> np.ndarray:
        """Rows ``index`` (int array) in that order, reading each needed chunk once."""
        cr = self._checker.layout.chunk_rows
        chunk_of = index // cr
        out = None
        for c in np.unique(chunk_of):
            block = self._chunk(int(c))
            mask = chunk_of == c
            if out is None:
                out = np.empty((len(index), *block.shape[1:]), dtype=block.dtype)
            out[mask] = block[index[mask] - c * cr]
        if out is None:
            out = np.empty((0, *self.raw.shape[1:]), dtype=self.dtype)
        return out

    def __getitem__(self, key: Any) -> np.ndarray:
        self._check_open()
        rows, rest = (key[0], key[1:]) if isinstance(key, tuple) else (key, ())
        n = len(self)
        if rows is Ellipsis:
            rows = slice(None)
        if isinstance(rows, int | np.integer) and not isinstance(rows, bool):
            i = int(rows) + (n if rows < 0 else 0)
            if not 0 <= i < n:
                raise IndexError(f"row {rows} is out of range for {self.name} with {n} rows")
            out = self._take(np.array([i]))[0]
            return out[rest] if rest else out
        if isinstance(rows, slice):
            index = np.arange(*rows.indices(n))
        else:
            index = np.asarray(rows)
            if index.dtype == np.bool_:
                if index.shape != (n,):
                    raise IndexError(f"a boolean row mask for {self.name} must have {n} entries")
                index = np.flatnonzero(index)
            elif not np.issubdtype(index.dtype, np.integer) or index.ndim != 1:
                raise IndexError(f"rows of {self.name} are indexed by an int, a slice or a 1-D int/bool array")
            index = np.where(index < 0, index + n, index)
            if len(index) and (index.min() < 0 or index.max() >= n):
                raise IndexError(f"row indices out of range for {self.name} with {n} rows")
        out = self._take(index.astype(np.int64))
        return out[(slice(None), *rest)] if rest else out

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray:
        values = self[:]
        return values if dtype is None else values.astype(dtype, copy=False)

    def __repr__(self) -> str:
        return f"LazyArray({self.name!r}, shape={tuple(self.raw.shape)}, dtype={self.dtype})"


@dataclass
class Encodings:
    """An opened store, the same for Zarr and HDF5. Row arrays are lazy; dims are in memory.

    ``source_index`` (int64 per row: the image's position in the source's own order, its
    ``all`` split) is None for schema-1 stores; ``source_names`` (file paths relative to an
    image folder) only exists for image folders. ``quantizers`` maps ``features`` (and
    ``features_std``) to their :class:`~.quantize.Quantizer` in integer stores.
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
    _layout: _Layout | None = field(default=None, repr=False, compare=False)

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
        start = int(i) * self.chunk_rows
        return start, min(start + self.chunk_rows, self.n_rows)

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
        return _error_summary(self._backend, self._layout)

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

    def close(self) -> None:
        if self._backend is not None:
            self._backend.close()
            self._backend = None

    def __enter__(self) -> Encodings:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


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
    backend = open_backend(path, writable=False)
    try:
        layout = _read_layout(backend, path)
        checker = ChunkChecker(backend, layout, path)
        if not layout.complete and not allow_incomplete:
            written = int(np.count_nonzero(checker.flags == 1))
            raise StoreError(f"{path} is incomplete ({written} of {layout.n_chunks} chunks written); "
                             f"re-run `vdvl encode --resume`.")
        if verify:
            for name in layout.row_arrays:
                gone = checker.missing(name)
                if gone:
                    more = f" (and {len(gone) - 1} more chunks)" if len(gone) > 1 else ""
                    raise checker.error(name, gone[0], f"are missing{more}: their chunk object was deleted")
        try:
            dims = {name: np.asarray(backend.array(f"dims/{name}")[...]) for name in DIM_FIELDS}
        except Exception as exc:
            raise _corrupt(path, f"its dims cannot be read ({exc})") from exc
        quantizers = _read_quantizers(backend, layout, path)

        def lazy(name: str) -> LazyArray | None:
            if not layout.has(name):
                return None
            return LazyArray(backend.array(name), name=name, path=path, checker=checker, verify=verify,
                             quantizer=quantizers.get(name), allow_unwritten=allow_incomplete,
                             is_open=backend.is_open)

        features, sample_index = lazy("features"), lazy("sample_index")
        assert features is not None and sample_index is not None  # _read_layout checked them
        return Encodings(path=path, format=backend.format, attrs=layout.attrs, features=features,
                         features_std=lazy("features_std"), labels=lazy("labels"), sample_index=sample_index,
                         source_index=lazy("source_index"), source_names=lazy("source_names"), dims=dims,
                         quantizers=quantizers, _backend=backend, _layout=layout)
    except BaseException:
        backend.close()
        raise
