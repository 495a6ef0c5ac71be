"""The whole mission on scikit-learn's bundled digits, in a few minutes on 2 CPU cores.

train -> evaluate -> rank latent dimensions by KL -> pruning sweep -> encode the active
3% of train and test -> decode a few -> probe against pixels and random dimensions ->
one summary table, and everything on one HTML page (report.html). Every step is the
library call the matching `vdvl` command makes.

    python examples/quickstart.py [--out quickstart-out] [--steps 1500] [--keep 3%] [--granularity element]

Re-running resumes the training run and rewrites the other outputs.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

from rich.console import Console
from rich.table import Table

from vdvae_latents.downstream import plot_probe, run_probe
from vdvae_latents.latents import analyze_checkpoint
from vdvae_latents.model import eval_checkpoint, reconstruct_images, sample_images
from vdvae_latents.report import write_report
from vdvae_latents.stores import decode_store, encode_to_store
from vdvae_latents.train import resolve_run_config, train

console = Console(width=120)


def step(title: str) -> None:
    console.print(f"[bold cyan]==> {title}[/bold cyan]")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="quickstart-out")
    ap.add_argument("--preset", default="digits-cpu")
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--keep", default="3%")
    # digits-cpu has 96 variates, so 3% of the paper's unit (variate) is 3 whole channels;
    # 3% of its 2,592 latent scalars is 78, chosen one by one.
    ap.add_argument("--granularity", default="element", choices=("variate", "element"),
                    help="rank single latent scalars (default) or whole channels (the paper's unit)")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    data = "digits"

    step(f"train {args.preset} on {data} for {args.steps} steps")
    run = resolve_run_config(preset=args.preset, data=data)
    run = replace(run, train=replace(run.train, steps=args.steps, log_every=250, checkpoint_every=1000))
    trained = train(out / "run", run)
    if trained.interrupted:
        console.print(f"interrupted at step {trained.step}; re-run to resume")
        raise SystemExit(130)
    ckpt = trained.checkpoint
    console.print(f"checkpoint {ckpt} ({trained.skips} skipped updates)")

    step("evaluate on the test split")
    full_eval = eval_checkpoint(ckpt, data, split="test", iw_samples=16)

    step(f"rank every latent dimension by its average KL (train split), keep {args.keep}, sweep")
    analysis = analyze_checkpoint(ckpt, data, out=out / "active.json", keep=args.keep, split="train",
                                  granularity=args.granularity,
                                  plot=out / "kl.png", sweep=[3.0, 10.0, 100.0])
    rows = {r["keep_pct"]: r for r in analysis["sweep"]["rows"]}

    step("encode the active dimensions of train and test (Zarr), decode a few")
    enc = {split: encode_to_store(ckpt, data, out / f"{split}.zarr", split=split, active_file=out / "active.json",
                                  overwrite=True) for split in ("train", "test")}
    decode_store(out / "test.zarr", out / "decoded.png", rows="0:32")
    reconstruct_images(ckpt, data, out / "reconstructions.png", n=32)
    sample_images(ckpt, out / "samples.png", n=64, temperature=0.9)

    step("probe: logistic regression on the active dims vs raw pixels and random dims")
    report = run_probe(out / "train.zarr", test_store=out / "test.zarr", baselines=("pixels", "random", "pca"))
    plot_probe(report, out / "probe.png")
    (out / "probe.json").write_text(json.dumps(report, indent=1))  # what `vdvl probe --json` prints
    (out / "summary.json").write_text(json.dumps({"eval": full_eval, "analysis": analysis, "encode": enc,
                                                  "probe": report}, indent=1, default=str))

    binary = "nats_per_image" in full_eval
    unit = "nats/image" if binary else "bits/dim"
    key = "nats_per_image" if binary else "bits_per_dim"
    keep_pct = float(str(args.keep).rstrip("%")) if str(args.keep).endswith("%") else float(args.keep) * 100
    pruned = rows.get(keep_pct) or rows[min(rows)]
    table = Table(title=f"quickstart summary ({time.perf_counter() - t0:.0f} s)", show_header=False)
    table.add_column("what")
    table.add_column("value", justify="right")
    table.add_row(f"latent dimensions ({analysis['granularity']}s) kept",
                  f"{analysis['n_active']} of {analysis['n_dims']} ({analysis['pct_active']:.1f}%)")
    table.add_row("share of the total KL they carry", f"{analysis['kl_share_active'] * 100:.1f}%")
    table.add_row(f"test negative ELBO, all dims ({unit})", f"{rows[100.0][key]:.4f}")
    table.add_row(f"test negative ELBO, {keep_pct:g}% kept ({unit})", f"{pruned[key]:.4f}")
    table.add_row(f"test importance-weighted NLL, K=16 ({unit})",
                  f"{full_eval['iw_nats_per_image' if binary else 'iw_bits_per_dim']:.4f}")
    e = enc["test"]
    table.add_row("test store on disk vs full latents (float16)",
                  f"{e['bytes_on_disk']:,} B vs {e['full_latents_bytes']:,} B "
                  f"({e['full_latents_bytes'] / e['bytes_on_disk']:.1f}x smaller)")
    for r in report["rows"]:
        table.add_row(f"probe accuracy: {r['name']} ({r['features']} features)",
                      f"{r['test_accuracy']:.3f} ± {r['test_accuracy_std']:.3f}")
    console.print(table)

    step("one page with all of it: the model, KL analysis, pruning sweep, stores and probes")
    page = write_report(out / "run", active=out / "active.json", stores=[out / "train.zarr", out / "test.zarr"],
                        probe=out / "probe.json", out=out / "report.html")
    console.print(f"report: {page['out']} (open it in a browser; it needs no network)")
    console.print(f"figures: {out / 'kl.png'}, {out / 'probe.png'}, {out / 'decoded.png'}, "
                  f"{out / 'reconstructions.png'}, {out / 'samples.png'}; numbers: {out / 'summary.json'}")


if __name__ == "__main__":
    main()
