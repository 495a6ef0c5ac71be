"""Store size per dtype x codec, and what each quantisation keeps.

Takes the float32 stores of a train and a test split (``vdvl encode --dtype float32``:
the exact posterior means) and rewrites their features through the real writer
(``StoreWriter``) as every dtype / quantisation scheme x every codec, recording bytes per
image on disk (the whole store and the ``features`` array alone). For each dtype it also
records what storing loses:

* the error record every store keeps (RMS and largest error, clipped values, RMS error
  relative to each column's spread);
* the RMS error relative to the posterior standard deviation of the calibration images
  (noise well below the posterior's own uncertainty costs no information about the image);
* with ``--probe``: the logistic probe's test accuracy (`vdvl probe` with the test store,
  no baselines, same protocol for every dtype).

Quantisers are fitted exactly as ``vdvl encode --dtype int8`` fits them: on the seeded
calibration rows of each split, with the prior std from the store's checkpoint.

    python benchmarks/store_codecs.py --train fashion-out/train-f32.zarr --test fashion-out/test-f32.zarr \\
        --probe --tag fashion-mnist

Results: benchmarks/results/store_codecs-<tag>.json and .md.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.train_step import machine  # noqa: E402
from vdvae_latents.model.inputs import prepare_batch  # noqa: E402
from vdvae_latents.data import load_images  # noqa: E402
from vdvae_latents.stores.decode import store_encoder  # noqa: E402
from vdvae_latents.stores.codes import CALIBRATION_ROWS, calibration_rows, fit_quantizer  # noqa: E402
from vdvae_latents.stores.backends import default_codec  # noqa: E402
from vdvae_latents.stores.schema import OWN_ATTRS, disk_bytes
from vdvae_latents.stores.writer import StoreWriter
from vdvae_latents.stores.reader import open_encodings  # noqa: E402

ZARR_CODECS = ["blosc:zstd:5:shuffle", "blosc:zstd:9:shuffle", "blosc:zstd:5:bitshuffle", "blosc:lz4:5:shuffle",
               "zstd:3", "zstd:9", "zstd:19", "zstd:9+transpose", "blosc:zstd:5:shuffle+transpose"]
HDF5_CODECS = ["gzip:4:shuffle", "gzip:9:shuffle", "gzip:4", "lzf:shuffle", "lzf"]
#: What is compared: dtype[:scheme[:step]].
VARIANTS = ["float32", "float16", "int8:range", "int8:std-step:0.125", "int8:std-step:0.25",
            "int8:prior-step:0.125", "int8:prior-step:0.25", "int8:prior-step:0.5"]


def parse_variant(text: str) -> tuple[str, str | None, float | None]:
    dtype, scheme, step = (text.split(":") + [None, None])[:3]
    return dtype, scheme, None if step is None else float(step)


def calibration(store: Path, batch_size: int = 256) -> dict[str, np.ndarray]:
    """Features, prior std and posterior std of the calibration rows, as encode computes them."""
    with open_encodings(store) as enc:
        n, data, split = enc.n_rows, enc.attrs["data"], enc.attrs["split"]
        encoder, _ = store_encoder(enc, statistic="mean+std")
        rows = calibration_rows(n, CALIBRATION_ROWS, int(enc.attrs.get("seed", 0)))
        stored = enc.features[rows]
    images = load_images(data, split=split).images[rows]
    feats, priors, posts = [], [], []
    for b in range(0, len(images), batch_size):
        f, s, p = encoder.encode_with_prior(prepare_batch(encoder.model.cfg, images[b:b + batch_size]))
        feats.append(f.numpy())
        posts.append(s.numpy())
        priors.append(p.numpy())
    features = np.concatenate(feats)
    # the store holds exactly these means (float32): a check that the calibration is encode's
    assert np.allclose(features, stored, rtol=1e-4, atol=1e-5), "calibration features differ from the store's"
    return {"features": features, "prior_std": np.concatenate(priors), "posterior_std": np.concatenate(posts)}


def rewrite(src: Path, dst: Path, dtype: str, codec: str, quantizer) -> dict:
    """Copy ``src`` (float32 features) to ``dst`` as ``dtype`` with ``codec``; sizes and errors."""
    with open_encodings(src) as enc:
        attrs = {k: v for k, v in enc.attrs.items() if k not in OWN_ATTRS} | {"dtype": dtype}
        writer = StoreWriter.create(dst, n_rows=enc.n_rows, dims=enc.dims, attrs=attrs, dtype=dtype,
                                    has_labels=enc.labels is not None, has_source_names=enc.source_names is not None,
                                    quantizers=None if quantizer is None else {"features": quantizer},
                                    quantization=None if quantizer is None else {"scheme": "benchmark"},
                                    codec=codec, chunk_rows=enc.chunk_rows, overwrite=True)
        start = time.perf_counter()
        for i in range(writer.n_chunks):
            lo, hi = enc.chunk_range(i)
            writer.write_chunk(i, enc.features[lo:hi], labels=None if enc.labels is None else enc.labels[lo:hi],
                               sample_index=enc.sample_index[lo:hi], source_index=enc.source_index[lo:hi],
                               source_names=None if enc.source_names is None else enc.source_names[lo:hi])
        seconds = time.perf_counter() - start
        errors = writer.error_summary()["features"]
        writer.finalize()
        n = enc.n_rows
    features = disk_bytes(dst / "features") if dst.suffix == ".zarr" else None
    return {"bytes_per_image": disk_bytes(dst) / n, "features_bytes_per_image": None if features is None
            else features / n, "write_seconds": seconds, "error": errors}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train", type=Path, required=True, help="float32 store of the training split")
    ap.add_argument("--test", type=Path, default=None, help="float32 store of the test split (default: the probes "
                    "hold out 20%% of --train)")
    ap.add_argument("--probe", action="store_true", help="probe every dtype (logreg, test store, no baselines)")
    ap.add_argument("--probe-max-train", type=int, default=None, help="training rows for the probes (default: all)")
    ap.add_argument("--probe-seeds", type=int, default=1)
    ap.add_argument("--work", type=Path, default=None, help="where the rewritten stores go (default: a temp dir)")
    ap.add_argument("--variants", nargs="+", default=VARIANTS, help="dtype[:scheme[:step]] ...")
    ap.add_argument("--codecs", choices=["all", "default"], default="all", help="size every codec or only the default")
    ap.add_argument("--tag", default="fashion-mnist")
    args = ap.parse_args()
    from vdvae_latents.downstream.probe import run_probe

    work = args.work or Path(tempfile.mkdtemp(prefix="vdvl-codecs-"))
    work.mkdir(parents=True, exist_ok=True)
    with open_encodings(args.train) as enc:
        if enc.dtype != "float32":
            raise SystemExit(f"{args.train} is {enc.dtype}; encode it with --dtype float32")
        n_train, k = enc.n_rows, enc.n_features
        total_scalars = int(enc.attrs["n_latent_scalars_total"])
        cfg = enc.attrs["model_config"]
    pixels = cfg["channels"] * (cfg["image_size"] - 2 * cfg.get("pad", 0)) ** 2
    splits = {"train": args.train, **({"test": args.test} if args.test else {})}
    calib = {split: calibration(path) for split, path in splits.items()}

    results = []
    for dtype, scheme, step in map(parse_variant, args.variants):
        quantizers = {}
        for split in splits:
            c = calib[split]
            quantizers[split] = None if scheme is None else fit_quantizer(
                c["features"], dtype, scheme=scheme, step=step or 0.25, prior_std=c["prior_std"])
        q = quantizers["train"]
        if q is not None:
            c = calib["train"]
            err = q.dequantize(q.quantize(c["features"])) - c["features"]
        else:
            c = calib["train"]
            err = c["features"].astype(dtype).astype(np.float32) - c["features"]
        noise_vs_posterior = float(np.sqrt(np.mean(err.astype(np.float64) ** 2) / np.mean(
            c["posterior_std"].astype(np.float64) ** 2)))
        name = dtype if scheme is None else f"{dtype} {scheme}" + (f" {step:g}" if step else "")
        row = {"variant": name, "dtype": dtype, "scheme": scheme, "step": step,
               "noise_vs_posterior_std": noise_vs_posterior, "codecs": {}}
        print(f"{name}: noise / posterior std {noise_vs_posterior:.4f}", flush=True)
        tables = (("zarr", ZARR_CODECS), ("hdf5", HDF5_CODECS)) if args.codecs == "all" else \
            (("zarr", [default_codec("zarr", dtype)]), ("hdf5", [default_codec("hdf5", dtype)]))
        for fmt, codecs in tables:
            for codec in codecs:
                dst = work / f"train-{dtype}-{scheme}-{step}-{codec.replace(':', '_').replace('+', '_')}." \
                             f"{'zarr' if fmt == 'zarr' else 'h5'}"
                r = rewrite(args.train, dst, dtype, codec, q)
                row["codecs"][f"{fmt} {codec}"] = {k2: v for k2, v in r.items() if k2 != "error"}
                row["error"] = r["error"]
                print(f"  {fmt} {codec}: {r['bytes_per_image']:.1f} B/image", flush=True)
                shutil.rmtree(dst) if dst.is_dir() else dst.unlink()
        if args.probe:
            stores = {}
            for split, src in splits.items():
                stores[split] = work / f"probe-{split}.zarr"
                rewrite(src, stores[split], dtype, default_codec("zarr", dtype), quantizers[split])
            start = time.perf_counter()
            report = run_probe(stores["train"], test_store=stores.get("test"), baselines="none",
                               seeds=args.probe_seeds, max_train=args.probe_max_train, stream="never")
            active = report["rows"][0]
            row["probe"] = {"test_accuracy": active["test_accuracy"], "test_accuracy_std": active["test_accuracy_std"],
                            "test_accuracies": active["test_accuracies"], "params": active["params"],
                            "n_train": report["n_train"], "n_test": report["n_test"],
                            "seconds": time.perf_counter() - start}
            print(f"  probe: {active['test_accuracy']:.4f} ({report['n_train']} training rows)", flush=True)
            for p in stores.values():
                shutil.rmtree(p)
        results.append(row)

    out = {"machine": machine(), "train_store": str(args.train), "test_store": str(args.test) if args.test else None,
           "rows": n_train,
           "features": k, "raw_pixel_bytes_per_image": pixels, "full_latents_float16_bytes_per_image":
           2 * total_scalars, "variants": results,
           "conditions": "sizes are exact; probe accuracies as reported; write_seconds on a shared, loaded "
                         "2-core machine (not comparable between rows)"}
    dest = ROOT / "benchmarks" / "results" / f"store_codecs-{args.tag}"
    dest.with_suffix(".json").write_text(json.dumps(out, indent=2) + "\n")
    dest.with_suffix(".md").write_text(markdown(out))
    print(f"wrote {dest}.json and .md")


def _probe_text(out: dict) -> str:
    p = next((v["probe"] for v in out["variants"] if v.get("probe")), None)
    if p is None:
        return ""
    where = f"the test store `{out['test_store']}`" if out["test_store"] else "a seeded stratified 20% hold-out"
    return (f"Probe: `vdvl probe`'s logistic regression, {p['n_train']:,} training rows, {p['n_test']:,} test rows "
            f"from {where}, mean ± std over {len(p['test_accuracies'])} seed(s), identical for every dtype.")


def _machine_text(m: dict) -> str:
    return f"{m.get('cpu', '?')}, {m.get('cpu_count')} cores, torch {m.get('torch')}"


def markdown(out: dict) -> str:
    full = out["full_latents_float16_bytes_per_image"]
    lines = [f"# Store bytes per image: dtype x codec ({out['rows']:,} rows x {out['features']} features)", "",
             f"Source: `{out['train_store']}` (float32 posterior means), rewritten through `StoreWriter` with "
             f"each dtype's quantiser fitted as `vdvl encode` fits it. Raw pixels: "
             f"{out['raw_pixel_bytes_per_image']} B/image; float16 full latents: {full:,} B/image. "
             + _probe_text(out) + f" Machine: {_machine_text(out['machine'])}; {out['conditions']}.", "",
             "## What each dtype keeps", "",
             "| dtype | RMS error | relative to column std | relative to posterior std | clipped | probe accuracy |",
             "|---|---|---|---|---|---|"]
    for v in out["variants"]:
        e, p = v["error"], v.get("probe")
        acc = f"{p['test_accuracy']:.4f} ± {p['test_accuracy_std']:.4f}" if p else "-"
        lines.append(f"| {v['variant']} | {e['rmse']:.3g} | {e['relative_rmse']:.3g} | {v['noise_vs_posterior_std']:.3g} "
                     f"| {e['clipped_fraction'] * 100:.3g}% | {acc} |")
    codecs = list(dict.fromkeys(c for v in out["variants"] for c in v["codecs"]))
    lines += ["", "## Bytes per image on disk (whole store)", "",
              "| codec | " + " | ".join(v["variant"] for v in out["variants"]) + " |",
              "|---|" + "---|" * len(out["variants"])]
    for codec in codecs:
        cells = [f"{v['codecs'][codec]['bytes_per_image']:.0f}" if codec in v["codecs"] else "-"
                 for v in out["variants"]]
        lines.append(f"| {codec} | " + " | ".join(cells) + " |")
    lines += ["", f"Times smaller than the float16 full latents ({full:,} B/image), best codec per dtype: "
              + ", ".join(f"{v['variant']} {full / min(c['bytes_per_image'] for c in v['codecs'].values()):.0f}x"
                          for v in out["variants"]) + ".", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
