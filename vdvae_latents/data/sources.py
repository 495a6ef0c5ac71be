"""From a data spec string to the :class:`~.readers.Reader` of that source.

A spec names the source: ``digits``, ``fashion-mnist``, an IDX file or folder, a
``.npy``/``.npz`` file, a folder of images (optionally one subfolder per class), a
CIFAR-10 folder, a downsampled-ImageNet folder, ``file.h5:images[,labels]`` or
``store.zarr:images[,labels]`` (a store written by ``vdvl pack`` needs no array names).
Named data sets win over same-named paths.
"""

from __future__ import annotations

import re
from pathlib import Path

from ..core.errors import DataError
from . import array_files, memory_sources
from .image_folder import ImageFolderReader
from .readers import Reader

__all__ = ["open_reader", "describe_sources"]

_ARRAY_STORE_RE = re.compile(r"^(?P<path>.+\.(?:h5|hdf5|zarr))/?(?::(?P<inner>.*))?$", re.IGNORECASE)


def open_reader(spec: str, resize: tuple[int, int] | None = None, *, sequential: bool = False,
                skip_bad: bool = False) -> Reader:
    """The reader of the source named by ``spec``.

    ``resize`` is applied by image folders while decoding (other sources are resized per
    batch by the caller). ``sequential`` allows compressed archives too large for memory,
    read front to back (packing only); ``skip_bad`` drops image files whose header
    cannot be read (packing only).
    """
    if spec == "digits":
        return memory_sources.read_digits()
    if spec == "fashion-mnist":
        return memory_sources.read_fashion_mnist()
    store = _ARRAY_STORE_RE.match(spec)
    if store is not None:
        path = Path(store["path"]).expanduser()
        image_name, label_name = array_files.parse_array_names(store["inner"], path)
        if not path.exists():
            raise DataError(f"data file {path} does not exist")
        if path.suffix.lower() == ".zarr":
            return array_files.ZarrReader(path, image_name, label_name)
        return array_files.HDF5Reader(path, image_name, label_name)

    path = Path(spec).expanduser()
    if not path.exists():
        raise DataError(
            f"data spec '{spec}' is not a known dataset or an existing path "
            "(known datasets: digits, fashion-mnist)"
        )
    if path.is_dir():
        if (path / "data_batch_1.bin").is_file():
            return memory_sources.read_cifar_binary(path)
        if (path / "data_batch_1").is_file():
            return memory_sources.read_cifar_python(path)
        if memory_sources.find_idx_images(path, "train") is not None:
            return memory_sources.read_idx_folder(path)
        if array_files.is_downsampled_imagenet(path):
            return array_files.read_downsampled_imagenet(path, sequential=sequential)
        return ImageFolderReader(path, resize, skip_bad=skip_bad)
    suffix = path.suffix.lower()
    if suffix == ".npy":
        return array_files.read_npy(path)
    if suffix == ".npz":
        return array_files.read_npz(path, sequential=sequential)
    if memory_sources.looks_like_idx(path):
        return memory_sources.read_idx_file(path)
    raise DataError(
        f"data file {path} is not a recognised format (expected an IDX file, .npy, .npz, .h5/.hdf5 or .zarr)"
    )


def describe_sources() -> list[tuple[str, str]]:
    """(spec form, description) pairs for the CLI's help text."""
    return [
        ("digits", "scikit-learn's bundled 8x8 digits (1797 images, labels 0-9)"),
        ("fashion-mnist", "Fashion-MNIST 28x28, Debian package dataset-fashion-mnist "
                          f"({memory_sources.FASHION_MNIST_DIR})"),
        ("PATH/*-images-idx3-ubyte[.gz]", "one IDX images file (+ a labels file beside it matching by name)"),
        ("PATH/ (IDX folder)", "train-/t10k-images-idx3-ubyte[.gz] (+ labels); own train/test split"),
        ("PATH.npy", "uint8 array (N,H,W) or (N,H,W,C), C in {1,3}; memory-mapped"),
        ("PATH.npz", "keys images|x (+ labels|y), or x_train/y_train/x_test/y_test for an own split"),
        ("PATH/ (image folder)", "png/jpg/jpeg/bmp; class subfolders (sorted) give labels; one size unless resized"),
        ("PATH/ (CIFAR-10 folder)", "binary (data_batch_N.bin, test_batch.bin) or python (pickled) version"),
        ("PATH/ (Imagenet32_train_npz, Imagenet64_train_npz)",
         "downsampled-ImageNet batch files train_data_batch_N.npz (+ val_data.npz as the test split)"),
        ("FILE.h5:images[,labels]", "arrays in an HDF5 file (.h5/.hdf5); default: images (+ labels if present)"),
        ("STORE.zarr:images[,labels]", "arrays in a Zarr store; default: images (+ labels if present); "
                                       "a store from `vdvl pack` as it is"),
    ]
