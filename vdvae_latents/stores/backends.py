"""The two store formats behind one small interface: a Zarr v3 group or an HDF5 file.

:mod:`~vdvae_latents.stores.create` decides what arrays a store holds (the layout
:mod:`~vdvae_latents.stores.writer` documents); this module knows how each format creates,
writes, reads and inspects them. Both formats hold the same arrays, so a
store reads identically whichever it is.

Compression codecs are named by short strings (``vdvl encode --codec``), chosen by
measurement (``benchmarks/store_codecs.py``, results in ``benchmarks/results/``):

* Zarr: ``zstd:LEVEL`` (plain Zstandard), ``blosc:CNAME:LEVEL:SHUFFLE`` (Blosc with
  ``shuffle``, ``bitshuffle`` or ``noshuffle``), either one optionally with ``+transpose``
  (each chunk stored column by column, so a column's values sit together);
* HDF5: ``gzip:LEVEL[:shuffle]``, ``lzf[:shuffle]``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Self

import h5py
import numpy as np
import zarr
from zarr.codecs import BloscCodec, TransposeCodec, ZstdCodec

from ..core.errors import UserError

StoreFormat = Literal["zarr", "hdf5"]

#: Default codecs per format and kind of dtype (float16/32, or int8/uint8 codes), chosen by
#: ``benchmarks/store_codecs.py`` (benchmarks/results/store_codecs-*.md): Blosc's byte shuffle
#: groups the bytes of multi-byte floats; one-byte codes gain nothing from it and compress best
#: with plain Zstandard. gzip level 9 with shuffle is HDF5's best for both.
DEFAULT_CODECS: dict[tuple[str, str], str] = {
    ("zarr", "float"): "blosc:zstd:5:shuffle", ("zarr", "int"): "zstd:9",
    ("hdf5", "float"): "gzip:9:shuffle", ("hdf5", "int"): "gzip:9:shuffle",
}


def default_codec(fmt: StoreFormat, dtype: str) -> str:
    """The measured best codec for ``fmt`` stores of ``dtype``."""
    return DEFAULT_CODECS[fmt, "float" if np.dtype(dtype).kind == "f" else "int"]

# HDF5 only: the root attribute listing which attributes hold JSON-encoded values.
JSON_KEYS_ATTR = "_json_keys"
# HDF5 format bounds. The low bound keeps the old superblock: the 1.10+ one carries a "file is
# open for writing" flag that a killed writer leaves set, so every killed file would need h5clear
# before a resume. The high bound (1.8 objects) still allows attributes over 64 KiB.
_H5_LIBVER = ("earliest", "v108")


class StoreError(UserError):
    """A store path that is missing, unwritable, of another schema, incomplete or corrupt."""


def store_format(path: str | os.PathLike[str]) -> StoreFormat:
    """Return ``"zarr"`` or ``"hdf5"`` from the path's suffix; raise StoreError otherwise."""
    suffix = Path(path).suffix.lower()
    if suffix == ".zarr":
        return "zarr"
    if suffix in (".h5", ".hdf5"):
        return "hdf5"
    raise StoreError(f"{path} is not a store path: use a name ending in .zarr, .h5 or .hdf5.")


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type name when it has none), for one-sentence errors."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def os_error_text(exc: OSError) -> str:
    """What an OSError says in a sentence: its strerror ("Permission denied"), else its message."""
    return str(exc.strerror or exc)


# ----------------------------------------------------------------------------- codecs


def parse_codec(fmt: StoreFormat, text: str | None, dtype: str = "float16") -> tuple[str, Any]:
    """(canonical name, format-specific settings) of a codec string (None: the default for
    ``dtype``); UserError if unknown."""
    name = default_codec(fmt, dtype) if text is None else str(text).strip().lower()
    body, transpose = (name[:-len("+transpose")], True) if name.endswith("+transpose") else (name, False)
    parts = body.split(":")
    bad = UserError(f"--codec {name!r} is not a {fmt} codec: use "
                    + ("zstd:LEVEL or blosc:zstd|lz4|zlib:LEVEL:shuffle|bitshuffle|noshuffle, optionally "
                       "+transpose" if fmt == "zarr" else "gzip:LEVEL[:shuffle] or lzf[:shuffle]") + ".")
    try:
        if fmt == "zarr":
            filters = [TransposeCodec(order=(1, 0))] if transpose else []
            if parts[0] == "zstd" and len(parts) == 2:
                return name, (filters, [ZstdCodec(level=int(parts[1]))])
            if parts[0] == "blosc" and len(parts) == 4:
                return name, (filters, [BloscCodec(cname=parts[1], clevel=int(parts[2]), shuffle=parts[3])])
        elif not transpose:
            shuffle = parts[-1] == "shuffle"
            core = parts[:-1] if shuffle else parts
            if core[0] == "gzip" and len(core) == 2 and 0 <= int(core[1]) <= 9:
                return name, {"compression": "gzip", "compression_opts": int(core[1]), "shuffle": shuffle}
            if core == ["lzf"]:
                return name, {"compression": "lzf", "shuffle": shuffle}
    except (ValueError, TypeError):
        raise bad from None
    raise bad


# ----------------------------------------------------------------------------- array specs


@dataclass(frozen=True)
class ArraySpec:
    """One array of a new store. Row arrays (``per_chunk`` False, ``compressed`` True) are
    chunked by rows; ``per_chunk`` arrays have one row per store chunk, stored as one object
    each so that writers of different chunks never touch the same object."""

    name: str
    shape: tuple[int, ...]
    dtype: str                      # a numpy dtype name, or "str" for UTF-8 strings
    chunk_rows: int | None = None   # None: one chunk for the whole array
    fill: Any = 0
    dims: tuple[str, ...] = ()
    compressed: bool = False
    data: np.ndarray | None = None


def _json_default(value: Any) -> Any:
    """Let numpy scalars and arrays through json.dumps (they are common in configs)."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"attribute value {value!r} of type {type(value).__name__} is not JSON-serialisable")


def normalise_attrs(attrs: dict[str, Any]) -> dict[str, Any]:
    """Round-trip through JSON so both formats store (and read back) exactly the same values:
    tuples become lists, numpy scalars Python numbers, keys strings."""
    return json.loads(json.dumps(attrs, default=_json_default))


# ----------------------------------------------------------------------------- Zarr


class ZarrBackend:
    format: StoreFormat = "zarr"

    def __init__(self, group: zarr.Group) -> None:
        self.group = group

    @classmethod
    def create(cls, path: Path, specs: list[ArraySpec], attrs: dict[str, Any], codec: Any) -> ZarrBackend:
        group = zarr.open_group(str(path), mode="w-", zarr_format=3, attributes=attrs)
        for spec in specs:
            _create_zarr_array(group, spec, codec)
        return cls(group)

    @classmethod
    def open(cls, path: Path, *, writable: bool) -> ZarrBackend:
        # use_consolidated=False: always read the live metadata, never a stale snapshot.
        return cls(zarr.open_group(str(path), mode="r+" if writable else "r", use_consolidated=False))

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
        # write_empty_chunks: a chunk that happens to equal the fill value (all-zero int8 codes)
        # must still exist as a file, or it would be indistinguishable from a deleted one.
        self.group[name].with_config({"write_empty_chunks": True})[start:stop] = data

    def chunk_present(self, name: str, i: int) -> bool:
        """Whether chunk ``i`` of row array ``name`` has its object (file) in the store."""
        arr = self.group[name]
        key = arr.metadata.encode_chunk_key((i,) + (0,) * (arr.ndim - 1))
        return (Path(str(self.group.store.root)) / arr.path / key).is_file()

    def is_open(self) -> bool:
        return True  # nothing to close: a Zarr array stays readable

    def sync(self) -> None:
        """Zarr writes each object completely before returning; nothing is buffered."""

    def close(self) -> None:
        # Zarr keeps no open file handles between calls.
        pass


def _create_zarr_array(group: zarr.Group, spec: ArraySpec, codec: Any) -> None:
    filters, compressors = codec
    if spec.data is not None:
        group.create_array(spec.name, data=spec.data, chunks=spec.shape, dimension_names=list(spec.dims))
        return
    chunks = spec.shape if spec.chunk_rows is None else (spec.chunk_rows, *spec.shape[1:])
    # Strings take zarr's own vlen-utf8 codec chain; the transpose filter is for 2-D rows.
    compressed = spec.compressed and spec.dtype != "str"
    group.create_array(spec.name, shape=spec.shape, chunks=chunks, dtype=str if spec.dtype == "str" else spec.dtype,
                       fill_value=spec.fill, compressors=compressors if compressed else None,
                       filters=filters if compressed and len(spec.shape) == 2 else None,
                       dimension_names=list(spec.dims))

# ----------------------------------------------------------------------------- HDF5


class HDF5Backend:
    """HDF5 attributes are flat: strings, booleans, ints and floats are stored natively and
    anything else (dicts, lists, None) as a JSON string whose name is listed in the hidden
    root attribute ``_json_keys`` (:func:`_write_h5_attrs`, :func:`_read_h5_attrs`)."""

    format: StoreFormat = "hdf5"

    def __init__(self, file: h5py.File) -> None:
        self.file = file

    @classmethod
    def create(cls, path: Path, specs: list[ArraySpec], attrs: dict[str, Any], codec: Any) -> HDF5Backend:
        # track_order keeps attributes in the order given, as the Zarr JSON does.
        file = h5py.File(path, "w-", libver=_H5_LIBVER, track_order=True)
        backend = cls(file)
        with close_on_error(backend):
            for spec in specs:
                _create_h5_dataset(file, spec, codec)
            _write_h5_attrs(file, attrs)
            backend.sync()
        return backend

    @classmethod
    def open(cls, path: Path, *, writable: bool) -> HDF5Backend:
        return cls(h5py.File(path, "r+" if writable else "r", libver=_H5_LIBVER if writable else None))

    def read_attrs(self) -> dict[str, Any]:
        return _read_h5_attrs(dict(self.file.attrs))

    def set_attr(self, key: str, value: Any) -> None:
        if not _is_h5_native(value):
            raise TypeError(f"only scalar attributes can be updated in place, not {key}")
        self.file.attrs[key] = value

    def has(self, name: str) -> bool:
        return name in self.file

    def array(self, name: str) -> Any:
        node = self.file[name]
        if not isinstance(node, h5py.Dataset):
            raise TypeError(f"{name} is a group, not a dataset")
        # Strings read back as str, not bytes, like Zarr's.
        return node.asstr() if h5py.check_string_dtype(node.dtype) is not None else node

    def write_rows(self, name: str, start: int, stop: int, data: np.ndarray) -> None:
        self.file[name][start:stop] = data

    def chunk_present(self, name: str, i: int) -> bool:
        ds = self.file[name]
        offset = (i * ds.chunks[0],) + (0,) * (ds.ndim - 1)
        return ds.id.get_chunk_info_by_coord(offset).byte_offset is not None

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


def _create_h5_dataset(file: h5py.File, spec: ArraySpec, codec: Any) -> None:
    if spec.data is not None:
        file.create_dataset(spec.name, data=spec.data)
        return
    dtype = h5py.string_dtype() if spec.dtype == "str" else spec.dtype
    # HDF5 chunks may not be larger than a fixed-size dataset.
    rows = spec.shape[0] if spec.chunk_rows is None else min(spec.chunk_rows, spec.shape[0])
    file.create_dataset(spec.name, shape=spec.shape, dtype=dtype, chunks=(rows, *spec.shape[1:]),
                        fillvalue=None if spec.dtype == "str" else spec.fill,
                        **(codec if spec.compressed else {}))


def _is_h5_native(value: Any) -> bool:
    if isinstance(value, bool | str | float):
        return True
    return isinstance(value, int) and -(2**63) <= value < 2**63


def _write_h5_attrs(file: h5py.File, attrs: dict[str, Any]) -> None:
    json_keys = []
    for key, value in attrs.items():
        if _is_h5_native(value):
            file.attrs[key] = value
        else:
            file.attrs[key] = json.dumps(value)
            json_keys.append(key)
    file.attrs[JSON_KEYS_ATTR] = json.dumps(sorted(json_keys))


def _read_h5_attrs(raw: dict[str, Any]) -> dict[str, Any]:
    json_keys = set(json.loads(_text(raw.pop(JSON_KEYS_ATTR, "[]"))))
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


def _text(value: bytes | str) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else value


# ----------------------------------------------------------------------------- either format


Backend = ZarrBackend | HDF5Backend


@contextmanager
def close_on_error(backend: Backend) -> Iterator[Backend]:
    """Close ``backend`` if the block raises anything (KeyboardInterrupt included), then re-raise."""
    try:
        yield backend
    except BaseException:
        backend.close()
        raise


class BackendOwner:
    """Mixin for objects that hold an open store in ``_backend``: :meth:`close` and ``with`` blocks."""

    _backend: Backend | None

    def close(self) -> None:
        """Release the store without finalizing anything (safe to call twice)."""
        if self._backend is not None:
            self._backend.close()
            self._backend = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def create_backend(path: Path, specs: list[ArraySpec], attrs: dict[str, Any], codec: Any) -> Backend:
    return (ZarrBackend if store_format(path) == "zarr" else HDF5Backend).create(path, specs, attrs, codec)


def open_backend(path: Path, *, writable: bool) -> Backend:
    """Open an existing store, turning every way that can fail into one StoreError."""
    fmt = store_format(path)
    if not path.exists():
        raise StoreError(f"{path} does not exist.")
    try:
        if fmt == "zarr":
            return ZarrBackend.open(path, writable=writable)
        return HDF5Backend.open(path, writable=writable)
    except StoreError:
        raise
    except Exception as exc:  # zarr and h5py raise many types (OSError, JSON, KeyError ...)
        reason = first_line(exc)
        if fmt == "hdf5" and "lock" in reason.lower():
            raise StoreError(f"{path} is open in another process ({reason}).") from exc
        hint = ("; an HDF5 file whose writer was killed can be damaged: re-create it with --overwrite"
                if fmt == "hdf5" else "; if it is a damaged store, re-create it with --overwrite")
        kind = "Zarr group" if fmt == "zarr" else "HDF5 file"
        raise StoreError(f"{path} is not a readable {kind} ({reason}){hint}.") from exc
