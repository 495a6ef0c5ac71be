"""The store schema (version 2): its names and dtypes, what a store says about itself checked
against the arrays it holds, and the per-chunk checks every reader makes.

:mod:`~vdvae_latents.stores.writer` documents the layout and writes stores (:mod:`~vdvae_latents.stores.create`
makes new ones); :mod:`~vdvae_latents.stores.reader` reads them; :mod:`~vdvae_latents.stores.verify` checks all
of a store at once. They all share what is here.
"""

from __future__ import annotations

import math
import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .backends import Backend, StoreError, close_on_error, first_line, open_backend
from .codes import ERROR_FIELDS, INT_DTYPES, Quantizer, summarise_errors

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
FILL_FEATURES = float("nan")
FILL_INDEX = -1

def short_text(value: Any, limit: int = 60) -> str:
    """A repr short enough to sit inside a one-sentence error message."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def as_numpy(value: Any) -> np.ndarray:
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
class StoreLayout:
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
        return chunk_bounds(i, self.chunk_rows, self.n_rows)


def chunk_bounds(i: int, chunk_rows: int, n_rows: int) -> tuple[int, int]:
    """Rows ``[start, stop)`` of chunk ``i`` of ``n_rows`` rows cut into chunks of ``chunk_rows``."""
    start = int(i) * chunk_rows
    return start, min(start + chunk_rows, n_rows)


def corrupt_store(path: Path, what: str) -> StoreError:
    return StoreError(f"{path} is corrupt: {what}; re-create it with --overwrite.")


def is_count(value: Any, minimum: int = 0) -> bool:
    """Whether ``value`` is an integer (Python or numpy, not a bool) of at least ``minimum``."""
    return isinstance(value, int | np.integer) and not isinstance(value, bool) and value >= minimum


def open_layout(path: Path, *, writable: bool) -> tuple[Backend, StoreLayout]:
    """Open the store at ``path`` and read its layout; the backend is closed again if that fails."""
    backend = open_backend(path, writable=writable)
    with close_on_error(backend):
        return backend, read_layout(backend, path)


def read_layout(backend: Backend, path: Path) -> StoreLayout:
    """Check the schema and the shapes/dtypes of every array; StoreError on any mismatch."""
    try:
        attrs = backend.read_attrs()
    except Exception as exc:
        raise StoreError(f"{path} has unreadable attributes ({exc}).") from exc
    version = _schema_version(attrs, path)

    def whole(key: str) -> int:
        value = attrs.get(key)
        if not is_count(value, 1):
            raise corrupt_store(path, f"attribute {key} is {short_text(value)}")
        return value

    n_rows, n_features, chunk_rows = whole("n_rows"), whole("n_features"), whole("chunk_rows")
    if not isinstance(attrs.get("complete"), bool):
        raise corrupt_store(path, f"attribute complete is {short_text(attrs.get('complete'))}")
    check, n_chunks = _ArrayCheck(backend, path), math.ceil(n_rows / chunk_rows)
    dtype, present = _check_version1_arrays(check, version, n_rows, n_features)
    check("chunks_written", (n_chunks,), ("uint8",))
    if version >= 2:
        present += _check_version2_arrays(check, attrs, n_rows, n_features, n_chunks, dtype, present)
    return StoreLayout(attrs=attrs, version=version, n_rows=n_rows, n_features=n_features, chunk_rows=chunk_rows,
                       dtype=dtype, row_arrays=tuple(present), complete=attrs["complete"])


def _schema_version(attrs: dict[str, Any], path: Path) -> int:
    """The store's schema version, refusing other schemas and versions newer than this code's."""
    schema = attrs.get("schema")
    if schema != SCHEMA_NAME:
        raise StoreError(f"{path} is not a {SCHEMA_NAME} store (its schema attribute is {short_text(schema)}).")
    version = attrs.get("schema_version")
    if not is_count(version, 1):
        raise corrupt_store(path, f"schema_version is {short_text(version)}")
    if version > SCHEMA_VERSION:
        raise StoreError(f"{path} uses {SCHEMA_NAME} schema version {version}, newer than the version "
                         f"{SCHEMA_VERSION} this vdvae_latents reads; upgrade vdvae_latents to read it.")
    return version


@dataclass(frozen=True)
class _ArrayCheck:
    """Checks one array of a store against the shape and dtypes the layout expects."""

    backend: Backend
    path: Path

    def __call__(self, name: str, shape: tuple[int, ...], dtypes: tuple[str, ...],
                 required: bool = True) -> str | None:
        """The array's dtype ("str" for strings), or None when an optional array is absent."""
        try:
            present = self.backend.has(name)
        except Exception as exc:  # e.g. a damaged zarr.json of a child node
            raise corrupt_store(self.path, f"the array {name} cannot be opened ({exc})") from exc
        if not present:
            if required:
                raise corrupt_store(self.path, f"the array {name} is missing")
            return None
        try:
            arr = self.backend.array(name)
            got_shape, got_dtype = tuple(arr.shape), np.dtype(arr.dtype)
        except Exception as exc:
            raise corrupt_store(self.path, f"the array {name} cannot be opened ({exc})") from exc
        kind = "str" if got_dtype.kind in "OUT" else str(got_dtype)
        if got_shape != shape or kind not in dtypes:
            raise corrupt_store(self.path, f"the array {name} is {kind}{list(got_shape)}, expected "
                                           f"{'|'.join(dtypes)}{list(shape)}")
        return kind


def _check_version1_arrays(check: _ArrayCheck, version: int, n_rows: int,
                           n_features: int) -> tuple[str, list[str]]:
    """(the feature dtype, the row arrays present), checking the row arrays and dims every version has."""
    dtype = check("features", (n_rows, n_features), FEATURE_DTYPES if version >= 2 else FLOAT_DTYPES)
    assert dtype is not None
    present = ["features"]
    if check("features_std", (n_rows, n_features), (dtype,), required=False):
        present.append("features_std")
    if check("labels", (n_rows,), ("int64",), required=False):
        present.append("labels")
    check("sample_index", (n_rows,), ("int64",))
    present.append("sample_index")
    for name, dim_dtype in DIM_FIELDS.items():
        check(f"dims/{name}", (n_features,), (str(dim_dtype),))
    return dtype, present


def _check_version2_arrays(check: _ArrayCheck, attrs: dict[str, Any], n_rows: int, n_features: int, n_chunks: int,
                           dtype: str, present: list[str]) -> list[str]:
    """The provenance row arrays present (to append to ``present``), checking them, the per-chunk
    checksums and errors and, for integer stores, the quantisers."""
    check("source_index", (n_rows,), ("int64",))
    added = ["source_index"]
    if check("source_names", (n_rows,), ("str",), required=False):
        added.append("source_names")
    row_arrays = present + added
    if attrs.get("checksum_arrays") != row_arrays:
        raise corrupt_store(check.path, f"its checksum_arrays attribute {short_text(attrs.get('checksum_arrays'))} "
                                        f"does not list its row arrays {row_arrays}")
    check("chunk_checksums", (n_chunks, len(row_arrays)), ("uint32",))
    value_arrays = [a for a in VALUE_ARRAYS if a in row_arrays]
    check("chunk_errors", (n_chunks, len(value_arrays), len(ERROR_FIELDS)), ("float64",))
    if dtype in INT_DTYPES:
        for name in value_arrays:
            for part in QUANT_FIELDS:
                check(f"quantization/{name}/{part}", (n_features,), ("float64",))
    return added


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


def read_flags(backend: Backend, layout: StoreLayout) -> np.ndarray:
    """``chunks_written``: 1 for each chunk that is fully written, 0 for the others."""
    return _read_per_chunk(backend, "chunks_written", (layout.n_chunks,), np.uint8)


def read_quantizers(backend: Backend, layout: StoreLayout, path: Path) -> dict[str, Quantizer]:
    if not layout.quantized:
        return {}
    out = {}
    for name in layout.value_arrays:
        try:
            parts = {p: np.asarray(backend.array(f"quantization/{name}/{p}")[...]) for p in QUANT_FIELDS}
            out[name] = Quantizer(dtype=layout.dtype, **parts)
        except Exception as exc:
            raise corrupt_store(path, f"its quantization parameters of {name} cannot be used ({exc})") from exc
    return out


# ----------------------------------------------------------------------------- chunk checks


def _rows_text(layout: StoreLayout, i: int) -> str:
    lo, hi = layout.chunk_range(i)
    return f"rows {lo}-{hi - 1}" if hi - lo > 1 else f"row {lo}"


class ChunkChecker:
    """Reads whole chunks of a store's row arrays and says what is wrong with each.

    Shared by every reader and by :mod:`~vdvae_latents.stores.verify`. ``flags``/``checksums`` are read once.
    """

    def __init__(self, backend: Backend, layout: StoreLayout, path: Path) -> None:
        self.backend, self.layout, self.path = backend, layout, path
        self.flags = read_flags(backend, layout)
        self.checksums = (_read_per_chunk(backend, "chunk_checksums", (layout.n_chunks, len(layout.row_arrays)),
                                          np.uint32) if layout.version >= 2 else None)

    def missing(self, name: str) -> list[int]:
        """Written chunks of ``name`` whose data object is gone."""
        return [i for i in np.flatnonzero(self.flags == 1).tolist() if not self.backend.chunk_present(name, i)]

    def to_rewrite(self, *, check_data: bool = False) -> list[int]:
        """Chunks a writer must (re)write, in increasing order: not flagged as written, or flagged
        with a data object gone; with ``check_data``, also those :meth:`read` refuses (reads them all)."""
        bad = set(np.flatnonzero(self.flags == 0).tolist())
        for name in self.layout.row_arrays:
            bad.update(self.missing(name))
        if check_data:
            for i in range(self.layout.n_chunks):
                if i not in bad and any(self.read(name, i)[1] for name in self.layout.row_arrays):
                    bad.add(i)
        return sorted(int(i) for i in bad)

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
            return None, f"cannot be decoded ({short_text(first_line(exc), 80)})"
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


def error_summary(backend: Backend, layout: StoreLayout) -> dict[str, dict[str, float]]:
    if layout.version < 2:
        return {}
    written = read_flags(backend, layout) == 1
    errors = _read_per_chunk(backend, "chunk_errors", (layout.n_chunks, len(layout.value_arrays), len(ERROR_FIELDS)),
                             np.float64)
    n_values = sum(layout.chunk_range(i)[1] - layout.chunk_range(i)[0] for i in np.flatnonzero(written))
    return {name: summarise_errors(errors[written, k], n_values * layout.n_features)
            for k, name in enumerate(layout.value_arrays)}


