"""Which training recipe suits a CPU preset: short `vdvl train` runs, one per recipe variant.

Each variant trains the preset from the same seed for the same number of steps with the
real training loop and reports the validation negative ELBO of its EMA weights (what
`vdvl eval` scores) and of its raw weights, so an EMA that has not caught up shows as
such. Variants:

* ``project``: the preset's own recipe (run-length cosine, EMA warm-up, no KL ramp or
  balancing);
* ``official``: the Efficient-VDVAE recipe as its configs give it (warm-up then constant lr
  for a run this short, KL ramp over 5,000 steps from 1e-4, KL balancing for 10,000 steps,
  EMA 0.9999 without warm-up);
* ``official-ema-warmup``: the same with the project's EMA warm-up, to separate the EMA from
  the KL schedule;
* ``project-kl-scaled``: the project's recipe plus the official KL ramp and balancing scaled
  to the run (ramp over the first 10%, balancing over the first 20% of the steps);
* ``project-cpu-bf16``: the project's recipe in bf16 autocast (``train.cpu_bf16``), to see
  what the faster precision costs.

    python benchmarks/recipe_compare.py --preset fashion-mnist-cpu --data fashion-mnist --steps 600

Results: benchmarks/results/recipes-<preset>.json and .md.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.train_step import machine  # noqa: E402
from vdvae_latents.model.evaluation import evaluate  # noqa: E402
from vdvae_latents.data import load_images  # noqa: E402
from vdvae_latents.train.recipes import RECIPES  # noqa: E402
from vdvae_latents.train.run_config import resolve_run_config  # noqa: E402
from vdvae_latents.train.loop import train  # noqa: E402

# The official settings that are about the optimisation (not the data set or its length).
OFFICIAL_KEYS = ("lr_schedule", "warmup_steps", "decay_start", "decay_steps", "kl_warmup_start", "kl_warmup_steps",
                 "kl_weight_min", "kl_balance_steps", "kl_balance_scaled", "ema_decay", "ema_warmup",
                 "grad_skip_threshold", "grad_clip")


def variants(steps: int) -> dict[str, dict]:
    official = {k: RECIPES["cifar10"].settings[k] for k in OFFICIAL_KEYS}
    return {
        "project": {},
        "official": official,
        "official-ema-warmup": {**official, "ema_warmup": True},
        "project-kl-scaled": {"kl_warmup_steps": max(1, steps // 10), "kl_weight_min": 1e-4,
                              "kl_balance_steps": max(1, steps // 5)},
        "project-cpu-bf16": {"cpu_bf16": True},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="fashion-mnist-cpu")
    ap.add_argument("--data", default="fashion-mnist")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--val", type=int, default=2000, help="validation images")
    ap.add_argument("--only", nargs="*", help="variant names to run")
    ap.add_argument("--note", default="")
    args = ap.parse_args()

    base = resolve_run_config(preset=args.preset, data=args.data)
    val = load_images(args.data, split="val", seed=base.train.seed, limit=args.val).images
    rows = []
    for name, settings in variants(args.steps).items():
        if args.only and name not in args.only:
            continue
        run = replace(base, train=replace(base.train, steps=args.steps, val_limit=1, log_every=50,
                                          checkpoint_every=10**9, **settings))
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            result = train(Path(tmp) / "run", run, quiet=True)
            seconds = time.perf_counter() - t0
        raw = evaluate(result.model, val, batch_size=256, seed=0).as_dict()
        result.model.load_state_dict(result.ema.state_dict())
        ema = evaluate(result.model, val, batch_size=256, seed=0).as_dict()
        row = {"variant": name, "settings": settings, "steps": args.steps, "seconds": seconds, "skips": result.skips,
               "val_bits_per_dim_ema": ema["bits_per_dim"], "val_bits_per_dim_raw": raw["bits_per_dim"],
               "val_kl_bits_per_dim_ema": ema["kl_bits_per_dim"]}
        rows.append(row)
        print(json.dumps(row), flush=True)

    out = {"benchmark": "recipe_compare", "date": time.strftime("%Y-%m-%d"), "machine": machine(),
           "preset": args.preset, "data": args.data, "steps": args.steps, "val_images": len(val), "note": args.note,
           "rows": rows}
    results = ROOT / "benchmarks" / "results"
    (results / f"recipes-{args.preset}.json").write_text(json.dumps(out, indent=2) + "\n")
    lines = [f"# recipe_compare ({args.preset} on {args.data}, {args.steps} steps), {out['date']}", "",
             f"Machine: `{json.dumps(out['machine'])}`. {args.note}", "",
             "| variant | val bits/dim (EMA) | val bits/dim (raw weights) | val KL bits/dim (EMA) | skips | s |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['val_bits_per_dim_ema']:.4f} | {r['val_bits_per_dim_raw']:.4f} | "
                     f"{r['val_kl_bits_per_dim_ema']:.4f} | {r['skips']} | {r['seconds']:.0f} |")
    lines += ["", f"Validation: the first {len(val)} images of the val split, seed 0, batch 256."]
    (results / f"recipes-{args.preset}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
