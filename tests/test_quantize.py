"""vdvae_latents.stores.codes and quantised stores: the round trip keeps every unclipped value
within half a step of its column, clipping is counted exactly, the error record sums to
closed forms, and every reader sees dequantised values."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from vdvae_latents.core.errors import UserError
from vdvae_latents.stores.codes import (
    INT_DTYPES, Quantizer, calibration_rows, count_clipped, error_stats, fit_quantizer, summarise_errors,
)
from vdvae_latents.stores.writer import StoreWriter
from vdvae_latents.stores.reader import open_encodings

K = 5


def columns(n: int, seed: int = 0) -> np.ndarray:
    """Columns on very different scales and offsets, one constant."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, K)) * np.array([1e-3, 0.5, 3.0, 40.0, 0.0]) + np.array([0.0, -2.0, 7.0, 1e3, 0.25])
    return x.astype(np.float32)


@pytest.mark.parametrize("dtype", list(INT_DTYPES))
@pytest.mark.parametrize("scheme", ["range", "std-step", "prior-step"])
def test_round_trip_within_half_a_step(dtype, scheme):
    x = columns(400)
    prior = np.abs(columns(400, seed=1)) + 0.5
    q = fit_quantizer(x, dtype, scheme=scheme, step=0.25, prior_std=prior)
    codes = q.quantize(x)
    assert codes.dtype == np.dtype(dtype)
    lo, hi = INT_DTYPES[dtype]
    assert codes.min() >= lo and codes.max() <= hi
    back = q.dequantize(codes)
    assert back.dtype == np.float32
    inside = (codes > lo) & (codes < hi)
    # the stated error: at most half a step (plus float32 rounding of the result)
    bound = q.scale / 2 + np.abs(back).max(0) * 2e-7
    assert (np.abs(back - x)[inside] <= np.broadcast_to(bound, x.shape)[inside]).all()
    if scheme == "range":
        # the calibration rows span the 256 levels exactly: nothing clips, the ends are used
        assert count_clipped(q, x, codes) == 0
        assert (codes.min(0)[:-1] == lo).all() and (codes.max(0)[:-1] == hi).all()
        np.testing.assert_allclose(q.scale[:-1], (x.max(0) - x.min(0))[:-1] / 255, rtol=1e-6)
    else:
        # a step of 0.25 column std (std-step) or RMS prior std (prior-step), centred on the column mean
        x64 = x.astype(np.float64)
        unit = np.where(x64.std(0) > 0, x64.std(0), 1.0) if scheme == "std-step" else \
            np.sqrt(np.mean(prior.astype(np.float64) ** 2, axis=0))
        np.testing.assert_allclose(q.scale, 0.25 * unit)
        middle = 0 if dtype == "int8" else 128
        np.testing.assert_allclose(q.offset + middle * q.scale, x64.mean(0))


def test_clipping_is_counted_and_bounded():
    q = Quantizer("int8", scale=np.array([1.0, 2.0]), offset=np.array([0.0, 10.0]), spread=np.ones(2))
    x = np.array([[127.4, 10.0], [127.6, 10.0 - 2 * 128.6], [-200.0, 10.0 + 2 * 127.0]])
    codes = q.quantize(x)
    np.testing.assert_array_equal(codes, [[127, 0], [127, -128], [-128, 127]])
    # clipped: values more than half a step beyond the end codes (127.6, -200, raw -128.6);
    # 127.4 and raw 127.0 are within half a step of code 127
    assert count_clipped(q, x, codes) == 3


def test_error_stats_closed_form():
    values = np.array([[0.0, 1.0], [2.0, 3.0]])
    stored = np.array([[0.5, 1.0], [2.0, 2.0]])
    spread = np.array([0.5, 2.0])
    e = error_stats(values, stored, spread, clipped=3)
    np.testing.assert_allclose(e, [0.25 + 1.0, 1.0, 3, (0.5 / 0.5) ** 2 + (1.0 / 2.0) ** 2])
    s = summarise_errors(np.stack([e, e]), n_values=8)
    assert s == pytest.approx({"rmse": np.sqrt(2.5 / 8), "max_abs_error": 1.0, "clipped_fraction": 6 / 8,
                               "relative_rmse": np.sqrt(2.5 / 8)})


def test_bad_inputs():
    x = columns(10)
    with pytest.raises(UserError, match="--dtype"):
        fit_quantizer(x, "float16")
    with pytest.raises(UserError, match="--quantize"):
        fit_quantizer(x, "int8", scheme="lloyd")
    with pytest.raises(UserError, match="--quant-step"):
        fit_quantizer(x, "int8", step=0.0, prior_std=np.ones(K))
    with pytest.raises(UserError, match="NaN"):
        fit_quantizer(np.full((3, K), np.nan), "int8", scheme="range")
    with pytest.raises(ValueError, match="NaN"):
        fit_quantizer(x, "int8", scheme="range").quantize(np.full((1, K), np.inf))
    with pytest.raises(ValueError, match="positive"):
        Quantizer("int8", scale=np.zeros(2), offset=np.zeros(2), spread=np.ones(2))


def test_calibration_rows_are_seeded_and_sorted():
    a = calibration_rows(10_000, 100, seed=3)
    assert len(a) == 100 and np.all(np.diff(a) > 0)
    np.testing.assert_array_equal(a, calibration_rows(10_000, 100, seed=3))
    assert not np.array_equal(a, calibration_rows(10_000, 100, seed=4))
    np.testing.assert_array_equal(calibration_rows(50, 100), np.arange(50))


@pytest.mark.parametrize("suffix", [".zarr", ".h5"])
@pytest.mark.parametrize("dtype", list(INT_DTYPES))
def test_quantised_store_reads_back_dequantised(tmp_path: Path, suffix: str, dtype: str):
    x, std = columns(37), np.abs(columns(37, seed=2)) + 0.1
    qs = {"features": fit_quantizer(x[:20], dtype, scheme="range"),
          "features_std": fit_quantizer(std[:20], dtype, scheme="range")}
    dims = {"layer": np.zeros(K), "variate": np.arange(K), "y": -np.ones(K), "x": -np.ones(K), "avg_kl": np.ones(K)}
    path = tmp_path / f"q{suffix}"
    writer = StoreWriter.create(path, n_rows=37, dims=dims, attrs={}, dtype=dtype, with_std=True, quantizers=qs,
                                quantization={"scheme": "range"}, chunk_rows=8)
    for i in range(writer.n_chunks):
        lo, hi = writer.chunk_range(i)
        writer.write_chunk(i, x[lo:hi], features_std=std[lo:hi], sample_index=np.arange(lo, hi),
                           source_index=np.arange(lo, hi))
    summary = writer.error_summary()
    writer.finalize()
    with open_encodings(path) as enc:
        assert enc.features.dtype == np.float32 and enc.dtype == dtype
        assert enc.attrs["quantization"] == {"dtype": dtype, "scheme": "range"}
        np.testing.assert_array_equal(enc.features[:], qs["features"].dequantize(qs["features"].quantize(x)))
        np.testing.assert_array_equal(enc.features_std[3:30], qs["features_std"].dequantize(
            qs["features_std"].quantize(std))[3:30])
        assert enc.features.raw.dtype == np.dtype(dtype)  # the codes, for whoever wants them
        assert enc.error_summary() == summary
    # the error record: the rows outside the 20 calibration rows clip, and the sums match
    q = qs["features"]
    codes = q.quantize(x)
    err = q.dequantize(codes).astype(np.float64) - x
    assert summary["features"]["clipped_fraction"] == pytest.approx(count_clipped(q, x, codes) / x.size)
    assert summary["features"]["rmse"] == pytest.approx(np.sqrt(np.mean(err**2)), rel=1e-6)
    assert summary["features"]["max_abs_error"] == pytest.approx(np.abs(err).max(), rel=1e-6)
    with pytest.raises(ValueError, match="Quantizer"):
        StoreWriter.create(tmp_path / f"bad{suffix}", n_rows=3, dims=dims, attrs={}, dtype=dtype)


def test_encode_int8_reports_its_error_and_resumes_with_its_quantiser(tmp_path: Path, capsys):
    import json

    from helpers import assert_one_line_error, run_cli
    from store_fixtures import random_run
    from vdvae_latents.stores.encode import encode_to_store

    run = random_run(tmp_path / "run")
    out = tmp_path / "q.zarr"
    base = ("encode", run, "--data", "digits", "--split", "val", "--keep", "25%", "--chunk-rows", "64",
            "--device", "cpu")
    code, stdout, err = run_cli(capsys, *base, "--out", out, "--dtype", "uint8", "--quantize", "range", "--json")
    assert code == 0, err
    r = json.loads(stdout)
    assert r["dtype"] == "uint8" and r["quantization"]["scheme"] == "range" and r["codec"] == "zstd:9"
    assert r["quantization"]["calibration_rows"] == 180 and r["bytes_per_image"] == r["bytes_on_disk"] / 180
    # range calibrated on the whole split: nothing clips, and the error is within half a step
    with open_encodings(out) as enc:
        half_step = enc.quantizers["features"].scale.max() / 2
        assert enc.error_summary()["features"] == r["error"]
    assert r["error"]["clipped_fraction"] == 0 and 0 < r["error"]["max_abs_error"] <= half_step * (1 + 1e-6)
    assert r["full_latents_dtype"] == "float16" and r["notes"] == []
    code, _, err = run_cli(capsys, "decode", out, "--rows", "0:4", "--out", tmp_path / "d.png", "--device", "cpu")
    assert code == 0 and (tmp_path / "d.png").is_file(), err  # decode reads the dequantised values
    active = tmp_path / "q.active.json"  # the first encode saved its active set: no more KL passes
    base = tuple("--active" if a == "--keep" else active if a == "25%" else a for a in base)
    code, stdout, _ = run_cli(capsys, *base, "--out", tmp_path / "t.zarr", "--dtype", "int8")
    assert code == 0 and "features error (int8 std-step step 0.125 column std)" in stdout
    code, stdout, _ = run_cli(capsys, *base, "--out", tmp_path / "p.zarr", "--dtype", "int8", "--quantize", "prior-step")
    assert code == 0 and "features error (int8 prior-step step 0.125 prior std)" in stdout
    assert "note: quantisation error" in stdout  # random weights: the means vary far less than a prior step

    # resume: the stored quantiser continues the store, identical to an uninterrupted run
    writer = StoreWriter.open(out)
    lo, hi = writer.chunk_range(1)
    with open_encodings(out) as enc:
        reference = enc.features[:]
    writer.close()
    import zarr

    zarr.open_group(str(out), mode="r+")["chunks_written"][1] = 0
    encode_to_store(run, "digits", out, split="val", active_file=active, chunk_rows=64, device="cpu", dtype="uint8",
                    quantize="range", resume=True)
    with open_encodings(out) as enc:
        np.testing.assert_array_equal(enc.features[:], reference)
    code, _, err = run_cli(capsys, *base, "--out", out, "--dtype", "uint8", "--resume")
    assert_one_line_error(code, err, "quantization")  # std-step is not how it was written

    for bad, needle in ((("--dtype", "int16"), "--dtype"), (("--dtype", "int8", "--quant-step", "0"), "--quant-step"),
                        (("--quantize", "lloyd"), "--quantize"), (("--codec", "gzip:4"), "--codec")):
        code, _, err = run_cli(capsys, *base, "--out", tmp_path / "bad.zarr", *bad)
        assert_one_line_error(code, err, needle)
