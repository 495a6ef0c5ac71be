"""Compact-encoding stores: the few active latent dimensions of every image, on disk.

A store is either a Zarr v3 group (a path ending ``.zarr``) or an HDF5 file (``.h5`` /
``.hdf5``). Both formats hold exactly the same layout, which other tools rely on:

========================  ============  ==========================================
name                      shape         contents
========================  ============  ==========================================
``features``              (N, K)        float16 or float32, chunked ``chunk_rows``
                                        rows x all K columns, compressed
``features_std``          (N, K)        same dtype/chunks; only when ``with_std``
``labels``                (N,)          int64; only when the source has labels
``sample_index``          (N,)          int64: row -> index of the image in its split
``dims/layer``            (K,)          int32 latent layer of each kept dimension
``dims/variate``          (K,)          int32 channel (variate) within that layer
``dims/y``, ``dims/x``    (K,)          int32 spatial position; -1 for variate granularity
``dims/avg_kl``           (K,)          float64 average KL that ranked the dimension
``chunks_written``        (n_chunks,)   uint8: 1 once chunk i is fully written
========================  ============  ==========================================

Root attributes: everything the caller passes in ``attrs`` plus ``schema``
(``"vdvl-encodings"``), ``schema_version``, ``n_rows``, ``n_features``, ``chunk_rows`` and
``complete`` (False until :meth:`StoreWriter.finalize`). Rows that were never written read
as NaN (features) or -1 (labels, sample_index), so an incomplete store read with
``allow_incomplete=True`` cannot be mistaken for real data.

Zarr specifics: compression is Blosc-zstd with byte shuffle; every array carries
``dimension_names`` (``row``, ``feature``, ``chunk``) so ``xarray.open_zarr(path)`` and
``dask.array.from_zarr(path, component="features")`` work; ``chunks_written`` has one
element per stored object so writers in different processes that own different chunks
(e.g. DDP ranks) never touch the same file. Nested attribute values are stored natively.

HDF5 specifics: compression is gzip level 4 with shuffle. HDF5 attributes cannot hold
nested values, so strings, booleans, ints and floats are stored natively and anything else
(dicts, lists, None) as a JSON string; the names of the JSON-encoded attributes are listed
in the hidden root attribute ``_json_keys``. :func:`open_encodings` parses them back so both
formats read identically. One HDF5 file has one writer at a time (HDF5 locks the file), so
several DDP ranks must use Zarr or funnel their rows through one process.

Resuming: the data of a chunk is written before its ``chunks_written`` flag, so a writer
killed at any moment (``kill -9`` included) leaves a store with ``complete == False`` whose
flagged chunks are intact. :meth:`StoreWriter.open` + writing :meth:`StoreWriter.missing_chunks`
+ :meth:`StoreWriter.finalize` then gives the same arrays and attributes as an uninterrupted
run. Zarr stores always survive this. HDF5 is not crash-safe: the writer flushes (and fsyncs)
after every chunk, which keeps the window small, but a file killed in the middle of a write
can be left unreadable; :meth:`StoreWriter.open` then raises a :class:`StoreError` saying to
start again with ``--overwrite``. Zarr chunk files are not fsynced: the guarantee is against
the writing process dying, not against the machine losing power.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import h5py
import numpy as np
import zarr
from zarr.codecs import BloscCodec

from .errors import UserError

SCHEMA_NAME = "vdvl-encodings"
SCHEMA_VERSION = 1

#: Names of the per-dimension arrays under ``dims/`` and their dtypes.
DIM_FIELDS: dict[str, np.dtype] = {
    "layer": np.dtype(np.int32),
    "variate": np.dtype(np.int32),
    "y": np.dtype(np.int32),
    "x": np.dtype(np.int32),
    "avg_kl": np.dtype(np.float64),
}
FEATURE_DTYPES = ("float16", "float32")

# HDF5 only: the root attribute listing which attributes hold JSON-encoded values.
_JSON_KEYS_ATTR = "_json_keys"
# HDF5 format bounds. The low bound keeps the old superblock: the 1.10+ one carries a "file is
# open for writing" flag that a killed writer leaves set, so every killed file would need h5clear
# before a resume. The high bound (1.8 objects) still allows attributes over 64 KiB.
_H5_LIBVER = ("earliest", "v108")
_H5_COMPRESSION = {"compression": "gzip", "compression_opts": 4, "shuffle": True}
_ZARR_COMPRESSOR = BloscCodec(cname="zstd", clevel=5, shuffle="shuffle")

# Values that mark rows nobody has written yet.
_FILL_FEATURES = float("nan")
_FILL_INDEX = -1

StoreFormat = Literal["zarr", "hdf5"]


class StoreError(UserError):
    """A store path that is missing, unwritable, of another schema, incomplete or corrupt."""


# ----------------------------------------------------------------------------- helpers


def store_format(path: str | os.PathLike[str]) -> StoreFormat:
    """Return ``"zarr"`` or ``"hdf5"`` from the path's suffix; raise StoreError otherwise."""
    suffix = Path(path).suffix.lower()
    if suffix == ".zarr":
        return "zarr"
    if suffix in (".h5", ".hdf5"):
        return "hdf5"
    raise StoreError(f"{path} is not a store path: use a name ending in .zarr, .h5 or .hdf5.")


def _json_default(value: Any) -> Any:
    """Let numpy scalars and arrays through json.dumps (they are common in configs)."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"attribute value {value!r} of type {type(value).__name__} is not JSON-serialisable")


def _normalise_attrs(attrs: dict[str, Any]) -> dict[str, Any]:
    """Round-trip through JSON so both formats store (and read back) exactly the same values:
    tuples become lists, numpy scalars Python numbers, keys strings."""
    return json.loads(json.dumps(attrs, default=_json_default))


def _short(value: Any, limit: int = 60) -> str:
    """A repr short enough to sit inside a one-sentence error message."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _as_numpy(value: Any) -> np.ndarray:
    """Accept numpy arrays, lists and (CPU or GPU) torch tensors without importing torch."""
    if hasattr(value, "detach") and hasattr(value, "cpu"):
        value = value.detach().cpu().numpy()
    return np.asarray(value)


# ----------------------------------------------------------------------------- backends
#
# Two small classes hide the difference between Zarr and HDF5 behind the same handful of
# operations; StoreWriter and open_encodings only talk to these.


class _ZarrBackend:
    format: StoreFormat = "zarr"

    def __init__(self, group: zarr.Group) -> None:
        self.group = group

    @classmethod
    def create(cls, path: Path, *, n_rows: int, n_features: int, chunk_rows: int, dtype: str,
               with_std: bool, has_labels: bool, dims: dict[str, np.ndarray], attrs: dict[str, Any]
               ) -> _ZarrBackend:
        group = zarr.open_group(str(path), mode="w-", zarr_format=3, attributes=attrs)
        n_chunks = math.ceil(n_rows / chunk_rows)
        row_arrays = ["features"] + (["features_std"] if with_std else [])
        for name in row_arrays:
            group.create_array(name, shape=(n_rows, n_features), chunks=(chunk_rows, n_features), dtype=dtype,
                               compressors=_ZARR_COMPRESSOR, fill_value=_FILL_FEATURES,
                               dimension_names=["row", "feature"])
        for name in (["labels"] if has_labels else []) + ["sample_index"]:
            group.create_array(name, shape=(n_rows,), chunks=(chunk_rows,), dtype="int64",
                               compressors=_ZARR_COMPRESSOR, fill_value=_FILL_INDEX, dimension_names=["row"])
        dims_group = group.create_group("dims")
        for name, values in dims.items():
            dims_group.create_array(name, data=values, chunks=(n_features,), dimension_names=["feature"])
        # One element per stored object: concurrent writers owning different chunks never rewrite
        # each other's flags. No compression: each object is one byte. The fill value 0 means
        # "not written"; zarr leaves fill-valued objects absent, so all zeros costs no files.
        group.create_array("chunks_written", shape=(n_chunks,), chunks=(1,), dtype="uint8", fill_value=0,
                           compressors=None, dimension_names=["chunk"])
        return cls(group)

    @classmethod
    def open(cls, path: Path, *, writable: bool) -> _ZarrBackend:
        # use_consolidated=False: always read the live metadata, never a stale snapshot.
        group = zarr.open_group(str(path), mode="r+" if writable else "r", use_consolidated=False)
        return cls(group)

    def read_attrs(self) -> dict[str, Any]:
        return dict(self.group.attrs)

    def set_attr(self, key: str, value: Any) -> None:
        self.group.update_attributes({key: value})

    def has(self, name: str) -> bool:
        return name in self.group

    def array(self, name: str) -> Any:
        node = self.group[name]
        if not isinstance(node, zarr.Array):
            raise TypeError(f"{name} is a group, not an array")
        return node

    def write_rows(self, name: str, start: int, stop: int, data: np.ndarray) -> None:
        self.group[name][start:stop] = data

    def read_flags(self) -> np.ndarray:
        flags = self.group["chunks_written"]
        try:
            return np.asarray(flags[:], dtype=np.uint8)
        except Exception:
            # A flag object cut short by a kill (or being replaced by another rank right now)
            # cannot be decoded; that chunk simply counts as not written and gets redone.
            out = np.zeros(flags.shape, dtype=np.uint8)
            for i in range(flags.shape[0]):
                try:
                    out[i] = flags[i]
                except Exception:
                    out[i] = 0
            return out

    def set_flag(self, i: int) -> None:
        # Zarr writes each chunk object completely before returning, so the data written just
        # before this call is already in the file system when the flag appears.
        self.group["chunks_written"][i] = 1

    def is_open(self) -> bool:
        return True  # nothing to close: a Zarr array stays readable

    def close(self) -> None:
        # Zarr keeps no open file handles between calls.
        pass


class _HDF5Backend:
    format: StoreFormat = "hdf5"

    def __init__(self, file: h5py.File) -> None:
        self.file = file

    @classmethod
    def create(cls, path: Path, *, n_rows: int, n_features: int, chunk_rows: int, dtype: str,
               with_std: bool, has_labels: bool, dims: dict[str, np.ndarray], attrs: dict[str, Any]
               ) -> _HDF5Backend:
        # track_order keeps attributes in the order given, as the Zarr JSON does.
        file = h5py.File(path, "w-", libver=_H5_LIBVER, track_order=True)
        try:
            # HDF5 chunks may not be larger than a fixed-size dataset.
            rows_per_chunk = min(chunk_rows, n_rows)
            for name in ["features"] + (["features_std"] if with_std else []):
                file.create_dataset(name, shape=(n_rows, n_features), dtype=dtype,
                                    chunks=(rows_per_chunk, n_features), fillvalue=_FILL_FEATURES,
                                    **_H5_COMPRESSION)
            for name in (["labels"] if has_labels else []) + ["sample_index"]:
                file.create_dataset(name, shape=(n_rows,), dtype="int64", chunks=(rows_per_chunk,),
                                    fillvalue=_FILL_INDEX, **_H5_COMPRESSION)
            dims_group = file.create_group("dims")
            for name, values in dims.items():
                dims_group.create_dataset(name, data=values)
            file.create_dataset("chunks_written", data=np.zeros(math.ceil(n_rows / chunk_rows), dtype=np.uint8))
            backend = cls(file)
            backend._write_attrs(attrs)
            backend.sync()
        except BaseException:
            file.close()
            raise
        return backend

    @classmethod
    def open(cls, path: Path, *, writable: bool) -> _HDF5Backend:
        return cls(h5py.File(path, "r+" if writable else "r", libver=_H5_LIBVER if writable else None))

    # HDF5 attributes are flat: see the module docstring for the JSON convention.
    @staticmethod
    def _is_native(value: Any) -> bool:
        if isinstance(value, bool | str | float):
            return True
        return isinstance(value, int) and -(2**63) <= value < 2**63

    def _write_attrs(self, attrs: dict[str, Any]) -> None:
        json_keys = []
        for key, value in attrs.items():
            if self._is_native(value):
                self.file.attrs[key] = value
            else:
                self.file.attrs[key] = json.dumps(value)
                json_keys.append(key)
        self.file.attrs[_JSON_KEYS_ATTR] = json.dumps(sorted(json_keys))

    def read_attrs(self) -> dict[str, Any]:
        raw = dict(self.file.attrs)
        json_keys = set(json.loads(_text(raw.pop(_JSON_KEYS_ATTR, "[]"))))
        out: dict[str, Any] = {}
        for key, value in raw.items():
            if key in json_keys:
                out[key] = json.loads(_text(value))
            elif isinstance(value, bytes | str):
                out[key] = _text(value)
            elif isinstance(value, np.generic):
                out[key] = value.item()
            elif isinstance(value, np.ndarray):  # written by another tool; keep it JSON-like
                out[key] = value.tolist()
            else:
                out[key] = value
        return out

    def set_attr(self, key: str, value: Any) -> None:
        if not self._is_native(value):
            raise TypeError(f"only scalar attributes can be updated in place, not {key}")
        self.file.attrs[key] = value

    def has(self, name: str) -> bool:
        return name in self.file

    def array(self, name: str) -> Any:
        node = self.file[name]
        if not isinstance(node, h5py.Dataset):
            raise TypeError(f"{name} is a group, not a dataset")
        return node

    def write_rows(self, name: str, start: int, stop: int, data: np.ndarray) -> None:
        self.file[name][start:stop] = data

    def read_flags(self) -> np.ndarray:
        return np.asarray(self.file["chunks_written"][:], dtype=np.uint8)

    def set_flag(self, i: int) -> None:
        self.file["chunks_written"][i] = 1

    def sync(self) -> None:
        """Push HDF5's caches to the file and the file to disk."""
        self.file.flush()
        try:
            os.fsync(self.file.id.get_vfd_handle())
        except (OSError, ValueError, TypeError, AttributeError):
            pass  # a driver without a plain file descriptor: flush() is the best we can do

    def is_open(self) -> bool:
        return bool(self.file.id.valid)

    def close(self) -> None:
        if self.file.id.valid:
            self.file.close()


_Backend = _ZarrBackend | _HDF5Backend


def _text(value: bytes | str) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else value


def _open_backend(path: Path, *, writable: bool) -> _Backend:
    """Open an existing store, turning every way that can fail into one StoreError."""
    fmt = store_format(path)
    if not path.exists():
        raise StoreError(f"{path} does not exist.")
    try:
        if fmt == "zarr":
            return _ZarrBackend.open(path, writable=writable)
        return _HDF5Backend.open(path, writable=writable)
    except StoreError:
        raise
    except Exception as exc:  # zarr and h5py raise many types (OSError, JSON, KeyError ...)
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if fmt == "hdf5" and "lock" in reason.lower():
            raise StoreError(f"{path} is open in another process ({reason}).") from exc
        hint = ("; an HDF5 file whose writer was killed can be damaged: re-create it with --overwrite"
                if fmt == "hdf5" else "; if it is a damaged store, re-create it with --overwrite")
        kind = "Zarr group" if fmt == "zarr" else "HDF5 file"
        raise StoreError(f"{path} is not a readable {kind} ({reason}){hint}.") from exc


@dataclass(frozen=True)
class _Layout:
    """What a store says about itself, checked against the arrays it actually holds."""

    attrs: dict[str, Any]
    n_rows: int
    n_features: int
    chunk_rows: int
    dtype: str
    with_std: bool
    has_labels: bool
    complete: bool

    @property
    def n_chunks(self) -> int:
        return math.ceil(self.n_rows / self.chunk_rows)


def _corrupt(path: Path, what: str) -> StoreError:
    return StoreError(f"{path} is corrupt: {what}; re-create it with --overwrite.")


def _read_layout(backend: _Backend, path: Path) -> _Layout:
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
            got_shape, got_dtype = tuple(arr.shape), str(np.dtype(arr.dtype))
        except Exception as exc:
            raise _corrupt(path, f"the array {name} cannot be opened ({exc})") from exc
        if got_shape != shape or got_dtype not in dtypes:
            raise _corrupt(path, f"the array {name} is {got_dtype}{list(got_shape)}, "
                                 f"expected {'|'.join(dtypes)}{list(shape)}")
        return got_dtype

    dtype = check("features", (n_rows, n_features), FEATURE_DTYPES)
    assert dtype is not None
    with_std = check("features_std", (n_rows, n_features), (dtype,), required=False) is not None
    has_labels = check("labels", (n_rows,), ("int64",), required=False) is not None
    check("sample_index", (n_rows,), ("int64",))
    for name, dim_dtype in DIM_FIELDS.items():
        check(f"dims/{name}", (n_features,), (str(dim_dtype),))
    check("chunks_written", (math.ceil(n_rows / chunk_rows),), ("uint8",))
    return _Layout(attrs=attrs, n_rows=n_rows, n_features=n_features, chunk_rows=chunk_rows, dtype=dtype,
                   with_std=with_std, has_labels=has_labels, complete=attrs["complete"])


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


# ----------------------------------------------------------------------------- writer


class StoreWriter:
    """Writes a store chunk by chunk; see the module docstring for the layout and guarantees.

    Create a new store with :meth:`create`, or re-open one (to resume, or from another DDP
    rank of a Zarr store) with :meth:`open`. Write each chunk ``i`` of rows
    ``chunk_range(i)`` once with :meth:`write_chunk` (any order, any process for Zarr),
    then call :meth:`finalize` once, from one process, after every chunk is written.
    """

    def __init__(self, path: Path, backend: _Backend, layout: _Layout) -> None:
        self.path = path
        self.format: StoreFormat = backend.format
        self.n_rows = layout.n_rows
        self.n_features = layout.n_features
        self.chunk_rows = layout.chunk_rows
        self.n_chunks = layout.n_chunks
        self.dtype = layout.dtype
        self.with_std = layout.with_std
        self.has_labels = layout.has_labels
        self._complete = layout.complete
        self._backend: _Backend | None = backend

    # -- construction

    @classmethod
    def create(cls, path: str | os.PathLike[str], *, n_rows: int, dims: dict[str, np.ndarray],
               attrs: dict[str, Any], dtype: str = "float16", with_std: bool = False, has_labels: bool = False,
               chunk_rows: int = 1024, overwrite: bool = False) -> StoreWriter:
        """Create an empty store (``complete = False``) with its dims and attributes written."""
        path = Path(path)
        fmt = store_format(path)
        if dtype not in FEATURE_DTYPES:
            raise StoreError(f"cannot create {path} with dtype {dtype!r}: use float16 or float32.")
        if isinstance(n_rows, bool) or not isinstance(n_rows, int | np.integer) or n_rows < 1:
            raise StoreError(f"cannot create {path} with {n_rows!r} rows: the data split has no images.")
        if isinstance(chunk_rows, bool) or not isinstance(chunk_rows, int | np.integer) or chunk_rows < 1:
            raise StoreError(f"cannot create {path} with chunk_rows={chunk_rows!r}: use a positive integer.")
        n_rows, chunk_rows = int(n_rows), int(chunk_rows)
        dims_arrays = cls._check_dims(path, dims)
        n_features = len(dims_arrays["layer"])

        user_attrs = _normalise_attrs(dict(attrs))
        own = {"schema": SCHEMA_NAME, "schema_version": SCHEMA_VERSION, "n_rows": n_rows,
               "n_features": n_features, "chunk_rows": chunk_rows, "complete": False}
        for key, value in own.items():
            if key in user_attrs and user_attrs[key] != value:
                raise ValueError(f"attrs[{key!r}] = {user_attrs[key]!r} contradicts the store's own value {value!r}")
        if _JSON_KEYS_ATTR in user_attrs:
            raise ValueError(f"attrs may not use the reserved name {_JSON_KEYS_ATTR!r}")
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

        spec = dict(n_rows=n_rows, n_features=n_features, chunk_rows=chunk_rows, dtype=dtype,
                    with_std=with_std, has_labels=has_labels, dims=dims_arrays, attrs=all_attrs)
        try:
            backend: _Backend = (_ZarrBackend if fmt == "zarr" else _HDF5Backend).create(path, **spec)
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
        layout = _Layout(attrs=all_attrs, n_rows=n_rows, n_features=n_features, chunk_rows=chunk_rows,
                         dtype=dtype, with_std=with_std, has_labels=has_labels, complete=False)
        return cls(path, backend, layout)

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
        """Re-open an existing store for writing (to resume it, or from another rank).

        With ``expect_attrs``, each of its keys must equal the stored attribute, so that a
        resume never mixes rows from, say, two different checkpoints in one store.
        """
        path = Path(path)
        backend = _open_backend(path, writable=True)
        try:
            layout = _read_layout(backend, path)
            for key, expected in _normalise_attrs(dict(expect_attrs or {})).items():
                if key not in layout.attrs:
                    raise StoreError(f"{path} has no attribute {key} (expected {_short(expected)}); "
                                     f"use --overwrite to replace it or choose another output path.")
                if layout.attrs[key] != expected:
                    raise StoreError(f"{path} was written with {key}={_short(layout.attrs[key])}, not "
                                     f"{_short(expected)}; use --overwrite to replace it or choose another "
                                     f"output path.")
        except BaseException:
            backend.close()
            raise
        return cls(path, backend, layout)

    # -- properties and bookkeeping

    @property
    def closed(self) -> bool:
        return self._backend is None

    def _live(self) -> _Backend:
        if self._backend is None:
            raise ValueError(f"the store writer for {self.path} is closed")
        return self._backend

    def chunk_range(self, i: int) -> tuple[int, int]:
        """Rows ``[start, stop)`` of chunk ``i``; the last chunk may be shorter."""
        if isinstance(i, bool) or not isinstance(i, int | np.integer) or not 0 <= i < self.n_chunks:
            raise ValueError(f"chunk index {i!r} is out of range for {self.n_chunks} chunks")
        start = int(i) * self.chunk_rows
        return start, min(start + self.chunk_rows, self.n_rows)

    def missing_chunks(self) -> list[int]:
        """Chunks whose rows are not known to be written yet, in increasing order."""
        flags = self._live().read_flags()
        return [int(i) for i in np.flatnonzero(flags == 0)]

    # -- writing

    def write_chunk(self, i: int, features: Any, *, features_std: Any = None, labels: Any = None,
                    sample_index: Any) -> None:
        """Write all rows of chunk ``i``, then mark it written.

        Arrays must have exactly the chunk's rows (``chunk_range(i)``); features are cast to the
        store dtype. ``features_std`` is required exactly when the store has it, likewise ``labels``.
        """
        backend = self._live()
        start, stop = self.chunk_range(i)
        rows = stop - start
        data: dict[str, np.ndarray] = {"features": self._rows(_as_numpy(features), "features", (rows, self.n_features))
                                       .astype(self.dtype)}
        if self.with_std:
            if features_std is None:
                raise ValueError(f"{self.path} stores features_std: pass features_std to write_chunk")
            data["features_std"] = self._rows(_as_numpy(features_std), "features_std",
                                              (rows, self.n_features)).astype(self.dtype)
        elif features_std is not None:
            raise ValueError(f"{self.path} was created without features_std (with_std=False)")
        if self.has_labels:
            if labels is None:
                raise ValueError(f"{self.path} stores labels: pass labels to write_chunk")
            data["labels"] = self._indices(_as_numpy(labels), "labels", rows)
        elif labels is not None:
            raise ValueError(f"{self.path} was created without labels (has_labels=False)")
        data["sample_index"] = self._indices(_as_numpy(sample_index), "sample_index", rows)

        try:
            if self._complete:
                # Rewriting a finished store: it must not claim to be complete while a
                # chunk is half rewritten. finalize() sets it back.
                backend.set_attr("complete", False)
                self._complete = False
            for name, values in data.items():
                backend.write_rows(name, start, stop, values)
            if isinstance(backend, _HDF5Backend):
                backend.sync()  # the data must be on disk before the flag that vouches for it
            backend.set_flag(int(i))
            if isinstance(backend, _HDF5Backend):
                backend.sync()
        except OSError as exc:
            raise StoreError(f"cannot write to {self.path} ({exc.strerror or exc}).") from exc

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

    def finalize(self) -> None:
        """Mark the store complete and close it; every chunk must have been written."""
        backend = self._live()
        missing = self.missing_chunks()
        if missing:
            raise StoreError(f"cannot finalize {self.path}: {len(missing)} of {self.n_chunks} chunks are not "
                             f"written yet (first missing: {missing[0]}).")
        try:
            backend.set_attr("complete", True)
            if isinstance(backend, _HDF5Backend):
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


# ----------------------------------------------------------------------------- reader


class LazyArray:
    """A read-only view of one stored array; nothing is read until it is sliced.

    Supports ``shape``, ``dtype``, ``ndim``, ``len()``, indexing/slicing (returns numpy) and
    ``np.asarray``. ``raw`` is the underlying ``zarr.Array`` or ``h5py.Dataset``.
    """

    def __init__(self, raw: Any, *, name: str, path: Path, is_open: Callable[[], bool] = lambda: True) -> None:
        self.raw = raw
        self.name = name
        self._path = path
        self._is_open = is_open

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
        return np.dtype(self.raw.dtype)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key: Any) -> np.ndarray:
        self._check_open()
        return np.asarray(self.raw[key])

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray:
        self._check_open()
        values = np.asarray(self.raw[...])
        return values if dtype is None else values.astype(dtype, copy=False)

    def __repr__(self) -> str:
        return f"LazyArray({self.name!r}, shape={tuple(self.raw.shape)}, dtype={np.dtype(self.raw.dtype)})"


@dataclass
class Encodings:
    """An opened store, the same for Zarr and HDF5. Row arrays are lazy; dims are in memory.

    Keeps an HDF5 file open until :meth:`close` (or the end of a ``with`` block).
    """

    path: Path
    format: StoreFormat
    attrs: dict[str, Any]
    features: LazyArray
    features_std: LazyArray | None
    labels: LazyArray | None
    sample_index: LazyArray
    dims: dict[str, np.ndarray]
    _backend: _Backend | None = field(default=None, repr=False, compare=False)

    @property
    def n_rows(self) -> int:
        return int(self.attrs["n_rows"])

    @property
    def n_features(self) -> int:
        return int(self.attrs["n_features"])

    @property
    def complete(self) -> bool:
        return bool(self.attrs["complete"])

    def dims_table(self) -> list[dict[str, Any]]:
        """One dict per feature column: its index and the latent dimension it came from."""
        return [{"feature": j, **{name: self.dims[name][j].item() for name in DIM_FIELDS}}
                for j in range(self.n_features)]

    def to_numpy(self) -> dict[str, np.ndarray]:
        """Everything in memory, keyed by the store's array names (``dims/layer`` ...)."""
        out: dict[str, np.ndarray] = {"features": np.asarray(self.features)}
        if self.features_std is not None:
            out["features_std"] = np.asarray(self.features_std)
        if self.labels is not None:
            out["labels"] = np.asarray(self.labels)
        out["sample_index"] = np.asarray(self.sample_index)
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


def open_encodings(path: str | os.PathLike[str], *, allow_incomplete: bool = False) -> Encodings:
    """Open a store for reading; StoreError if it is missing, foreign, newer, corrupt or incomplete.

    With ``allow_incomplete=True`` a store still being written (or killed) opens too; its
    unwritten rows read as NaN features and -1 labels/sample_index.
    """
    path = Path(path)
    backend = _open_backend(path, writable=False)
    try:
        layout = _read_layout(backend, path)
        if not layout.complete and not allow_incomplete:
            written = layout.n_chunks - int(np.count_nonzero(backend.read_flags() == 0))
            raise StoreError(f"{path} is incomplete ({written} of {layout.n_chunks} chunks written); "
                             f"re-run `vdvl encode --resume`.")
        try:
            dims = {name: np.asarray(backend.array(f"dims/{name}")[...]) for name in DIM_FIELDS}
        except Exception as exc:
            raise _corrupt(path, f"its dims cannot be read ({exc})") from exc

        def lazy(name: str) -> LazyArray | None:
            if not backend.has(name):
                return None
            return LazyArray(backend.array(name), name=name, path=path, is_open=backend.is_open)

        features, sample_index = lazy("features"), lazy("sample_index")
        assert features is not None and sample_index is not None  # _read_layout checked them
        return Encodings(path=path, format=backend.format, attrs=layout.attrs, features=features,
                         features_std=lazy("features_std"), labels=lazy("labels"), sample_index=sample_index,
                         dims=dims, _backend=backend)
    except BaseException:
        backend.close()
        raise
