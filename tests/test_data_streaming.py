"""Streaming data: every source's lazy reader against its eager reading and the arrays written,
DataLoader batches and workers, training order and its resumption after kill -9, shards of
two torchrun ranks, and `vdvl pack` (round trip, resume after kill -9, bad files)."""

from __future__ import annotations

import json
import os
import sys
from dataclasses import replace
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import zarr
from background import subprocess_fixture
from helpers import assert_one_line_error, pixels, run_cli
from PIL import Image

from vdvae_latents.model import checkpoints as ckpt
from vdvae_latents.data import TrainOrder, load_images, open_images, pack_images
from vdvae_latents.data import array_files
from vdvae_latents.core.errors import ConfigError, DataError
from vdvae_latents.train.run_config import resolve_run_config
from vdvae_latents.train.loop import train

ROOT = Path(__file__).resolve().parents[1]
SUBPROCESS_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def save_png(path: Path, image: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image[..., 0] if image.shape[2] == 1 else image).save(path)


def write_downsampled_imagenet(root: Path, size: int = 4, compress_val: bool = True) -> tuple[Path, np.ndarray,
                                                                                             np.ndarray]:
    """Imagenet<size>_train_npz (3 batch files, numbered 1, 2, 10) and a sibling _val_npz folder."""
    train, val = root / f"Imagenet{size}_train_npz", root / f"Imagenet{size}_val_npz"
    train.mkdir(parents=True)
    val.mkdir()
    images, labels = [], []
    rng = np.random.default_rng(7)
    for k, n in ((2, 6), (10, 5), (1, 4)):  # written out of order: files are read by number
        flat = rng.integers(0, 256, (n, 3 * size * size), dtype=np.uint8)
        np.savez(train / f"train_data_batch_{k}.npz", data=flat, labels=rng.integers(1, 1001, n),
                 mean=np.zeros(3 * size * size))
    for k in (1, 2, 10):
        with np.load(train / f"train_data_batch_{k}.npz") as f:
            images.append(f["data"])
            labels.append(f["labels"] - 1)
    flat, val_labels = rng.integers(0, 256, (3, 3 * size * size), dtype=np.uint8), rng.integers(1, 1001, 3)
    (np.savez_compressed if compress_val else np.savez)(val / "val_data.npz", data=flat, labels=val_labels)
    images.append(flat)
    labels.append(val_labels - 1)
    hwc = np.concatenate(images).reshape(-1, 3, size, size).transpose(0, 2, 3, 1)
    return train, hwc, np.concatenate(labels)


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, tuple[str, np.ndarray, np.ndarray | None]]:
    """One small source of every streamed kind: spec -> (spec, images in `all` order, labels)."""
    root = tmp_path_factory.mktemp("sources")
    out = {}
    gray = pixels(23, 5, 4, 1, seed=1)
    np.save(root / "gray.npy", gray[..., 0])
    out["npy"] = (str(root / "gray.npy"), gray, None)
    colour, labels = pixels(21, 4, 4, 3, seed=2), np.arange(21) % 4
    np.savez(root / "stored.npz", images=colour, labels=labels)
    out["npz stored"] = (str(root / "stored.npz"), colour, labels)
    np.savez_compressed(root / "split.npz", x_train=colour[:15], y_train=labels[:15], x_test=colour[15:],
                        y_test=labels[15:])
    out["npz compressed, own split"] = (str(root / "split.npz"), colour, labels)
    with h5py.File(root / "a.h5", "w") as f:
        f.create_dataset("images", data=colour.astype(np.int32), chunks=(4, 4, 4, 3))  # cast per batch
        f["labels"] = labels.astype(np.float32)
    out["hdf5"] = (f"{root / 'a.h5'}:images,labels", colour, labels)
    group = zarr.open_group(str(root / "a.zarr"), mode="w")
    group.create_array("images", data=colour, chunks=(4, 4, 4, 3))
    group.create_array("labels", data=labels)
    out["zarr"] = (str(root / "a.zarr"), colour, labels)
    folder, files = root / "folder", []
    for k, cls in enumerate(("b", "a")):
        for j in range(9):
            image = pixels(1, 6, 5, 3, seed=10 * k + j)[0]
            if j % 3 == 0:  # some gray files: the folder reads as RGB all the same
                image = np.repeat(image[..., :1], 3, axis=2)
            save_png(folder / cls / f"{j:02d}.png", image[..., :1] if j % 3 == 0 else image)
            files.append((cls, image))
    files.sort(key=lambda item: item[0])  # class folders in sorted order: a, then b
    out["image folder"] = (str(folder), np.stack([img for _, img in files]), np.repeat([0, 1], 9))
    inet, hwc, inet_labels = write_downsampled_imagenet(root)
    out["downsampled ImageNet"] = (str(inet), hwc, inet_labels)
    return out


KINDS = ["npy", "npz stored", "npz compressed, own split", "hdf5", "zarr", "image folder", "downsampled ImageNet"]


@pytest.mark.parametrize("kind", KINDS)
def test_lazy_reader_equals_eager_reader_and_the_written_images(sources, kind):
    spec, truth, labels = sources[kind]
    everything = load_images(spec, "all")
    np.testing.assert_array_equal(everything.images, truth)
    if labels is not None:
        np.testing.assert_array_equal(everything.labels, labels)
    rng = np.random.default_rng(0)
    for split in ("train", "val", "test"):
        eager = load_images(spec, split, seed=3)
        lazy = open_images(spec, split, seed=3)
        np.testing.assert_array_equal(lazy.source_index, eager.source_index)
        assert lazy.shape == eager.shape and len(lazy) == len(eager)
        positions = rng.integers(0, len(lazy), 2 * len(lazy))  # any order, repeats
        np.testing.assert_array_equal(lazy.read(positions), eager.images[positions])
        np.testing.assert_array_equal(lazy.read(positions), truth[lazy.source_index[positions]])
        streamed = np.concatenate([b.images.numpy() for b in lazy.batches(4)])
        np.testing.assert_array_equal(streamed, eager.images.transpose(0, 3, 1, 2))
        if labels is not None:
            np.testing.assert_array_equal(lazy.labels, eager.labels)
        assert lazy.source_names == eager.source_names


def test_workers_deliver_the_same_batches_and_share_no_handles(sources):
    for kind in ("zarr", "hdf5", "image folder"):
        lazy = open_images(sources[kind][0], "all")
        lazy.read([0])  # a handle open in this process before the workers fork
        one = [(b.images, b.labels, b.positions) for b in lazy.batches(5, workers=0)]
        two = [(b.images, b.labels, b.positions) for b in lazy.batches(5, workers=2)]
        for a, b in zip(one, two, strict=True):
            for x, y in zip(a, b):
                assert torch.equal(x, y), kind


def test_downsampled_imagenet_files(sources, tmp_path, monkeypatch):
    spec, truth, labels = sources["downsampled ImageNet"]
    test = load_images(spec, "test")  # val_data.npz of the sibling folder is the own test split
    np.testing.assert_array_equal(test.images, truth[-3:])
    assert test.source_names == ("val_data.npz:0", "val_data.npz:1", "val_data.npz:2")
    assert load_images(spec, "all").source_names[:2] == ("train_data_batch_1.npz:0", "train_data_batch_1.npz:1")
    assert 0 <= labels.min() and labels.max() <= 999  # 1-based in the files
    # A compressed member too large to hold cannot be read by index: pack it instead.
    monkeypatch.setattr(array_files, "IN_MEMORY_LIMIT", 0)
    big, truth, labels = write_downsampled_imagenet(tmp_path, compress_val=True)
    with pytest.raises(DataError, match="vdvl pack"):
        open_images(str(big), "train")
    pack_images(str(big), tmp_path / "i4.zarr", workers=0, block_rows=4)  # streams the compressed member
    packed = load_images(str(tmp_path / "i4.zarr"), "all")
    np.testing.assert_array_equal(packed.images, truth)
    np.testing.assert_array_equal(packed.labels, labels)
    assert len(load_images(str(tmp_path / "i4.zarr"), "test")) == 3


def test_views_of_a_split_share_its_reader(sources):
    spec = sources["image folder"][0]
    train = open_images(spec, "train", seed=4)
    for split in ("val", "test", "all"):
        other = train.split_as(split, seed=4, limit=5)
        assert other.reader is train.reader  # the folder's headers are not read again
        np.testing.assert_array_equal(other.source_index, open_images(spec, split, seed=4, limit=5).source_index)
    shard = train.shard(1, 3)
    np.testing.assert_array_equal(shard.read(), train.read()[1::3])
    np.testing.assert_array_equal(train.subset(slice(2, 6)).labels, train.labels[2:6])


def test_truncated_npy_names_the_file(tmp_path):
    np.save(tmp_path / "x.npy", np.zeros((10, 4, 4), np.uint8))
    raw = (tmp_path / "x.npy").read_bytes()
    (tmp_path / "x.npy").write_bytes(raw[:-20])
    with pytest.raises(DataError, match="truncated"):
        open_images(str(tmp_path / "x.npy"))


def test_out_of_range_integer_pixels_are_refused_per_batch(tmp_path):
    images = np.zeros((6, 3, 3), np.int16)
    images[4, 0, 0] = 300
    np.save(tmp_path / "x.npy", images)
    lazy = open_images(str(tmp_path / "x.npy"), "all")
    assert lazy.read([0, 1]).dtype == np.uint8
    with pytest.raises(DataError, match="outside the uint8 range"):
        lazy.read([4])


# --------------------------------------------------------------------------- training order


def test_train_order_is_a_function_of_the_step():
    order = TrainOrder(50, batch_size=8, seed=3)
    assert order.batches_per_epoch == 6
    first_epoch = np.concatenate([order.rows(s) for s in range(6)])
    assert len(set(first_epoch.tolist())) == 48  # a permutation, the remainder of 2 dropped
    resumed = TrainOrder(50, batch_size=8, seed=3)  # a fresh process resuming at step 9
    for step in (9, 10, 11, 12, 13):
        np.testing.assert_array_equal(resumed.rows(step), order.rows(step))
    assert not np.array_equal(order.rows(6), order.rows(0))  # each epoch reshuffles
    assert order.position(9) == {"epoch": 1, "batch": 3, "batches_per_epoch": 6, "images": 50}
    assert order.resume_problems(order.position(9)) == []
    assert "images" in TrainOrder(51, batch_size=8, seed=3).resume_problems(order.position(9))[0]
    halves = [TrainOrder(50, 8, 3, rank=r, world_size=2).rows(4) for r in (0, 1)]
    np.testing.assert_array_equal(np.concatenate(halves), order.rows(4))


def streaming_run(spec: str):
    run = resolve_run_config(preset="tiny", data=spec)
    return replace(run, train=replace(run.train, steps=12, batch_size=8, warmup_steps=2, log_every=3,
                                      checkpoint_every=3, val_limit=8, seed=2, num_workers=1))


@subprocess_fixture
def train_killed_at_step_8(request):
    """tests/kill_worker.py training tiny on pixels(44, 8, 8, 1, seed=4) (36 train images: 4 batches of 8 per
    epoch) into OUT/cut, killing itself with SIGKILL at step 8; in the background (tests/background.py)."""
    out = request.getfixturevalue("tmp_path_factory").mktemp("killed-train")
    np.save(out / "d.npy", pixels(44, 8, 8, 1, seed=4))
    argv = [sys.executable, str(ROOT / "tests" / "kill_worker.py"), "train", str(out / "cut"), str(out / "d.npy"), "8"]
    return argv, None, SUBPROCESS_ENV, 120, {"out": out}


def test_train_resumes_after_sigkill_mid_epoch_in_the_same_order(train_killed_at_step_8):
    tmp_path = train_killed_at_step_8.out  # this test's own folder
    images = pixels(44, 8, 8, 1, seed=4)  # 36 train images: 4 batches of 8 per epoch
    spec = str(tmp_path / "d.npy")
    np.testing.assert_array_equal(np.load(spec), images)
    train(tmp_path / "whole", streaming_run(spec), quiet=True)
    assert train_killed_at_step_8.returncode == -9, train_killed_at_step_8.stderr[-2000:]
    latest = ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path / "cut"))
    assert latest["step"] == 6
    assert latest["data_position"] == {"epoch": 1, "batch": 2, "batches_per_epoch": 4, "images": 36}
    train(tmp_path / "cut", streaming_run(spec), quiet=True)  # resumes mid-epoch 1
    np.save(tmp_path / "d.npy", images[:40])  # the data changed: the order cannot continue
    with pytest.raises(ConfigError, match="data changed"):
        train(tmp_path / "cut", replace(streaming_run(spec), train=replace(streaming_run(spec).train, steps=20)),
              quiet=True)
    whole = ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path / "whole"))
    cut = ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path / "cut"))
    for part in ("model", "ema"):
        for key, value in whole[part].items():
            assert torch.equal(value, cut[part][key]), f"{part}.{key}"


@pytest.mark.slow
def test_two_gloo_ranks_read_disjoint_shards_covering_the_split(torchrun_session):
    """tests/data_ddp_worker.py on pixels(40, 4, 4, 1, seed=5) (train split: 32 images, 4 batches of 8), run
    as a part of the session's one torchrun launch (tests/torchrun_worker.py)."""
    tmp_path = torchrun_session.out / "data"
    assert (torchrun_session.out / "data.ok").exists(), torchrun_session.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    split = sorted(ranks[0]["split"])
    assert len(split) == 32
    for kind in ("train", "eval"):
        rows = [[row for batch in rank[kind] for row in batch] for rank in ranks]
        assert not set(rows[0]) & set(rows[1]), kind
        assert sorted(rows[0] + rows[1]) == split, kind  # every row once
    assert all(len(batch) == 4 for rank in ranks for batch in rank["train"])  # half of each batch of 8


# ------------------------------------------------------------------------------------- pack


def test_pack_image_folder_round_trip(tmp_path, capsys):
    folder = tmp_path / "imgs"
    for j in range(7):
        save_png(folder / ("cat" if j % 2 else "dog") / f"{j}.png", pixels(1, 6 + j, 9, 3, seed=j)[0])
    code, _, err = run_cli(capsys, "pack", folder, "--out", tmp_path / "p.zarr", "--workers", "0")
    assert_one_line_error(code, err, "resize")  # mixed sizes: the first other-sized file is named
    assert str(folder / "cat" / "3.png") in err
    code, out, err = run_cli(capsys, "pack", folder, "--out", tmp_path / "p.zarr", "--resize", "5", "--workers", "1",
                             "--json")
    assert code == 0, err
    assert json.loads(out)["shape"] == [7, 5, 5, 3]
    packed, direct = load_images(str(tmp_path / "p.zarr"), "all"), load_images(str(folder), "all", resize=(5, 5))
    np.testing.assert_array_equal(packed.images, direct.images)
    np.testing.assert_array_equal(packed.labels, direct.labels)
    assert packed.class_names == ("cat", "dog") and packed.source_names == direct.source_names
    for split in ("train", "test"):  # same rows, so the same seeded splits
        np.testing.assert_array_equal(load_images(str(tmp_path / "p.zarr"), split).images,
                                      load_images(str(folder), split, resize=(5, 5)).images)
    code, _, err = run_cli(capsys, "pack", folder, "--out", tmp_path / "p.zarr", "--resize", "5")
    assert_one_line_error(code, err, "--resume")
    code, _, err = run_cli(capsys, "pack", folder, "--out", tmp_path / "p.zarr", "--resize", "4", "--resume")
    assert_one_line_error(code, err, "resize")


@subprocess_fixture
def pack_killed_after_block_1(request):
    """tests/kill_worker.py packing OUT/imgs (18 PNGs) into OUT/cut.zarr in blocks of 4, killing itself with
    SIGKILL after block 1; in the background (tests/background.py)."""
    out = request.getfixturevalue("tmp_path_factory").mktemp("killed-pack")
    for j in range(18):
        save_png(out / "imgs" / f"{j:02d}.png", pixels(1, 4, 4, 3, seed=j)[0])
    argv = [sys.executable, str(ROOT / "tests" / "kill_worker.py"), "pack", str(out / "imgs"), str(out / "cut.zarr"),
            "1"]
    return argv, None, SUBPROCESS_ENV, 120, {"out": out}


def test_pack_resumes_after_sigkill_and_equals_an_uninterrupted_pack(pack_killed_after_block_1, capsys):
    tmp_path = pack_killed_after_block_1.out  # this test's own folder
    folder = tmp_path / "imgs"
    pack_images(str(folder), tmp_path / "whole.zarr", workers=0, block_rows=4)
    assert pack_killed_after_block_1.returncode == -9, pack_killed_after_block_1.stderr[-2000:]
    assert zarr.open_group(str(tmp_path / "cut.zarr"), mode="r")["blocks_written"][...].tolist() == [1, 1, 0, 0, 0]
    with pytest.raises(DataError, match="--resume"):  # an interrupted pack is no data set
        open_images(str(tmp_path / "cut.zarr"))
    code, _, err = run_cli(capsys, "train", "--preset", "tiny", "--data", tmp_path / "cut.zarr", "--run-dir",
                           tmp_path / "run", "--steps", "1")
    assert_one_line_error(code, err, "incomplete")
    code, out, err = run_cli(capsys, "pack", folder, "--out", tmp_path / "cut.zarr", "--resume", "--json")
    assert code == 0, err
    assert json.loads(out)["blocks_written"] == 3
    whole, cut = (zarr.open_group(str(tmp_path / p), mode="r") for p in ("whole.zarr", "cut.zarr"))
    for name in ("images", "ok", "names", "blocks_written"):
        np.testing.assert_array_equal(cut[name][...], whole[name][...])
    assert dict(cut.attrs) == dict(whole.attrs) and cut.attrs["complete"] is True


def test_bad_image_files_are_named_or_skipped_and_counted(tmp_path, capsys):
    folder = tmp_path / "imgs"
    for j in range(12):
        save_png(folder / f"{j:02d}.png", pixels(1, 4, 4, 3, seed=j)[0])
    whole = (folder / "05.png").read_bytes()
    (folder / "05.png").write_bytes(whole[: len(whole) // 2])  # a valid header, truncated pixels
    with pytest.raises(DataError, match="05.png"):  # in a worker process, raised here as one sentence
        list(open_images(str(folder), "all").batches(4, workers=1))
    code, _, err = run_cli(capsys, "pack", folder, "--out", tmp_path / "p.zarr", "--workers", "2")
    assert_one_line_error(code, err, str(folder / "05.png"))
    (folder / "09.png").write_bytes(b"not an image at all")  # an unreadable header
    with pytest.raises(DataError, match="09.png"):  # refused on opening: its header cannot be read
        open_images(str(folder))
    code, out, err = run_cli(capsys, "pack", folder, "--out", tmp_path / "p.zarr", "--skip-bad", "--overwrite",
                             "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["skipped"] == 2 and set(report["skipped_files"]) == {"05.png", "09.png"}
    packed = load_images(str(tmp_path / "p.zarr"), "all")
    assert len(packed) == 10 and "05.png" not in packed.source_names and "09.png" not in packed.source_names
    for name, image in zip(packed.source_names, packed.images):
        np.testing.assert_array_equal(np.asarray(Image.open(folder / name)), image)


def test_eval_streams_a_packed_store_with_workers(tmp_path, capsys):
    np.save(tmp_path / "d.npy", pixels(40, 8, 8, 1, seed=6))
    run = streaming_run(str(tmp_path / "d.npy"))
    train(tmp_path / "run", replace(run, train=replace(run.train, steps=2)), quiet=True)
    pack_images(str(tmp_path / "d.npy"), tmp_path / "d.zarr")
    results = []
    for data, workers in ((tmp_path / "d.npy", "0"), (tmp_path / "d.zarr", "2")):
        code, out, err = run_cli(capsys, "eval", tmp_path / "run", "--data", data, "--batch-size", "8",
                                 "--workers", workers, "--json")
        assert code == 0, err
        results.append(json.loads(out))
    assert results[0]["n_images"] == 4 and results[0]["bits_per_dim"] == results[1]["bits_per_dim"]
