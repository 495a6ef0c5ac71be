"""Helpers for the store tests: random-weight run directories (no training) and the three
ways a store gets damaged (a deleted chunk, a flipped byte, a NaN)."""

from __future__ import annotations

import os
import subprocess
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import h5py
import numpy as np
import torch
import zarr

from vdvae_latents.model.config import ModelConfig
from vdvae_latents.interop.run_dir import write_imported_run
from vdvae_latents.train.presets import get_preset
from vdvae_latents.stores.writer import StoreWriter
from vdvae_latents.stores.reader import open_encodings
from vdvae_latents.model.vae import VAE
from background import lower_priority

#: A 32x32 RGB model small enough for tests (the CIFAR-10 layout).
RGB32 = ModelConfig(image_size=32, channels=3, n_mixtures=2, resolutions=(1, 4, 32), up_blocks=(1, 1, 1),
                    down_blocks=(1, 1, 1), widths=(16, 16, 8), bottleneck=0.5, variates=2, name="rgb32-test")


def random_run(run_dir: Path, cfg: ModelConfig | None = None, seed: int = 0) -> Path:
    """A run directory with one checkpoint of freshly initialised weights (posterior biases
    spread out, so the posterior means differ between images and from the prior)."""
    cfg = cfg or get_preset("tiny").config
    torch.manual_seed(seed)
    state = VAE(cfg).state_dict()
    g = torch.Generator().manual_seed(seed)
    for key, value in state.items():
        if key.endswith("posterior_params.bias"):
            state[key] = value + torch.randn(value.shape, generator=g) * 0.7
    return write_imported_run(run_dir, cfg, state, state, step=1, source={"kind": "random test weights"})


def chunk_file(store: Path, array: str, chunk: int) -> Path:
    """The file of a Zarr store holding chunk ``chunk`` of a row array."""
    with open_encodings(store, verify=False) as enc:
        raw = getattr(enc, array).raw
        return store / raw.path / raw.metadata.encode_chunk_key((chunk,) + (0,) * (raw.ndim - 1))


def delete_chunk(store: Path, chunk: int, array: str = "features") -> None:
    """Zarr: remove the chunk's file. HDF5 cannot lose one chunk of a file, so the same state
    is made by a store whose chunk was never written although flagged (a lost write)."""
    if store.suffix == ".zarr":
        chunk_file(store, array, chunk).unlink()
        return
    with h5py.File(store, "r+") as f:
        ds = f[array]
        data = ds[...]
        del f[array]
        kwargs = {k: getattr(ds, k) for k in ("chunks", "compression", "compression_opts", "shuffle")}
        new = f.create_dataset(array, shape=data.shape, dtype=data.dtype, fillvalue=ds.fillvalue, **kwargs)
        rows = kwargs["chunks"][0]
        for c in range(int(np.ceil(len(data) / rows))):
            if c != chunk:
                new[c * rows:(c + 1) * rows] = data[c * rows:(c + 1) * rows]


def flip_byte(store: Path, chunk: int, array: str = "features") -> None:
    """Invert one byte in the middle of the chunk's stored (compressed) bytes."""
    if store.suffix == ".zarr":
        path, offset, size = chunk_file(store, array, chunk), 0, None
    else:
        with h5py.File(store, "r") as f:
            ds = f[array]
            info = ds.id.get_chunk_info_by_coord((chunk * ds.chunks[0],) + (0,) * (ds.ndim - 1))
        path, offset, size = store, info.byte_offset, info.size
    data = bytearray(path.read_bytes())
    where = offset + (size or len(data)) // 2
    data[where] ^= 0xFF
    path.write_bytes(bytes(data))


def write_nan(store: Path, chunk: int, row_in_chunk: int = 1) -> None:
    """Rewrite one chunk (through the writer, checksum and all) with a NaN feature."""
    with open_encodings(store) as enc:
        lo, hi = enc.chunk_range(chunk)
        rows = {name: np.asarray(getattr(enc, name)[lo:hi]) for name in
                ("features", "features_std", "labels", "sample_index", "source_index", "source_names")
                if getattr(enc, name) is not None}
    rows["features"][row_in_chunk, 0] = np.nan
    writer = StoreWriter.open(store)
    writer.write_chunk(chunk, rows.pop("features"), **rows)
    writer.finalize()


# ----------------------------------------------------------------------------- comparing stores

ROW_ARRAYS = ("features", "features_std", "labels", "sample_index", "source_index", "chunks_written",
              "chunk_checksums", "chunk_errors")


def raw_arrays(path: Path) -> dict[str, np.ndarray]:
    """Every array of a store read with zarr/h5py directly (not through vdvae_latents)."""
    out = {}
    if path.suffix == ".zarr":
        g = zarr.open_group(str(path), mode="r", use_consolidated=False)
        for name in ROW_ARRAYS:
            if name in g:
                out[name] = np.asarray(g[name][...])
        for name in g["dims"].array_keys():
            out[f"dims/{name}"] = np.asarray(g["dims"][name][...])
    else:
        with h5py.File(path, "r") as f:
            for name in ROW_ARRAYS:
                if name in f:
                    out[name] = f[name][...]
            for name in f["dims"]:
                out[f"dims/{name}"] = f["dims"][name][...]
    return out


def attrs_of(path: Path) -> dict:
    with open_encodings(path, allow_incomplete=True) as enc:
        return dict(enc.attrs)


def assert_same_store(a: Path, b: Path) -> None:
    ra, rb = raw_arrays(a), raw_arrays(b)
    assert sorted(ra) == sorted(rb)
    for name in ra:
        assert ra[name].dtype == rb[name].dtype, name
        np.testing.assert_array_equal(ra[name], rb[name], err_msg=name)
    assert attrs_of(a) == attrs_of(b)


def signal_when_written(cmd: list[str], env: dict, out: Path, n_chunks: int, sig: int) -> SimpleNamespace:
    """Run ``cmd`` (a `vdvl encode` into the Zarr store ``out`` of ``n_chunks`` chunks) and send it
    ``sig`` as soon as it has written a chunk and before it has written them all.

    Returns returncode, stderr, out and signalled_at (the chunks written when the signal went;
    None if the job finished first).
    """
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(cmd, cwd=Path(__file__).resolve().parents[1], env=env, stdout=subprocess.DEVNULL,
                                stderr=err, preexec_fn=lower_priority)
        signalled_at = None
        try:
            deadline = time.monotonic() + 120
            while proc.poll() is None and time.monotonic() < deadline and signalled_at is None:
                flags = _chunks_written(out)
                if flags is not None and 0 < flags.sum() < n_chunks:
                    os.kill(proc.pid, sig)
                    signalled_at = int(flags.sum())
                time.sleep(0.05)
        finally:
            if proc.poll() is None and signalled_at is None:
                proc.kill()
            proc.wait(timeout=60)
            err.seek(0)
            stderr = err.read().decode(errors="replace")
    return SimpleNamespace(returncode=proc.returncode, stderr=stderr, out=out, signalled_at=signalled_at)


def _chunks_written(out: Path) -> np.ndarray | None:
    if not (out / "zarr.json").exists():
        return None
    try:
        return np.asarray(zarr.open_group(str(out), mode="r", use_consolidated=False)["chunks_written"][...])
    except Exception:  # caught mid-creation or mid-write: look again
        return None
