"""Tests for vdvae_latents.data: every reader on small generated files, splits,
model-input conversion, binarisation and the DataError messages for bad data."""

from __future__ import annotations

import gzip
import os
import pickle
import struct
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import zarr
from PIL import Image

from vdvae_latents import data as data_mod
from vdvae_latents.data import (
    ImageDataset,
    ImageSet,
    binarize,
    describe_sources,
    load_images,
    to_model_input,
)
from vdvae_latents.core.errors import DataError

# ------------------------------------------------------------------------ helpers


def random_images(n: int, h: int = 6, w: int = 5, c: int | None = None, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    shape = (n, h, w) if c is None else (n, h, w, c)
    return rng.integers(0, 256, size=shape, dtype=np.uint8)


def idx_bytes(array: np.ndarray) -> bytes:
    """Encode a uint8 array as IDX: magic 0 0 0x08 ndim, big-endian uint32 dims, data."""
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_idx(path: Path, array: np.ndarray, gz: bool = False) -> Path:
    raw = idx_bytes(array)
    path.write_bytes(gzip.compress(raw) if gz else raw)
    return path


def assert_names(exc: pytest.ExceptionInfo, *parts: str) -> None:
    message = str(exc.value)
    for part in parts:
        assert part in message, f"{part!r} not in {message!r}"


# ------------------------------------------------------------------------- digits


def test_digits_shapes_labels_and_range():
    full = load_images("digits", "all")
    assert full.images.shape == (1797, 8, 8, 1) and full.images.dtype == np.uint8
    assert full.labels.dtype == np.int64 and set(full.labels.tolist()) == set(range(10))
    assert full.images.min() == 0 and full.images.max() == 255
    # 0..16 mapped by round(v * 255 / 16): every value is one of the 17 levels.
    levels = {round(v * 255 / 16) for v in range(17)}
    assert set(np.unique(full.images).tolist()) <= levels
    assert full.shape == (8, 8, 1) and len(full) == 1797 and full.spec == "digits"


@pytest.mark.parametrize("through", ["file", "load_digits"])
def test_digits_are_load_digits_read_without_importing_sklearn(through, monkeypatch):
    """The digits come from the file scikit-learn ships, parsed here; where that file is not
    found, from ``load_digits`` itself. Either way the same pixels and labels as ``load_digits``."""
    import importlib.util

    from sklearn.datasets import load_digits

    from vdvae_latents.data import memory_sources

    if through == "load_digits":
        monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    reader = memory_sources.read_digits()
    digits = load_digits()
    assert np.array_equal(reader.images[..., 0], np.rint(digits.images * (255 / 16)).astype(np.uint8))
    assert np.array_equal(reader.labels, digits.target)


def test_reading_digits_leaves_sklearn_unimported():
    import subprocess
    import sys

    code = "import sys; from vdvae_latents.data import load_images; load_images('digits', 'all'); " \
           "print('sklearn' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# ------------------------------------------------------------------ fashion-mnist


def test_fashion_mnist_package():
    if not data_mod.FASHION_MNIST_DIR.is_dir():
        pytest.skip("Debian package dataset-fashion-mnist is not installed")
    test = load_images("fashion-mnist", "test", limit=7)
    assert test.images.shape == (7, 28, 28, 1) and test.labels.shape == (7,)
    # Full lengths from the IDX headers, without decompressing everything again.
    for name, n in (("train-images-idx3-ubyte.gz", 60000), ("t10k-images-idx3-ubyte.gz", 10000)):
        with gzip.open(data_mod.FASHION_MNIST_DIR / name) as f:
            assert struct.unpack(">4I", f.read(16)) == (0x00000803, n, 28, 28)


def test_fashion_mnist_missing_names_package(monkeypatch, tmp_path):
    monkeypatch.setattr(data_mod, "FASHION_MNIST_DIR", tmp_path / "nowhere")
    with pytest.raises(DataError) as exc:
        load_images("fashion-mnist")
    assert_names(exc, "dataset-fashion-mnist")


# ---------------------------------------------------------------------------- IDX


@pytest.mark.parametrize("gz", [False, True])
def test_idx_single_file_with_matching_labels(tmp_path, gz):
    images, labels = random_images(20), np.arange(20, dtype=np.uint8) % 10
    suffix = ".gz" if gz else ""
    path = write_idx(tmp_path / f"my-images-idx3-ubyte{suffix}", images, gz)
    write_idx(tmp_path / f"my-labels-idx1-ubyte{suffix}", labels, gz)
    got = load_images(str(path), "all")
    np.testing.assert_array_equal(got.images[..., 0], images)
    np.testing.assert_array_equal(got.labels, labels)


def test_idx_single_file_without_labels(tmp_path):
    path = write_idx(tmp_path / "pics.idx", random_images(10))
    got = load_images(str(path), "all")
    assert got.images.shape == (10, 6, 5, 1) and got.labels is None


def test_idx_folder_own_split(tmp_path):
    train, test = random_images(30, seed=1), random_images(8, seed=2)
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", train, gz=True)
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.arange(30) % 3, gz=True)
    write_idx(tmp_path / "t10k-images-idx3-ubyte", test)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.arange(8) % 3)
    got_test = load_images(str(tmp_path), "test")
    np.testing.assert_array_equal(got_test.images[..., 0], test)
    got_train = load_images(str(tmp_path), "train", val_fraction=0.2)
    got_val = load_images(str(tmp_path), "val", val_fraction=0.2)
    assert (len(got_train), len(got_val)) == (24, 6)
    assert len(load_images(str(tmp_path), "all")) == 38


def test_idx_bad_magic(tmp_path):
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(b"\x12\x34\x08\x03" + bytes(100))
    with pytest.raises(DataError) as exc:
        load_images(str(path))
    assert_names(exc, str(path), "header")


def test_idx_wrong_dtype(tmp_path):
    path = tmp_path / "x-images-idx3-ubyte"
    path.write_bytes(bytes([0, 0, 0x0D, 1]) + struct.pack(">I", 2) + bytes(8))
    with pytest.raises(DataError) as exc:
        load_images(str(path))
    assert_names(exc, str(path), "float")


def test_idx_truncated(tmp_path):
    path = tmp_path / "x-images-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(idx_bytes(random_images(5))[:-7]))
    with pytest.raises(DataError) as exc:
        load_images(str(path))
    assert_names(exc, str(path), "data bytes")


def test_idx_truncated_gzip_stream(tmp_path):
    path = tmp_path / "x-images-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(idx_bytes(random_images(5)))[:-20])
    with pytest.raises(DataError) as exc:
        load_images(str(path))
    assert_names(exc, str(path))


def test_idx_labels_of_wrong_length(tmp_path):
    path = write_idx(tmp_path / "a-images-idx3-ubyte", random_images(5))
    labels = write_idx(tmp_path / "a-labels-idx1-ubyte", np.zeros(4, np.uint8))
    with pytest.raises(DataError) as exc:
        load_images(str(path))
    assert_names(exc, str(labels), "4", "5")


# -------------------------------------------------------------------------- numpy


def test_npy_gray_and_rgb(tmp_path):
    for c in (None, 3):
        arr = random_images(12, c=c)
        np.save(tmp_path / "a.npy", arr)
        got = load_images(str(tmp_path / "a.npy"), "all")
        assert got.images.shape == (12, 6, 5, 1 if c is None else 3) and got.labels is None


def test_npy_integer_array_is_cast(tmp_path):
    np.save(tmp_path / "a.npy", random_images(4).astype(np.int32))
    assert load_images(str(tmp_path / "a.npy"), "all").images.dtype == np.uint8


@pytest.mark.parametrize(("image_key", "label_key"), [("images", "labels"), ("x", "y")])
def test_npz_single_set(tmp_path, image_key, label_key):
    arr, labels = random_images(10, c=1), np.arange(10) % 2
    np.savez(tmp_path / "d.npz", **{image_key: arr, label_key: labels})
    got = load_images(str(tmp_path / "d.npz"), "all")
    np.testing.assert_array_equal(got.images, arr)
    np.testing.assert_array_equal(got.labels, labels)


def test_npz_own_split(tmp_path):
    np.savez(
        tmp_path / "d.npz",
        x_train=random_images(20, c=3), y_train=np.arange(20) % 4,
        x_test=random_images(5, c=3), y_test=np.arange(5) % 4,
    )
    test = load_images(str(tmp_path / "d.npz"), "test")
    assert test.images.shape == (5, 6, 5, 3) and test.labels.tolist() == [0, 1, 2, 3, 0]
    assert len(load_images(str(tmp_path / "d.npz"), "train", val_fraction=0.25)) == 15


def test_npz_labels_of_wrong_length(tmp_path):
    path = tmp_path / "d.npz"
    np.savez(path, images=random_images(10), labels=np.zeros(9, np.int64))
    with pytest.raises(DataError) as exc:
        load_images(str(path))
    assert_names(exc, str(path), "9", "10")


@pytest.mark.parametrize(
    ("array", "words"),
    [
        (np.random.default_rng(0).random((4, 6, 5)).astype(np.float32), "floating point"),
        (np.full((4, 6, 5), 300, np.int16), "outside"),
        (np.zeros((4, 6, 5, 2), np.uint8), "shape"),
    ],
)
def test_npy_bad_arrays(tmp_path, array, words):
    path = tmp_path / "bad.npy"
    np.save(path, array)
    with pytest.raises(DataError) as exc:
        load_images(str(path))
    assert_names(exc, str(path), words)


def test_npy_pickled_object_array_is_refused(tmp_path):
    path = tmp_path / "obj.npy"
    np.save(path, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(DataError) as exc:
        load_images(str(path))
    assert_names(exc, str(path))


# ------------------------------------------------------------------ image folders


def save_png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def test_image_folder_flat_gray(tmp_path):
    arrays = random_images(4, 7, 9)
    for i, a in enumerate(arrays):
        save_png(tmp_path / f"img{i}.png", a)
    got = load_images(str(tmp_path), "all")
    assert got.labels is None and got.images.shape == (4, 7, 9, 1)
    np.testing.assert_array_equal(got.images[..., 0], arrays)  # png is lossless


def test_image_folder_classes_rgb(tmp_path):
    for cls, n in (("cat", 2), ("ant", 3)):
        for i, a in enumerate(random_images(n, 7, 9, 3, seed=n)):
            save_png(tmp_path / cls / f"{i}.png", a)
    got = load_images(str(tmp_path), "all")
    assert got.images.shape == (5, 7, 9, 3)
    assert got.labels.tolist() == [0, 0, 0, 1, 1]  # sorted names: ant=0, cat=1
    assert got.class_names == ("ant", "cat")


def test_image_folder_mixed_gray_rgba_palette_becomes_rgb(tmp_path):
    save_png(tmp_path / "a.png", random_images(1, 7, 9)[0])
    Image.fromarray(random_images(1, 7, 9, 3)[0]).convert("RGBA").save(tmp_path / "b.png")
    Image.fromarray(random_images(1, 7, 9, 3)[0]).convert("P").save(tmp_path / "c.bmp")
    got = load_images(str(tmp_path), "all")
    assert got.images.shape == (3, 7, 9, 3)
    gray = got.images[0]
    assert (gray[..., 0] == gray[..., 1]).all() and (gray[..., 1] == gray[..., 2]).all()


def test_image_folder_resize(tmp_path):
    save_png(tmp_path / "a.png", random_images(1, 10, 12)[0])
    save_png(tmp_path / "b.png", random_images(1, 20, 8)[0])
    got = load_images(str(tmp_path), "all", resize=(6, 4))
    assert got.images.shape == (2, 6, 4, 1)


def test_image_folder_mixed_sizes(tmp_path):
    save_png(tmp_path / "a.png", random_images(1, 10, 12)[0])
    save_png(tmp_path / "b.png", random_images(1, 20, 8)[0])
    with pytest.raises(DataError) as exc:
        load_images(str(tmp_path))
    assert_names(exc, str(tmp_path / "b.png"), "resize")


def test_image_folder_corrupt_image(tmp_path):
    save_png(tmp_path / "a.png", random_images(1)[0])
    (tmp_path / "b.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    with pytest.raises(DataError) as exc:
        load_images(str(tmp_path))
    assert_names(exc, str(tmp_path / "b.jpg"))


def test_empty_folder(tmp_path):
    (tmp_path / "notes.txt").write_text("no images here")
    with pytest.raises(DataError) as exc:
        load_images(str(tmp_path))
    assert_names(exc, str(tmp_path), "empty")


# ------------------------------------------------------------------------ CIFAR-10


def cifar_arrays(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 3072), dtype=np.uint8), rng.integers(0, 10, n)


def test_cifar_binary(tmp_path):
    batches = {}
    for name, n, seed in [(f"data_batch_{i}.bin", 3, i) for i in range(1, 6)] + [("test_batch.bin", 4, 9)]:
        pixels, labels = cifar_arrays(n, seed)
        records = np.concatenate([labels[:, None].astype(np.uint8), pixels], axis=1)
        (tmp_path / name).write_bytes(records.tobytes())
        batches[name] = (pixels, labels)
    test = load_images(str(tmp_path), "test")
    pixels, labels = batches["test_batch.bin"]
    assert test.images.shape == (4, 32, 32, 3)
    np.testing.assert_array_equal(test.images, pixels.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
    np.testing.assert_array_equal(test.labels, labels)
    assert len(load_images(str(tmp_path), "train", val_fraction=0.2)) == 12


def test_cifar_binary_truncated(tmp_path):
    for name in ("data_batch_1.bin", "test_batch.bin"):
        (tmp_path / name).write_bytes(bytes(3073 * 2))
    (tmp_path / "data_batch_1.bin").write_bytes(bytes(3073 + 5))
    with pytest.raises(DataError) as exc:
        load_images(str(tmp_path))
    assert_names(exc, str(tmp_path / "data_batch_1.bin"))


def test_cifar_python(tmp_path):
    for name, n, seed in [(f"data_batch_{i}", 2, i) for i in range(1, 6)] + [("test_batch", 3, 9)]:
        pixels, labels = cifar_arrays(n, seed)
        (tmp_path / name).write_bytes(pickle.dumps({b"data": pixels, b"labels": labels.tolist()}))
    train_all = load_images(str(tmp_path), "all")
    assert train_all.images.shape == (13, 32, 32, 3) and train_all.labels.dtype == np.int64
    pixels, labels = cifar_arrays(3, 9)
    test = load_images(str(tmp_path), "test")
    np.testing.assert_array_equal(test.images, pixels.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
    np.testing.assert_array_equal(test.labels, labels)


def test_cifar_python_protocol4(tmp_path):
    """Pickle protocols below 5 rebuild arrays with multiarray._reconstruct; str keys work too."""
    for name in ("data_batch_1", "test_batch"):
        pixels, labels = cifar_arrays(2, 0)
        (tmp_path / name).write_bytes(pickle.dumps({"data": pixels, "labels": labels.tolist()}, protocol=4))
    assert len(load_images(str(tmp_path), "test")) == 2


class _Exploit:
    """Unpickling this with plain pickle would run a shell command."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def test_cifar_python_refuses_disallowed_global(tmp_path):
    marker = tmp_path / "pwned"
    pixels, labels = cifar_arrays(2, 0)
    payload = {b"data": pixels, b"labels": labels.tolist(), b"evil": _Exploit(f"touch {marker}")}
    (tmp_path / "data_batch_1").write_bytes(pickle.dumps(payload))
    (tmp_path / "test_batch").write_bytes(pickle.dumps({b"data": pixels, b"labels": labels.tolist()}))
    with pytest.raises(DataError) as exc:
        load_images(str(tmp_path))
    assert_names(exc, str(tmp_path / "data_batch_1"), "system")
    assert not marker.exists()


# ---------------------------------------------------------------------- HDF5/Zarr


def test_hdf5_with_and_without_labels(tmp_path):
    path = tmp_path / "d.h5"
    with h5py.File(path, "w") as f:
        f["grp/images"] = random_images(9, c=3)
        f["grp/labels"] = np.arange(9) % 3
        f["images"] = random_images(4)
    got = load_images(f"{path}:grp/images,grp/labels", "all")
    assert got.images.shape == (9, 6, 5, 3) and got.labels.tolist() == [0, 1, 2] * 3
    assert load_images(f"{path}:images", "all").labels is None
    assert load_images(str(path), "all").images.shape == (4, 6, 5, 1)  # default 'images'


def test_hdf5_errors(tmp_path):
    path = tmp_path / "d.hdf5"
    with h5py.File(path, "w") as f:
        f["images"] = random_images(5)
        f["short"] = np.zeros(3, np.int64)
        f["flat"] = np.zeros((5, 4), np.uint8)
    for spec, words in [
        (f"{path}:missing", "missing"),
        (f"{path}:images,short", "3"),
        (f"{path}:flat", "shape"),
        (f"{tmp_path / 'nope.h5'}:images", "does not exist"),
    ]:
        with pytest.raises(DataError) as exc:
            load_images(spec)
        assert_names(exc, str(tmp_path), words)


def test_zarr_with_labels(tmp_path):
    path = tmp_path / "store.zarr"
    root = zarr.open_group(str(path), mode="w")
    root.create_array("images", data=random_images(8))
    root.create_array("labels", data=np.arange(8, dtype=np.int32))
    root.create_array("short", data=np.arange(2, dtype=np.int32))
    got = load_images(f"{path}:images,labels", "all")
    assert got.images.shape == (8, 6, 5, 1) and got.labels.tolist() == list(range(8))
    assert load_images(str(path), "all").labels.tolist() == list(range(8))  # defaults
    with pytest.raises(DataError) as exc:
        load_images(f"{path}:images,short")
    assert_names(exc, str(path))
    with pytest.raises(DataError) as exc:
        load_images(f"{path}:nothing")
    assert_names(exc, str(path), "nothing")


# ------------------------------------------------------------------------- splits


@pytest.fixture
def indexed_npz(tmp_path) -> str:
    """100 images whose first pixel is their index (label = index too)."""
    images = np.zeros((100, 2, 2), np.uint8)
    images[:, 0, 0] = np.arange(100)
    np.savez(tmp_path / "idx.npz", images=images, labels=np.arange(100))
    return str(tmp_path / "idx.npz")


def test_splits_disjoint_cover_and_seeded(indexed_npz):
    parts = {s: load_images(indexed_npz, s, seed=3).labels for s in ("train", "val", "test")}
    assert [len(parts[s]) for s in ("train", "val", "test")] == [80, 10, 10]
    together = np.concatenate(list(parts.values()))
    assert sorted(together.tolist()) == list(range(100))  # disjoint and covering
    assert all((np.diff(p) > 0).all() for p in parts.values())  # original order kept
    again = load_images(indexed_npz, "val", seed=3).labels
    np.testing.assert_array_equal(again, parts["val"])
    assert not np.array_equal(load_images(indexed_npz, "val", seed=4).labels, parts["val"])
    np.testing.assert_array_equal(load_images(indexed_npz, "all").labels, np.arange(100))


def test_limit_and_fractions(indexed_npz):
    got = load_images(indexed_npz, "train", limit=5, val_fraction=0.3, test_fraction=0.2)
    assert len(got) == 5
    assert len(load_images(indexed_npz, "train", val_fraction=0.3, test_fraction=0.2)) == 50


def test_split_errors(indexed_npz):
    with pytest.raises(DataError, match="split 'bogus'"):
        load_images(indexed_npz, "bogus")
    with pytest.raises(DataError, match="empty"):
        load_images(indexed_npz, "val", val_fraction=0.0)


def test_resize_applies_to_arrays(indexed_npz):
    assert load_images(indexed_npz, "all", resize=(4, 3)).images.shape == (100, 4, 3, 1)


# ------------------------------------------------------------------- spec errors


def test_unknown_spec_and_missing_path(tmp_path):
    with pytest.raises(DataError) as exc:
        load_images("imagenet-9000")
    assert_names(exc, "imagenet-9000", "not a known dataset")
    missing = tmp_path / "missing.npy"
    with pytest.raises(DataError) as exc:
        load_images(str(missing))
    assert_names(exc, str(missing))


def test_unrecognised_file(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("hello")
    with pytest.raises(DataError) as exc:
        load_images(str(path))
    assert_names(exc, str(path))


def test_data_error_is_a_user_error():
    from vdvae_latents.core.errors import UserError

    assert issubclass(DataError, UserError) and issubclass(DataError, ValueError)


# ------------------------------------------------------------ model input helpers


@pytest.mark.parametrize("n_bits", [8, 5])
def test_to_model_input_on_grid(n_bits):
    images = np.arange(256, dtype=np.uint8).reshape(4, 8, 8, 1)
    x = to_model_input(images, n_bits)
    assert x.dtype == torch.float32 and x.shape == (4, 1, 8, 8)
    levels = 2**n_bits - 1
    k = (x + 1) * levels / 2
    assert torch.allclose(k, k.round(), atol=1e-4)  # on the 2**n_bits grid
    assert x.min() == -1.0 and x.max() == 1.0
    assert len(torch.unique(x)) == 2**n_bits
    expected = (images >> (8 - n_bits)).astype(np.float32) * 2 / levels - 1
    np.testing.assert_allclose(x.numpy(), expected.transpose(0, 3, 1, 2), atol=1e-6)


def test_to_model_input_layouts_and_padding():
    images = random_images(3, 28, 28, 3)
    x = to_model_input(images, pad_to=(32, 32))
    assert x.shape == (3, 3, 32, 32)
    assert (x[:, :, :2, :] == -1).all() and (x[:, :, -2:, :] == -1).all()
    assert (x[:, :, :, :2] == -1).all() and (x[:, :, :, -2:] == -1).all()
    np.testing.assert_allclose(x[:, :, 2:30, 2:30].numpy(), to_model_input(images).numpy())
    # A torch batch from ImageDataset is NCHW and gives the same result.
    nchw = torch.from_numpy(images).permute(0, 3, 1, 2)
    torch.testing.assert_close(to_model_input(nchw, pad_to=(32, 32)), x)


def test_binarize():
    probs = torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    fixed = binarize(probs, fixed=True)
    torch.testing.assert_close(fixed, binarize(probs, fixed=True))
    torch.testing.assert_close(fixed, (probs >= 0.5).float())
    a = binarize(probs, torch.Generator().manual_seed(1))
    b = binarize(probs, torch.Generator().manual_seed(1))
    torch.testing.assert_close(a, b)
    assert set(a.unique().tolist()) <= {0.0, 1.0}
    assert binarize(torch.ones(10)).sum() == 10 and binarize(torch.zeros(10)).sum() == 0


def test_image_dataset(tmp_path):
    images = random_images(6, 4, 5, 3)
    ds = ImageDataset(ImageSet(images, np.arange(6), "x", "all"))
    item, label = ds[2]
    assert len(ds) == 6 and item.dtype == torch.uint8 and item.shape == (3, 4, 5) and label == 2
    np.testing.assert_array_equal(item.numpy(), images[2].transpose(2, 0, 1))
    _, no_label = ImageDataset(ImageSet(images, None, "x", "all"))[0]
    assert no_label == -1
    batch, labels = next(iter(torch.utils.data.DataLoader(ds, batch_size=4)))
    assert batch.shape == (4, 3, 4, 5) and labels.tolist() == [0, 1, 2, 3]


def test_describe_sources():
    sources = describe_sources()
    assert all(isinstance(a, str) and isinstance(b, str) for a, b in sources)
    forms = " ".join(a for a, _ in sources)
    for word in ("digits", "fashion-mnist", ".npz", ".h5", ".zarr", "CIFAR"):
        assert word in forms


# ---------------------------------------------------------------------- provenance


def _provenance_sources(tmp_path: Path) -> dict[str, str]:
    """One small source of every kind, each image unique (so rows can be matched)."""
    specs = {}
    images = random_images(30, 4, 4, 1, seed=1)
    np.save(tmp_path / "a.npy", images)
    specs["npy"] = str(tmp_path / "a.npy")
    np.savez(tmp_path / "own.npz", x_train=random_images(20, 3, 3, 1, seed=2), y_train=np.arange(20),
             x_test=random_images(7, 3, 3, 1, seed=3), y_test=np.arange(7))
    specs["npz-own-split"] = str(tmp_path / "own.npz")
    idx = tmp_path / "idx"
    idx.mkdir()
    write_idx(idx / "train-images-idx3-ubyte", random_images(25, 3, 3, seed=4))
    write_idx(idx / "t10k-images-idx3-ubyte", random_images(6, 3, 3, seed=5))
    specs["idx-folder"] = str(idx)
    with h5py.File(tmp_path / "a.h5", "w") as f:
        f["images"] = random_images(22, 3, 3, 3, seed=6)
    specs["hdf5"] = f"{tmp_path / 'a.h5'}:images"
    folder = tmp_path / "folder"
    for k, cls in enumerate(("cat", "dog")):
        (folder / cls).mkdir(parents=True)
        for j, img in enumerate(random_images(12, 4, 4, 3, seed=10 + k)):
            save_png(folder / cls / f"img{j:02d}.png", img)
    specs["image-folder"] = str(folder)
    return specs


def test_source_index_joins_rows_back_to_the_source(tmp_path):
    for kind, spec in _provenance_sources(tmp_path).items():
        everything = load_images(spec, "all")
        np.testing.assert_array_equal(everything.source_index, np.arange(len(everything)), err_msg=kind)
        seen = []
        for split in ("train", "val", "test"):
            part = load_images(spec, split, seed=5, val_fraction=0.2, test_fraction=0.2)
            assert part.source_index.dtype == np.int64
            np.testing.assert_array_equal(everything.images[part.source_index], part.images, err_msg=kind)
            seen += part.source_index.tolist()
            limited = load_images(spec, split, seed=5, val_fraction=0.2, test_fraction=0.2, limit=2)
            np.testing.assert_array_equal(limited.source_index, part.source_index[:2], err_msg=kind)
        assert sorted(seen) == list(range(len(everything))), kind  # the splits cover the source once


def test_image_folder_rows_name_their_files(tmp_path):
    sources = _provenance_sources(tmp_path)
    folder = sources["image-folder"]
    part = load_images(folder, "test", seed=1, test_fraction=0.25)
    assert part.source_names is not None and len(part.source_names) == len(part)
    for name, image in zip(part.source_names, part.images):
        np.testing.assert_array_equal(np.asarray(Image.open(Path(folder) / name).convert("RGB")), image)
    assert load_images(sources["npy"]).source_names is None
