"""`vdvl encode` / `vdvl decode` end to end on a real (30-step, tiny-preset) digits checkpoint.

The data are the first 600 of scikit-learn's digits as an .npz (the session's ``encode_data``,
tests/conftest.py): 480 train, 60 val and 60 test images. Every --keep/--threshold encode ranks the
latent dimensions over the whole train split, so a third of digits makes each command about three
times faster; nothing checked here depends on the number of images.

Stores are written through ``vdvae_latents.cli.main(argv)`` (or a real ``python -m vdvae_latents`` process) and
checked against closed forms and independent calls: the features against the model's own
posterior means picked out by hand, the active set against a top-k of the per-variate KL,
the checkpoint hash against hashlib, the decoded PNG against the pruned reconstruction
rounded by hand and cut out of the grid by its geometry, resumed stores against
uninterrupted ones, and two torchrun ranks against one process.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import math
import os
import shutil
import signal
import sys
from dataclasses import replace
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import zarr

from vdvae_latents.cli import main
from vdvae_latents.stores import writer as stores
from vdvae_latents.model.inputs import prepare_batch
from vdvae_latents.model.checkpoints import load_model
from vdvae_latents.data import load_images
from vdvae_latents.data.grids import read_grid
from vdvae_latents.latents.encoder import Encoder
from vdvae_latents.latents.active_set import ActiveSet, build_active_set
from vdvae_latents.latents.stats import LatentKL
from vdvae_latents.train.run_config import resolve_run_config
from vdvae_latents.stores.backends import StoreError
from vdvae_latents.stores.writer import StoreWriter
from vdvae_latents.stores.reader import open_encodings
from vdvae_latents.train.loop import train
from background import subprocess_fixture
from helpers import rewrite_checkpoint, run_cli
from store_fixtures import ROW_ARRAYS, assert_same_store, attrs_of, raw_arrays, signal_when_written

ROOT = Path(__file__).resolve().parents[1]
FORMATS = {"zarr": ".zarr", "hdf5": ".h5"}
TINY_SHAPES = [(4, 1, 1), (4, 4, 4), (4, 4, 4), (4, 8, 8), (4, 8, 8)]  # (V, H, W) per latent layer
N_VARIATES = sum(v for v, _, _ in TINY_SHAPES)            # 20
N_SCALARS = sum(v * h * w for v, h, w in TINY_SHAPES)     # 644
N_KEEP = math.ceil(0.25 * N_VARIATES)                     # --keep 25% -> 5 variates
N_TEST, N_TRAIN = 60, 480                                 # the splits of the 600 images of DATA
CHUNK = 24                                                # -> 3 chunks of the test split (24, 24, 12)
KILL_CHUNK = 16                                           # the kill -9 test: 30 chunks of the train split
DATA = ""  # the data spec of every command here: the session's `encode_data`, set by the `_data` fixture


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module", autouse=True)
def _data(encode_data):
    global DATA
    DATA = encode_data


def _train(run_dir: Path, steps: int) -> Path:
    run = resolve_run_config(preset="tiny", data="digits")
    run = replace(run, train=replace(run.train, steps=steps, batch_size=32, val_limit=16, log_every=10,
                                     device="cpu"))
    result = train(run_dir, run, quiet=True)
    assert result.step == steps and result.checkpoint is not None
    return Path(result.checkpoint)


@pytest.fixture(scope="module")
def ckpt(encode_checkpoint) -> Path:
    """A 30-step checkpoint whose EMA posterior biases are randomised (so the KL of the
    variates is far from zero and well separated, and the posterior means carry signal); made
    once per session (tests/conftest.py), shared with the torchrun launch. Read-only."""
    return encode_checkpoint


@pytest.fixture(scope="module")
def run_dir(ckpt) -> Path:
    return ckpt.parent.parent


@pytest.fixture(scope="module")
def other_ckpt(tmp_path_factory) -> Path:
    """Another (2-step) checkpoint, without the optimizer state, which nothing here reads."""
    return rewrite_checkpoint(_train(tmp_path_factory.mktemp("enc-other") / "run", 2), drop_optimizer=True)


@pytest.fixture(scope="module")
def model(ckpt):
    m, info = load_model(ckpt, ema=True, device="cpu")
    assert info["weights"] == "ema"
    return m


@pytest.fixture(scope="module")
def digits_test():
    return load_images(DATA, split="test")


@pytest.fixture(scope="module")
def train_set():
    return load_images(DATA, split="train")


@pytest.fixture(scope="module")
def kl_table(model, train_set):
    """Per-variate average KL on the train split, as encode ranks it (batch 256, seed 0)."""
    return LatentKL(batch_size=256, seed=0).fit(model, train_set.images)


@pytest.fixture(scope="module")
def kept(kl_table) -> np.ndarray:
    """Closed form of --keep 25%: the 5 variates of largest average KL, natural order."""
    avg = kl_table.table("variate").avg_kl
    order = np.argsort(-avg, kind="stable")
    assert avg[order[N_KEEP - 1]] > 1.05 * avg[order[N_KEEP]], "no clear top-5: the test would be fragile"
    return np.sort(order[:N_KEEP])


@pytest.fixture(scope="module")
def active(kl_table, kept) -> ActiveSet:
    a = build_active_set(kl_table, granularity="variate", keep=0.25)
    np.testing.assert_array_equal(a.selected, kept)
    return a


def _variate_index() -> list[tuple[int, int]]:
    """Natural-order (layer, variate) of every variate of the tiny model."""
    return [(k, v) for k, (nv, _, _) in enumerate(TINY_SHAPES) for v in range(nv)]


@pytest.fixture(scope="module")
def columns(kept) -> dict[str, np.ndarray]:
    """Closed form of the store's dims: each kept variate contributes its H*W positions, row-major."""
    cols = {k: [] for k in ("layer", "variate", "y", "x")}
    for layer, v in (_variate_index()[i] for i in kept):
        _, h, w = TINY_SHAPES[layer]
        for y in range(h):
            for x in range(w):
                for name, value in zip(cols, (layer, v, y, x)):
                    cols[name].append(value)
    return {k: np.asarray(c) for k, c in cols.items()}


def _masks(kept) -> list:
    """Per-layer bool (V, H, W) masks of the kept variates (None for a fully kept layer)."""
    masks = [torch.zeros(s, dtype=torch.bool) for s in TINY_SHAPES]
    for layer, v in (_variate_index()[i] for i in kept):
        masks[layer][v] = True
    return [None if m.all() else m for m in masks]


def _by_hand(model, kept, images: np.ndarray, field: str = "q_mean") -> np.ndarray:
    """Posterior means (or stds) of the kept variates under the pruned forward pass, chunk by chunk
    with the encoder's batches, read straight off the model's layer outputs."""
    out = []
    for lo in range(0, len(images), CHUNK):
        x = prepare_batch(model.cfg, images[lo:lo + CHUNK])
        with torch.no_grad():
            res = model(x, active=_masks(kept), posterior="mean", masked="mean")
        cols = [getattr(res.layers[layer], field)[:, v].reshape(len(x), -1)
                for layer, v in (_variate_index()[i] for i in kept)]
        out.append(torch.cat(cols, 1).float().numpy())
    return np.concatenate(out)


# ----------------------------------------------------------------------------- helpers


def encode(capsys, src, out: Path, *extra, split: str = "test") -> dict:
    code, stdout, err = run_cli(capsys, "encode", src, "--data", DATA, "--split", split, "--out", out,
                                "--chunk-rows", CHUNK, "--device", "cpu", "--json", *extra)
    assert code == 0, err
    return json.loads(stdout)


def encode_quietly(src, out: Path, *extra, split: str = "test") -> dict:
    """The same through main(), for module fixtures (no capsys there)."""
    buf, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(err):
        code = main([str(a) for a in ("encode", src, "--data", DATA, "--split", split, "--out", out,
                                      "--chunk-rows", CHUNK, "--device", "cpu", "--json", *extra)])
    assert code == 0, err.getvalue()
    return json.loads(buf.getvalue())


def refused(capsys, *argv) -> str:
    """Exit 2 with exactly one plain sentence on stderr; returns it."""
    code, stdout, err = run_cli(capsys, *argv)
    assert code == 2, (code, stdout, err)
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].endswith("."), err
    return lines[0]


def chunk_flags(path: Path) -> np.ndarray:
    return raw_arrays(path)["chunks_written"]


def tree_digest(path: Path) -> dict[str, str]:
    """sha256 of every file under a store (or of the file itself)."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {str(p.relative_to(path.parent)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def disk_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def png_tiles(path: Path, n: int, size: int = 8) -> np.ndarray:
    """Cut the n decoded tiles out of a `vdvl decode` figure: its unlabelled grid (read_grid) has
    rows of min(n, 8) originals, each followed by the row of their decodings; every tile upscaled
    to >= 32 px by pixel repetition, 2 px of padding around and between tiles."""
    grid = read_grid(path)
    ncols, scale, pad = min(n, 8), math.ceil(32 / size), 2
    nrows, tile = 2 * math.ceil(n / ncols), size * scale
    assert grid.shape == (nrows * (tile + pad) + pad, ncols * (tile + pad) + pad)
    out = []
    for i in range(n):
        r, c = divmod(i, ncols)
        top, left = pad + (2 * r + 1) * (tile + pad), pad + c * (tile + pad)
        block = grid[top:top + tile, left:left + tile]
        assert (block == block[::scale, ::scale].repeat(scale, 0).repeat(scale, 1)).all()
        out.append(block[::scale, ::scale])
    return np.stack(out)


def by_hand_uint8(images: torch.Tensor) -> np.ndarray:
    """[-1, 1] (N, 1, H, W) -> uint8 (N, H, W) as 8-bit pixels: round((x + 1) / 2 * 255)."""
    v = images.double().numpy()[:, 0]
    return np.clip(np.rint((v + 1) / 2 * 255), 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------- reference stores


REFERENCE_STORES = {  # name: (file, split, options); encode_quietly's chunks (CHUNK) unless they say otherwise
    "f32": ("f32.zarr", "test", ("--keep", "25%", "--dtype", "float32")),
    "train": ("train.zarr", "train", ("--keep", "25%", "--chunk-rows", KILL_CHUNK, "--batch-size", KILL_CHUNK)),
    "meanstd-zarr": ("meanstd.zarr", "test", ("--keep", "25%", "--stat", "mean+std")),
    "meanstd-hdf5": ("meanstd.h5", "test", ("--keep", "25%", "--stat", "mean+std")),
    "ms32": ("ms32.zarr", "test", ("--keep", "25%", "--dtype", "float32", "--stat", "mean+std")),
    "sample32": ("sample32.zarr", "test", ("--keep", "25%", "--dtype", "float32", "--stat", "sample", "--seed", "0")),
    "single32": ("single32.zarr", "test", ("--keep", "25%", "--chunk-rows", "32")),
}


@subprocess_fixture
def reference_stores(request):
    """The reference stores below, encoded from the session's checkpoint by `vdvl encode` commands in one
    process (tests/cli_worker.py) on the background thread of tests/background.py while other tests run."""
    run_dir = request.getfixturevalue("encode_checkpoint").parent.parent
    data = request.getfixturevalue("encode_data")  # DATA, which is set only when this module's tests start
    out = request.getfixturevalue("tmp_path_factory").mktemp("refs")
    commands = {}
    for name, (file, split, options) in REFERENCE_STORES.items():
        chunks = () if "--chunk-rows" in options else ("--chunk-rows", CHUNK)
        commands[name] = [str(a) for a in ("encode", run_dir, "--data", data, "--split", split, "--out", out / file,
                                           *chunks, "--device", "cpu", "--json", *options)]
    (out / "commands.json").write_text(json.dumps(commands))
    argv = [sys.executable, str(ROOT / "tests" / "cli_worker.py"), str(out / "commands.json"),
            str(out / "results.json")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return argv, ROOT, env, 600, {"out": out}


@pytest.fixture(scope="module")
def refs(reference_stores) -> dict[str, Path]:
    """name -> reference store (read-only: copy one to write into it)."""
    assert reference_stores.returncode == 0, reference_stores.stderr[-3000:] + (
        (reference_stores.out / "results.json").read_text()[-3000:] if (reference_stores.out / "results.json").exists()
        else "")
    return {name: reference_stores.out / file for name, (file, _, _) in REFERENCE_STORES.items()}


@pytest.fixture(scope="module")
def ref_f32(refs) -> Path:
    """Test split, --keep 25%, posterior mean, float32, Zarr."""
    return refs["f32"]


@pytest.fixture(scope="module")
def ref_train(refs) -> Path:
    """Train split, --keep 25%, float16, Zarr, KILL_CHUNK-row chunks (the kill -9 test's settings)."""
    return refs["train"]


@pytest.fixture(scope="module")
def ref_meanstd(refs) -> dict[str, Path]:
    """Test split, --keep 25%, --stat mean+std, float16, in both formats. Read-only: copy to write."""
    return {"zarr": refs["meanstd-zarr"], "hdf5": refs["meanstd-hdf5"]}


@pytest.fixture(scope="module")
def ref_ms32(refs) -> Path:
    """Test split, --keep 25%, --stat mean+std, float32, Zarr."""
    return refs["ms32"]


@pytest.fixture(scope="module")
def ref_sample32(refs) -> Path:
    """Test split, --keep 25%, --stat sample --seed 0, float32, Zarr."""
    return refs["sample32"]


# ----------------------------------------------------------------------------- 1. numbers and contents


@pytest.mark.parametrize("fmt", FORMATS)
def test_encode_numbers_and_contents(capsys, fmt, tmp_path, run_dir, ckpt, model, digits_test, kl_table, kept,
                                     active, columns):
    out = tmp_path / f"E{FORMATS[fmt]}"
    r = encode(capsys, run_dir, out, "--keep", "25%")
    k = len(columns["layer"])
    assert k == sum(TINY_SHAPES[_variate_index()[i][0]][1] ** 2 for i in kept)
    assert r["store"] == str(out) and r["format"] == fmt
    assert (r["rows"], r["features"], r["dims_kept"], r["dims_total"]) == (N_TEST, k, N_KEEP, N_VARIATES)
    assert r["statistic"] == "mean" and r["dtype"] == "float16"
    assert r["rows_written"] == N_TEST and r["images_per_s"] > 0 and r["seconds"] > 0
    assert r["bytes_on_disk"] == disk_bytes(out) > 0
    assert r["full_latents_bytes"] == N_TEST * N_SCALARS * 2
    assert r["raw_pixel_bytes"] == N_TEST * 8 * 8 * 1
    avg = kl_table.table("variate").avg_kl
    assert r["kl_share_kept"] == pytest.approx(avg[kept].sum() / avg.sum(), rel=1e-9)

    expected = _by_hand(model, kept, digits_test.images)
    encoder = Encoder(model, active)
    via_encoder = np.concatenate([encoder.encode(prepare_batch(model.cfg, digits_test.images[lo:lo + CHUNK]))[0].numpy()
                                  for lo in range(0, N_TEST, CHUNK)])
    np.testing.assert_array_equal(via_encoder, expected)
    assert expected.std(0).min() > 0  # every column varies over the images

    raw = raw_arrays(out)
    assert raw["features"].dtype == np.float16 and raw["features"].shape == (N_TEST, k)
    np.testing.assert_array_equal(raw["features"], expected.astype(np.float16))
    np.testing.assert_array_equal(raw["labels"], digits_test.labels)
    assert raw["labels"].dtype == np.int64 and raw["sample_index"].dtype == np.int64
    np.testing.assert_array_equal(raw["sample_index"], np.arange(N_TEST))
    np.testing.assert_array_equal(raw["chunks_written"], np.ones(3, np.uint8))
    assert "features_std" not in raw
    for name in ("layer", "variate", "y", "x"):
        assert raw[f"dims/{name}"].dtype == np.int32
        np.testing.assert_array_equal(raw[f"dims/{name}"], columns[name], err_msg=name)
    variate_of = {lv: i for i, lv in enumerate(_variate_index())}
    kl_of_col = avg[[variate_of[(a, b)] for a, b in zip(columns["layer"], columns["variate"])]]
    np.testing.assert_allclose(raw["dims/avg_kl"], kl_of_col, rtol=1e-9)
    if fmt == "zarr":
        assert zarr.open_group(str(out), mode="r")["features"].chunks == (CHUNK, k)
    else:
        with h5py.File(out, "r") as f:
            assert f["features"].chunks == (CHUNK, k)

    attrs = attrs_of(out)
    assert attrs["complete"] is True
    assert attrs["checkpoint_sha256"] == hashlib.sha256(ckpt.read_bytes()).hexdigest()
    assert Path(attrs["checkpoint"]).resolve() == ckpt.resolve() and attrs["checkpoint_step"] == 30
    assert attrs["model_config"] == json.loads(json.dumps(model.cfg.to_dict()))
    expected_attrs = {"schema": "vdvl-encodings", "data": DATA, "split": "test", "granularity": "variate",
                      "selection_rule": "keep", "selection_value": 0.25, "statistic": "mean", "dtype": "float16",
                      "kl_split": "train", "kl_images": N_TRAIN, "n_rows": N_TEST, "n_features": k,
                      "chunk_rows": CHUNK, "n_dims_total": N_VARIATES, "n_dims_kept": N_KEEP,
                      "n_latent_scalars_total": N_SCALARS, "seed": 0}
    assert {key: attrs.get(key) for key in expected_attrs} == expected_attrs
    assert attrs["kl_share_kept"] == pytest.approx(r["kl_share_kept"])

    # The ranking is recorded beside the store, for reuse with --active.
    sidecar = ActiveSet.load(tmp_path / "E.active.json")
    np.testing.assert_array_equal(sidecar.selected, kept)
    assert sidecar.checkpoint_sha256 == attrs["checkpoint_sha256"]
    assert (sidecar.rule, sidecar.value, sidecar.split, sidecar.n_images) == ("keep", 0.25, "train", N_TRAIN)


def test_zarr_and_hdf5_layouts_are_identical(ref_meanstd):
    a, b = ref_meanstd["zarr"], ref_meanstd["hdf5"]  # --keep 25% --stat mean+std
    ra, rb = raw_arrays(a), raw_arrays(b)
    assert sorted(ra) == sorted(rb) == sorted(list(ROW_ARRAYS) + [f"dims/{n}" for n in
                                                                  ("layer", "variate", "y", "x", "avg_kl")])
    for name in ra:
        assert ra[name].dtype == rb[name].dtype and ra[name].shape == rb[name].shape, name
        np.testing.assert_array_equal(ra[name], rb[name], err_msg=name)
    # the checksums are of the values, so they agree across formats; only the codec differs
    assert attrs_of(a) | {"codec": None} == attrs_of(b) | {"codec": None}


def test_threshold_rule(capsys, tmp_path, run_dir, kl_table):
    avg = kl_table.table("variate").avg_kl
    t = float(np.sort(avg)[-3] + np.sort(avg)[-4]) / 2  # between the 3rd and 4th largest: keeps 3
    r = encode(capsys, run_dir, tmp_path / "T.zarr", "--threshold", repr(t))
    assert r["dims_kept"] == 3
    chosen = np.flatnonzero(avg > t)
    assert r["features"] == sum(TINY_SHAPES[_variate_index()[i][0]][1] ** 2 for i in chosen)
    attrs = attrs_of(tmp_path / "T.zarr")
    assert attrs["selection_rule"] == "threshold" and attrs["selection_value"] == pytest.approx(t)


# ----------------------------------------------------------------------------- 2. determinism and statistics


def test_posterior_mean_is_deterministic(capsys, tmp_path, run_dir, ref_f32):
    encode(capsys, run_dir, tmp_path / "again.zarr", "--keep", "25%", "--dtype", "float32")
    a, b = raw_arrays(ref_f32)["features"], raw_arrays(tmp_path / "again.zarr")["features"]
    assert a.dtype == np.float32
    assert a.tobytes() == b.tobytes()


def test_sample_statistic_is_seeded(capsys, tmp_path, run_dir, ref_f32, ref_sample32):
    for name, seed in (("s0b", 0), ("s1", 1)):  # s0a: ref_sample32, made the same way
        encode(capsys, run_dir, tmp_path / f"{name}.zarr", "--keep", "25%", "--dtype", "float32",
               "--stat", "sample", "--seed", seed)
    s0a = raw_arrays(ref_sample32)["features"]
    s0b, s1 = (raw_arrays(tmp_path / f"{n}.zarr")["features"] for n in ("s0b", "s1"))
    mean = raw_arrays(ref_f32)["features"]
    assert s0a.tobytes() == s0b.tobytes()
    assert np.isfinite(s0a).all()
    assert (s0a != s1).mean() > 0.99 and (s0a != mean).mean() > 0.99
    assert attrs_of(tmp_path / "s1.zarr")["statistic"] == "sample" and attrs_of(tmp_path / "s1.zarr")["seed"] == 1


def test_mean_plus_std(model, kept, digits_test, ref_f32, ref_ms32):
    out = ref_ms32  # --keep 25% --dtype float32 --stat mean+std
    raw = raw_arrays(out)
    np.testing.assert_array_equal(raw["features"], raw_arrays(ref_f32)["features"])
    assert raw["features_std"].shape == raw["features"].shape and raw["features_std"].dtype == np.float32
    assert (raw["features_std"] > 0).all()
    np.testing.assert_array_equal(raw["features_std"], _by_hand(model, kept, digits_test.images, "q_std"))
    assert attrs_of(out)["statistic"] == "mean+std"


def test_sample_is_mean_plus_std_times_normal_noise_on_the_first_kept_layer(ref_ms32, ref_sample32):
    """Every layer above the first one with kept variates is fully pruned (prior means, the
    same in both passes), so there the posterior is the same with or without sampling and
    (sample - mean) / std must be standard normal draws."""
    ms, s = raw_arrays(ref_ms32), raw_arrays(ref_sample32)  # --keep 25% --dtype float32, mean+std and sample
    top = ms["dims/layer"] == ms["dims/layer"].min()
    eps = (s["features"][:, top] - ms["features"][:, top]) / ms["features_std"][:, top]
    assert abs(eps.mean()) < 4 / math.sqrt(eps.size) + 0.05 and 0.8 < eps.std() < 1.2


# ----------------------------------------------------------------------------- 3. decode invariant


def test_decode_reproduces_the_pruned_reconstruction(capsys, tmp_path, run_dir, model, kept, active, digits_test,
                                                     ref_f32):
    # Pruned reconstruction of the first chunk (the batch the encoder saw), by the model directly.
    x = prepare_batch(model.cfg, digits_test.images[:CHUNK])
    with torch.no_grad():
        recon = model.reconstruct(x, active=_masks(kept), posterior="mean", masked="mean", deterministic=True)[:16]
    np.testing.assert_array_equal(Encoder(model, active).pruned_reconstruction(x)[:16].numpy(), recon.numpy())

    feats = torch.from_numpy(np.asarray(raw_arrays(ref_f32)["features"][:16], dtype=np.float32))
    decoded = Encoder(model, active).decode(feats)
    torch.testing.assert_close(decoded, recon, rtol=0, atol=1e-6)
    # The features matter: zeros in their place decode to other images.
    zeros = Encoder(model, active).decode(torch.zeros_like(feats))
    assert (by_hand_uint8(zeros) != by_hand_uint8(recon)).any()

    png = tmp_path / "dec.png"
    code, stdout, err = run_cli(capsys, "decode", ref_f32, "--out", png, "--rows", "0:16", "--device", "cpu",
                                "--json")
    assert code == 0, err
    r = json.loads(stdout)
    assert r["rows"] == [0, 16] and Path(r["out"]) == png and r["temperature"] == 0
    assert Path(r["checkpoint"]).resolve() == Path(attrs_of(ref_f32)["checkpoint"]).resolve()
    np.testing.assert_array_equal(png_tiles(png, 16), by_hand_uint8(recon))

    # Other rows: 30:39 (3 x 3 grid) against the reconstruction of chunk 1 (rows 24:48).
    x1 = prepare_batch(model.cfg, digits_test.images[CHUNK:2 * CHUNK])
    with torch.no_grad():
        recon1 = model.reconstruct(x1, active=_masks(kept), posterior="mean", masked="mean", deterministic=True)
    code, _, err = run_cli(capsys, "decode", ref_f32, "--out", tmp_path / "d9.png", "--rows", "30:39",
                           "--device", "cpu")
    assert code == 0, err
    np.testing.assert_array_equal(png_tiles(tmp_path / "d9.png", 9), by_hand_uint8(recon1[30 - CHUNK:39 - CHUNK]))


def test_decode_at_a_temperature_samples_the_pruned_dims(capsys, tmp_path, ref_f32):
    outs = {}
    for name, t, seed in (("t0", "0", 0), ("a", "1.0", 0), ("b", "1.0", 0), ("c", "1.0", 1)):
        code, _, err = run_cli(capsys, "decode", ref_f32, "--out", tmp_path / f"{name}.png", "--rows", "0:16",
                               "--temperature", t, "--seed", seed, "--device", "cpu")
        assert code == 0, err
        outs[name] = png_tiles(tmp_path / f"{name}.png", 16)
    np.testing.assert_array_equal(outs["a"], outs["b"])
    assert (outs["a"] != outs["t0"]).any() and (outs["a"] != outs["c"]).any()


def test_decode_with_the_same_checkpoint_given_explicitly(capsys, tmp_path, ckpt, ref_f32):
    code, _, err = run_cli(capsys, "decode", ref_f32, "--ckpt", ckpt, "--out", tmp_path / "a.png", "--device", "cpu")
    assert code == 0, err
    code, _, err = run_cli(capsys, "decode", ref_f32, "--out", tmp_path / "b.png", "--device", "cpu")
    assert code == 0, err
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()


def test_decode_finds_the_checkpoint_of_a_store_encoded_with_a_relative_path(capsys, monkeypatch, tmp_path, run_dir,
                                                                            ckpt, ref_f32):
    monkeypatch.chdir(run_dir.parent)
    encode(capsys, Path(run_dir.name), Path("rel.zarr"), "--keep", "25%", "--dtype", "float32")
    assert Path(attrs_of(run_dir.parent / "rel.zarr")["checkpoint"]).is_absolute()
    monkeypatch.chdir(tmp_path)  # decode from somewhere else, without --ckpt
    code, _, err = run_cli(capsys, "decode", run_dir.parent / "rel.zarr", "--out", "a.png", "--device", "cpu")
    assert code == 0, err
    code, _, err = run_cli(capsys, "decode", ref_f32, "--out", "b.png", "--device", "cpu")
    assert code == 0, err
    # The same images (the titles differ: each names its own store).
    np.testing.assert_array_equal(read_grid(tmp_path / "a.png"), read_grid(tmp_path / "b.png"))


# ----------------------------------------------------------------------------- 4. --active


def test_active_set_reuse(capsys, tmp_path, run_dir, kept, columns, ref_f32):
    code, _, err = run_cli(capsys, "analyze-kl", run_dir, "--data", DATA, "--keep", "25%",
                           "--out", tmp_path / "A.json", "--device", "cpu", "--json")
    assert code == 0, err
    np.testing.assert_array_equal(ActiveSet.load(tmp_path / "A.json").selected, kept)

    r = encode(capsys, run_dir, tmp_path / "train.zarr", "--active", tmp_path / "A.json", split="train")
    assert r["rows"] == N_TRAIN and r["features"] == len(columns["layer"])
    assert not (tmp_path / "train.active.json").exists()  # nothing new to record
    ref = raw_arrays(ref_f32)
    got = raw_arrays(tmp_path / "train.zarr")
    for name in ("layer", "variate", "y", "x"):
        np.testing.assert_array_equal(got[f"dims/{name}"], ref[f"dims/{name}"], err_msg=name)
    # analyze-kl runs the model channels_last, encode --keep in the checkpoint's layout: their
    # convolutions round differently (about 1e-7), so the average KLs agree to float tolerance.
    np.testing.assert_allclose(got["dims/avg_kl"], ref["dims/avg_kl"], rtol=1e-6)
    np.testing.assert_array_equal(got["sample_index"], np.arange(N_TRAIN))
    attrs = attrs_of(tmp_path / "train.zarr")
    assert (attrs["split"], attrs["selection_rule"], attrs["selection_value"], attrs["kl_split"]) == \
        ("train", "keep", 0.25, "train")

    # The sidecar an encode leaves beside its store works the same way.
    sidecar = ref_f32.with_name("f32.active.json")
    r2 = encode(capsys, run_dir, tmp_path / "test.zarr", "--active", sidecar, "--dtype", "float32")
    assert r2["features"] == len(columns["layer"])
    assert_same_store(tmp_path / "test.zarr", ref_f32)


def test_active_set_of_another_checkpoint_is_refused(capsys, tmp_path, run_dir, other_ckpt, ref_f32):
    meta = json.loads(ref_f32.with_name("f32.active.json").read_text())
    meta["checkpoint_sha256"] = "0" * 64
    (tmp_path / "forged.json").write_text(json.dumps(meta))
    msg = refused(capsys, "encode", run_dir, "--data", DATA, "--active", tmp_path / "forged.json",
                  "--out", tmp_path / "X.zarr", "--device", "cpu")
    assert "checkpoint" in msg
    assert not (tmp_path / "X.zarr").exists()

    code, _, err = run_cli(capsys, "analyze-kl", other_ckpt, "--data", DATA, "--keep", "25%",
                           "--out", tmp_path / "other.json", "--device", "cpu")
    assert code == 0, err
    refused(capsys, "encode", run_dir, "--data", DATA, "--active", tmp_path / "other.json",
            "--out", tmp_path / "X.h5", "--device", "cpu")
    assert not (tmp_path / "X.h5").exists()


# ----------------------------------------------------------------------------- 5. resume


class _Interrupt:
    """Wraps StoreWriter.write_chunk: lets `after` chunks through, then raises `exc`."""

    def __init__(self, monkeypatch, after: int, exc: BaseException) -> None:
        self.calls, self.after, self.exc = 0, after, exc
        real = StoreWriter.write_chunk

        def write_chunk(writer, i, *args, **kwargs):
            if self.calls >= self.after:
                raise self.exc
            self.calls += 1
            return real(writer, i, *args, **kwargs)

        monkeypatch.setattr(StoreWriter, "write_chunk", write_chunk)


@pytest.mark.parametrize("fmt", FORMATS)
def test_resume_after_an_interrupt_matches_an_uninterrupted_run(capsys, monkeypatch, tmp_path, fmt, run_dir):
    # stat=sample: a resumed run must also draw exactly the noise an uninterrupted one draws.
    args = ("--keep", "25%", "--stat", "sample", "--dtype", "float32", "--seed", "3")
    full = tmp_path / f"full{FORMATS[fmt]}"
    encode(capsys, run_dir, full, *args)

    part = tmp_path / f"part{FORMATS[fmt]}"
    with monkeypatch.context() as m:
        _Interrupt(m, 2, KeyboardInterrupt())
        code, _, err = run_cli(capsys, "encode", run_dir, "--data", DATA, "--out", part, "--chunk-rows", CHUNK,
                               "--device", "cpu", *args)
    assert code == 130, err
    with pytest.raises(StoreError, match="incomplete"):
        open_encodings(part)
    raw = raw_arrays(part)
    np.testing.assert_array_equal(raw["chunks_written"], [1, 1, 0])
    assert np.isnan(raw["features"][2 * CHUNK:]).all() and (raw["sample_index"][2 * CHUNK:] == -1).all()
    assert attrs_of(part)["complete"] is False
    # Decoding an incomplete store is refused.
    refused(capsys, "decode", part, "--out", tmp_path / "x.png", "--device", "cpu")
    assert not (tmp_path / "x.png").exists()

    r = encode(capsys, run_dir, part, *args, "--resume")
    assert r["rows_written"] == N_TEST - 2 * CHUNK and r["rows"] == N_TEST
    assert_same_store(part, full)
    assert attrs_of(part)["complete"] is True

    # Resuming a complete store writes nothing and leaves its contents as they were (HDF5
    # rewrites its metadata when `complete` is set again, so the bytes of the file may change).
    r = encode(capsys, run_dir, part, *args, "--resume")
    assert r["rows_written"] == 0
    assert_same_store(part, full)


def test_resume_after_an_unwritable_store_midway(capsys, monkeypatch, tmp_path, run_dir, ref_f32):
    """The disk turns read-only after the first chunk: exit 2, a store that says it is incomplete."""
    out = tmp_path / "ro.zarr"
    real = stores.ZarrBackend.write_rows
    calls = {"n": 0}

    def write_rows(self, name, start, stop, data):
        if start >= CHUNK:
            raise OSError(errno.EROFS, "Read-only file system")
        calls["n"] += 1
        return real(self, name, start, stop, data)

    with monkeypatch.context() as m:
        m.setattr(stores.ZarrBackend, "write_rows", write_rows)
        refused(capsys, "encode", run_dir, "--data", DATA, "--keep", "25%", "--dtype", "float32",
                "--out", out, "--chunk-rows", CHUNK, "--device", "cpu")
    assert calls["n"] > 0
    with pytest.raises(StoreError, match="incomplete"):
        open_encodings(out)
    np.testing.assert_array_equal(chunk_flags(out), [1, 0, 0])
    encode(capsys, run_dir, out, "--keep", "25%", "--dtype", "float32", "--resume")
    assert_same_store(out, ref_f32)


@subprocess_fixture
def encode_killed_midway(request):
    """`python -m vdvae_latents encode` of the train split (--keep 25%, KILL_CHUNK-row chunks) into OUT/killed.zarr,
    sent SIGKILL as soon as it has written a chunk. It runs, and is watched, on the background thread of
    tests/background.py while other tests run: returncode, stderr, out and signalled_at (the chunks written
    when it was killed; None if it finished first)."""
    run_dir = request.getfixturevalue("encode_checkpoint").parent.parent
    data = request.getfixturevalue("encode_data")  # DATA, which is set only when this module's tests start
    out = request.getfixturevalue("tmp_path_factory").mktemp("killed-encode") / "killed.zarr"
    cmd = [sys.executable, "-m", "vdvae_latents", "encode", str(run_dir), "--data", data, "--split", "train",
           "--keep", "25%", "--out", str(out), "--chunk-rows", str(KILL_CHUNK), "--batch-size", str(KILL_CHUNK),
           "--device", "cpu", "--quiet"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    n_chunks = math.ceil(N_TRAIN / KILL_CHUNK)

    return lambda: signal_when_written(cmd, env, out, n_chunks, signal.SIGKILL)


def test_resume_after_kill_9(capsys, run_dir, ref_train, encode_killed_midway):
    proc, out, killed_at = encode_killed_midway, encode_killed_midway.out, encode_killed_midway.signalled_at
    n_chunks = math.ceil(N_TRAIN / KILL_CHUNK)
    if killed_at is None:
        assert proc.returncode == 0, proc.stderr[-2000:]
        pytest.skip("the encode finished before it could be killed")
    assert proc.returncode == -signal.SIGKILL

    flags = chunk_flags(out)
    assert killed_at <= flags.sum() < n_chunks
    with pytest.raises(StoreError, match="incomplete"):
        open_encodings(out)
    assert attrs_of(out)["complete"] is False

    code, stdout, err = run_cli(capsys, "encode", run_dir, "--data", DATA, "--split", "train", "--keep", "25%",
                                "--out", out, "--chunk-rows", KILL_CHUNK, "--batch-size", KILL_CHUNK, "--device", "cpu",
                                "--resume", "--json")
    assert code == 0, err
    r = json.loads(stdout)
    sizes = np.minimum(KILL_CHUNK, N_TRAIN - KILL_CHUNK * np.arange(n_chunks))  # the last chunk may be short
    assert r["rows_written"] == int(sizes[flags == 0].sum())
    assert_same_store(out, ref_train)


# ----------------------------------------------------------------------------- 6. existing stores


@pytest.mark.parametrize("fmt", FORMATS)
def test_existing_store_is_kept_without_overwrite(capsys, tmp_path, fmt, run_dir, other_ckpt, ref_meanstd):
    out = tmp_path / f"E{FORMATS[fmt]}"
    (shutil.copytree if fmt == "zarr" else shutil.copy2)(ref_meanstd[fmt], out)  # --keep 25% --stat mean+std
    before = tree_digest(out)
    msg = refused(capsys, "encode", run_dir, "--data", DATA, "--keep", "25%", "--out", out, "--device", "cpu")
    assert "exists" in msg and "--overwrite" in msg
    assert tree_digest(out) == before

    # --resume on a (complete) store of another checkpoint names the mismatch.
    msg = refused(capsys, "encode", other_ckpt, "--data", DATA, "--keep", "25%", "--stat", "mean+std",
                  "--out", out, "--device", "cpu", "--resume")
    assert "checkpoint_sha256" in msg
    assert tree_digest(out) == before

    # ... and on one with another statistic too.
    msg = refused(capsys, "encode", run_dir, "--data", DATA, "--keep", "25%", "--stat", "mean",
                  "--out", out, "--device", "cpu", "--resume")
    assert "statistic" in msg
    assert tree_digest(out) == before

    r = encode(capsys, other_ckpt, out, "--keep", "25%", "--overwrite")
    assert r["rows_written"] == N_TEST
    raw = raw_arrays(out)
    assert "features_std" not in raw
    attrs = attrs_of(out)
    assert attrs["complete"] is True and attrs["statistic"] == "mean"
    assert attrs["checkpoint_sha256"] == hashlib.sha256(other_ckpt.read_bytes()).hexdigest()


def test_resume_of_an_incomplete_store_from_another_checkpoint(capsys, monkeypatch, tmp_path, run_dir, other_ckpt):
    out = tmp_path / "I.zarr"
    with monkeypatch.context() as m:
        _Interrupt(m, 1, KeyboardInterrupt())
        code, _, _ = run_cli(capsys, "encode", run_dir, "--data", DATA, "--keep", "25%", "--out", out,
                             "--chunk-rows", CHUNK, "--device", "cpu")
    assert code == 130
    before = tree_digest(out)
    msg = refused(capsys, "encode", other_ckpt, "--data", DATA, "--keep", "25%", "--out", out,
                  "--device", "cpu", "--resume")
    assert "checkpoint_sha256" in msg
    assert tree_digest(out) == before
    np.testing.assert_array_equal(chunk_flags(out), [1, 0, 0])


def test_resume_with_other_columns_of_the_same_size_is_refused(capsys, monkeypatch, tmp_path, run_dir, ref_f32):
    """An --active set with the same rule, value and number of columns but other variates must
    not fill the missing chunks of a store whose dims table says otherwise."""
    out = tmp_path / "C.zarr"
    with monkeypatch.context() as m:
        _Interrupt(m, 1, KeyboardInterrupt())
        code, _, _ = run_cli(capsys, "encode", run_dir, "--data", DATA, "--keep", "25%", "--dtype", "float32",
                             "--out", out, "--chunk-rows", CHUNK, "--device", "cpu")
    assert code == 130
    meta = json.loads((tmp_path / "C.active.json").read_text())
    arrays = meta["arrays"]
    sel, res = list(arrays["selected"]), arrays["resolution"]
    # Swap one kept variate for a pruned one of the same resolution: same K, same attrs, other columns.
    swap = next((i, j) for i in sel for j in range(N_VARIATES) if j not in sel and res[j] == res[i])
    arrays["selected"] = sorted([s for s in sel if s != swap[0]] + [swap[1]])
    (tmp_path / "swapped.json").write_text(json.dumps(meta))
    before = tree_digest(out)
    code, stdout, err = run_cli(capsys, "encode", run_dir, "--data", DATA, "--active", tmp_path / "swapped.json",
                                "--dtype", "float32", "--out", out, "--chunk-rows", CHUNK, "--device", "cpu",
                                "--resume", "--json")
    mixed = code == 0 and not np.array_equal(raw_arrays(out)["features"], raw_arrays(ref_f32)["features"])
    assert code == 2, ("resume accepted an active set with other columns" +
                       (" and wrote a store that mixes two column sets" if mixed else ""), stdout, err)
    assert tree_digest(out) == before


# ----------------------------------------------------------------------------- 7. bad input


def test_encode_bad_options(capsys, tmp_path, run_dir, ref_f32):
    out = tmp_path / "X.zarr"
    base = ("encode", run_dir, "--data", DATA, "--out", out, "--device", "cpu")
    sidecar = ref_f32.with_name("f32.active.json")
    for extra in (("--keep", "25%", "--active", sidecar), ("--keep", "25%", "--threshold", "0.1"), (),
                  ("--keep", "25%", "--stat", "median"), ("--keep", "25%", "--dtype", "bfloat16"),
                  ("--keep", "250%"), ("--keep", "25%", "--resume", "--overwrite"),
                  ("--active", tmp_path / "missing.json")):
        refused(capsys, *base, *extra)
        assert not out.exists(), extra
        assert not (tmp_path / "X.active.json").exists(), extra
    refused(capsys, "encode", run_dir, "--data", DATA, "--keep", "25%", "--out", tmp_path / "X.npy",
            "--device", "cpu")
    assert not (tmp_path / "X.npy").exists()


@pytest.mark.parametrize("fmt", FORMATS)
def test_encode_into_a_read_only_destination(capsys, monkeypatch, tmp_path, fmt, run_dir):
    # Running as root, chmod does not stop writes: simulate both ways a read-only place shows.
    ro = tmp_path / "ro"
    ro.mkdir()
    out = ro / f"X{FORMATS[fmt]}"
    real_access = os.access

    with monkeypatch.context() as m:  # the directory is not writable
        m.setattr(os, "access", lambda p, mode, **kw: False if Path(p) == ro and mode & os.W_OK
                  else real_access(p, mode, **kw))
        msg = refused(capsys, "encode", run_dir, "--data", DATA, "--keep", "25%", "--out", out, "--device", "cpu")
    assert "not writable" in msg
    assert list(ro.iterdir()) == []

    def erofs(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    with monkeypatch.context() as m:  # the file system refuses the creation
        if fmt == "zarr":
            m.setattr(zarr, "open_group", erofs)
        else:
            m.setattr(h5py, "File", erofs)
        msg = refused(capsys, "encode", run_dir, "--data", DATA, "--keep", "25%", "--out", out, "--device", "cpu")
    assert "Read-only" in msg
    assert list(ro.iterdir()) == []

    # A file where the destination's folder should be.
    (tmp_path / "a-file").write_text("not a folder")
    msg = refused(capsys, "encode", run_dir, "--data", DATA, "--keep", "25%", "--out", tmp_path / "a-file" / out.name,
                  "--device", "cpu")
    assert "is a file, not a folder" in msg


def test_decode_bad_input(capsys, tmp_path, other_ckpt, ref_f32):
    png = tmp_path / "x.png"
    base = ("decode", ref_f32, "--device", "cpu")
    for rows in ("500:600", f"{N_TEST - 10}:{N_TEST + 1}", "5:5", "a:b", "-3:4"):
        msg = refused(capsys, *base, "--out", png, "--rows", rows)
        assert "--rows" in msg, rows
    assert f"{N_TEST} rows" in refused(capsys, *base, "--out", png, "--rows", "500:600")
    msg = refused(capsys, *base, "--out", png, "--ckpt", other_ckpt)
    assert "sha256" in msg
    (tmp_path / "a-file").write_text("not a folder")
    refused(capsys, *base, "--out", tmp_path / "a-file" / "x.png")
    refused(capsys, *base, "--out", png, "--temperature", "-1")
    refused(capsys, "decode", tmp_path / "nothing.zarr", "--out", png, "--device", "cpu")
    assert not png.exists()

    # Corrupt stores: a damaged array in a Zarr copy, an HDF5 file of garbage, a foreign Zarr group.
    bad = tmp_path / "bad.zarr"
    shutil.copytree(ref_f32, bad)
    (bad / "features" / "zarr.json").write_text("{ not json")
    refused(capsys, "decode", bad, "--out", png, "--device", "cpu")
    (tmp_path / "bad.h5").write_bytes(os.urandom(4096))
    refused(capsys, "decode", tmp_path / "bad.h5", "--out", png, "--device", "cpu")
    zarr.open_group(str(tmp_path / "foreign.zarr"), mode="w", attributes={"hello": 1})
    refused(capsys, "decode", tmp_path / "foreign.zarr", "--out", png, "--device", "cpu")
    assert not png.exists()


def test_decode_refuses_a_store_whose_dims_do_not_fit_its_checkpoint(capsys, tmp_path, ref_f32):
    def damaged(name: str, change) -> Path:
        bad = tmp_path / f"{name}.zarr"
        shutil.copytree(ref_f32, bad)
        g = zarr.open_group(str(bad), mode="r+", use_consolidated=False)
        for field, values in change(np.asarray(g["dims"]["layer"][...]), np.asarray(g["dims"]["variate"][...]),
                                    np.asarray(g["dims"]["y"][...])).items():
            g["dims"][field][...] = values
        return bad

    cases = {
        "layer7": lambda layer, v, y: {"layer": np.full_like(layer, 7)},      # a layer tiny does not have
        "variate9": lambda layer, v, y: {"variate": np.full_like(v, 9)},      # tiny layers have 4 variates
        "y-1": lambda layer, v, y: {"y": np.full_like(y, -1)},                # the variate-granularity marker
        "reversed": lambda layer, v, y: {"layer": layer[::-1].copy(), "variate": v[::-1].copy()},
    }
    for name, change in cases.items():
        msg = refused(capsys, "decode", damaged(name, change), "--out", tmp_path / "x.png", "--device", "cpu")
        assert "dims" in msg, (name, msg)
        assert not (tmp_path / "x.png").exists(), name


# ----------------------------------------------------------------------------- 8. two processes


@pytest.mark.slow
def test_two_process_encode_equals_one_process(torchrun_session, refs):
    """`python -m vdvae_latents encode` on two torchrun ranks (the last part of the session's one torchrun
    launch, tests/torchrun_worker.py) against the same command in one process (refs["single32"])."""
    out, single = torchrun_session.encode_out, refs["single32"]
    assert torchrun_session.returncode == 0, torchrun_session.stderr[-3000:]

    a, b = raw_arrays(out), raw_arrays(single)
    assert sorted(a) == sorted(b)
    np.testing.assert_array_equal(a["chunks_written"], np.ones(math.ceil(N_TEST / 32), np.uint8))
    for name in a:
        if name == "dims/avg_kl":  # ranked on two shards with per-rank posterior samples
            np.testing.assert_allclose(a[name], b[name], rtol=0.05)
        else:
            np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    attrs_a, attrs_b = attrs_of(out), attrs_of(single)
    assert attrs_a["complete"] is True
    assert attrs_a["kl_share_kept"] == pytest.approx(attrs_b["kl_share_kept"], rel=0.05)
    assert {k: v for k, v in attrs_a.items() if k != "kl_share_kept"} == \
        {k: v for k, v in attrs_b.items() if k != "kl_share_kept"}
