"""Damaged stores: `vdvl verify` finds a deleted chunk, a flipped byte and a NaN, and every
reader (open_encodings, decode, probe, ActiveLatents, EncodingsDataset) refuses them in one
sentence naming the rows (exit 2 on the command line); `encode --resume` repairs them;
schema-1 stores are still read."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import zarr

from helpers import assert_one_line_error, run_cli
from store_fixtures import delete_chunk, flip_byte, random_run, write_nan
from vdvae_latents.stores.encode import encode_to_store
from vdvae_latents.core.errors import UserError
from vdvae_latents.downstream.transformer import ActiveLatents
from vdvae_latents.stores.backends import StoreError
from vdvae_latents.stores.writer import StoreWriter
from vdvae_latents.stores.reader import open_encodings
from vdvae_latents.downstream.torch_dataset import EncodingsDataset
from vdvae_latents.stores.verify import verify_store

CHUNK = 64  # the digits test split (180 rows) -> chunks 0-63, 64-127, 128-179
DAMAGES = {"deleted": delete_chunk, "flipped": flip_byte, "nan": write_nan}
#: Where verify lists each damage.
LISTED_AS = {"deleted": "missing", "flipped": ("checksum_mismatches", "undecodable"), "nan": "nonfinite"}


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    return random_run(tmp_path_factory.mktemp("integrity") / "run").parent.parent


@pytest.fixture(scope="module")
def stores(run, tmp_path_factory) -> dict[str, Path]:
    """An intact float16 store of the digits test split per format."""
    out = {}
    for suffix in (".zarr", ".h5"):
        path = tmp_path_factory.mktemp("intact") / f"test{suffix}"
        encode_to_store(run, "digits", path, split="test", keep="25%", chunk_rows=CHUNK, device="cpu")
        out[suffix] = path
    return out


def damaged(stores: dict[str, Path], tmp_path: Path, suffix: str, damage: str, chunk: int = 1) -> Path:
    path = tmp_path / f"damaged{suffix}"
    (shutil.copytree if suffix == ".zarr" else shutil.copy)(stores[suffix], path)
    DAMAGES[damage](path, chunk)
    return path


def read_all(path: Path) -> None:
    with open_encodings(path) as enc:
        np.asarray(enc.features)


@pytest.mark.parametrize("suffix", [".zarr", ".h5"])
@pytest.mark.parametrize("damage", list(DAMAGES))
def test_verify_and_open_encodings_name_the_damaged_rows(stores, tmp_path, capsys, suffix, damage):
    report = verify_store(stores[suffix])
    assert report["ok"] and report["checksummed"], report["summary"]
    path = damaged(stores, tmp_path, suffix, damage)
    report = verify_store(path)
    assert not report["ok"]
    keys = LISTED_AS[damage] if isinstance(LISTED_AS[damage], tuple) else (LISTED_AS[damage],)
    found = [item for key in keys for item in report[key]]
    assert [(f["array"], f["chunk"], f["rows"]) for f in found] == [("features", 1, [64, 128])], report
    assert "rows 64-127 of features" in report["summary"]
    if damage == "nan":
        assert found[0]["count"] == 1

    # the command: the report, then exit 2 with one sentence
    code, out, err = run_cli(capsys, "verify", path, "--json")
    assert json.loads(out)["ok"] is False
    assert_one_line_error(code, err, "rows 64-127 of features")
    assert run_cli(capsys, "verify", stores[suffix])[0] == 0

    # the library reader: rows outside the damaged chunk read (unless the chunk is gone, which
    # is refused when the store is opened), the damaged ones are refused naming them
    if damage == "deleted":
        with pytest.raises(StoreError, match="rows 64-127 of features are missing"):
            open_encodings(path)
        return
    with open_encodings(path) as enc:
        assert enc.features[:64].shape == (64, enc.n_features)
        with pytest.raises(StoreError, match=r"rows 64-127 of features (fail their checksum|cannot be decoded|hold NaN)"):
            enc.features[100]


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_every_reader_refuses_a_damaged_store(run, stores, tmp_path, capsys, damage):
    path = damaged(stores, tmp_path, ".zarr", damage, chunk=0)
    needle = "rows 0-63 of features"
    png = tmp_path / "x.png"
    code, _, err = run_cli(capsys, "decode", path, "--rows", "0:4", "--out", png, "--device", "cpu")
    assert_one_line_error(code, err, needle)
    assert not png.exists()
    code, _, err = run_cli(capsys, "probe", path, "--baselines", "none", "--seeds", "1")
    assert_one_line_error(code, err, needle)
    code, _, err = run_cli(capsys, "probe", stores[".zarr"], "--test-store", path, "--baselines", "none",
                           "--seeds", "1")
    assert_one_line_error(code, err, needle)
    X = np.zeros((2, 64))
    with pytest.raises(StoreError, match=needle):
        ActiveLatents(store=path).fit(X)
    with pytest.raises(StoreError, match=needle):
        ds = EncodingsDataset(path)
        ds[0]


def test_resume_rewrites_damaged_chunks(run, stores, tmp_path):
    path = tmp_path / "repair.zarr"
    shutil.copytree(stores[".zarr"], path)
    delete_chunk(path, 0)
    flip_byte(path, 2)
    result = encode_to_store(run, "digits", path, split="test", keep="25%", chunk_rows=CHUNK, device="cpu",
                             resume=True)
    assert result["rows_written"] == 64 + 52
    assert verify_store(path)["ok"]
    with open_encodings(path) as a, open_encodings(stores[".zarr"]) as b:
        np.testing.assert_array_equal(a.features[:], b.features[:])


def test_the_encoder_refuses_to_store_nan(run, tmp_path, monkeypatch):
    from vdvae_latents.latents.encoder import Encoder

    real = Encoder.encode

    def broken(self, x, **kw):
        f, s = real(self, x, **kw)
        f[3, 0] = float("nan")
        return f, s

    monkeypatch.setattr(Encoder, "encode", broken)
    with pytest.raises(UserError, match=r"NaN or infinite latents .*\(rows 3\)"):
        encode_to_store(run, "digits", tmp_path / "x.zarr", split="test", keep="25%", chunk_rows=CHUNK, device="cpu")


def as_schema_1(src: Path, dst: Path) -> Path:
    """A copy of a schema-2 Zarr store as the first version of the layout wrote it."""
    shutil.copytree(src, dst)
    for name in ("source_index", "chunk_checksums", "chunk_errors"):
        shutil.rmtree(dst / name)
    group = zarr.open_group(str(dst), mode="r+")
    attrs = dict(group.attrs)
    for key in ("codec", "checksum", "checksum_arrays", "quantization"):
        attrs.pop(key)
    attrs["schema_version"] = 1
    group.attrs.clear()
    group.update_attributes(attrs)
    return dst


def test_schema_1_stores_are_still_read(stores, tmp_path):
    old = as_schema_1(stores[".zarr"], tmp_path / "v1.zarr")
    with open_encodings(old) as enc, open_encodings(stores[".zarr"]) as new:
        assert enc.source_index is None and enc.attrs["schema_version"] == 1
        np.testing.assert_array_equal(enc.features[:], new.features[:])
        np.testing.assert_array_equal(enc.labels[:], new.labels[:])
    report = verify_store(old)
    assert report["ok"] and not report["checksummed"] and "no checksums" in report["summary"]
    with pytest.raises(StoreError, match="schema version 1, which cannot be resumed"):
        StoreWriter.open(old)
    (old / "features" / "c" / "1" / "0").unlink()
    with pytest.raises(StoreError, match="rows 64-127 of features are missing"):
        open_encodings(old)


def test_hdf5_attributes_are_checked_too(stores, tmp_path):
    path = tmp_path / "attrs.h5"
    shutil.copy(stores[".h5"], path)
    with h5py.File(path, "r+") as f:
        f.attrs["checksum_arrays"] = json.dumps(["features"])
    with pytest.raises(StoreError, match="checksum_arrays"):
        open_encodings(path)


def test_active_latents_from_a_store_reproduces_its_rows(run, stores, tmp_path):
    from sklearn.base import clone

    from vdvae_latents.data import load_images

    images = load_images("digits", "test").images[:40]
    X = images.reshape(len(images), -1)
    int8 = tmp_path / "int8.zarr"
    encode_to_store(run, "digits", int8, split="test", keep="25%", chunk_rows=CHUNK, device="cpu", dtype="int8",
                    quantize="range")
    for path in (stores[".zarr"], int8):
        est = ActiveLatents(store=path)
        assert clone(est).get_params()["store"] == path
        got = est.fit(X).transform(X)
        with open_encodings(path) as enc:
            want = enc.features[:40]
            step = enc.quantizers["features"].scale if enc.quantizers else np.abs(want) * 1e-3 + 1e-6
        assert got.shape == want.shape and est.n_features_out_ == want.shape[1]
        assert est.checkpoint_sha256_ == enc.attrs["checkpoint_sha256"]
        # the same latents; float16 rounding, or at most one quantisation step at a rounding boundary
        assert (np.abs(got - want) <= step * 1.001).all()
        if enc.quantizers:
            assert np.mean(got == want) > 0.99
