"""Peak memory of `vdvl probe` on a store far larger than its memory budget.

Writes (once) a synthetic store of ``--rows`` x ``--features`` float16 features with
``--classes`` Gaussian classes through the real writer, then runs ``vdvl probe STORE
--baselines none --seeds 1 --json`` in a child process and records its peak resident set
size (``ru_maxrss`` of the child), wall time and report. The default 1,000,000 x 600 store
holds 2.4 GB of float32 features, so the probe must stream it (goal: peak RSS < 1 GB).

    python benchmarks/probe_memory.py --store /tmp/big.zarr            # 1,000,000 x 600
    python benchmarks/probe_memory.py --store /tmp/small.zarr --rows 20000 --features 60 --tag small

Results: benchmarks/results/probe_memory-<tag>.json and .md.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.train_step import machine  # noqa: E402
from vdvae_latents.stores.writer import StoreWriter
from vdvae_latents.stores.schema import disk_bytes
from vdvae_latents.stores.reader import open_encodings  # noqa: E402


def synthetic_store(path: Path, rows: int, features: int, classes: int, chunk_rows: int, seed: int = 0) -> None:
    """Gaussian classes: centres ~ N(0, 0.05^2) per feature, unit noise: overlapping classes."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 0.05, (classes, features)).astype(np.float32)
    dims = {"layer": np.zeros(features), "variate": np.arange(features), "y": -np.ones(features),
            "x": -np.ones(features), "avg_kl": np.ones(features)}
    writer = StoreWriter.create(path, n_rows=rows, dims=dims, attrs={"data": "synthetic", "split": "train"},
                                dtype="float16", has_labels=True, chunk_rows=chunk_rows, overwrite=True)
    for i in range(writer.n_chunks):
        lo, hi = writer.chunk_range(i)
        y = rng.integers(0, classes, hi - lo)
        x = centres[y] + rng.normal(0, 1, (hi - lo, features)).astype(np.float32)
        writer.write_chunk(i, x, labels=y, sample_index=np.arange(lo, hi), source_index=np.arange(lo, hi))
    writer.finalize()


def markdown(out: dict) -> str:
    m = out["machine"]
    return (f"# `vdvl probe` peak memory on a {out['rows']:,} x {out['features']} store\n\n"
            f"`{out['command']}` on a synthetic float16 store ({out['store_bytes'] / 1e9:.2f} GB on disk, "
            f"{out['float32_feature_bytes'] / 1e9:.1f} GB as float32 features), {out['n_train']:,} training and "
            f"{out['n_test']:,} test rows (20% hold-out), 10 overlapping Gaussian classes.\n\n"
            f"| peak RSS | goal | fit | epochs | test accuracy | C | wall |\n|---|---|---|---|---|---|---|\n"
            f"| {out['peak_rss_bytes'] / 2**20:,.0f} MiB ({out['peak_rss_bytes'] / 1e9:.2f} GB) | < 1 GB | "
            f"{out['fit']} | {out['epochs']} | {out['test_accuracy']:.4f} | {out['params'][0]['C']} | "
            f"{out['wall_seconds']:.0f} s |\n\n"
            f"Machine: {m.get('cpu')}, {m.get('cpu_count')} cores, torch {m.get('torch')}, python {m.get('python')}. "
            f"{out['conditions'][0].upper()}{out['conditions'][1:]}.\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", type=Path, required=True, help="where the synthetic store is (written if missing)")
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--features", type=int, default=600)
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--chunk-rows", type=int, default=1024)
    ap.add_argument("--tag", default="1m-x-600")
    ap.add_argument("--probe-args", default="", help="extra `vdvl probe` arguments")
    args = ap.parse_args()

    if not args.store.exists():
        start = time.perf_counter()
        synthetic_store(args.store, args.rows, args.features, args.classes, args.chunk_rows)
        print(f"wrote {args.store} in {time.perf_counter() - start:.0f} s", flush=True)
    with open_encodings(args.store) as enc:
        rows, features = enc.n_rows, enc.n_features
    cmd = [sys.executable, "-m", "vdvae_latents", "probe", str(args.store), "--baselines", "none", "--seeds", "1",
           "--json", *args.probe_args.split()]
    start = time.perf_counter()
    child = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if child.returncode != 0:
        raise SystemExit(f"vdvl probe failed ({child.returncode}): {child.stderr}")
    peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # Linux: kilobytes
    report = json.loads(child.stdout)
    row = report["rows"][0]
    out = {
        "machine": machine(), "command": " ".join(cmd[2:]), "store": str(args.store), "rows": rows,
        "features": features, "store_bytes": disk_bytes(args.store), "float32_feature_bytes": rows * features * 4,
        "peak_rss_bytes": peak_kb * 1024, "wall_seconds": seconds, "fit": row["fit"], "epochs": row.get("epochs"),
        "n_train": report["n_train"], "n_test": report["n_test"], "test_accuracy": row["test_accuracy"],
        "params": row["params"], "goal": "peak RSS < 1 GB",
        "conditions": "peak RSS is per process and does not depend on load; wall time was taken on the shared "
                      "2-core machine while other jobs ran (an upper bound)",
    }
    dest = ROOT / "benchmarks" / "results" / f"probe_memory-{args.tag}"
    dest.with_suffix(".json").write_text(json.dumps(out, indent=2) + "\n")
    dest.with_suffix(".md").write_text(markdown(out))
    print(json.dumps({k: out[k] for k in ("peak_rss_bytes", "wall_seconds", "fit", "test_accuracy")}))


if __name__ == "__main__":
    main()
