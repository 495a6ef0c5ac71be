"""The official Efficient-VDVAE training step, timed and sized beside vdvl's (issue 13).

Runs the authors' own PyTorch code from a checkout (``VDVL_REF_EFFICIENT`` or
``--checkout``; the hparams library from ``VDVL_REF_HPARAMS`` or an installed one):
their ``UniversalAutoEncoder`` built from an ``egs/*.cfg``, their ``model.model.train_step``
(forward, their loss with the KL schedule and gamma balancing, backward, their gradient
clip and skip, their Adamax, their EMA update, the output sample they log) and their
learning-rate schedule's step, on random targets in [-1, 1] at the
batch size asked for. Nothing of their code is copied here; it is imported, with the
same environment shims the conformance tests use (``tests/efficient_reference.py``), plus
three for a CPU: the posterior noise, ``Tensor.cuda`` and the output sampler's one-hot stay
on the tensors' device.

Each measurement is a fresh process (``--one``), so its peak RSS is its own, and
``--rounds`` interleaves it with ``benchmarks/train_step.py``'s measurements of the
matching vdvl preset (the real ``vdvl train`` step; several cases: defaults, fp32,
checkpointing), so all see the same machine::

    python benchmarks/official_train_step.py --cfg egs/cifar10_C1.cfg --batch 16 \\
        --vdvl-case cifar10-c1:16 cifar10-c1:16:train.cpu_bf16=false --rounds 2

Results: benchmarks/results/official_train_step-<tag>.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT / "benchmarks"))  # train_step.py: vdvl's measurement and the machine description


def _cfg_with_batch(cfg: Path, batch: int) -> Path:
    """A copy of ``cfg`` whose [train] batch_size is ``batch`` (the loss normalises by it)."""
    text = cfg.read_text()
    head, sep, tail = text.partition("[train]")
    tail = re.sub(r"(?m)^batch_size\s*=.*$", f"batch_size = {batch}", tail, count=1)
    out = Path(tempfile.mkdtemp(prefix="vdvl-official-step-")) / "hparams.cfg"
    out.write_text(head + sep + tail)
    return out


def _calculate_z_on_device(mean, std):
    eps = torch.empty_like(mean).normal_(0., 1.)
    return eps * std + mean, mean, std


def _one_hot_on_device(indices, depth, dim):
    """float one-hot of ``indices`` along ``dim``, on their device (theirs allocates on CUDA)."""
    return torch.nn.functional.one_hot(indices, depth).movedim(-1, dim).float()


def run_one(checkout: Path, cfg: Path, batch: int, steps: int, warmup: int, hparams_lib: str | None) -> dict:
    sys.path.insert(0, str(ROOT / "tests"))
    from efficient_reference import load_reference  # noqa: E402 (the conformance tests' loader)

    # Packages the training step's module imports but this measurement does not use.
    sys.modules.setdefault("torch_optimizer", types.ModuleType("torch_optimizer"))
    ref = load_reference(checkout, _cfg_with_batch(cfg, batch), hparams_lib)
    cwd = os.getcwd()
    os.chdir(ref.work)
    try:
        official = __import__("model.model", fromlist=["train_step"])
        adamax = __import__("model.adamax", fromlist=["Adamax"])
    finally:
        os.chdir(cwd)
    hp = ref.hp
    # Their posterior sampler draws on CUDA; the same TorchScript function drawing on the
    # tensors' own device (the only change to their step).
    ref.latent_layers.calculate_z = torch.jit.script(_calculate_z_on_device)
    # Their step also samples an output image and moves its noise with .cuda(): stay on the CPU.
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    sys.modules["model.autoencoder"].one_hot = _one_hot_on_device
    torch.manual_seed(0)
    net = ref.def_model.UniversalAutoEncoder()
    ema = ref.def_model.UniversalAutoEncoder()
    shape = (batch, hp.data.channels, hp.data.target_res, hp.data.target_res)
    g = torch.Generator().manual_seed(0)

    def batch_at(step: int) -> torch.Tensor:
        levels = 2 ** int(getattr(hp.data, "num_bits", 8)) - 1  # the data's grid in [-1, 1]
        return torch.randint(0, levels + 1, shape, generator=g).float() / levels * 2 - 1

    with torch.no_grad():  # creates the unpools' lazily made scale_bias, as their trainer's first batch does
        net(batch_at(0)[:1])
        ema(batch_at(0)[:1])
    ema.load_state_dict(net.state_dict())

    class Wrapped(torch.nn.Module):  # their step reads model.module (the DDP wrapper they train under)
        def __init__(self, module):
            super().__init__()
            self.module = module

        def forward(self, *args, **kwargs):
            return self.module(*args, **kwargs)

    model = Wrapped(net).train()
    opt = hp.optimizer
    # Their own optimiser and schedule factory, called as their train.py calls it.
    optimizer, schedule = official.get_optimizer(
        model=model, type=opt.type, learning_rate=opt.learning_rate, beta_1=opt.beta1, beta_2=opt.beta2,
        epsilon=opt.epsilon, weight_decay_rate=0.0, decay_scheme=opt.learning_rate_scheme,
        warmup_steps=opt.warmup_steps, decay_steps=opt.decay_steps, decay_rate=opt.decay_rate,
        decay_start=opt.decay_start, min_lr=opt.min_learning_rate, last_epoch=torch.tensor(-1),
        checkpoint={"optimizer_state_dict": None, "scheduler_state_dict": None})
    times = []
    for step in range(warmup + steps):
        x = batch_at(step)
        start = time.perf_counter()
        official.train_step(model, ema, optimizer, x, torch.tensor(step))
        schedule.step()
        times.append(time.perf_counter() - start)
    timed = times[warmup:]
    s_per_step = sum(timed) / len(timed)
    return {"impl": "official", "cfg": cfg.name, "batch": batch,
            "parameters": sum(p.numel() for p in net.parameters() if p.requires_grad),
            "seconds_per_step": s_per_step, "images_per_s": batch / s_per_step, "step_times": timed,
            "peak_memory_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,  # KiB on Linux -> GiB
            "memory_kind": "process peak RSS", "threads": torch.get_num_threads()}


def measure_official(args, checkout: Path) -> dict:
    cmd = [sys.executable, __file__, "--one", "--checkout", str(checkout), "--cfg", str(args.cfg),
           "--batch", str(args.batch), "--steps", str(args.steps), "--warmup", str(args.warmup)]
    if args.hparams_lib:
        cmd += ["--hparams-lib", args.hparams_lib]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"official step failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure_vdvl(case: str, steps: int, warmup: int) -> dict:
    from train_step import measure  # one fresh process per measurement

    row = measure(case, steps, warmup)
    return {"impl": "vdvl", "case": case, **row}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkout", default=os.environ.get("VDVL_REF_EFFICIENT"),
                    help="Efficient-VDVAE checkout (default: $VDVL_REF_EFFICIENT)")
    ap.add_argument("--hparams-lib", default=os.environ.get("VDVL_REF_HPARAMS"),
                    help="Rayhane-mamah/hparams checkout (default: $VDVL_REF_HPARAMS or installed)")
    ap.add_argument("--cfg", type=Path, default=Path("egs/cifar10_C1.cfg"), help="config, relative to the checkout")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--vdvl-case", nargs="*", default=[],
                    help="benchmarks/train_step.py cases to interleave with (each round: official, then these)")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--tag", default="cpu")
    ap.add_argument("--note", default="")
    ap.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if not args.checkout:
        raise SystemExit("give --checkout or set VDVL_REF_EFFICIENT to an Efficient-VDVAE checkout.")
    checkout = Path(args.checkout)
    cfg = args.cfg if args.cfg.is_absolute() else checkout / args.cfg
    if args.one:
        torch.set_num_threads(int(os.environ.get("VDVL_BENCH_THREADS", "2")))
        print(json.dumps(run_one(checkout, cfg, args.batch, args.steps, args.warmup, args.hparams_lib)))
        return
    args.cfg = cfg
    rows = []
    for r in range(args.rounds):
        rows.append({"round": r, **measure_official(args, checkout)})
        print(json.dumps(rows[-1]), flush=True)
        for case in args.vdvl_case:
            rows.append({"round": r, **measure_vdvl(case, args.steps, args.warmup)})
            print(json.dumps(rows[-1]), flush=True)
    from train_step import machine

    commit = subprocess.run(["git", "-C", str(checkout), "rev-parse", "HEAD"], capture_output=True, text=True).stdout
    result = {"date": time.strftime("%Y-%m-%d"), "machine": machine(), "official_commit": commit.strip(),
              "note": args.note, "rows": rows}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"official_train_step-{args.tag}.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"# official vs vdvl training step ({args.tag}), {result['date']}", "",
             f"Machine: `{json.dumps(result['machine'])}`; official code at `{result['official_commit']}`.", "",
             "| round | implementation | case | s/step | images/s | peak RSS (GiB) |", "|---|---|---|---|---|---|"]
    for row in rows:
        name = row.get("case") or f"{row['cfg']} @{row['batch']}"
        if "error" in row:
            lines.append(f"| {row['round']} | {row['impl']} | {name} | failed: {row['error']} | | |")
            continue
        lines.append(f"| {row['round']} | {row['impl']} | {name} | {row['seconds_per_step']:.3f} | "
                     f"{row['images_per_s']:.2f} | {row['peak_memory_gb']:.2f} |")
    if args.note:
        lines += ["", args.note]
    (RESULTS / f"official_train_step-{args.tag}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
