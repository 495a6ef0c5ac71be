"""Small sources read whole into memory: digits, Fashion-MNIST, IDX files, CIFAR-10.

They are at most a few hundred MB and stored in formats without random access (gzip,
pickles, fixed records), so each becomes one :class:`~.readers.ArrayReader`; forked
DataLoader workers share its pages instead of copying them.
"""

from __future__ import annotations

import gzip
import io
import math
import pickle
import re
import struct
import sys
import zlib
from pathlib import Path

import numpy as np

from ..core.errors import DataError
from .readers import ArrayReader, array_reader, concat_readers

#: Where the Debian package ``dataset-fashion-mnist`` installs its IDX files.
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
CIFAR_RECORD = 1 + 3 * 32 * 32  # one label byte, then the image in CHW order


def read_digits() -> ArrayReader:
    flat = _digits_table()
    # Values are integers 0..16; spread them over the full uint8 range.
    images = np.rint(flat[:, :64].reshape(-1, 8, 8) * (255.0 / 16.0)).astype(np.uint8)[..., None]
    return ArrayReader(images, flat[:, 64].astype(np.int64), "digits")


def _digits_table() -> np.ndarray:
    """scikit-learn's digits as its (1797, 65) table: 64 pixels (0..16) and the label per row.

    Read from the file scikit-learn ships (``sklearn/datasets/data/digits.csv.gz``, what
    ``load_digits`` parses) without importing scikit-learn, whose import takes longer than
    everything else a digits command does before its model runs (3 s of a 30-step training
    on a 2-core machine); through ``load_digits`` where the file is not found."""
    import importlib.util

    spec = importlib.util.find_spec("sklearn")  # locates the package without running its __init__
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in folders:
        path = Path(folder) / "datasets" / "data" / "digits.csv.gz"
        if path.is_file():
            return np.loadtxt(path, delimiter=",")
    from sklearn.datasets import load_digits

    digits = load_digits()
    return np.concatenate([digits.data, digits.target[:, None]], axis=1)


def read_fashion_mnist() -> ArrayReader:
    # Looked up on the package at call time, so that setting vdvae_latents.data.FASHION_MNIST_DIR
    # (a test, or a user with the files elsewhere) takes effect.
    folder = sys.modules[__package__].FASHION_MNIST_DIR
    if find_idx_images(folder, "train") is None:
        raise DataError(
            f"fashion-mnist is not installed in {folder}; install the Debian package "
            "dataset-fashion-mnist (apt-get install dataset-fashion-mnist) or pass a folder of IDX files"
        )
    return read_idx_folder(folder)


# ----------------------------------------------------------------------------- IDX

_IDX_TYPES = {
    0x08: "unsigned byte",
    0x09: "signed byte",
    0x0B: "short",
    0x0C: "int",
    0x0D: "float",
    0x0E: "double",
}


def looks_like_idx(path: Path) -> bool:
    """IDX by name (idx/ubyte/.gz), or by its first two bytes being zero."""
    name = path.name.lower()
    if "idx" in name or "ubyte" in name or name.endswith(".gz"):
        return True
    with path.open("rb") as f:
        return f.read(2) == b"\x00\x00"


def _read_idx_array(path: Path) -> np.ndarray:
    """Parse one IDX file (gzipped or raw) into a uint8 array of its header's shape."""
    try:
        with path.open("rb") as f:
            raw = f.read()
        if raw[:2] == b"\x1f\x8b":  # gzip magic, whatever the file is called
            raw = gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"IDX file {path} cannot be read or decompressed ({exc})") from exc

    # Header: two zero bytes, a type byte, a dimension count, then big-endian uint32 dims.
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[3] == 0:
        raise DataError(f"IDX file {path} has a bad header (it does not start with an IDX magic number)")
    dtype_code, ndim = raw[2], raw[3]
    if dtype_code != 0x08:
        kind = _IDX_TYPES.get(dtype_code, f"unknown type 0x{dtype_code:02x}")
        raise DataError(f"IDX file {path} holds {kind} values, but only unsigned bytes (type 0x08) are supported")
    start = 4 + 4 * ndim
    if len(raw) < start:
        raise DataError(f"IDX file {path} is truncated inside its header")
    dims = struct.unpack(f">{ndim}I", raw[4:start])
    expected = math.prod(dims)
    if len(raw) - start != expected:
        raise DataError(
            f"IDX file {path} has {len(raw) - start} data bytes but its header shape {dims} needs {expected}"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=start).reshape(dims)


def _idx_labels_for(images_path: Path) -> Path | None:
    """The labels file that matches an images file by name (images-idx3 -> labels-idx1)."""
    name = images_path.name
    if "images" not in name:
        return None
    stem = name.replace("images", "labels").replace("idx3", "idx1").removesuffix(".gz")
    for candidate in (stem, stem + ".gz"):
        if (images_path.parent / candidate).is_file():
            return images_path.parent / candidate
    return None


def read_idx_file(images_path: Path) -> ArrayReader:
    """One IDX images file, with the labels file beside it that matches it by name."""
    images = _read_idx_array(images_path)
    labels_path = _idx_labels_for(images_path)
    labels = None if labels_path is None else _read_idx_array(labels_path)
    return array_reader(images, labels, str(images_path), labels_where=str(labels_path))


def find_idx_images(folder: Path, which: str) -> Path | None:
    """The folder's ``train`` or test (``t10k``/``test``) images file, if exactly one."""
    prefixes = ("train",) if which == "train" else ("t10k", "test")
    if not folder.is_dir():
        return None
    found = sorted(
        p
        for p in folder.iterdir()
        if p.is_file() and any(p.name.removesuffix(".gz").endswith(f"{x}-images-idx3-ubyte") for x in prefixes)
    )
    if len(found) > 1:
        names = ", ".join(p.name for p in found)
        raise DataError(f"IDX folder {folder} has more than one {which} images file ({names})")
    return found[0] if found else None


def read_idx_folder(folder: Path) -> ArrayReader:
    train_path = find_idx_images(folder, "train")
    assert train_path is not None  # callers check first
    train = read_idx_file(train_path)
    test_path = find_idx_images(folder, "test")
    test = None if test_path is None else read_idx_file(test_path)
    if test is None:
        return train
    if test.shape != train.shape:
        raise DataError(f"IDX file {test_path} has images of shape {test.shape}, unlike {train_path}")
    return concat_readers(train, test, str(folder))


# -------------------------------------------------------------------------- CIFAR-10


def _cifar_batches(folder: Path, suffix: str) -> tuple[list[Path], Path]:
    """data_batch_<n> files in numeric order, and the test batch (which must exist)."""
    pattern = re.compile(rf"data_batch_(\d+){re.escape(suffix)}")
    numbered = []
    for p in folder.iterdir():
        match = pattern.fullmatch(p.name)
        if match:
            numbered.append((int(match[1]), p))
    test = folder / f"test_batch{suffix}"
    if not test.is_file():
        raise DataError(f"CIFAR-10 folder {folder} has no {test.name}")
    return [p for _, p in sorted(numbered)], test


def read_cifar_binary(folder: Path) -> ArrayReader:
    train_files, test_file = _cifar_batches(folder, ".bin")
    return _cifar_source(folder, [_read_cifar_binary_batch(p) for p in train_files], _read_cifar_binary_batch(test_file))


def _cifar_source(folder: Path, train: list[ArrayReader], test: ArrayReader) -> ArrayReader:
    images = np.concatenate([b.images for b in train])
    labels = np.concatenate([b.labels for b in train])
    return concat_readers(ArrayReader(images, labels, str(folder)), test, f"CIFAR-10 folder {folder}")


def _read_cifar_binary_batch(path: Path) -> ArrayReader:
    raw = path.read_bytes()
    if not raw or len(raw) % CIFAR_RECORD:
        raise DataError(
            f"CIFAR-10 file {path} has {len(raw)} bytes, "
            f"which is not a whole number of {CIFAR_RECORD}-byte records"
        )
    records = np.frombuffer(raw, dtype=np.uint8).reshape(-1, CIFAR_RECORD)
    images = records[:, 1:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return ArrayReader(np.ascontiguousarray(images), records[:, 0].astype(np.int64), str(path))


def _numpy_pickle_globals() -> dict[tuple[str, str], object]:
    """The only globals a CIFAR python batch may reference: numpy array rebuilding."""
    try:  # numpy >= 2 (and 1.26's forward-compatibility aliases)
        from numpy._core import multiarray, numeric
    except ImportError:  # pragma: no cover - older numpy
        from numpy.core import multiarray, numeric  # type: ignore[no-redef]
    reconstruct = multiarray._reconstruct
    allowed: dict[tuple[str, str], object] = {
        ("numpy.core.multiarray", "_reconstruct"): reconstruct,
        ("numpy._core.multiarray", "_reconstruct"): reconstruct,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
    }
    # Pickle protocol 5 (Python's default) rebuilds arrays from a buffer instead.
    frombuffer = getattr(numeric, "_frombuffer", None)
    if frombuffer is not None:
        allowed[("numpy.core.numeric", "_frombuffer")] = frombuffer
        allowed[("numpy._core.numeric", "_frombuffer")] = frombuffer
    return allowed


class _RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that can only rebuild numpy arrays; any other global is refused.

    Plain pickle would run whatever callable the file names (e.g. os.system), so a
    user's file must never reach it.
    """

    _allowed = _numpy_pickle_globals()

    def find_class(self, module: str, name: str) -> object:
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"it references the disallowed global {module}.{name}") from None


def read_cifar_python(folder: Path) -> ArrayReader:
    train_files, test_file = _cifar_batches(folder, "")
    return _cifar_source(folder, [_read_cifar_python_batch(p) for p in train_files], _read_cifar_python_batch(test_file))


def _read_cifar_python_batch(path: Path) -> ArrayReader:
    try:
        # encoding="bytes": the official files are Python 2 pickles with byte-string keys.
        batch = _RestrictedUnpickler(io.BytesIO(path.read_bytes()), encoding="bytes").load()
    except Exception as exc:  # noqa: BLE001 - a hostile or corrupt pickle can fail in many ways
        raise DataError(f"CIFAR-10 python batch {path} was refused or is corrupt: {exc}") from exc
    if not isinstance(batch, dict):
        raise DataError(f"CIFAR-10 python batch {path} does not hold a dictionary")
    data = batch.get(b"data", batch.get("data"))
    labels = batch.get(b"labels", batch.get("labels"))
    if not isinstance(data, np.ndarray) or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise DataError(f"CIFAR-10 python batch {path} has no 'data' array of shape (N, 3072)")
    if labels is None:
        raise DataError(f"CIFAR-10 python batch {path} has no 'labels' entry")
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return array_reader(np.ascontiguousarray(images), np.asarray(labels), str(path))
