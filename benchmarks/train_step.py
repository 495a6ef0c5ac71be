"""Training-step throughput and peak memory per preset and batch size.

Times the real code path (prepare_batch -> VAE.forward -> backward -> Adamax step ->
EMA update), after warm-up steps, in a fresh subprocess per configuration so the
peak-memory figure belongs to that configuration alone (RSS on CPU,
``torch.cuda.max_memory_allocated`` on CUDA; bf16 autocast on CUDA as in training).

    python benchmarks/train_step.py                 # default set for this device
    python benchmarks/train_step.py --cases tiny:64 fashion-mnist-cpu:32 --steps 10
    python benchmarks/train_step.py --paper-memory  # cifar10-c1 @16 vs cifar10-vdvae @32, and equal batch

Results go to benchmarks/results/train_step-<device>.json and .md with the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
CPU_CASES = ["tiny:64", "fashion-mnist-cpu:32", "cifar10-c1:4", "cifar10-vdvae:4"]
CUDA_CASES = ["fashion-mnist-cpu:256", "cifar10-c1:16", "cifar10-c2:16", "cifar10-vdvae:16", "cifar10-vdvae:32",
              "imagenet32-c1:16"]
PAPER_MEMORY = ["cifar10-c1:16", "cifar10-vdvae:32", "cifar10-c1:32", "cifar10-vdvae:16"]


def run_one(preset: str, batch: int, steps: int, warmup: int) -> dict:
    import torch

    sys.path.insert(0, str(ROOT))
    from vdvae_latents.presets import get_preset
    from vdvae_latents.training import EMA
    from vdvae_latents.vae import VAE

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    cfg = get_preset(preset).config
    torch.manual_seed(0)
    model = VAE(cfg).to(device)
    if cuda:
        model.to(memory_format=torch.channels_last)
    ema = EMA(model, 0.9999)
    opt = torch.optim.Adamax(model.parameters(), lr=1e-4)
    x = torch.rand(batch, cfg.channels, cfg.image_size, cfg.image_size, device=device) * 2 - 1
    if cfg.output == "bernoulli":
        x = (x > 0).float() * 2 - 1
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else torch.autocast("cpu", enabled=False)

    def step() -> None:
        with autocast:
            out = model(x)
        loss = (out.nll.float() + out.kl_per_image.float()).mean() / cfg.dims_per_image
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf"))
        opt.step()
        ema.update(model)

    for _ in range(warmup):
        step()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    row = {"preset": preset, "batch": batch, "steps": steps, "seconds_per_step": seconds / steps,
           "images_per_s": batch * steps / seconds, "parameters": sum(p.numel() for p in model.parameters())}
    if cuda:
        row["peak_memory_gb"] = torch.cuda.max_memory_allocated() / 2**30
        row["memory_kind"] = "cuda max_memory_allocated"
    else:
        row["peak_memory_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
        row["memory_kind"] = "process peak RSS"
    return row


def machine() -> dict:
    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_memory_gb"] = torch.cuda.get_device_properties(0).total_memory / 2**30
    return info


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", nargs="*", help="preset:batch pairs")
    ap.add_argument("--paper-memory", action="store_true", help="the paper's Table 3 memory comparison")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--tag", default=None, help="results file suffix (default: cpu or cuda)")
    ap.add_argument("--one", nargs=2, metavar=("PRESET", "BATCH"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one[0], int(args.one[1]), args.steps, args.warmup)))
        return

    import torch

    cuda = torch.cuda.is_available()
    cases = args.cases or (PAPER_MEMORY if args.paper_memory else (CUDA_CASES if cuda else CPU_CASES))
    rows = []
    for case in cases:
        preset, batch = case.split(":")
        cmd = [sys.executable, __file__, "--one", preset, batch, "--steps", str(args.steps), "--warmup", str(args.warmup)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            if proc.returncode < 0:  # killed by a signal: on Linux almost always the OOM killer
                err = f"killed by signal {-proc.returncode} (likely out of memory)"
            else:
                err = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"
            row = {"preset": preset, "batch": int(batch), "error": err}
        else:
            row = json.loads(proc.stdout.strip().splitlines()[-1])
        rows.append(row)
        print(json.dumps(row), flush=True)

    tag = args.tag or ("cuda" if cuda else "cpu")
    RESULTS.mkdir(parents=True, exist_ok=True)
    result = {"benchmark": "train_step", "date": time.strftime("%Y-%m-%d"), "machine": machine(), "rows": rows}
    (RESULTS / f"train_step-{tag}.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"# train_step ({tag}), {result['date']}", "", f"Machine: `{json.dumps(result['machine'])}`", "",
             "| preset | batch | params | s/step | images/s | peak memory (GB) |", "|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['preset']} | {r['batch']} | | error: {r['error']} | | |")
        else:
            lines.append(f"| {r['preset']} | {r['batch']} | {r['parameters'] / 1e6:.1f}M | "
                         f"{r['seconds_per_step']:.3f} | {r['images_per_s']:.1f} | {r['peak_memory_gb']:.2f} |")
    lines.append("")
    lines.append(f"Memory is {rows[0].get('memory_kind', '')}; steps={args.steps} after {args.warmup} warm-up steps.")
    (RESULTS / f"train_step-{tag}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
