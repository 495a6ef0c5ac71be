"""The store schema (version 2): its names and dtypes, what a store says about itself checked
against the arrays it holds, and the per-chunk checks every reader makes.

:mod:`~vdvae_latents.stores.writer` documents the layout and writes stores; :mod:`~vdvae_latents.stores.reader` reads them;
:mod:`~vdvae_latents.stores.verify` checks all of a store at once. All three share what is here.
"""

from __future__ import annotations

import math
import os
import shutil
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .backends import Backend, StoreError
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
        start = int(i) * self.chunk_rows
        return start, min(start + self.chunk_rows, self.n_rows)


def corrupt_store(path: Path, what: str) -> StoreError:
    return StoreError(f"{path} is corrupt: {what}; re-create it with --overwrite.")


def read_layout(backend: Backend, path: Path) -> StoreLayout:
    """Check the schema and the shapes/dtypes of every array; StoreError on any mismatch."""
    try:
        attrs = backend.read_attrs()
    except Exception as exc:
        raise StoreError(f"{path} has unreadable attributes ({exc}).") from exc
    schema = attrs.get("schema")
    if schema != SCHEMA_NAME:
        raise StoreError(f"{path} is not a {SCHEMA_NAME} store (its schema attribute is {short_text(schema)}).")
    version = attrs.get("schema_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise corrupt_store(path, f"schema_version is {short_text(version)}")
    if version > SCHEMA_VERSION:
        raise StoreError(f"{path} uses {SCHEMA_NAME} schema version {version}, newer than the version "
                         f"{SCHEMA_VERSION} this vdvae_latents reads; upgrade vdvae_latents to read it.")

    def whole(key: str, minimum: int) -> int:
        value = attrs.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
            raise corrupt_store(path, f"attribute {key} is {short_text(value)}")
        return value

    n_rows, n_features, chunk_rows = whole("n_rows", 1), whole("n_features", 1), whole("chunk_rows", 1)
    n_chunks = math.ceil(n_rows / chunk_rows)
    if not isinstance(attrs.get("complete"), bool):
        raise corrupt_store(path, f"attribute complete is {short_text(attrs.get('complete'))}")

    def check(name: str, shape: tuple[int, ...], dtypes: tuple[str, ...], required: bool = True) -> str | None:
        try:
            present = backend.has(name)
        except Exception as exc:  # e.g. a damaged zarr.json of a child node
            raise corrupt_store(path, f"the array {name} cannot be opened ({exc})") from exc
        if not present:
            if required:
                raise corrupt_store(path, f"the array {name} is missing")
            return None
        try:
            arr = backend.array(name)
            got_shape, got_dtype = tuple(arr.shape), np.dtype(arr.dtype)
        except Exception as exc:
            raise corrupt_store(path, f"the array {name} cannot be opened ({exc})") from exc
        kind = "str" if got_dtype.kind in "OUT" else str(got_dtype)
        if got_shape != shape or kind not in dtypes:
            raise corrupt_store(path, f"the array {name} is {kind}{list(got_shape)}, expected {'|'.join(dtypes)}"
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
            raise corrupt_store(path, f"its checksum_arrays attribute {short_text(attrs.get('checksum_arrays'))} does not "
                                 f"list its row arrays {present}")
        check("chunk_checksums", (n_chunks, len(present)), ("uint32",))
        n_values = sum(a in present for a in VALUE_ARRAYS)
        check("chunk_errors", (n_chunks, n_values, len(ERROR_FIELDS)), ("float64",))
        if dtype in INT_DTYPES:
            for name in (a for a in VALUE_ARRAYS if a in present):
                for part in QUANT_FIELDS:
                    check(f"quantization/{name}/{part}", (n_features,), ("float64",))
    return StoreLayout(attrs=attrs, version=version, n_rows=n_rows, n_features=n_features, chunk_rows=chunk_rows,
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


def remove_existing(path: Path) -> None:
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


def _rows_text(layout: StoreLayout, i: int) -> str:
    lo, hi = layout.chunk_range(i)
    return f"rows {lo}-{hi - 1}" if hi - lo > 1 else f"row {lo}"


class ChunkChecker:
    """Reads whole chunks of a store's row arrays and says what is wrong with each.

    Shared by every reader and by :mod:`~vdvae_latents.stores.verify`. ``flags``/``checksums`` are read once.
    """

    def __init__(self, backend: Backend, layout: StoreLayout, path: Path) -> None:
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
            return None, f"cannot be decoded ({short_text(reason, 80)})"
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
    n = layout.n_chunks
    flags = _read_per_chunk(backend, "chunks_written", (n,), np.uint8)
    errors = _read_per_chunk(backend, "chunk_errors", (n, len(layout.value_arrays), len(ERROR_FIELDS)), np.float64)
    written = flags == 1
    n_values = sum(layout.chunk_range(i)[1] - layout.chunk_range(i)[0] for i in np.flatnonzero(written))
    return {name: summarise_errors(errors[written, k], n_values * layout.n_features)
            for k, name in enumerate(layout.value_arrays)}


