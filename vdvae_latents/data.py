"""Loading image data sets into memory and turning batches into model input.

Every source is read once into a uint8 array of shape (N, H, W, C) with C in {1, 3}
(cheap to keep in memory); conversion to float happens per batch in
:func:`to_model_input`. A *spec* string names the source:

* ``digits`` - scikit-learn's bundled 8x8 digits;
* ``fashion-mnist`` - the IDX files of the Debian package ``dataset-fashion-mnist``;
* an IDX file (raw or ``.gz``) or a folder of IDX files;
* a ``.npy`` or ``.npz`` file of uint8 arrays;
* a folder of images (png/jpg/jpeg/bmp), optionally one subfolder per class;
* a CIFAR-10 folder (binary or python version);
* ``file.h5:images[,labels]``, ``file.hdf5:...`` or ``store.zarr:images[,labels]``.

Every problem with the user's data raises :class:`~vdvae_latents.errors.DataError`
with one sentence naming the file (or spec) and what is wrong.
"""

from __future__ import annotations

import gzip
import io
import math
import pickle
import re
import struct
import zlib
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from vdvae_latents.errors import DataError

__all__ = [
    "ImageSet",
    "ImageDataset",
    "load_images",
    "to_model_input",
    "binarize",
    "describe_sources",
    "FASHION_MNIST_DIR",
    "SPLITS",
]

SPLITS = ("train", "val", "test", "all")

#: Where the Debian package ``dataset-fashion-mnist`` installs its IDX files.
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")

_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp"}
_DEEP_MODES = {"I", "I;16", "I;16B", "I;16L", "F"}  # 16/32-bit pixels would be clipped, not scaled
_ARRAY_STORE_RE = re.compile(r"^(?P<path>.+\.(?:h5|hdf5|zarr))/?(?::(?P<inner>.*))?$", re.IGNORECASE)
_CIFAR_RECORD = 1 + 3 * 32 * 32  # one label byte, then the image in CHW order


# --------------------------------------------------------------------------- types


@dataclass
class ImageSet:
    """One split of a data set, held in memory as uint8.

    ``images`` has shape (N, H, W, C) with C in {1, 3}; ``labels`` is int64 (N,) or
    None when the source has no labels. ``class_names`` is set when the labels come
    from class subfolder names (label i is ``class_names[i]``).

    Provenance: ``source_index`` (int64 (N,)) is each row's position in the source's
    own order, i.e. in the ``all`` split (the source's train part, then its test part),
    so ``load_images(spec, "all").images[source_index[i]]`` is row ``i``.
    ``source_names`` gives, for image folders, each row's file path relative to the
    folder (None for array sources).
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


@dataclass
class _Part:
    images: np.ndarray  # uint8 (N, H, W, C)
    labels: np.ndarray | None  # int64 (N,)
    index: np.ndarray | None = None  # int64 (N,) positions in the source's `all` order
    names: tuple[str, ...] | None = None  # file paths relative to an image folder


@dataclass
class _Source:
    """What a reader returns: all data, or the source's own train/test split."""

    train: _Part  # everything, when the source has no split of its own
    test: _Part | None = None
    class_names: tuple[str, ...] | None = None


# ----------------------------------------------------------------------- public API


def load_images(
    spec: str,
    split: str = "train",
    *,
    seed: int = 0,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    resize: tuple[int, int] | None = None,
    limit: int | None = None,
) -> ImageSet:
    """Read the data set named by ``spec`` and return one split of it.

    Where the source has its own train/test split, ``test`` is the source's test set
    and ``val`` is a seeded ``val_fraction`` slice of the source's train set (``train``
    is the rest). Otherwise a seeded permutation assigns ``test_fraction`` of the
    images to ``test``, ``val_fraction`` to ``val`` and the rest to ``train``. ``all``
    is everything in its original order. Selected images keep their original order.

    ``resize`` is (H, W); images are resized with Pillow (bicubic, antialiased).
    ``limit`` keeps the first N images of the split.
    """
    _check_options(split, val_fraction, test_fraction, resize, limit)
    source = _read_source(spec, resize)
    _number_rows(source)
    part = _select_split(source, split, seed, val_fraction, test_fraction)
    images, labels, index, names = part.images, part.labels, part.index, part.names
    if limit is not None:
        images, index = images[:limit], index[:limit]
        labels = None if labels is None else labels[:limit]
        names = None if names is None else names[:limit]
    if len(images) == 0:
        raise DataError(f"the '{split}' split of data spec '{spec}' is empty")
    if resize is not None and images.shape[1:3] != tuple(resize):
        images = _resize_array(images, resize)
    # Readers may hand back views of read-only buffers; torch.from_numpy warns on those.
    if not images.flags.writeable:
        images = images.copy()
    return ImageSet(images, labels, spec, split, source.class_names, index, names)


def to_model_input(
    images: np.ndarray | torch.Tensor,
    n_bits: int = 8,
    pad_to: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Turn a uint8 batch into float32 NCHW model input in [-1, 1].

    Pixels are reduced to ``n_bits`` bits (``k = x >> (8 - n_bits)``) and mapped to
    ``2k / (2**n_bits - 1) - 1``, so every value lies on the 2**n_bits-level grid.
    A numpy array is taken as NHWC (the layout of :attr:`ImageSet.images`); a torch
    tensor is taken as NCHW (the layout :class:`ImageDataset` yields) and stays on its
    device. ``pad_to`` (H, W) pads symmetrically with -1 (the lowest level), any odd
    remainder going to the bottom/right, e.g. 28 -> 32 adds 2 on each side.
    """
    if not 1 <= n_bits <= 8:
        raise ValueError(f"n_bits must be between 1 and 8, got {n_bits}")
    if isinstance(images, np.ndarray):
        if images.ndim != 4 or images.dtype != np.uint8:
            raise ValueError(f"expected a uint8 NHWC array, got {images.dtype} of shape {images.shape}")
        # np.require copies only when needed (read-only or strided input).
        batch = torch.from_numpy(np.require(images, requirements=["C", "W"])).permute(0, 3, 1, 2)
    elif isinstance(images, torch.Tensor):
        if images.ndim != 4:
            raise ValueError(f"expected a uint8 NCHW tensor, got shape {tuple(images.shape)}")
        batch = images
    else:
        raise TypeError(f"expected a numpy array or torch tensor, got {type(images).__name__}")
    if batch.dtype != torch.uint8:
        raise ValueError(f"expected uint8 pixels, got {batch.dtype}")

    levels = 2**n_bits - 1
    k = batch >> (8 - n_bits)
    x = (k.to(torch.float32) * 2.0) / levels - 1.0
    if pad_to is not None:
        x = _pad(x, pad_to)
    return x.contiguous()


def binarize(
    images_01: torch.Tensor,
    generator: torch.Generator | None = None,
    fixed: bool = False,
) -> torch.Tensor:
    """Binarise pixel intensities in [0, 1] to {0, 1} (same dtype and device).

    By default each pixel is an independent Bernoulli(p) draw (dynamic binarisation,
    for training; pass ``generator`` for reproducible draws, on the tensor's device).
    With ``fixed=True`` the result is deterministic for evaluation: a pixel is 1 when
    its intensity is >= 0.5 and 0 otherwise.
    """
    if not images_01.is_floating_point():
        raise TypeError(f"binarize expects float intensities in [0, 1], got {images_01.dtype}")
    if fixed:
        return (images_01 >= 0.5).to(images_01.dtype)
    return torch.bernoulli(images_01, generator=generator)


class ImageDataset(torch.utils.data.Dataset):
    """A map-style dataset over an :class:`ImageSet`.

    ``dataset[i]`` is ``(uint8 tensor (C, H, W), label)`` with label -1 when the set
    has no labels. The images are converted to one contiguous NCHW tensor up front so
    that an item is just an index, with no per-item decoding or copying.
    """

    def __init__(self, data: ImageSet) -> None:
        self.data = data
        self._images = torch.from_numpy(np.ascontiguousarray(data.images.transpose(0, 3, 1, 2)))
        if data.labels is None:
            self._labels = torch.full((len(data),), -1, dtype=torch.int64)
        else:
            self._labels = torch.from_numpy(np.asarray(data.labels, dtype=np.int64))

    @property
    def images(self) -> torch.Tensor:
        """All images as one uint8 (N, C, H, W) tensor (index it with a batch of rows)."""
        return self._images

    @property
    def labels(self) -> torch.Tensor:
        """int64 (N,), -1 where unknown."""
        return self._labels

    def __len__(self) -> int:
        return int(self._images.shape[0])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self._images[index], int(self._labels[index])


def describe_sources() -> list[tuple[str, str]]:
    """(spec form, description) pairs for the CLI's help text."""
    return [
        ("digits", "scikit-learn's bundled 8x8 digits (1797 images, labels 0-9)"),
        ("fashion-mnist", f"Fashion-MNIST 28x28, Debian package dataset-fashion-mnist ({FASHION_MNIST_DIR})"),
        ("PATH/*-images-idx3-ubyte[.gz]", "one IDX images file (+ a labels file beside it matching by name)"),
        ("PATH/ (IDX folder)", "train-/t10k-images-idx3-ubyte[.gz] (+ labels); own train/test split"),
        ("PATH.npy", "uint8 array (N,H,W) or (N,H,W,C), C in {1,3}"),
        ("PATH.npz", "keys images|x (+ labels|y), or x_train/y_train/x_test/y_test for an own split"),
        ("PATH/ (image folder)", "png/jpg/jpeg/bmp; class subfolders (sorted) give labels; one size unless resized"),
        ("PATH/ (CIFAR-10 folder)", "binary (data_batch_N.bin, test_batch.bin) or python (pickled) version"),
        ("FILE.h5:images[,labels]", "arrays in an HDF5 file (.h5/.hdf5); default: images (+ labels if present)"),
        ("STORE.zarr:images[,labels]", "arrays in a Zarr store; default: images (+ labels if present)"),
    ]


# ------------------------------------------------------------------------ dispatch


def _read_source(spec: str, resize: tuple[int, int] | None) -> _Source:
    """Pick the reader for ``spec``; named data sets win over same-named paths."""
    if spec == "digits":
        return _read_digits()
    if spec == "fashion-mnist":
        return _read_fashion_mnist()
    store = _ARRAY_STORE_RE.match(spec)
    if store is not None:
        return _read_array_store(Path(store["path"]).expanduser(), store["inner"])

    path = Path(spec).expanduser()
    if not path.exists():
        raise DataError(
            f"data spec '{spec}' is not a known dataset or an existing path "
            "(known datasets: digits, fashion-mnist)"
        )
    if path.is_dir():
        return _read_folder(path, resize)
    suffix = path.suffix.lower()
    if suffix == ".npy":
        return _read_npy(path)
    if suffix == ".npz":
        return _read_npz(path)
    if _looks_like_idx(path):
        return _read_idx_file(path)
    raise DataError(
        f"data file {path} is not a recognised format (expected an IDX file, .npy, .npz, .h5/.hdf5 or .zarr)"
    )


def _read_folder(folder: Path, resize: tuple[int, int] | None) -> _Source:
    if (folder / "data_batch_1.bin").is_file():
        return _read_cifar_binary(folder)
    if (folder / "data_batch_1").is_file():
        return _read_cifar_python(folder)
    if _find_idx_images(folder, "train") is not None:
        return _read_idx_folder(folder)
    return _read_image_folder(folder, resize)


# ------------------------------------------------------------------ named data sets


def _read_digits() -> _Source:
    from sklearn.datasets import load_digits  # imported lazily: sklearn is slow to import

    digits = load_digits()
    # Values are integers 0..16; spread them over the full uint8 range.
    images = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    return _Source(_Part(images, digits.target.astype(np.int64)))


def _read_fashion_mnist() -> _Source:
    if _find_idx_images(FASHION_MNIST_DIR, "train") is None:
        raise DataError(
            f"fashion-mnist is not installed in {FASHION_MNIST_DIR}; install the Debian package "
            "dataset-fashion-mnist (apt-get install dataset-fashion-mnist) or pass a folder of IDX files"
        )
    return _read_idx_folder(FASHION_MNIST_DIR)


# ----------------------------------------------------------------------------- IDX

_IDX_TYPES = {
    0x08: "unsigned byte",
    0x09: "signed byte",
    0x0B: "short",
    0x0C: "int",
    0x0D: "float",
    0x0E: "double",
}


def _looks_like_idx(path: Path) -> bool:
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


def _read_idx_part(images_path: Path) -> _Part:
    images = _read_idx_array(images_path)
    labels_path = _idx_labels_for(images_path)
    labels = None if labels_path is None else _read_idx_array(labels_path)
    return _checked_part(images, labels, str(images_path), labels_where=str(labels_path))


def _read_idx_file(path: Path) -> _Source:
    return _Source(_read_idx_part(path))


def _find_idx_images(folder: Path, which: str) -> Path | None:
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


def _read_idx_folder(folder: Path) -> _Source:
    train_path = _find_idx_images(folder, "train")
    assert train_path is not None  # callers check first
    train = _read_idx_part(train_path)
    test_path = _find_idx_images(folder, "test")
    test = None if test_path is None else _read_idx_part(test_path)
    if test is not None and test.images.shape[1:] != train.images.shape[1:]:
        raise DataError(f"IDX file {test_path} has images of shape {test.images.shape[1:]}, unlike {train_path}")
    return _Source(train, test)


# ---------------------------------------------------------------------- numpy files


def _read_npy(path: Path) -> _Source:
    try:
        images = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise DataError(f"numpy file {path} cannot be read as a plain array ({exc})") from exc
    return _Source(_checked_part(images, None, str(path)))


def _read_npz(path: Path) -> _Source:
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {key: npz[key] for key in npz.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise DataError(f"numpy archive {path} cannot be read as plain arrays ({exc})") from exc

    if "x_train" in arrays or "x_test" in arrays:
        if "x_train" not in arrays or "x_test" not in arrays:
            raise DataError(f"numpy archive {path} must hold both x_train and x_test for its own split")
        train = _checked_part(arrays["x_train"], arrays.get("y_train"), f"{path} (x_train)")
        test = _checked_part(arrays["x_test"], arrays.get("y_test"), f"{path} (x_test)")
        if train.images.shape[1:] != test.images.shape[1:]:
            raise DataError(f"numpy archive {path} has x_train and x_test images of different shapes")
        return _Source(train, test)

    image_key = next((k for k in ("images", "x") if k in arrays), None)
    if image_key is None:
        found = ", ".join(sorted(arrays)) or "none"
        raise DataError(
            f"numpy archive {path} has no 'images' or 'x' array (or x_train/x_test); its keys are: {found}"
        )
    label_key = next((k for k in ("labels", "y") if k in arrays), None)
    labels = None if label_key is None else arrays[label_key]
    return _Source(_checked_part(arrays[image_key], labels, f"{path} ({image_key})"))


# -------------------------------------------------------------------- image folders


def _read_image_folder(folder: Path, resize: tuple[int, int] | None) -> _Source:
    """Images directly in ``folder`` (no labels), or in one subfolder per class."""
    subdirs = [d for d in sorted(folder.iterdir()) if d.is_dir() and not d.name.startswith(".")]
    # Subfolders without images (e.g. a thumbnails cache left empty) are not classes.
    classes = [(d, files) for d in subdirs if (files := _image_files(d, recursive=True))]
    loose = _image_files(folder, recursive=False)

    if not classes:
        if not loose:
            raise DataError(f"folder {folder} is empty: it holds no png/jpg/jpeg/bmp images or known data files")
        files, labels, class_names = loose, None, None
    else:
        if loose:
            raise DataError(
                f"image folder {folder} mixes loose images (e.g. {loose[0].name}) with class subfolders"
            )
        files = [f for _, class_files in classes for f in class_files]
        labels = np.repeat(np.arange(len(classes), dtype=np.int64), [len(fs) for _, fs in classes])
        class_names = tuple(d.name for d, _ in classes)

    arrays = [_read_image(f, resize) for f in files]
    _check_same_size(arrays, files, folder)
    if any(a.shape[2] == 3 for a in arrays):
        # A folder mixing gray and colour images becomes all colour.
        arrays = [np.repeat(a, 3, axis=2) if a.shape[2] == 1 else a for a in arrays]
    names = tuple(f.relative_to(folder).as_posix() for f in files)
    return _Source(_Part(np.stack(arrays), labels, names=names), class_names=class_names)


def _image_files(folder: Path, *, recursive: bool) -> list[Path]:
    candidates = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(
        p
        for p in candidates
        if p.suffix.lower() in _IMAGE_SUFFIXES
        and not any(part.startswith(".") for part in p.relative_to(folder).parts)
        and p.is_file()
    )


def _read_image(path: Path, resize: tuple[int, int] | None) -> np.ndarray:
    """Decode one image to uint8 (H, W, 1) for gray or (H, W, 3) for colour."""
    try:
        with Image.open(path) as img:
            img.load()  # decode now, so a truncated file fails here, inside the try
            mode = img.mode
            if mode not in _DEEP_MODES:
                # Gray (incl. 1-bit and gray+alpha) stays one channel; all else becomes RGB.
                img = img.convert("L" if mode in ("L", "1", "LA") else "RGB")
                if resize is not None:
                    height, width = resize
                    img = img.resize((width, height), Image.Resampling.BICUBIC)
                array = np.asarray(img, dtype=np.uint8)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise DataError(f"image file {path} cannot be read ({exc})") from exc
    if mode in _DEEP_MODES:
        raise DataError(f"image file {path} has {mode} pixels; only 8-bit gray or colour images are supported")
    return array[..., None] if array.ndim == 2 else array


def _check_same_size(arrays: list[np.ndarray], files: list[Path], folder: Path) -> None:
    first = arrays[0].shape[:2]
    for array, path in zip(arrays, files):
        if array.shape[:2] != first:
            raise DataError(
                f"image file {path} is {array.shape[0]}x{array.shape[1]} (HxW) but {files[0]} is "
                f"{first[0]}x{first[1]}; images in {folder} must be one size unless resize is given"
            )


def _resize_array(images: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize every image of a uint8 NHWC array with Pillow (bicubic, antialiased)."""
    height, width = size
    out = np.empty((len(images), height, width, images.shape[3]), dtype=np.uint8)
    for i, image in enumerate(images):
        pil = Image.fromarray(image[..., 0] if image.shape[2] == 1 else image)
        resized = np.asarray(pil.resize((width, height), Image.Resampling.BICUBIC))
        out[i] = resized.reshape(height, width, -1)
    return out


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


def _read_cifar_binary(folder: Path) -> _Source:
    train_files, test_file = _cifar_batches(folder, ".bin")
    train = _concat_parts([_read_cifar_binary_batch(p) for p in train_files])
    return _Source(train, _read_cifar_binary_batch(test_file))


def _read_cifar_binary_batch(path: Path) -> _Part:
    raw = path.read_bytes()
    if not raw or len(raw) % _CIFAR_RECORD:
        raise DataError(
            f"CIFAR-10 file {path} has {len(raw)} bytes, "
            f"which is not a whole number of {_CIFAR_RECORD}-byte records"
        )
    records = np.frombuffer(raw, dtype=np.uint8).reshape(-1, _CIFAR_RECORD)
    images = records[:, 1:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return _Part(np.ascontiguousarray(images), records[:, 0].astype(np.int64))


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


def _read_cifar_python(folder: Path) -> _Source:
    train_files, test_file = _cifar_batches(folder, "")
    train = _concat_parts([_read_cifar_python_batch(p) for p in train_files])
    return _Source(train, _read_cifar_python_batch(test_file))


def _read_cifar_python_batch(path: Path) -> _Part:
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
    return _checked_part(np.ascontiguousarray(images), np.asarray(labels), str(path))


def _concat_parts(parts: list[_Part]) -> _Part:
    labels = None if any(p.labels is None for p in parts) else np.concatenate([p.labels for p in parts])
    index = None if any(p.index is None for p in parts) else np.concatenate([p.index for p in parts])
    names = None if any(p.names is None for p in parts) else sum((p.names for p in parts), ())
    return _Part(np.concatenate([p.images for p in parts]), labels, index, names)


# --------------------------------------------------------------------- HDF5 / Zarr


def _parse_array_names(inner: str | None, path: Path) -> tuple[str | None, str | None]:
    """``images[,labels]`` after the colon; (None, None) means use the defaults."""
    if inner is None:
        return None, None
    names = [n.strip() for n in inner.split(",")]
    if not 1 <= len(names) <= 2 or not all(names):
        raise DataError(f"array spec '{inner}' for {path} must be 'images' or 'images,labels'")
    return names[0], names[1] if len(names) == 2 else None


def _read_array_store(path: Path, inner: str | None) -> _Source:
    image_name, label_name = _parse_array_names(inner, path)
    if not path.exists():
        raise DataError(f"data file {path} does not exist")
    if path.suffix.lower() == ".zarr":
        images, labels, where = _read_zarr(path, image_name, label_name)
    else:
        images, labels, where = _read_hdf5(path, image_name, label_name)
    return _Source(_checked_part(images, labels, where))


def _read_hdf5(
    path: Path, image_name: str | None, label_name: str | None
) -> tuple[np.ndarray, np.ndarray | None, str]:
    import h5py

    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise DataError(f"HDF5 file {path} cannot be opened ({exc})") from exc
    with f:
        if image_name is None:  # defaults: 'images', plus 'labels' if it is there
            image_name, label_name = "images", ("labels" if "labels" in f else None)

        def read(name: str) -> np.ndarray:
            node = f.get(name)
            if not isinstance(node, h5py.Dataset):
                raise DataError(f"HDF5 file {path} has no array named '{name}'")
            return node[()]

        images = read(image_name)
        labels = None if label_name is None else read(label_name)
    return images, labels, f"{path}:{image_name}"


def _read_zarr(
    path: Path, image_name: str | None, label_name: str | None
) -> tuple[np.ndarray, np.ndarray | None, str]:
    import zarr

    try:
        root = zarr.open(store=str(path), mode="r")
    except (OSError, ValueError, KeyError) as exc:
        raise DataError(f"Zarr store {path} cannot be opened ({exc})") from exc
    if isinstance(root, zarr.Array):  # the store itself is the image array
        if image_name is not None or label_name is not None:
            raise DataError(f"Zarr store {path} is a single array, so it cannot contain '{image_name}'")
        return root[...], None, str(path)
    if image_name is None:
        image_name, label_name = "images", ("labels" if "labels" in root else None)

    def read(name: str) -> np.ndarray:
        try:
            node = root[name]
        except KeyError:
            node = None
        if not isinstance(node, zarr.Array):
            raise DataError(f"Zarr store {path} has no array named '{name}'")
        return node[...]

    images = read(image_name)
    labels = None if label_name is None else read(label_name)
    return images, labels, f"{path}:{image_name}"


# ------------------------------------------------------------------- validation


def _checked_part(images: object, labels: object | None, where: str, labels_where: str | None = None) -> _Part:
    """Validate and normalise images to uint8 NHWC and labels to int64 of matching length."""
    images = _as_uint8_images(images, where)
    if labels is None:
        return _Part(images, None)
    labels_where = labels_where or where
    labels = np.asarray(labels)
    if labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.ndim != 1:
        raise DataError(f"labels of {labels_where} must be one-dimensional, got shape {labels.shape}")
    if len(labels) != len(images):
        raise DataError(f"{labels_where} has {len(labels)} labels for {len(images)} images")
    if labels.dtype.kind in "iub":
        pass
    elif labels.dtype.kind == "f" and np.all(np.isfinite(labels)) and np.all(labels == np.round(labels)):
        pass  # float labels holding whole numbers (common in HDF5 exports)
    else:
        raise DataError(f"labels of {labels_where} must be integers, got {labels.dtype}")
    return _Part(images, labels.astype(np.int64))


def _as_uint8_images(array: object, where: str) -> np.ndarray:
    """uint8 (N, H, W, C) with C in {1, 3}; integer arrays in 0..255 are cast."""
    array = np.asarray(array)
    if array.ndim == 3:
        array = array[..., None]
    if array.ndim != 4 or array.shape[3] not in (1, 3):
        raise DataError(
            f"images in {where} have shape {array.shape}; expected (N, H, W) or (N, H, W, C) with C 1 or 3"
        )
    if array.dtype == np.uint8:
        return array
    if array.dtype.kind in "iu":
        if array.size and (array.min() < 0 or array.max() > 255):
            raise DataError(
                f"images in {where} have values from {array.min()} to {array.max()}, "
                "outside the uint8 range 0..255"
            )
        return array.astype(np.uint8)
    if array.dtype.kind == "f":
        raise DataError(f"images in {where} are floating point ({array.dtype}); store them as uint8 0..255")
    raise DataError(f"images in {where} have dtype {array.dtype}; expected uint8 0..255")


def _check_options(
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


# -------------------------------------------------------------------------- splits


def _number_rows(source: _Source) -> None:
    """Give every row its position in the source's own order (train part, then test)."""
    n_train = len(source.train.images)
    source.train.index = np.arange(n_train, dtype=np.int64)
    if source.test is not None:
        source.test.index = np.arange(n_train, n_train + len(source.test.images), dtype=np.int64)


def _select_split(
    source: _Source, split: str, seed: int, val_fraction: float, test_fraction: float
) -> _Part:
    if split == "all":
        if source.test is None:
            return source.train
        return _concat_parts([source.train, source.test])

    rng = np.random.default_rng(seed)
    if source.test is not None:  # own split: carve val out of the source's train set
        if split == "test":
            return source.test
        n = len(source.train.images)
        order = rng.permutation(n)
        n_val = round(val_fraction * n)
        chosen = order[:n_val] if split == "val" else order[n_val:]
        return _take(source.train, chosen)

    n = len(source.train.images)
    order = rng.permutation(n)
    n_test, n_val = round(test_fraction * n), round(val_fraction * n)
    chosen = {
        "test": order[:n_test],
        "val": order[n_test : n_test + n_val],
        "train": order[n_test + n_val :],
    }[split]
    return _take(source.train, chosen)


def _take(part: _Part, indices: np.ndarray) -> _Part:
    """Rows ``indices`` of ``part``, kept in their original order."""
    indices = np.sort(indices)
    labels = None if part.labels is None else part.labels[indices]
    index = None if part.index is None else part.index[indices]
    names = None if part.names is None else tuple(part.names[i] for i in indices)
    return _Part(part.images[indices], labels, index, names)


# ---------------------------------------------------------------------------- misc


def _pad(x: torch.Tensor, pad_to: tuple[int, int]) -> torch.Tensor:
    """Pad NCHW ``x`` symmetrically to ``pad_to`` (H, W) with the lowest value, -1."""
    height, width = x.shape[2], x.shape[3]
    target_h, target_w = pad_to
    if target_h < height or target_w < width:
        raise ValueError(f"pad_to {pad_to} is smaller than the images ({height}, {width})")
    top, left = (target_h - height) // 2, (target_w - width) // 2
    bottom, right = target_h - height - top, target_w - width - left
    return torch.nn.functional.pad(x, (left, right, top, bottom), value=-1.0)
