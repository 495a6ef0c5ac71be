"""Images per second the data pipeline delivers, per source kind and worker count, beside the
images per second the model consumes.

    python benchmarks/data_loader.py --root /work/bench-data/loader --prepare   # write the sources
    flock -x /tmp/vdvl-cpu.lock python benchmarks/data_loader.py --root /work/bench-data/loader

``--prepare`` writes N synthetic 64x64x3 images (smooth colour fields with noise, so PNG and
zstd compress them roughly as they do photographs) as a PNG folder (10 class folders), a
packed Zarr store (``vdvl pack`` of that folder, timed), an HDF5 file (chunks of 32 images),
a ``.npy`` file and downsampled-ImageNet batch files (``Imagenet64_train_npz``). The timed run
streams each through the real training loader (:class:`vdvae_latents.data.TrainLoader`:
shuffled batches of 32, a DataLoader with 0, 1 or 2 workers) and counts images delivered
after the first batch, then times training steps of ``cifar10-c1`` (batch 16), the paper's
64x64 ``imagenet64-c1`` (batch 2, what fits a shared 24 GiB machine) and the toy ``tiny64``
(batch 16) with ``benchmarks/train_step.py`` for the images per second a model takes.
Results: benchmarks/results/data_loader-cpu.json and .md.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from train_step import machine  # noqa: E402

SIZE = 64
# Table 3 of the paper: (batch size, training iterations, hours) of the C1 configurations
# and of VDVAE, i.e. the images per second one training run consumed.
PAPER_RUNS = {
    "CIFAR-10 C1": (16, 800_000, 99), "ImageNet 32 C1": (64, 800_000, 161), "ImageNet 64 C1": (32, 800_000, 184),
    "FFHQ 256 C1": (16, 850_000, 226), "ImageNet 32 VDVAE": (256, 1_700_000, 420),
    "ImageNet 64 VDVAE": (128, 1_600_000, 420),
}


def synthetic_images(n: int, seed: int) -> np.ndarray:
    """Smooth random colour fields (8x8 upsampled) plus pixel noise: compressible like photos."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = np.empty((n, SIZE, SIZE, 3), dtype=np.uint8)
    for i in range(n):
        coarse = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
        fine = np.asarray(coarse.resize((SIZE, SIZE), Image.Resampling.BICUBIC), dtype=np.int16)
        out[i] = np.clip(fine + rng.integers(-6, 7, fine.shape), 0, 255)
    return out


def prepare(root: Path, n: int) -> dict:
    import h5py
    from PIL import Image

    from vdvae_latents.data import pack_images

    root.mkdir(parents=True, exist_ok=True)
    images, labels = synthetic_images(n, 0), np.arange(n) % 10
    folder = root / "png"
    for i, (image, label) in enumerate(zip(images, labels)):
        path = folder / f"class{label}" / f"{i:06d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(path)
    packed = pack_images(str(folder), root / "packed.zarr", workers=2, overwrite=(root / "packed.zarr").exists())
    with h5py.File(root / "images.h5", "w") as f:
        f.create_dataset("images", data=images, chunks=(32, SIZE, SIZE, 3))
        f["labels"] = labels
    np.save(root / "images.npy", images)
    inet = root / "Imagenet64_train_npz"
    inet.mkdir(exist_ok=True)
    chw = images.transpose(0, 3, 1, 2).reshape(n, -1)
    for k, part in enumerate(np.array_split(np.arange(n), 2), start=1):
        np.savez(inet / f"train_data_batch_{k}.npz", data=chw[part], labels=labels[part] + 1)
    return {"images": n, "pack_images_per_s": packed["images_per_s"], "pack_workers": 2,
            "png_bytes": sum(p.stat().st_size for p in folder.rglob("*.png")), "packed_bytes": packed["bytes_on_disk"]}


def sources(root: Path) -> dict[str, str]:
    return {"packed Zarr": str(root / "packed.zarr"), "HDF5": f"{root / 'images.h5'}:images,labels",
            "npy": str(root / "images.npy"), "PNG folder": str(root / "png"),
            "downsampled ImageNet": str(root / "Imagenet64_train_npz")}


def delivered(spec: str, workers: int, batches: int, batch_size: int = 32) -> dict:
    """Images/s of shuffled training batches, counted after the first batch arrives."""
    from vdvae_latents.data import TrainLoader, open_images

    t0 = time.perf_counter()
    images = open_images(spec, "all")
    opened = time.perf_counter() - t0
    loader = TrainLoader(images, batch_size=batch_size, seed=0, workers=workers)
    stream = iter(loader.steps(0, batches))
    next(stream)
    t0 = time.perf_counter()
    count = sum(len(batch.images) for batch in stream)
    seconds = time.perf_counter() - t0
    return {"images_per_s": count / seconds, "open_seconds": opened}


def consumed(preset: str, batch: int, steps: int) -> dict:
    cmd = [sys.executable, str(ROOT / "benchmarks" / "train_step.py"), "--one", preset, str(batch), "--steps",
           str(steps), "--warmup", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", type=Path, required=True, help="scratch folder for the sources (not the repo)")
    ap.add_argument("--prepare", action="store_true", help="write the sources and exit")
    ap.add_argument("--images", type=int, default=8192)
    ap.add_argument("--batches", type=int, default=60, help="batches of 32 timed per configuration")
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--report", action="store_true", help="only rewrite the .md from the saved .json")
    args = ap.parse_args()
    if args.report:
        saved = json.loads((RESULTS / "data_loader-cpu.json").read_text())
        (RESULTS / "data_loader-cpu.md").write_text(report(saved) + "\n")
        return
    if args.prepare:
        info = prepare(args.root, args.images)
        (args.root / "prepared.json").write_text(json.dumps(info))
        print(json.dumps(info))
        return

    info = json.loads((args.root / "prepared.json").read_text())
    rows = []
    for kind, spec in sources(args.root).items():
        for workers in args.workers:
            row = {"source": kind, "workers": workers, **delivered(spec, workers, args.batches)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    models = [consumed("cifar10-c1", 16, 2), consumed("imagenet64-c1", 2, 2), consumed("tiny64", 16, 5)]
    for m in models:
        print(json.dumps(m), flush=True)

    RESULTS.mkdir(parents=True, exist_ok=True)
    result = {"benchmark": "data_loader", "date": time.strftime("%Y-%m-%d"), "machine": machine(), "prepared": info,
              "batches": args.batches, "rows": rows, "models": models}
    (RESULTS / "data_loader-cpu.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / "data_loader-cpu.md").write_text(report(result) + "\n")


def report(result: dict) -> str:
    rows, models, info = result["rows"], result["models"], result["prepared"]
    workers = sorted({r["workers"] for r in rows})
    lines = [f"# data_loader (cpu), {result['date']}", "", f"Machine: `{json.dumps(result['machine'])}`", "",
             f"{info['images']:,} synthetic {SIZE}x{SIZE}x3 images; shuffled training batches of 32 through "
             f"TrainLoader ({result['batches']} batches after the first); images/s delivered:", "",
             "| source | open (s) | " + " | ".join(f"{w} worker{'' if w == 1 else 's'}" for w in workers) + " |",
             "|---|---|" + "---|" * len(workers)]
    for kind in dict.fromkeys(r["source"] for r in rows):
        mine = {r["workers"]: r for r in rows if r["source"] == kind}
        cells = " | ".join(f"{mine[w]['images_per_s']:,.0f}" for w in workers)
        lines.append(f"| {kind} | {mine[workers[0]]['open_seconds']:.2f} | {cells} |")
    packed = {r["workers"]: r["images_per_s"] for r in rows if r["source"] == "packed Zarr"}
    lines += ["", "Images/s the model consumes in training (benchmarks/train_step.py on this CPU), and how many "
                  "times that the packed Zarr store delivers with 2 workers (goal >= 10x):", "",
              "| preset | batch | s/step | images/s | packed Zarr, 2 workers / model |", "|---|---|---|---|---|"]
    lines += [f"| {m['preset']} | {m['batch']} | {m['seconds_per_step']:.3f} | {m['images_per_s']:.1f} | "
              f"{packed.get(2, float('nan')) / m['images_per_s']:.1f}x |" for m in models]
    per_worker = packed.get(1)
    if per_worker:
        lines += ["", f"Workers a GPU run would need at the paper's pace (Table 3: batch x iterations / hours, all "
                      f"GPUs together), taking one worker's packed-Zarr rate here ({per_worker:,.0f} images/s of "
                      f"{SIZE}x{SIZE}) and, conservatively, dividing it by the pixels per image for larger images "
                      "and never multiplying it for smaller ones (a random read costs about one chunk's fixed "
                      "overhead whatever the image size):", "",
                  "| run | images/s consumed | workers needed |", "|---|---|---|"]
        for name, (batch, iters, hours) in PAPER_RUNS.items():
            need = batch * iters / (hours * 3600)
            side = 32 if "32" in name or "CIFAR" in name else (256 if "256" in name else 64)
            rate = per_worker * min(1.0, (SIZE * SIZE) / (side * side))
            lines.append(f"| {name} ({side}x{side}) | {need:.0f} | {max(1, math.ceil(need / rate))} "
                         f"({rate / need:.0f}x margin with one) |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
