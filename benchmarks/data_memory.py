"""Peak memory of the streaming commands does not grow with the data set.

Writes two synthetic 64x64x3 uint8 Zarr stores laid out as `vdvl pack` lays them out
(chunks of 32 images, zstd; random pixels, so 200,000 images are 2.5 GB on disk too),
then runs the real commands on each, each in its own process under GNU time, and
records their peak RSS:

* ``vdvl train --preset tiny64 --steps 200`` (batch 16, checkpoint and validation at the end),
* ``vdvl analyze-kl --split all`` (every image once),
* ``vdvl encode --split all --active`` (every image once, into a Zarr store).

    python benchmarks/data_memory.py --root /work/bench-data/mem            # 20,000 and 200,000 images
    python benchmarks/data_memory.py --root /work/bench-data/mem --lock /tmp/vdvl-cpu.lock
    python benchmarks/data_memory.py --root /tmp/mem --sizes 2000 20000 --steps 20

The data sets are deleted afterwards unless ``--keep``. Results go to
benchmarks/results/data_memory-cpu.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT / "benchmarks"))
from train_step import machine  # noqa: E402


def make_store(path: Path, n: int, seed: int = 0) -> None:
    """n random 64x64x3 images with labels, written block by block (never all in memory)."""
    import zarr

    group = zarr.open_group(str(path), mode="w")
    images = group.create_array("images", shape=(n, 64, 64, 3), chunks=(32, 64, 64, 3), dtype="uint8")
    rng = np.random.default_rng(seed)
    group.create_array("labels", data=rng.integers(0, 10, n))
    for lo in range(0, n, 4096):
        hi = min(n, lo + 4096)
        images[lo:hi] = rng.integers(0, 256, (hi - lo, 64, 64, 3), dtype=np.uint8)


def peak_rss(cmd: list[str], log: Path, lock: str | None = None) -> dict:
    """Run ``cmd`` under GNU time: its peak RSS (MB) and wall time.

    One torch thread: the figure is memory, and on a shared 2-core machine two spinning
    OpenMP threads per process make these runs several times slower.
    """
    t0 = time.perf_counter()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with log.open("w") as out:
        # The shared lock is taken per command, so others' exclusive timing runs can go in between.
        prefix = ["flock", "-s", lock] if lock else []
        proc = subprocess.run([*prefix, "/usr/bin/time", "-f", "PEAK_RSS_KB %M", *cmd], stdout=out,
                              stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    text = log.read_text()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{text[-3000:]}")
    kb = int(next(line.split()[1] for line in text.splitlines() if line.startswith("PEAK_RSS_KB")))
    return {"peak_rss_mb": kb / 1024, "seconds": time.perf_counter() - t0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", type=Path, required=True, help="scratch folder for the data sets (not the repo)")
    ap.add_argument("--sizes", type=int, nargs="+", default=[20_000, 200_000])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=256, help="for analyze-kl and encode")
    ap.add_argument("--keep", action="store_true", help="keep the data sets")
    ap.add_argument("--lock", help="run each command under `flock -s LOCK` (a shared machine's CPU lock)")
    args = ap.parse_args()
    vdvl = [sys.executable, "-m", "vdvae_latents"]
    rows = []
    args.root.mkdir(parents=True, exist_ok=True)
    try:
        for n in args.sizes:
            work = args.root / f"n{n}"
            shutil.rmtree(work, ignore_errors=True)
            work.mkdir()
            data = work / "images.zarr"
            t0 = time.perf_counter()
            make_store(data, n)
            print(f"{n} images written in {time.perf_counter() - t0:.0f} s", flush=True)
            run, active = work / "run", work / "active.json"
            jobs = {
                "train": [*vdvl, "train", "--preset", "tiny64", "--data", str(data), "--run-dir", str(run),
                          "--steps", str(args.steps), "--batch-size", "16", "--checkpoint-every", str(args.steps),
                          "--device", "cpu", "--quiet", "--set", "train.val_limit=512"],
                "analyze-kl": [*vdvl, "analyze-kl", str(run), "--data", str(data), "--split", "all", "--keep", "10%",
                               "--out", str(active), "--batch-size", str(args.batch_size), "--device", "cpu"],
                "encode": [*vdvl, "encode", str(run), "--data", str(data), "--split", "all", "--active", str(active),
                           "--out", str(work / "codes.zarr"), "--batch-size", str(args.batch_size), "--device", "cpu",
                           "--quiet"],
            }
            for name, cmd in jobs.items():
                row = {"command": name, "images": n, **peak_rss(cmd, work / f"{name}.log", args.lock)}
                rows.append(row)
                print(json.dumps(row), flush=True)
    finally:
        if not args.keep:
            for n in args.sizes:
                shutil.rmtree(args.root / f"n{n}", ignore_errors=True)

    RESULTS.mkdir(parents=True, exist_ok=True)
    result = {"benchmark": "data_memory", "date": time.strftime("%Y-%m-%d"), "machine": machine(),
              "steps": args.steps, "batch_size": args.batch_size, "rows": rows}
    (RESULTS / "data_memory-cpu.json").write_text(json.dumps(result, indent=2) + "\n")
    sizes = sorted({r["images"] for r in rows})
    lines = [f"# data_memory (cpu), {result['date']}", "", f"Machine: `{json.dumps(result['machine'])}`", "",
             "Peak RSS of each command in its own process (GNU time), on synthetic 64x64x3 uint8 Zarr stores "
             f"(chunks of 32 images), preset tiny64; train {args.steps} steps at batch 16, analyze-kl and encode "
             f"over --split all at batch {args.batch_size}, all with the default --workers (0 on the CPU) and one torch "
             "thread; seconds are wall time on a shared machine.", "",
             "| command | " + " | ".join(f"{n:,} images" for n in sizes) + " | difference |",
             "|---|" + "---|" * (len(sizes) + 1)]
    for name in ("train", "analyze-kl", "encode"):
        mb = [next(r["peak_rss_mb"] for r in rows if r["command"] == name and r["images"] == n) for n in sizes]
        secs = [next(r["seconds"] for r in rows if r["command"] == name and r["images"] == n) for n in sizes]
        cells = " | ".join(f"{m:.0f} MB ({s:.0f} s)" for m, s in zip(mb, secs))
        lines.append(f"| {name} | {cells} | {mb[-1] - mb[0]:+.0f} MB |")
    lines.append("")
    (RESULTS / "data_memory-cpu.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
