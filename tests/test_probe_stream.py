"""Downstream use at any size: the streaming probe (same protocol, block by block) agrees with
the in-memory one, its pieces match scikit-learn's closed forms, `vdvl probe` switches to it
when a feature set exceeds the memory budget, and EncodingsDataset feeds a DataLoader."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.model_selection import StratifiedKFold
from sklearn.preprocessing import StandardScaler
from torch.utils.data import DataLoader

from helpers import assert_one_line_error, run_cli
from store_fixtures import random_run
from vdvae_latents.stores.encode import encode_to_store
from vdvae_latents.core.errors import UserError
from vdvae_latents.downstream.streaming import _Moments, blocks, default_epochs
from vdvae_latents.downstream.probe import run_probe
from vdvae_latents.stores.writer import StoreWriter
from vdvae_latents.stores.reader import open_encodings
from vdvae_latents.downstream.torch_dataset import ChunkShuffleSampler, EncodingsDataset


def gaussian_classes(n: int, k: int, classes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Well separated Gaussian classes (the classes' centres far apart relative to the noise)."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, n)
    centres = rng.normal(0, 1.5, (classes, k))
    return (centres[y] + rng.normal(0, 1.0, (n, k))).astype(np.float32), y


def write_store(path: Path, X: np.ndarray, y: np.ndarray, chunk_rows: int, dtype: str = "float32") -> Path:
    n, k = X.shape
    dims = {"layer": np.zeros(k), "variate": np.arange(k), "y": -np.ones(k), "x": -np.ones(k), "avg_kl": np.ones(k)}
    writer = StoreWriter.create(path, n_rows=n, dims=dims, attrs={}, dtype=dtype, has_labels=True,
                                chunk_rows=chunk_rows)
    for i in range(writer.n_chunks):
        lo, hi = writer.chunk_range(i)
        writer.write_chunk(i, X[lo:hi], labels=y[lo:hi], sample_index=np.arange(lo, hi),
                           source_index=np.arange(lo, hi))
    writer.finalize()
    return path


@pytest.fixture(scope="module")
def separable(tmp_path_factory) -> Path:
    X, y = gaussian_classes(2400, 12, 4, seed=0)
    return write_store(tmp_path_factory.mktemp("stream") / "sep.zarr", X, y, chunk_rows=100)


def test_streaming_agrees_with_in_memory(separable):
    reports = {mode: run_probe(separable, baselines="none", stream=mode, seeds=1) for mode in ("never", "always")}
    mem, streamed = (reports[m]["rows"][0] for m in ("never", "always"))
    assert mem["fit"] == "in-memory" and streamed["fit"] == "streaming"
    assert reports["never"]["n_train"] == reports["always"]["n_train"] == 1920  # all rows after the hold-out
    assert mem["test_accuracy"] > 0.9  # a problem both should nearly solve
    for a, b in zip(mem["test_accuracies"], streamed["test_accuracies"]):
        assert abs(a - b) <= 0.01, (mem["test_accuracies"], streamed["test_accuracies"])
    assert all("alpha" in p for p in streamed["params"]) and streamed["epochs"] == default_epochs(1920)


def test_blocks_are_whole_chunks_covering_each_row_once():
    unit = np.arange(1000) // 64
    rows = np.sort(np.random.default_rng(0).choice(1000, 600, replace=False))
    natural = blocks(rows, unit, 150)
    shuffled = blocks(rows, unit, 150, np.random.default_rng(1))
    for parts in (natural, shuffled):
        np.testing.assert_array_equal(np.sort(np.concatenate(parts)), rows)
        for b in parts:
            assert len(b) >= 150 or b is parts[-1]
            assert np.all(np.diff(b) > 0)
            # a block holds every selected row of each of its chunks
            for c in np.unique(unit[b]):
                np.testing.assert_array_equal(b[unit[b] == c], rows[unit[rows] == c])
    assert [b[0] for b in natural] != [b[0] for b in shuffled]


def test_fold_moments_are_standard_scalers():
    X, y = gaussian_classes(300, 5, 3, seed=2)
    X[:, 4] = 3.0  # a constant column: scale 1, as StandardScaler does
    fold = np.empty(300, int)
    for k, (_, held) in enumerate(StratifiedKFold(3, shuffle=True, random_state=0).split(X, y)):
        fold[held] = k
    m = _Moments(3, 5)
    for lo in range(0, 300, 70):
        m.add(X[lo:lo + 70], fold[lo:lo + 70])
    for k in (None, 0, 1, 2):
        rows = np.ones(300, bool) if k is None else fold != k
        ref = StandardScaler().fit(X[rows])
        mean, scale = m.scaler(k)
        np.testing.assert_allclose(mean, ref.mean_, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(scale, ref.scale_, rtol=1e-4)


def test_auto_streams_what_exceeds_the_budget(separable, capsys):
    report = run_probe(separable, baselines="none", seeds=1, memory_budget=1e3, epochs=1)
    assert report["rows"][0]["fit"] == "streaming" and report["rows"][0]["epochs"] == 1
    with pytest.raises(UserError, match="--model knn cannot stream"):
        run_probe(separable, baselines="none", seeds=1, memory_budget=1e3, model="knn")
    code, out, err = run_cli(capsys, "probe", separable, "--baselines", "none", "--seeds", "1", "--memory-budget",
                             "1e-6", "--epochs", "2", "--json")
    assert code == 0, err
    row = json.loads(out)["rows"][0]
    assert row["fit"] == "streaming" and row["epochs"] == 2
    code, _, err = run_cli(capsys, "probe", separable, "--stream", "sometimes")
    assert_one_line_error(code, err, "--stream")


@pytest.fixture(scope="module")
def digits_store(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("digits-stream")
    run = random_run(root / "run")
    path = root / "val.zarr"
    # range: the random weights' posterior means vary far less than a prior-std step
    encode_to_store(run, "digits", path, split="val", keep="25%", chunk_rows=32, dtype="int8", quantize="range",
                    kl_limit=64, device="cpu")
    return path


def test_pixel_and_pca_baselines_stream(digits_store):
    report = run_probe(digits_store, baselines="pixels,pca", seeds=1, stream="always", epochs=3)
    rows = {r["name"]: r for r in report["rows"]}
    assert {r["fit"] for r in rows.values()} == {"streaming"}
    assert rows["pixels"]["features"] == 64 and rows["active"]["dtype"] == "int8"
    assert rows["pca"]["features_per_seed"] == [min(64, rows["active"]["features"])]
    for row in rows.values():
        assert row["test_accuracy"] > 2 * report["chance_accuracy"], row


def test_encodings_dataset_and_sampler(digits_store):
    ds = EncodingsDataset(digits_store, cache_chunks=2)
    with open_encodings(digits_store) as enc:
        X, y = enc.features[:], enc.labels[:]
    assert len(ds) == len(X) and ds.n_features == X.shape[1]
    x0, y0 = ds[5]
    assert x0.dtype == torch.float32 and y0.dtype == torch.int64
    np.testing.assert_array_equal(x0.numpy(), X[5])
    assert int(y0) == y[5]

    sampler = ChunkShuffleSampler(ds, chunks_per_group=2, seed=3)
    order = list(sampler)
    assert sorted(order) == list(range(len(ds)))
    # two chunks at a time: never more than two chunks started but not finished, so a cache
    # of two decodes every chunk once per epoch
    chunks = ds.chunk_of(np.asarray(order))
    left = dict(zip(*np.unique(chunks, return_counts=True)))
    open_chunks: set[int] = set()
    for c in chunks.tolist():
        open_chunks.add(c)
        left[c] -= 1
        assert len(open_chunks) <= 2
        if left[c] == 0:
            open_chunks.discard(c)
    sampler.set_epoch(1)
    assert list(sampler) != order

    mean, std = ds.moments()
    np.testing.assert_allclose(mean, X.astype(np.float64).mean(0), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(std, np.where(X.std(0) > 0, X.astype(np.float64).std(0), 1.0), rtol=1e-5)

    loader = DataLoader(ds, batch_size=50, sampler=sampler, num_workers=2)
    seen_x, seen_y = [], []
    for xb, yb in loader:
        seen_x.append(xb.numpy())
        seen_y.append(yb.numpy())
    got_x, got_y = np.concatenate(seen_x), np.concatenate(seen_y)
    sampler_order = np.asarray(list(sampler))
    np.testing.assert_array_equal(got_x, X[sampler_order])
    np.testing.assert_array_equal(got_y, y[sampler_order])

    subset = EncodingsDataset(digits_store, rows=[3, 40, 7])
    np.testing.assert_array_equal(torch.stack([subset[i][0] for i in range(3)]).numpy(), X[[3, 40, 7]])
    with pytest.raises(UserError, match="rows"):
        EncodingsDataset(digits_store, rows=[len(X)])
