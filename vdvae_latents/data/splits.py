"""One split of a data source: lazily (:class:`LazyImages`) or in memory (:class:`ImageSet`).

:func:`open_images` chooses the rows of a split (an int64 array of row numbers in the
source's own order, held once) and reads nothing else; :func:`load_images` reads those
rows into an :class:`ImageSet`. Both keep the provenance of every row:
``source_index`` (its position in the ``all`` split) and, for sources with file names
(image folders, packed stores, downsampled-ImageNet files), ``source_names``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..core.errors import DataError
from .image_folder import resize_images
from .readers import Reader
from .sources import open_reader

__all__ = ["SPLITS", "ImageSet", "LazyImages", "open_images", "load_images", "split_rows"]

SPLITS = ("train", "val", "test", "all")


@dataclass
class ImageSet:
    """One split of a data set, held in memory as uint8.

    ``images`` has shape (N, H, W, C) with C in {1, 3}; ``labels`` is int64 (N,) or
    None when the source has no labels. ``class_names`` is set when the labels come
    from class subfolder names (label i is ``class_names[i]``).

    Provenance: ``source_index`` (int64 (N,)) is each row's position in the source's
    own order, i.e. in the ``all`` split (the source's train part, then its test part),
    so ``load_images(spec, "all").images[source_index[i]]`` is row ``i``.
    ``source_names`` gives, for sources with file names, each row's name: the file path
    relative to an image folder (also kept by ``vdvl pack``), or ``<file>:<row>`` for
    downsampled-ImageNet batch files; None for other array sources.
    """

    images: np.ndarray
    labels: np.ndarray | None
    spec: str
    split: str
    class_names: tuple[str, ...] | None = None
    source_index: np.ndarray | None = None
    source_names: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.source_index is None:
            self.source_index = np.arange(len(self.images), dtype=np.int64)

    @property
    def shape(self) -> tuple[int, int, int]:
        """(H, W, C) of one image."""
        _, h, w, c = self.images.shape
        return (h, w, c)

    def __len__(self) -> int:
        return int(self.images.shape[0])


@dataclass(eq=False)
class LazyImages:
    """One split of a source, read on demand: random access by position, no pixels held.

    Positions ``0 .. len-1`` are the split's rows in the source's order; ``read``
    returns uint8 (n, H, W, C) images for any positions, ``subset``/``shard`` narrow the
    view without reading, ``batches`` streams it through a DataLoader (worker processes,
    pinned memory), ``load`` reads it all into an :class:`ImageSet`. ``labels``,
    ``source_index``, ``class_names`` and ``source_names`` mean what they mean on
    :class:`ImageSet`. A LazyImages pickles as paths and row numbers (DataLoader workers
    open their own file handles).
    """

    reader: Reader
    source_index: np.ndarray
    spec: str
    split: str
    resize: tuple[int, int] | None = None
    labels: np.ndarray | None = field(init=False)

    def __post_init__(self) -> None:
        self.source_index = np.asarray(self.source_index, dtype=np.int64)
        self.labels = None if self.reader.labels is None else self.reader.labels[self.source_index]

    @property
    def shape(self) -> tuple[int, int, int]:
        """(H, W, C) of one image (after ``resize``)."""
        if self.resize is None:
            return self.reader.shape
        return (*self.resize, self.reader.shape[2])

    @property
    def class_names(self) -> tuple[str, ...] | None:
        return self.reader.class_names

    @property
    def source_names(self) -> tuple[str, ...] | None:
        """Each row's file name (see :class:`ImageSet`), or None; built on request."""
        names = self.reader.names(self.source_index) if self.reader.has_names else None
        return None if names is None else tuple(names)

    @property
    def in_memory(self) -> bool:
        """True when the source is one array in memory (reading is a copy; workers gain nothing)."""
        return self.reader.in_memory

    def __len__(self) -> int:
        return len(self.source_index)

    def read(self, positions: np.ndarray | list[int] | slice | None = None) -> np.ndarray:
        """uint8 (n, H, W, C) images at ``positions`` of this split (all of it when None)."""
        rows = self.source_index if positions is None else self.source_index[_as_positions(positions, len(self))]
        images = self.reader.read(rows)
        if self.resize is not None and images.shape[1:3] != tuple(self.resize):
            images = resize_images(images, self.resize)
        return images

    def subset(self, positions: np.ndarray | list[int] | slice) -> LazyImages:
        """The rows at ``positions`` of this split, as a lazy view (nothing is read)."""
        rows = self.source_index[_as_positions(positions, len(self))]
        return LazyImages(self.reader, rows, self.spec, self.split, self.resize)

    def split_as(self, split: str, *, seed: int = 0, val_fraction: float = 0.1, test_fraction: float = 0.1,
                 limit: int | None = None) -> LazyImages:
        """Another split of the same source (as :func:`open_images` would choose it), sharing this
        one's reader: an image folder's headers are not read again."""
        return _split_of(self.reader, self.spec, split, seed, val_fraction, test_fraction, self.resize, limit)

    def shard(self, rank: int, world_size: int) -> LazyImages:
        """Process ``rank``'s share under torchrun: every ``world_size``-th row from ``rank``."""
        return self.subset(slice(rank, None, world_size))

    def batches(self, batch_size: int, *, workers: int = 0, pin_memory: bool = False, prefetch: int = 2):
        """Consecutive batches (:class:`~.loading.Batch`: uint8 NCHW images, labels, positions),
        read ahead by ``workers`` processes; re-iterable."""
        from .loading import consecutive

        return self.loader(consecutive(len(self), batch_size), workers=workers, pin_memory=pin_memory,
                           prefetch=prefetch)

    def loader(self, batches, *, workers: int = 0, pin_memory: bool = False, prefetch: int = 2):
        """Batches at the positions ``batches`` lists (an iterable of int arrays), as :meth:`batches` does."""
        from .loading import BatchLoader

        return BatchLoader(self, batches, workers=workers, pin_memory=pin_memory, prefetch=prefetch)

    def load(self) -> ImageSet:
        """Read every row into memory."""
        return ImageSet(self.read(), self.labels, self.spec, self.split, self.class_names, self.source_index.copy(),
                        self.source_names)


def _as_positions(positions: np.ndarray | list[int] | slice, n: int) -> np.ndarray | slice:
    if isinstance(positions, slice):
        return positions
    positions = np.asarray(positions, dtype=np.int64)
    if positions.size and (positions.min() < -n or positions.max() >= n):
        raise IndexError(f"positions {positions.min()}..{positions.max()} are outside a split of {n} images")
    return positions


# ----------------------------------------------------------------------- public API


def open_images(
    spec: str,
    split: str = "train",
    *,
    seed: int = 0,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    resize: tuple[int, int] | None = None,
    limit: int | None = None,
) -> LazyImages:
    """One split of the data set named by ``spec``, read lazily (see :class:`LazyImages`).

    Where the source has its own train/test split, ``test`` is the source's test set
    and ``val`` is a seeded ``val_fraction`` slice of the source's train set (``train``
    is the rest). Otherwise a seeded permutation assigns ``test_fraction`` of the
    images to ``test``, ``val_fraction`` to ``val`` and the rest to ``train``. ``all``
    is everything in its original order. Selected images keep their original order.

    ``resize`` is (H, W); images are resized with Pillow (bicubic, antialiased).
    ``limit`` keeps the first N images of the split.
    """
    check_split_options(split, val_fraction, test_fraction, resize, limit)  # before any file is opened
    return _split_of(open_reader(spec, resize), spec, split, seed, val_fraction, test_fraction, resize, limit)


def _split_of(reader: Reader, spec: str, split: str, seed: int, val_fraction: float, test_fraction: float,
              resize: tuple[int, int] | None, limit: int | None) -> LazyImages:
    check_split_options(split, val_fraction, test_fraction, resize, limit)
    rows = split_rows(reader.n_rows, reader.n_train, split, seed, val_fraction, test_fraction)
    if limit is not None:
        rows = rows[:limit]
    if len(rows) == 0:
        raise DataError(f"the '{split}' split of data spec '{spec}' is empty")
    return LazyImages(reader, rows, spec, split, resize)


def load_images(spec: str, split: str = "train", **options) -> ImageSet:
    """:func:`open_images` (same ``seed``, ``val_fraction``, ``test_fraction``, ``resize`` and
    ``limit`` options) read into memory: only the split's rows, and only ``limit`` of them, are read."""
    return open_images(spec, split, **options).load()


def split_rows(n_rows: int, n_train: int | None, split: str, seed: int, val_fraction: float,
               test_fraction: float) -> np.ndarray:
    """Sorted int64 row numbers of ``split`` in a source of ``n_rows`` (own split: ``n_train`` train rows)."""
    if split == "all":
        return np.arange(n_rows, dtype=np.int64)
    rng = np.random.default_rng(seed)
    if n_train is not None:  # own split: carve val out of the source's train set
        if split == "test":
            return np.arange(n_train, n_rows, dtype=np.int64)
        order = rng.permutation(n_train)
        n_val = round(val_fraction * n_train)
        chosen = order[:n_val] if split == "val" else order[n_val:]
    else:
        order = rng.permutation(n_rows)
        n_test, n_val = round(test_fraction * n_rows), round(val_fraction * n_rows)
        chosen = {"test": order[:n_test], "val": order[n_test:n_test + n_val], "train": order[n_test + n_val:]}[split]
    return np.sort(chosen).astype(np.int64)


def check_split_options(
    split: str,
    val_fraction: float,
    test_fraction: float,
    resize: tuple[int, int] | None,
    limit: int | None,
) -> None:
    if split not in SPLITS:
        raise DataError(f"split '{split}' is unknown; choose one of {', '.join(SPLITS)}")
    for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0.0 <= value < 1.0:
            raise DataError(f"{name} must be in [0, 1), got {value}")
    if val_fraction + test_fraction >= 1.0:
        raise DataError(f"val_fraction + test_fraction must be below 1, got {val_fraction + test_fraction}")
    if resize is not None and (len(resize) != 2 or min(resize) < 1):
        raise DataError(f"resize must be two positive sizes (H, W), got {resize}")
    if limit is not None and limit < 1:
        raise DataError(f"limit must be a positive number of images, got {limit}")
