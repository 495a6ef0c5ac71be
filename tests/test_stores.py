"""Tests for vdvae_latents.stores.writer: the Zarr/HDF5 encoding stores, their shared layout,
refusals, resuming (including after a real kill -9) and concurrent Zarr writers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import h5py
import numpy as np
import pytest
import zarr

from background import lower_priority, subprocess_fixture
from vdvae_latents.stores import writer as stores
from vdvae_latents.core.errors import UserError
from vdvae_latents.stores.schema import SCHEMA_NAME, SCHEMA_VERSION
from vdvae_latents.stores.reader import Encodings, open_encodings
from vdvae_latents.stores.backends import StoreError, store_format
from vdvae_latents.stores.writer import StoreWriter

FORMATS = {"zarr": ".zarr", "hdf5": ".h5"}
N_ROWS, N_FEATURES, CHUNK_ROWS = 53, 6, 8  # 7 chunks, the last one 5 rows long

# ------------------------------------------------------------------------ helpers


def make_inputs(n_rows: int = N_ROWS, n_features: int = N_FEATURES, seed: int = 0) -> dict[str, Any]:
    """Everything a store is created from and filled with, deterministic in `seed`."""
    rng = np.random.default_rng(seed)
    return {
        "features": rng.normal(size=(n_rows, n_features)).astype(np.float32),
        "features_std": rng.uniform(0.1, 2.0, size=(n_rows, n_features)).astype(np.float32),
        "labels": rng.integers(0, 10, size=n_rows),
        "sample_index": rng.permutation(n_rows * 3)[:n_rows],
        "source_index": rng.permutation(n_rows * 5)[:n_rows],
        "dims": {
            "layer": rng.integers(0, 4, size=n_features),
            "variate": rng.integers(0, 16, size=n_features),
            "y": np.full(n_features, -1),
            "x": np.full(n_features, -1),
            "avg_kl": np.sort(rng.uniform(0, 3, size=n_features))[::-1].copy(),
        },
        "attrs": {
            "checkpoint": {"sha256": "ab" * 32, "path": "runs/x/checkpoints/step-100.pt"},
            "model_config": {"channels": 1, "widths": [16, 32], "nested": {"deep": [1, [2, 3]]}},
            "data": {"name": "digits", "split": "test"},
            "granularity": "variate",
            "selection": {"rule": "top_k", "value": n_features},
            "statistic": "mean",
            "dtype": "float16",
            "n_dims_total": 64,
            "n_dims_kept": n_features,
            "flag": True,
            "ratio": 0.125,
            "nothing": None,
        },
    }


def create(path: Path, inputs: dict[str, Any], **kwargs: Any) -> StoreWriter:
    options = {"dtype": "float16", "with_std": True, "has_labels": True, "chunk_rows": CHUNK_ROWS} | kwargs
    return StoreWriter.create(path, n_rows=len(inputs["features"]), dims=inputs["dims"], attrs=inputs["attrs"],
                              **options)


def write(writer: StoreWriter, inputs: dict[str, Any], chunks: list[int] | None = None) -> None:
    for i in writer.missing_chunks() if chunks is None else chunks:
        a, b = writer.chunk_range(i)
        writer.write_chunk(
            i, inputs["features"][a:b],
            features_std=inputs["features_std"][a:b] if writer.with_std else None,
            labels=inputs["labels"][a:b] if writer.has_labels else None,
            sample_index=inputs["sample_index"][a:b], source_index=inputs["source_index"][a:b])


def build(path: Path, inputs: dict[str, Any], *, seed: int = 1, **kwargs: Any) -> Path:
    """A finished store, its chunks written in a random order."""
    writer = create(path, inputs, **kwargs)
    order = list(range(writer.n_chunks))
    np.random.default_rng(seed).shuffle(order)
    write(writer, inputs, order)
    writer.finalize()
    return path


def read_all(path: Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    with open_encodings(path) as enc:
        return enc.to_numpy(), enc.attrs


def assert_same_content(a: Path, b: Path) -> None:
    arrays_a, attrs_a = read_all(a)
    arrays_b, attrs_b = read_all(b)
    if store_format(a) != store_format(b):  # each format has its own compression
        attrs_a, attrs_b = ({k: v for k, v in attrs.items() if k != "codec"} for attrs in (attrs_a, attrs_b))
    assert attrs_a == attrs_b
    assert arrays_a.keys() == arrays_b.keys()
    for key in arrays_a:
        assert arrays_a[key].dtype == arrays_b[key].dtype, key
        np.testing.assert_array_equal(arrays_a[key], arrays_b[key], err_msg=key)


@pytest.fixture(params=list(FORMATS))
def fmt(request: pytest.FixtureRequest) -> str:
    return request.param


def store_path(tmp_path: Path, fmt: str, name: str = "enc") -> Path:
    return tmp_path / f"{name}{FORMATS[fmt]}"


# A child process that resumes/writes a store slowly, printing each chunk it finished. Importing
# vdvae_latents.stores.writer does not import torch (the package's __init__ is lazy), so it starts
# in a fraction of a second.
CHILD_WRITER = """
import sys, time
import numpy as np
from vdvae_latents.stores.writer import StoreWriter
path, data, rank, world, delay = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])
d = np.load(data)
w = StoreWriter.open(path)
for i in w.missing_chunks():
    if i % world != rank:
        continue
    a, b = w.chunk_range(i)
    w.write_chunk(i, d["features"][a:b], features_std=d["features_std"][a:b], labels=d["labels"][a:b],
                  sample_index=d["sample_index"][a:b], source_index=d["source_index"][a:b])
    w.missing_chunks()  # read the flags while other writers change them
    print(i, flush=True)
    time.sleep(delay)
w.close()
print("done", flush=True)
"""


def save_inputs(tmp_path: Path, inputs: dict[str, Any]) -> Path:
    data = tmp_path / "rows.npz"
    np.savez(data, **{k: inputs[k] for k in ("features", "features_std", "labels", "sample_index", "source_index")})
    return data


def start_child(path: Path, data: Path, rank: int = 0, world: int = 1, delay: float = 0.0) -> subprocess.Popen:
    """Start CHILD_WRITER (on the background thread, below the in-process tests: tests/background.py);
    its stderr goes to a file next to the data (a pipe could fill up)."""
    args = [sys.executable, "-c", CHILD_WRITER, str(path), str(data), str(rank), str(world), str(delay)]
    with open(data.parent / f"child-{rank}.err", "w") as err:
        child = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=err, text=True, preexec_fn=lower_priority)
    # Never let a stuck child hang the test run: kill it after a minute whatever happens.
    watchdog = threading.Timer(60, child.kill)
    watchdog.daemon = True
    watchdog.start()
    return child


def child_errors(data: Path, rank: int = 0) -> str:
    return (data.parent / f"child-{rank}.err").read_text()


# ------------------------------------------------------------------------ basics


def test_store_format() -> None:
    assert store_format("a/b.zarr") == "zarr"
    assert store_format(Path("x.ZARR")) == "zarr"
    assert store_format("x.h5") == "hdf5"
    assert store_format("x.hdf5") == "hdf5"
    for bad in ("x.npz", "x", "x.zarr.tmp"):
        with pytest.raises(StoreError, match=bad.replace(".", r"\.")):
            store_format(bad)
    assert issubclass(StoreError, UserError)


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_round_trip(tmp_path: Path, fmt: str, dtype: str) -> None:
    inputs = make_inputs()
    path = build(store_path(tmp_path, fmt), inputs, dtype=dtype)
    with open_encodings(path) as enc:
        assert isinstance(enc, Encodings)
        assert enc.format == fmt and enc.path == path and enc.complete
        assert (enc.n_rows, enc.n_features) == (N_ROWS, N_FEATURES)
        # lazy arrays: shape/dtype/len/slicing without reading everything
        assert enc.features.shape == (N_ROWS, N_FEATURES) and enc.features.dtype == np.dtype(dtype)
        assert len(enc.features) == N_ROWS and len(enc.sample_index) == N_ROWS
        np.testing.assert_array_equal(enc.features[10:20], inputs["features"][10:20].astype(dtype))
        np.testing.assert_array_equal(np.asarray(enc.features), inputs["features"].astype(dtype))
        np.testing.assert_array_equal(np.asarray(enc.features_std), inputs["features_std"].astype(dtype))
        np.testing.assert_array_equal(np.asarray(enc.labels), inputs["labels"])
        np.testing.assert_array_equal(np.asarray(enc.sample_index), inputs["sample_index"])
        np.testing.assert_array_equal(np.asarray(enc.source_index), inputs["source_index"])
        assert enc.labels.dtype == np.int64 and enc.sample_index.dtype == np.int64
        assert enc.source_index.dtype == np.int64 and enc.source_names is None
        for name, values in inputs["dims"].items():
            np.testing.assert_array_equal(enc.dims[name], values)
            assert enc.dims[name].dtype == (np.float64 if name == "avg_kl" else np.int32)
        table = enc.dims_table()
        assert len(table) == N_FEATURES
        assert table[2] == {"feature": 2, **{k: v[2].item() for k, v in inputs["dims"].items()}}

        expected_attrs = {**json.loads(json.dumps(inputs["attrs"])), "schema": SCHEMA_NAME,
                          "schema_version": SCHEMA_VERSION, "n_rows": N_ROWS, "n_features": N_FEATURES,
                          "chunk_rows": CHUNK_ROWS, "codec": stores.default_codec(fmt, dtype), "checksum": "crc32",
                          "checksum_arrays": ["features", "features_std", "labels", "sample_index", "source_index"],
                          "quantization": None, "complete": True}
        assert enc.attrs == expected_attrs
        assert type(enc.attrs["flag"]) is bool and type(enc.attrs["n_rows"]) is int

        arrays = enc.to_numpy()
        assert set(arrays) == {"features", "features_std", "labels", "sample_index", "source_index",
                               *(f"dims/{n}" for n in inputs["dims"])}


def test_without_std_and_labels(tmp_path: Path, fmt: str) -> None:
    inputs = make_inputs()
    path = build(store_path(tmp_path, fmt), inputs, with_std=False, has_labels=False, chunk_rows=100)
    with open_encodings(path) as enc:
        assert enc.features_std is None and enc.labels is None
        assert set(enc.to_numpy()) == {"features", "sample_index", "source_index",
                                       *(f"dims/{n}" for n in inputs["dims"])}
        np.testing.assert_array_equal(enc.features[:], inputs["features"].astype(np.float16))


def test_formats_read_identically(tmp_path: Path) -> None:
    inputs = make_inputs(seed=3)
    zarr_path = build(tmp_path / "a.zarr", inputs, seed=4)
    hdf5_path = build(tmp_path / "a.hdf5", inputs, seed=5)
    assert_same_content(zarr_path, hdf5_path)
    # the key order of the attributes matches too (HDF5 tracks creation order)
    assert list(read_all(zarr_path)[1]) == list(read_all(hdf5_path)[1])


def test_layout_on_disk(tmp_path: Path) -> None:
    """The parts of the contract that the readers above do not see: chunking, compression,
    dimension names, the JSON convention for nested HDF5 attributes."""
    inputs = make_inputs()
    zpath = build(tmp_path / "a.zarr", inputs)
    group = zarr.open_group(str(zpath), mode="r")
    names = {"features": ("row", "feature"), "features_std": ("row", "feature"), "labels": ("row",),
             "sample_index": ("row",), "source_index": ("row",), "chunks_written": ("chunk",),
             "chunk_checksums": ("chunk", "checksummed_array"), "chunk_errors": ("chunk", "value_array", "error_field"),
             **{f"dims/{n}": ("feature",) for n in inputs["dims"]}}
    arrays = {name: arr for name, arr in group.arrays()} | {f"dims/{n}": a for n, a in group["dims"].arrays()}
    assert set(arrays) == set(names)
    for name, arr in arrays.items():
        assert arr.metadata.dimension_names == names[name], name
        assert arr.metadata.zarr_format == 3
    assert group["features"].chunks == (CHUNK_ROWS, N_FEATURES)
    assert group["chunks_written"].chunks == (1,)
    codec = group["features"].compressors[0]  # float16: Blosc zstd with byte shuffle
    assert type(codec).__name__ == "BloscCodec" and codec.cname.value == "zstd" and codec.shuffle.value == "shuffle"
    assert group["chunk_checksums"].chunks == (1, 5) and group["chunk_errors"].chunks == (1, 2, 4)
    np.testing.assert_array_equal(group["chunks_written"][:], np.ones(7, dtype=np.uint8))

    hpath = build(tmp_path / "a.h5", inputs)
    with h5py.File(hpath, "r") as f:
        assert f["features"].chunks == (CHUNK_ROWS, N_FEATURES)
        assert f["features"].compression == "gzip" and f["features"].compression_opts == 9 and f["features"].shuffle
        assert f["dims/y"].dtype == np.int32 and f["chunks_written"].dtype == np.uint8
        assert isinstance(f.attrs["model_config"], str)  # nested -> JSON string
        assert json.loads(f.attrs["model_config"]) == inputs["attrs"]["model_config"]
        assert f.attrs["schema"] == SCHEMA_NAME and f.attrs["complete"]


def test_chunk_bigger_than_store(tmp_path: Path, fmt: str) -> None:
    inputs = make_inputs(n_rows=3)
    path = build(store_path(tmp_path, fmt), inputs, chunk_rows=1024)
    arrays, attrs = read_all(path)
    assert attrs["chunk_rows"] == 1024
    np.testing.assert_array_equal(arrays["labels"], inputs["labels"])


def test_lazy_arrays_need_open_file(tmp_path: Path) -> None:
    path = build(tmp_path / "a.h5", make_inputs())
    enc = open_encodings(path)
    enc.close()
    enc.close()  # twice is fine
    with pytest.raises(ValueError, match="closed"):
        enc.features[:2]
    with pytest.raises(ValueError, match="closed"):
        np.asarray(enc.labels)


# ------------------------------------------------------------------------ create / open refusals


def test_existing_path_needs_overwrite(tmp_path: Path, fmt: str) -> None:
    path = build(store_path(tmp_path, fmt), make_inputs(seed=1))
    with pytest.raises(StoreError, match=r"exists; use --overwrite or --resume") as info:
        create(path, make_inputs(seed=2))
    assert str(path) in str(info.value)
    assert read_all(path)[1]["complete"]  # untouched

    inputs = make_inputs(seed=2, n_rows=20)
    writer = create(path, inputs, overwrite=True, dtype="float32")
    assert writer.missing_chunks() == [0, 1, 2]
    write(writer, inputs)
    writer.finalize()
    arrays, attrs = read_all(path)
    assert attrs["n_rows"] == 20
    np.testing.assert_array_equal(arrays["features"], inputs["features"])


def test_overwrite_refuses_to_delete_a_foreign_directory(tmp_path: Path) -> None:
    path = tmp_path / "precious.zarr"
    path.mkdir()
    (path / "thesis.tex").write_text("do not delete")
    with pytest.raises(StoreError, match="not a Zarr store"):
        create(path, make_inputs(), overwrite=True)
    assert (path / "thesis.tex").exists()


def test_bad_create_arguments(tmp_path: Path, fmt: str) -> None:
    inputs = make_inputs()
    path = store_path(tmp_path, fmt)
    with pytest.raises(StoreError, match="dtype"):
        create(path, inputs, dtype="float64")
    with pytest.raises(StoreError, match="chunk_rows"):
        create(path, inputs, chunk_rows=0)
    with pytest.raises(StoreError, match="rows"):
        StoreWriter.create(path, n_rows=0, dims=inputs["dims"], attrs={})
    with pytest.raises(StoreError, match="no feature"):
        StoreWriter.create(path, n_rows=5, dims={k: v[:0] for k, v in inputs["dims"].items()}, attrs={})
    with pytest.raises(ValueError, match="dims"):
        StoreWriter.create(path, n_rows=5, dims={"layer": np.zeros(3)}, attrs={})
    with pytest.raises(ValueError, match="complete"):
        StoreWriter.create(path, n_rows=5, dims=inputs["dims"], attrs={"complete": True})
    assert not path.exists()


def test_missing_parent_directories_are_created(tmp_path: Path, fmt: str) -> None:
    path = tmp_path / "new" / "folders" / f"enc{FORMATS[fmt]}"
    create(path, make_inputs())
    assert path.exists()


def test_a_file_where_a_parent_folder_is_needed_is_refused(tmp_path: Path, fmt: str) -> None:
    (tmp_path / "a-file").write_text("not a folder")
    path = tmp_path / "a-file" / f"enc{FORMATS[fmt]}"
    with pytest.raises(StoreError, match="is a file, not a folder") as info:
        create(path, make_inputs())
    assert str(path) in str(info.value)


def test_read_only_parent_directory(tmp_path: Path, fmt: str) -> None:
    if os.geteuid() == 0:
        pytest.skip("root can write into read-only directories (see the simulated test below)")
    parent = tmp_path / "ro"
    parent.mkdir()
    parent.chmod(0o555)
    try:
        with pytest.raises(StoreError, match="not writable") as info:
            create(parent / f"enc{FORMATS[fmt]}", make_inputs())
        assert str(parent) in str(info.value)
    finally:
        parent.chmod(0o755)


def test_read_only_parent_simulated(tmp_path: Path, fmt: str, monkeypatch: pytest.MonkeyPatch) -> None:
    path = store_path(tmp_path, fmt)

    # 1) the access check
    monkeypatch.setattr(stores.os, "access", lambda *a, **k: False)
    with pytest.raises(StoreError, match="not writable") as info:
        create(path, make_inputs())
    assert str(path) in str(info.value)
    monkeypatch.undo()

    # 2) the file system refusing the write anyway (e.g. a read-only mount seen as writable)
    def refuse(*args: Any, **kwargs: Any) -> None:
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(zarr, "open_group", refuse)
    monkeypatch.setattr(h5py, "File", refuse)
    with pytest.raises(StoreError, match="Permission denied") as info:
        create(path, make_inputs())
    assert str(path) in str(info.value)
    assert not path.exists()


def test_missing_store_refused(tmp_path: Path, fmt: str) -> None:
    path = store_path(tmp_path, fmt)
    for opener in (open_encodings, StoreWriter.open):
        with pytest.raises(StoreError, match="does not exist") as info:
            opener(path)
        assert str(path) in str(info.value)


def test_not_our_schema_refused(tmp_path: Path) -> None:
    zpath = tmp_path / "other.zarr"
    group = zarr.open_group(str(zpath), mode="w", attributes={"schema": "someone-else"})
    group.create_array("features", shape=(2, 2), dtype="float32")
    hpath = tmp_path / "other.h5"
    with h5py.File(hpath, "w") as f:
        f["features"] = np.zeros((2, 2))
    for path in (zpath, hpath):
        for opener in (open_encodings, StoreWriter.open):
            with pytest.raises(StoreError, match=f"not a {SCHEMA_NAME} store") as info:
                opener(path)
            assert str(path) in str(info.value)


def test_newer_schema_version_refused(tmp_path: Path, fmt: str) -> None:
    path = build(store_path(tmp_path, fmt), make_inputs())
    if fmt == "zarr":
        zarr.open_group(str(path), mode="r+").update_attributes({"schema_version": SCHEMA_VERSION + 1})
    else:
        with h5py.File(path, "r+") as f:
            f.attrs["schema_version"] = SCHEMA_VERSION + 1
    with pytest.raises(StoreError, match="newer") as info:
        open_encodings(path)
    assert str(path) in str(info.value)


def test_corrupt_stores_refused(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    garbage_h5 = tmp_path / "garbage.h5"
    garbage_h5.write_bytes(rng.bytes(4096))
    garbage_zarr = tmp_path / "garbage.zarr"
    garbage_zarr.mkdir()
    (garbage_zarr / "zarr.json").write_bytes(rng.bytes(300))
    not_json_zarr = tmp_path / "notjson.zarr"
    not_json_zarr.mkdir()
    (not_json_zarr / "zarr.json").write_text("{ this is not json")
    empty_zarr = tmp_path / "empty.zarr"
    empty_zarr.mkdir()
    for path in (garbage_h5, garbage_zarr, not_json_zarr, empty_zarr):
        for opener in (open_encodings, StoreWriter.open):
            with pytest.raises(StoreError) as info:
                opener(path)
            assert str(path) in str(info.value), str(info.value)
            assert "--overwrite" in str(info.value)


def test_corrupt_array_metadata_refused(tmp_path: Path) -> None:
    path = build(tmp_path / "a.zarr", make_inputs())
    (path / "features" / "zarr.json").write_text("{ broken")
    for opener in (open_encodings, StoreWriter.open):
        with pytest.raises(StoreError, match="corrupt|not a readable") as info:
            opener(path)
        assert str(path) in str(info.value)


def test_truncated_flag_counts_as_missing(tmp_path: Path) -> None:
    """A flag object cut short (a kill while it was written, with a zarr that does not write
    atomically) must not make the store unreadable: that chunk is simply redone."""
    inputs = make_inputs()
    path = tmp_path / "a.zarr"
    writer = create(path, inputs)
    write(writer, inputs, [0, 1, 2])
    writer.close()
    flag_files = sorted(p for p in (path / "chunks_written").rglob("*") if p.is_file() and p.name != "zarr.json")
    assert [p.name for p in flag_files] == ["0", "1", "2"]
    flag_files[1].write_bytes(b"")
    writer = StoreWriter.open(path)
    assert writer.missing_chunks() == [1, 3, 4, 5, 6]
    write(writer, inputs)
    writer.finalize()
    assert_same_content(path, build(tmp_path / "reference.zarr", inputs))


def test_missing_array_refused(tmp_path: Path, fmt: str) -> None:
    path = build(store_path(tmp_path, fmt), make_inputs())
    if fmt == "zarr":
        import shutil
        shutil.rmtree(path / "sample_index")
    else:
        with h5py.File(path, "r+") as f:
            del f["sample_index"]
    for opener in (open_encodings, StoreWriter.open):
        with pytest.raises(StoreError, match="sample_index") as info:
            opener(path)
        message = str(info.value)
        assert "corrupt" in message and str(path) in message and "--overwrite" in message


def test_expect_attrs(tmp_path: Path, fmt: str) -> None:
    inputs = make_inputs()
    path = store_path(tmp_path, fmt)
    writer = create(path, inputs)
    write(writer, inputs, [0, 1])
    writer.close()

    same = {"checkpoint": inputs["attrs"]["checkpoint"], "granularity": "variate", "dtype": "float16"}
    StoreWriter.open(path, expect_attrs=same).close()
    other = {"granularity": "variate", "checkpoint": {**inputs["attrs"]["checkpoint"], "sha256": "cd" * 32}}
    with pytest.raises(StoreError, match="checkpoint") as info:
        StoreWriter.open(path, expect_attrs=other)
    assert str(path) in str(info.value) and "granularity" not in str(info.value)
    with pytest.raises(StoreError, match="no attribute unknown_key"):
        StoreWriter.open(path, expect_attrs={"unknown_key": 1})


def test_write_chunk_validation(tmp_path: Path, fmt: str) -> None:
    inputs = make_inputs()
    writer = create(store_path(tmp_path, fmt), inputs)
    rows = np.zeros((CHUNK_ROWS, N_FEATURES))
    index = np.arange(CHUNK_ROWS)
    ok = {"features_std": rows, "labels": index, "sample_index": index, "source_index": index}
    with pytest.raises(ValueError, match="features has shape"):
        writer.write_chunk(0, rows[:-1], **ok)
    with pytest.raises(ValueError, match="features has shape"):
        writer.write_chunk(0, rows[:, :-1], **ok)
    with pytest.raises(ValueError, match="shape"):  # the last chunk has only 5 rows
        writer.write_chunk(6, rows, **ok)
    with pytest.raises(ValueError, match="sample_index"):
        writer.write_chunk(0, rows, **(ok | {"sample_index": index[:3]}))
    with pytest.raises(ValueError, match="labels"):
        writer.write_chunk(0, rows, **(ok | {"labels": None}))
    with pytest.raises(ValueError, match="features_std"):
        writer.write_chunk(0, rows, **(ok | {"features_std": None}))
    with pytest.raises(ValueError, match="integers"):
        writer.write_chunk(0, rows, **(ok | {"labels": index + 0.5}))
    with pytest.raises(ValueError, match="out of range"):
        writer.write_chunk(7, rows, **ok)
    assert writer.missing_chunks() == list(range(7))  # nothing was flagged
    writer.close()
    with pytest.raises(ValueError, match="closed"):
        writer.write_chunk(0, rows, **ok)


def test_chunk_ranges(tmp_path: Path) -> None:
    with create(tmp_path / "a.zarr", make_inputs()) as writer:
        assert writer.n_chunks == 7
        assert [writer.chunk_range(i) for i in (0, 1, 6)] == [(0, 8), (8, 16), (48, 53)]
        assert (writer.n_rows, writer.n_features, writer.chunk_rows) == (N_ROWS, N_FEATURES, CHUNK_ROWS)
        assert (writer.dtype, writer.with_std, writer.has_labels) == ("float16", True, True)


# ------------------------------------------------------------------------ incomplete stores and resuming


def test_incomplete_store(tmp_path: Path, fmt: str) -> None:
    inputs = make_inputs()
    path = store_path(tmp_path, fmt)
    writer = create(path, inputs)
    write(writer, inputs, [1, 4, 2])
    with pytest.raises(StoreError, match="cannot finalize"):
        writer.finalize()
    writer.close()

    with pytest.raises(StoreError, match=r"is incomplete \(3 of 7 chunks written\).*--resume") as info:
        open_encodings(path)
    assert str(path) in str(info.value)

    with open_encodings(path, allow_incomplete=True) as enc:
        assert not enc.complete
        features, labels = enc.features[:], enc.labels[:]
    np.testing.assert_array_equal(features[8:24], inputs["features"][8:24].astype(np.float16))
    assert np.isnan(features[:8]).all() and np.isnan(features[40:]).all()  # never written
    np.testing.assert_array_equal(labels[:8], -1)


def test_resume_equals_uninterrupted(tmp_path: Path, fmt: str) -> None:
    inputs = make_inputs(seed=7)
    reference = build(store_path(tmp_path, fmt, "reference"), inputs)

    path = store_path(tmp_path, fmt)
    writer = create(path, inputs)
    write(writer, inputs, [5, 0, 3])
    writer.close()

    writer = StoreWriter.open(path, expect_attrs={"checkpoint": inputs["attrs"]["checkpoint"]})
    assert writer.missing_chunks() == [1, 2, 4, 6]
    write(writer, inputs)
    assert writer.missing_chunks() == []
    writer.finalize()
    assert writer.closed
    assert_same_content(path, reference)

    # A finished store can be re-opened (another rank arriving late): nothing is missing.
    with StoreWriter.open(path) as late:
        assert late.missing_chunks() == []


def test_rewriting_a_complete_store_marks_it_incomplete(tmp_path: Path, fmt: str) -> None:
    inputs = make_inputs()
    path = build(store_path(tmp_path, fmt), inputs)
    writer = StoreWriter.open(path)
    write(writer, inputs, [3])
    writer.close()
    with pytest.raises(StoreError, match="incomplete"):
        open_encodings(path)
    writer = StoreWriter.open(path)
    writer.finalize()
    assert read_all(path)[1]["complete"]


def killed_writer(fmt: str):
    """A CHILD_WRITER filling a fresh 300-row store of 30 chunks, SIGKILLed after it reported 5 chunks,
    as a subprocess fixture (tests/background.py): it runs, and is killed, on the background thread
    while other tests run. Its value: returncode, written (chunks reported before the kill), path, data."""
    def prepare(request):
        tmp_path = request.getfixturevalue("tmp_path_factory").mktemp(f"killed-writer-{fmt}")
        inputs = make_inputs(n_rows=300, n_features=24, seed=11)
        path = store_path(tmp_path, fmt)
        create(path, inputs, chunk_rows=10).close()  # 30 chunks
        data = save_inputs(tmp_path, inputs)

        def run_and_kill() -> SimpleNamespace:
            child = start_child(path, data, delay=0.002)
            assert child.stdout is not None
            written = 0
            while written < 5:
                if not child.stdout.readline():
                    break  # the writer died early: the test reports it
                written += 1
            else:
                time.sleep(np.random.default_rng().uniform(0, 0.01))  # land anywhere in the write loop
                child.send_signal(signal.SIGKILL)
            child.wait(timeout=30)
            child.stdout.close()
            return SimpleNamespace(returncode=child.returncode, written=written, path=path, data=data)

        return run_and_kill

    return subprocess_fixture(prepare, f"killed_writer_{fmt}")


killed_writer_zarr = killed_writer("zarr")
killed_writer_hdf5 = killed_writer("hdf5")


def test_kill_9_then_resume(tmp_path: Path, fmt: str, killed_writer_zarr, killed_writer_hdf5) -> None:
    """A writer SIGKILLed mid-way leaves an incomplete store that a resume completes exactly
    (Zarr); an HDF5 file may instead be too damaged to reopen, which must say --overwrite."""
    inputs = make_inputs(n_rows=300, n_features=24, seed=11)
    reference = build(store_path(tmp_path, fmt, "reference"), inputs, chunk_rows=10)
    killed = {"zarr": killed_writer_zarr, "hdf5": killed_writer_hdf5}[fmt]
    path, data, written = killed.path, killed.data, killed.written  # the killed writer's own folder
    assert written == 5, f"writer died early: {child_errors(data)}"
    assert killed.returncode == -signal.SIGKILL, "the writer finished before it could be killed"

    with pytest.raises(StoreError):  # incomplete (or, for HDF5, possibly damaged)
        open_encodings(path)
    try:
        writer = StoreWriter.open(path)
    except StoreError as exc:
        if fmt == "zarr":
            raise
        assert "--overwrite" in str(exc) and str(path) in str(exc)
        return
    missing = writer.missing_chunks()
    assert 0 < len(missing) <= 30 - written
    write(writer, inputs)
    writer.finalize()
    assert_same_content(path, reference)


def test_two_writers_in_one_process(tmp_path: Path) -> None:
    inputs = make_inputs(seed=5)
    reference = build(tmp_path / "reference.zarr", inputs)
    path = tmp_path / "enc.zarr"
    create(path, inputs).close()
    ranks = [StoreWriter.open(path), StoreWriter.open(path)]
    for i in range(7):  # interleaved, each rank owning every other chunk
        write(ranks[i % 2], inputs, [i])
    assert ranks[0].missing_chunks() == [] and ranks[1].missing_chunks() == []
    ranks[1].close()
    ranks[0].finalize()
    assert_same_content(path, reference)


@subprocess_fixture
def two_writer_processes(request):
    """Two CHILD_WRITERs (ranks 0 and 1 of 2) filling a fresh 200-row store of 20 chunks at once, on the
    background thread of tests/background.py: results ([(returncode, stdout)] per rank), path, data."""
    tmp_path = request.getfixturevalue("tmp_path_factory").mktemp("two-writers")
    inputs = make_inputs(n_rows=200, n_features=12, seed=9)
    path = tmp_path / "enc.zarr"
    create(path, inputs, chunk_rows=10).close()
    data = save_inputs(tmp_path, inputs)

    def run() -> SimpleNamespace:
        children = [start_child(path, data, rank=r, world=2) for r in range(2)]
        results = []
        for child in children:
            out, _ = child.communicate(timeout=90)
            results.append((child.returncode, out))
        return SimpleNamespace(results=results, path=path, data=data)

    return run


def test_two_processes_write_disjoint_chunks(tmp_path: Path, two_writer_processes) -> None:
    inputs = make_inputs(n_rows=200, n_features=12, seed=9)
    reference = build(tmp_path / "reference.zarr", inputs, chunk_rows=10)
    path, data = two_writer_processes.path, two_writer_processes.data  # the writers' own folder
    for rank, (returncode, out) in enumerate(two_writer_processes.results):
        assert returncode == 0, child_errors(data, rank)
        assert out.split() == [str(i) for i in range(rank, 20, 2)] + ["done"]
    writer = StoreWriter.open(path)
    assert writer.missing_chunks() == []
    writer.finalize()
    assert_same_content(path, reference)


# ------------------------------------------------------------------------ interoperability (optional)


def test_xarray_opens_the_zarr_group(tmp_path: Path) -> None:
    xr = pytest.importorskip("xarray")
    pytest.importorskip("dask")
    inputs = make_inputs()
    path = build(tmp_path / "a.zarr", inputs)
    with warnings.catch_warnings():
        # xarray warns that the store has no consolidated metadata (by design), then reads it.
        warnings.simplefilter("ignore", RuntimeWarning)
        ds = xr.open_zarr(path)
    assert ds["features"].dims == ("row", "feature")
    assert ds["labels"].dims == ("row",) and ds["chunks_written"].dims == ("chunk",)
    assert ds.sizes["row"] == N_ROWS and ds.sizes["feature"] == N_FEATURES
    assert ds.attrs["schema"] == SCHEMA_NAME
    np.testing.assert_array_equal(ds["features"].values, inputs["features"].astype(np.float16))
    ds.close()
    # consolidated=False opens it without the warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        xr.open_zarr(path, consolidated=False).close()


def test_dask_reads_features(tmp_path: Path) -> None:
    da = pytest.importorskip("dask.array")
    inputs = make_inputs()
    path = build(tmp_path / "a.zarr", inputs)
    features = da.from_zarr(str(path), component="features")
    assert features.shape == (N_ROWS, N_FEATURES) and features.chunks[0][0] == CHUNK_ROWS
    np.testing.assert_array_equal(features.compute(), inputs["features"].astype(np.float16))
