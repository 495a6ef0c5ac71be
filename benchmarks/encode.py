"""Encoding throughput and store sizes.

Compares `vdvl encode` end to end (the library call behind it: pruned forward pass +
chunked, compressed store writes) with the bare pruned forward pass on the same model,
active set and images, and sizes the stores at the chosen keep against the full
latents and the raw pixels.

    python benchmarks/encode.py --ckpt quickstart-out/run --data digits --split train
    python benchmarks/encode.py --ckpt fashion-out/run --data fashion-mnist --split test

Goals (issue 5): storage overhead < 10% of the bare pass; the keep-3% store >= 20x
smaller than the full latents. Results: benchmarks/results/encode-<tag>.json and .md.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.train_step import machine  # noqa: E402
from vdvae_latents.model.inputs import prepare_batch  # noqa: E402
from vdvae_latents.model.checkpoints import load_model, resolve_checkpoint  # noqa: E402
from vdvae_latents.data import load_images  # noqa: E402
from vdvae_latents.stores.encode import encode_to_store  # noqa: E402
from vdvae_latents.latents.encoder import Encoder  # noqa: E402
from vdvae_latents.latents.stats import LatentKL
from vdvae_latents.latents.active_set import build_active_set, parse_keep  # noqa: E402


def bare_pass(model, encoder, images, batch_size: int, device) -> float:
    """Seconds for prepare_batch + pruned forward + feature gather over all images."""
    start = time.perf_counter()
    for b in range(0, len(images), batch_size):
        x = prepare_batch(model.cfg, images[b:b + batch_size], device=device)
        f, _ = encoder.encode(x)
        f.cpu().numpy()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", required=True, help="run directory or checkpoint")
    ap.add_argument("--data", default="digits")
    ap.add_argument("--split", default="train")
    ap.add_argument("--keep", default="3%")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tag", default=None)
    ap.add_argument("--formats", nargs="*", default=["zarr", "h5"])
    ap.add_argument("--dtypes", nargs="*", default=["float16", "float32"])
    ap.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results", help="results folder")
    args = ap.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    ckpt = resolve_checkpoint(args.ckpt)
    model, _ = load_model(ckpt, ema=True, device=device)
    images = load_images(args.data, split=args.split).images
    kl_images = load_images(args.data, split="train", limit=5000).images
    stats = LatentKL(batch_size=args.batch_size, device=device).fit(model, kl_images)
    active = build_active_set(stats, keep=parse_keep(args.keep), data=args.data, split="train", checkpoint=str(ckpt))
    encoder = Encoder(model, active)

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        active_file = active.save(Path(tmp) / "active.json")
        bare = min(bare_pass(model, encoder, images, args.batch_size, device) for _ in range(args.repeats))
        for fmt in args.formats:
            for dtype in args.dtypes:
                best, result = float("inf"), None
                for r in range(args.repeats):
                    out = Path(tmp) / f"s{r}.{fmt}"
                    t = time.perf_counter()
                    result = encode_to_store(ckpt, args.data, out, split=args.split, active_file=active_file,
                                             dtype=dtype, batch_size=args.batch_size, overwrite=True, device=str(device))
                    best = min(best, time.perf_counter() - t)
                rows.append({
                    "format": fmt, "dtype": dtype, "rows": result["rows"], "features": result["features"],
                    "bare_pass_s": bare, "encode_s": best, "overhead_pct": 100 * (best - bare) / bare,
                    "bare_images_per_s": len(images) / bare, "encode_images_per_s": len(images) / best,
                    "bytes_on_disk": result["bytes_on_disk"], "full_latents_bytes": result["full_latents_bytes"],
                    "raw_pixel_bytes": result["raw_pixel_bytes"],
                    "x_smaller_than_full": result["full_latents_bytes"] / result["bytes_on_disk"],
                    "x_vs_raw_pixels": result["raw_pixel_bytes"] / result["bytes_on_disk"],
                })
                print(json.dumps(rows[-1]), flush=True)

    tag = args.tag or f"{args.data}-{device.type}"
    summary = {"benchmark": "encode", "date": time.strftime("%Y-%m-%d"), "machine": machine(),
               "checkpoint": str(ckpt), "data": f"{args.data}:{args.split}", "keep": args.keep,
               "dims_kept": active.n_active, "dims_total": active.n_dims,
               "kl_share_kept": active.summary()["kl_share_active"], "rows": rows}
    results = args.results
    results.mkdir(parents=True, exist_ok=True)
    (results / f"encode-{tag}.json").write_text(json.dumps(summary, indent=2) + "\n")
    lines = [f"# encode ({tag}), {summary['date']}", "",
             f"Checkpoint `{ckpt}`; data {summary['data']}; keep {args.keep} = {active.n_active} of "
             f"{active.n_dims} variates ({summary['kl_share_kept'] * 100:.1f}% of the KL).", "",
             f"Machine: `{json.dumps(summary['machine'])}`", "",
             "| format | dtype | rows | features | bare pass img/s | encode img/s | overhead | on disk (B) | "
             "full latents (B) | x smaller | raw pixels (B) |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['format']} | {r['dtype']} | {r['rows']} | {r['features']} | {r['bare_images_per_s']:.0f} | "
                     f"{r['encode_images_per_s']:.0f} | {r['overhead_pct']:.1f}% | {r['bytes_on_disk']:,} | "
                     f"{r['full_latents_bytes']:,} | {r['x_smaller_than_full']:.1f} | {r['raw_pixel_bytes']:,} |")
    lines += ["", "Times are the best of the repeats. `encode` includes loading the checkpoint and data, "
              "creating the store and compressing; the bare pass is prepare_batch + pruned forward + gather."]
    (results / f"encode-{tag}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
