"""Provenance in stores: for every kind of data source, a store's ``source_index`` is each
row's position in the source's own order (``load_images(spec, "all")``), its
``sample_index`` the position in the split, and for image folders ``source_names`` names
the file; the README's join recipe gives back the very images that were encoded."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import h5py
import numpy as np
import pytest
import zarr
from PIL import Image

from store_fixtures import RGB32, random_run
from vdvae_latents.data import load_images
from vdvae_latents.stores.encode import encode_to_store
from vdvae_latents.stores.reader import open_encodings


def gray(n: int, seed: int, size: int = 8) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size), dtype=np.uint8)


def idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(gzip.compress(header + array.tobytes()))


def sources(root: Path) -> dict[str, str]:
    """One small source of every kind with 8x8 grayscale images (the tiny model's)."""
    specs = {"digits": "digits"}
    np.save(root / "a.npy", gray(23, 1)[..., None])
    specs["npy"] = str(root / "a.npy")
    np.savez(root / "own.npz", x_train=gray(20, 2), y_train=np.arange(20) % 3, x_test=gray(9, 3),
             y_test=np.arange(9) % 3)
    specs["npz-own-split"] = str(root / "own.npz")
    folder = root / "idx"
    folder.mkdir()
    idx(folder / "train-images-idx3-ubyte.gz", gray(21, 4))
    idx(folder / "t10k-images-idx3-ubyte.gz", gray(8, 5))
    specs["idx-folder"] = str(folder)
    idx(root / "single-images-idx3-ubyte.gz", gray(17, 6))
    specs["idx-file"] = str(root / "single-images-idx3-ubyte.gz")
    with h5py.File(root / "a.h5", "w") as f:
        f["images"] = gray(19, 7)
        f["labels"] = np.arange(19) % 2
    specs["hdf5"] = f"{root / 'a.h5'}:images,labels"
    group = zarr.open_group(str(root / "a.zarr"), mode="w")
    group.create_array("images", data=gray(18, 8))
    specs["zarr"] = f"{root / 'a.zarr'}:images"
    images = root / "folder"
    for k, cls in enumerate(("shirt", "shoe")):
        (images / cls).mkdir(parents=True)
        for j, img in enumerate(gray(11, 10 + k)):
            Image.fromarray(img).save(images / cls / f"{j:03d}.png")
    specs["image-folder"] = str(images)
    return specs


def cifar(root: Path) -> str:
    rng = np.random.default_rng(0)
    for name, n in [(f"data_batch_{i}.bin", 3) for i in range(1, 6)] + [("test_batch.bin", 6)]:
        records = np.concatenate([rng.integers(0, 10, (n, 1)), rng.integers(0, 256, (n, 3072))], axis=1)
        (root / name).write_bytes(records.astype(np.uint8).tobytes())
    return str(root)


def check_store(store: Path, spec: str, split: str) -> None:
    """The store's provenance against the data module's own, and the README's join."""
    part = load_images(spec, split)
    everything = load_images(spec, "all")
    with open_encodings(store) as enc:
        source_index, sample_index = enc.source_index[:], enc.sample_index[:]
        names = None if enc.source_names is None else list(enc.source_names[:])
        assert enc.attrs["data"] == spec and enc.attrs["split"] == split
    np.testing.assert_array_equal(sample_index, np.arange(len(part)))
    np.testing.assert_array_equal(source_index, part.source_index)
    # the join: row i of the store is image source_index[i] of the source, as encoded
    np.testing.assert_array_equal(everything.images[source_index], part.images)
    assert len(set(source_index.tolist())) == len(source_index)
    if part.source_names is None:
        assert names is None
    else:
        assert names == list(part.source_names)
        for name, image in zip(names, part.images):
            np.testing.assert_array_equal(np.asarray(Image.open(Path(spec) / name))[..., None], image)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return random_run(tmp_path_factory.mktemp("prov") / "run")


@pytest.fixture(scope="module")
def tiny_active(tiny, tmp_path_factory) -> Path:
    """One active set for every source, so each encode is a single pass over its split."""
    from vdvae_latents.model.checkpoints import load_model, file_sha256
    from vdvae_latents.latents.stats import LatentKL
    from vdvae_latents.latents.active_set import build_active_set

    model, _ = load_model(tiny, device="cpu")
    stats = LatentKL(batch_size=64).fit(model, load_images("digits", "test").images[:64])
    path = tmp_path_factory.mktemp("active") / "active.json"
    build_active_set(stats, granularity="element", keep=0.1, checkpoint=str(tiny),
                     checkpoint_sha256=file_sha256(tiny)).save(path)
    return path


def test_every_source_kind_joins_back(tiny, tiny_active, tmp_path):
    for kind, spec in sources(tmp_path).items():
        split = "val" if kind == "digits" else "test"  # digits' smallest split keeps this quick
        # HDF5 holds the same arrays (tested in test_stores); here it stores the file names once
        for suffix in (".zarr", ".h5") if kind == "image-folder" else (".zarr",):
            store = tmp_path / f"{kind}{suffix}"
            encode_to_store(tiny, spec, store, split=split, active_file=tiny_active, chunk_rows=8, device="cpu")
            check_store(store, spec, split)


def test_cifar_folder_joins_back(tmp_path):
    run = random_run(tmp_path / "run", RGB32)
    spec = cifar(tmp_path)
    store = tmp_path / "cifar.zarr"
    encode_to_store(run, spec, store, split="test", keep="50%", chunk_rows=4, kl_limit=8, device="cpu")
    check_store(store, spec, "test")
