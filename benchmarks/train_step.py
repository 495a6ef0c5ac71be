"""Training-step throughput and peak memory per preset, batch size and training options.

Drives the real step of ``vdvl train`` (:class:`vdvae_latents.train.step.TrainStep`:
forward, loss with the recipe's KL weight and balancing, backward, gradient norm,
skipping, schedule, Adamax/AdamW update, EMA) on batches made by the training's own
``prepare_batch`` from random uint8 pixels, after warm-up steps. Every measurement runs
in a fresh subprocess, so its peak memory belongs to it alone (process peak RSS on
CPU, ``torch.cuda.max_memory_allocated`` on CUDA). Cases are
``PRESET:BATCH[:KEY=VALUE,...]`` with ``--set`` syntax (``train.x=...`` or model
fields); ``--rounds N`` repeats the whole list, interleaved, for noisy machines.

    python benchmarks/train_step.py                 # default set for this device
    python benchmarks/train_step.py --cases cifar10-c1:16 cifar10-c1:16:train.checkpoint_activations=true
    python benchmarks/train_step.py --paper-memory  # cifar10-c1 @16 vs cifar10-vdvae @32 (with checkpointing)

Results go to benchmarks/results/train_step-<tag>.json and .md with the machine.
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
CPU_CASES = ["tiny:64", "fashion-mnist-cpu:32", "cifar10-c1:16",
             "cifar10-c1:16:train.checkpoint_activations=true", "cifar10-c1:16:train.cpu_bf16=false",
             "cifar10-c1:16:train.cpu_bf16=false,train.checkpoint_activations=true"]
CUDA_CASES = ["fashion-mnist-cpu:256", "cifar10-c1:16", "cifar10-c2:16", "cifar10-vdvae:16", "cifar10-vdvae:32",
              "imagenet32-c1:16"]
# The paper's Table 3 memory comparison (8 GB vs 32 GB on its GPUs), with and without
# checkpointing. On the 24 GiB CPU machine cifar10-vdvae @32 fits since act_conv (12.1 GiB fp32).
PAPER_MEMORY = ["cifar10-c1:16", "cifar10-c1:16:train.checkpoint_activations=true",
                "cifar10-vdvae:32", "cifar10-vdvae:32:train.checkpoint_activations=true"]


def parse_case(case: str) -> tuple[str, int, dict[str, str]]:
    preset, batch, *rest = case.split(":", 2)
    sets = dict(item.split("=", 1) for item in rest[0].split(",")) if rest and rest[0] else {}
    return preset, int(batch), sets


def run_one(case: str, steps: int, warmup: int) -> dict:
    import torch

    sys.path.insert(0, str(ROOT))
    from vdvae_latents.model.inputs import prepare_batch
    from vdvae_latents.train.run_config import resolve_run_config
    from vdvae_latents.train.step import TrainStep, build_model
    from vdvae_latents.core.runtime import auto_device
    from vdvae_latents.train.loop import step_generator

    preset, batch, sets = parse_case(case)
    run = resolve_run_config(preset=preset, overrides=sets, train_overrides={"batch_size": batch})
    cfg, tcfg = run.model, run.train
    device = auto_device(tcfg.device, setting="train setting 'device'")
    model, ema, optimizer = build_model(run, device)
    step_fn = TrainStep(model, ema, optimizer, run, device)

    size = cfg.loss_size
    pixels = torch.Generator().manual_seed(0)

    def batch_at(step: int) -> torch.Tensor:
        images = torch.randint(0, 256, (batch, cfg.channels, size, size), dtype=torch.uint8, generator=pixels)
        return prepare_batch(cfg, images, dynamic_binarize=True, generator=step_generator(tcfg.seed, step, 0),
                             device=device)

    setup_rss = _current_rss_gb()  # torch, the model and its EMA: before any step allocates
    skipped = 0
    for step in range(warmup):
        skipped += step_fn(batch_at(step), step, step_generator(tcfg.seed, step, 0, device)).skipped
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    seconds = 0.0
    for step in range(warmup, warmup + steps):
        x = batch_at(step)
        t0 = time.perf_counter()
        stats = step_fn(x, step, step_generator(tcfg.seed, step, 0, device))
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds += time.perf_counter() - t0
        skipped += stats.skipped
    row = {"case": case, "preset": preset, "batch": batch, "sets": sets, "steps": steps,
           "seconds_per_step": seconds / steps, "images_per_s": batch * steps / seconds,
           "parameters": sum(p.numel() for p in model.parameters()), "skipped": skipped,
           "loss_nats_per_dim": float(stats.nll + stats.kl) / cfg.dims_per_image}
    if device.type == "cuda":
        row["peak_memory_gb"] = torch.cuda.max_memory_allocated() / 2**30
        row["memory_kind"] = "cuda max_memory_allocated"
    else:
        row["peak_memory_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
        row["memory_kind"] = "process peak RSS"
        # RSS also counts the torch runtime and the heap glibc keeps after frees; the tensors
        # themselves, as CUDA's max_memory_allocated counts them, come from one profiled step.
        moments = [t for state in optimizer.state.values() for t in state.values() if torch.is_tensor(t)]
        step = warmup + steps
        row["tensor_peak_gb"] = cpu_tensor_peak_gb(
            lambda x: step_fn(x, step, step_generator(tcfg.seed, step, 0, device)), batch_at(step),
            held=[*model.state_dict().values(), *ema.shadow.values(), *moments])
        # What a step needs beyond the state every variant holds alike (process and weights at
        # set-up, the gradients, the optimiser's moments): activations and temporaries. This
        # is the part activation checkpointing can shrink.
        fixed = setup_rss + (_nbytes(model.parameters()) + _nbytes(moments)) / 2**30
        row["fixed_state_gb"] = fixed
        row["step_memory_gb"] = row["peak_memory_gb"] - fixed
    return row


def cpu_tensor_peak_gb(run_step, x, held) -> float:
    """Peak bytes of live CPU tensors in one step ``run_step(x)``: max_memory_allocated's CPU twin.

    The profiler's allocation events carry the running total of the bytes allocated since
    it started, less those freed again; its maximum is the step's own peak, on top of the
    tensors ``held`` when the step begins (weights, EMA, optimiser state) and the batch.
    """
    import torch
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run_step(x)
    peak, stack = 0, list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        event = stack.pop()
        stack.extend(event.children)
        if event.tag == _EventType.Allocation and event.extra_fields.device.type == "cpu":
            peak = max(peak, event.extra_fields.total_allocated)
    return (_nbytes([*held, x]) + peak) / 2**30


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _current_rss_gb() -> float:
    """This process's resident set size now (Linux /proc; 0 elsewhere)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return 0.0
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**30


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


def measure(case: str, steps: int, warmup: int) -> dict:
    """One case in its own process (a failure becomes a row with the reason)."""
    cmd = [sys.executable, __file__, "--one", case, "--steps", str(steps), "--warmup", str(warmup)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode == 0:
        return json.loads(proc.stdout.strip().splitlines()[-1])
    if proc.returncode < 0:  # killed by a signal: on Linux almost always the OOM killer
        err = f"killed by signal {-proc.returncode} (likely out of memory)"
    else:
        err = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"
    preset, batch, sets = parse_case(case)
    return {"case": case, "preset": preset, "batch": batch, "sets": sets, "error": err}


def write_results(tag: str, rows: list[dict], note: str, results: Path = RESULTS) -> None:
    results.mkdir(parents=True, exist_ok=True)
    result = {"benchmark": "train_step", "date": time.strftime("%Y-%m-%d"), "machine": machine(), "note": note,
              "rows": rows}
    (results / f"train_step-{tag}.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"# train_step ({tag}), {result['date']}", "", f"Machine: `{json.dumps(result['machine'])}`", "",
             "| case | params | s/step | images/s | peak memory (GiB) | of which step (GiB) | tensor peak (GiB) "
             "| skipped |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['case']} | | error: {r['error']} | | | | | |")
        else:
            step_mem = f"{r['step_memory_gb']:.2f}" if "step_memory_gb" in r else ""
            tensors = f"{r['tensor_peak_gb']:.2f}" if "tensor_peak_gb" in r else ""
            lines.append(f"| {r['case']} | {r['parameters'] / 1e6:.1f}M | {r['seconds_per_step']:.3f} | "
                         f"{r['images_per_s']:.2f} | {r['peak_memory_gb']:.2f} | {step_mem} | {tensors} | "
                         f"{r['skipped']} |")
    lines += ["", f"Memory is {next((r['memory_kind'] for r in rows if 'memory_kind' in r), '')}. {note}"]
    if any("tensor_peak_gb" in r for r in rows):
        lines += ["", "Step memory: peak RSS less the state present before the first step (process, weights, "
                      "EMA, gradients, optimiser moments). Tensor peak: the most bytes of live tensors in one "
                      "profiled step, that state included, i.e. what CUDA's max_memory_allocated counts "
                      "(no torch runtime, no heap the allocator keeps after frees)."]
    (results / f"train_step-{tag}.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", nargs="*", help="PRESET:BATCH[:KEY=VALUE,...] cases")
    ap.add_argument("--paper-memory", action="store_true", help="the paper's Table 3 memory comparison")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=1, help="repeat the case list, interleaved")
    ap.add_argument("--tag", default=None, help="results file suffix (default: cpu or cuda)")
    ap.add_argument("--results", type=Path, default=RESULTS, help="results folder (default: benchmarks/results)")
    ap.add_argument("--note", default="", help="load conditions etc., written into the results")
    ap.add_argument("--no-write", action="store_true", help="print the rows only")
    ap.add_argument("--in-process", action="store_true",
                    help="run every case in this process (a smoke test: the memory figures are then not per case)")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one, args.steps, args.warmup)))
        return

    import torch

    cuda = torch.cuda.is_available()
    cases = args.cases or (PAPER_MEMORY if args.paper_memory else (CUDA_CASES if cuda else CPU_CASES))
    rows = []
    for rnd in range(args.rounds):
        for case in cases:
            one = run_one(case, args.steps, args.warmup) if args.in_process else measure(case, args.steps, args.warmup)
            row = {**one, "round": rnd}
            rows.append(row)
            print(json.dumps(row), flush=True)
    if not args.no_write:
        note = f"{args.steps} timed steps after {args.warmup} warm-up steps, one process per row. {args.note}"
        write_results(args.tag or ("cuda" if cuda else "cpu"), rows, note.strip(), args.results)


if __name__ == "__main__":
    main()
