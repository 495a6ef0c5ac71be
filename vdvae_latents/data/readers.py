"""Random access by row to one data source: what every source kind becomes.

A :class:`Reader` holds ``n_rows`` images of one ``shape`` (H, W, C), C in {1, 3},
numbered in the source's own order: its train part first, then its test part where
the source has its own split (``n_train`` rows of train), i.e. the order of the ``all``
split. Labels (int64) and file names are small and held in memory; pixels are read
only when :meth:`Reader.read` asks for rows.

Readers that need file handles (HDF5, Zarr, memory maps) open them lazily in the
process that reads (:class:`ProcessLocal`): a reader pickles as its paths, so each
DataLoader worker opens its own handles and none copies the data or shares a handle
across ``fork``. Small sources (digits, IDX, CIFAR, compressed archives) are one
in-memory array behind the same interface (:class:`ArrayReader`); forked workers share
its pages.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import numpy as np

from ..core.errors import DataError

__all__ = ["Reader", "ArrayReader", "ProcessLocal", "runs", "image_shape", "checked_labels", "as_uint8"]


class Reader:
    """Random access to the images of one source, by row number in the source's own order."""

    where: str = ""                               # names the source in messages
    shape: tuple[int, int, int] = (0, 0, 0)       # (H, W, C) of every image
    n_rows: int = 0
    n_train: int | None = None                    # own split: rows [0, n_train) are train, the rest test
    labels: np.ndarray | None = None              # int64 (n_rows,)
    class_names: tuple[str, ...] | None = None
    in_memory: bool = False                       # the pixels are one array in this process

    @property
    def has_names(self) -> bool:
        """Whether rows carry file names (:meth:`names`)."""
        return False

    def names(self, rows: np.ndarray) -> list[str] | None:
        """The file names (relative paths) of ``rows``, or None when the source has none."""
        return None

    def read(self, rows: np.ndarray | list[int]) -> np.ndarray:
        """uint8 (len(rows), H, W, C) images of ``rows``, in the order given (repeats allowed)."""
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        if rows.size == 0:
            return np.empty((0, *self.shape), dtype=np.uint8)
        if rows.min() < 0 or rows.max() >= self.n_rows:
            raise IndexError(f"rows {rows.min()}..{rows.max()} are outside {self.where}'s {self.n_rows} images")
        if rows.size == 1 or bool(np.all(np.diff(rows) > 0)):
            return self._read_sorted(rows)
        # Sources read fastest in increasing order (chunks once, runs as slices).
        unique, inverse = np.unique(rows, return_inverse=True)
        return self._read_sorted(unique)[inverse]

    def _read_sorted(self, rows: np.ndarray) -> np.ndarray:
        """Images of strictly increasing ``rows``."""
        raise NotImplementedError


class ArrayReader(Reader):
    """A source held in memory as one uint8 (N, H, W, C) array."""

    in_memory = True

    def __init__(self, images: np.ndarray, labels: np.ndarray | None, where: str, *, n_train: int | None = None,
                 class_names: tuple[str, ...] | None = None) -> None:
        self.images, self.labels, self.where = images, labels, where
        self.n_rows, self.shape = len(images), tuple(images.shape[1:])
        self.n_train, self.class_names = n_train, class_names

    def _read_sorted(self, rows: np.ndarray) -> np.ndarray:
        return self.images[rows]


class ProcessLocal:
    """Mixin for readers with handles: ``handle()`` is opened once per process, never pickled."""

    _handle: object = None
    _pid: int | None = None

    def _open(self) -> object:
        raise NotImplementedError

    def handle(self) -> object:
        if self._handle is None or self._pid != os.getpid():
            self._handle, self._pid = self._open(), os.getpid()
        return self._handle

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_handle"], state["_pid"] = None, None
        return state


# ----------------------------------------------------------------------- helpers


def runs(rows: np.ndarray) -> Iterator[tuple[int, int]]:
    """Strictly increasing ``rows`` as maximal [start, stop) runs of consecutive numbers."""
    breaks = np.flatnonzero(np.diff(rows) != 1) + 1
    for part in np.split(rows, breaks):
        yield int(part[0]), int(part[-1]) + 1


def image_shape(shape: tuple[int, ...], where: str) -> tuple[int, int, int]:
    """(H, W, C) of an (N, H, W) or (N, H, W, C) image array, C in {1, 3}, H and W at least 1."""
    if len(shape) not in (3, 4) or (len(shape) == 4 and shape[3] not in (1, 3)) or min(shape[1:3]) < 1:
        raise DataError(
            f"images in {where} have shape {tuple(shape)}; expected (N, H, W) or (N, H, W, C) with C 1 or 3"
        )
    return (shape[1], shape[2], shape[3] if len(shape) == 4 else 1)


def check_pixel_dtype(dtype: np.dtype, where: str) -> None:
    """Refuse pixel types that are not integers (checked before any pixel is read)."""
    if dtype == np.uint8 or dtype.kind in "iu":
        return
    if dtype.kind == "f":
        raise DataError(f"images in {where} are floating point ({dtype}); store them as uint8 0..255")
    raise DataError(f"images in {where} have dtype {dtype}; expected uint8 0..255")


def as_uint8(array: np.ndarray, where: str) -> np.ndarray:
    """uint8 (N, H, W, C): integer pixels in 0..255 are cast, anything else is refused."""
    array = np.asarray(array)
    if array.ndim == 3:
        array = array[..., None]
    image_shape(array.shape, where)
    check_pixel_dtype(array.dtype, where)
    if array.dtype == np.uint8:
        return array
    if array.size and (array.min() < 0 or array.max() > 255):
        raise DataError(
            f"images in {where} have values from {array.min()} to {array.max()}, outside the uint8 range 0..255"
        )
    return array.astype(np.uint8)


def checked_labels(labels: object, n_images: int, where: str) -> np.ndarray:
    """Labels as int64 (n_images,); whole-number floats (common in HDF5 exports) are accepted."""
    labels = np.asarray(labels)
    if labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.ndim != 1:
        raise DataError(f"labels of {where} must be one-dimensional, got shape {labels.shape}")
    if len(labels) != n_images:
        raise DataError(f"{where} has {len(labels)} labels for {n_images} images")
    if labels.dtype.kind == "f" and np.all(np.isfinite(labels)) and np.all(labels == np.round(labels)):
        pass
    elif labels.dtype.kind not in "iub":
        raise DataError(f"labels of {where} must be integers, got {labels.dtype}")
    return labels.astype(np.int64)


def array_reader(images: object, labels: object | None, where: str, labels_where: str | None = None,
                 **kwargs) -> ArrayReader:
    """Validate an in-memory source: uint8 NHWC images and int64 labels of matching length."""
    images = as_uint8(images, where)
    if labels is not None:
        labels = checked_labels(labels, len(images), labels_where or where)
    return ArrayReader(images, labels, where, **kwargs)


def concat_readers(train: ArrayReader, test: ArrayReader, where: str) -> ArrayReader:
    """An in-memory source with its own split: train rows, then test rows."""
    if train.shape != test.shape:
        raise DataError(f"{where} has train images of shape {train.shape} but test images of shape {test.shape}")
    labels = None
    if train.labels is not None and test.labels is not None:
        labels = np.concatenate([train.labels, test.labels])
    return ArrayReader(np.concatenate([train.images, test.images]), labels, where, n_train=train.n_rows)
