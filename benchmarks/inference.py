"""vdvl's inference jobs timed and sized: analyze-kl, encode and eval (issue 22).

Each job runs on the library path (the call behind the command: ``analyze_checkpoint``,
``encode_to_store``, ``eval_checkpoint``, in a fresh Python process) and as the whole CLI
command (a fresh ``vdvl`` process), in fp32 and in the default precision (``auto``: bf16
autocast on bf16-native CPUs for analyze-kl and encode; eval is fp32 unless asked). Each
row gives the job's own images/s (its ``seconds``), the whole process's images/s (start
to exit: imports and model loading included) and the process's peak RSS.

``--posterior-ab`` times encode's model pass on the 3% active set with every layer's posterior
net and with the kept layers' only (interleaved rounds).

``--depth-sweep`` times the encoder's model pass against the full pass (every layer and
the likelihood, as the pass was before it learned to stop) for active sets whose deepest
kept layer is each of a few layers: the speed-up as a function of that layer.

The model and data are those of ``benchmarks/official_inference.py`` (a randomly
initialised official CIFAR-10 C1 model imported with ``vdvl import efficient-vdvae``, 512
random CIFAR-shaped images); that script interleaves these measurements with the official
code's. Alone::

    python benchmarks/inference.py --rounds 2 --depth-sweep --tag cpu

Results: benchmarks/results/inference-<tag>.json and .md (``--results`` elsewhere;
``--dry-run`` writes to a temporary folder).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VDVL = str(Path(sys.executable).with_name("vdvl"))
VDVL_JOB = {"kl": "analyze-kl", "encode": "encode", "eval": "eval"}  # the official jobs' vdvl counterparts
KEEP = "3%"


def machine() -> dict:
    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    try:
        text = Path("/proc/cpuinfo").read_text()
        for line in text.splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                info["cpu_flags"] = sorted(flags & {"avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16"})
                break
    except OSError:
        pass
    return info


def _active_file(work: Path, paths: dict, batch: int) -> Path:
    """The 3% active set encode reuses (made once, fp32, untimed)."""
    out = work / "ACTIVE-3.json"
    if not out.exists():
        from vdvae_latents.latents.analyze import analyze_checkpoint

        analyze_checkpoint(paths["run"], paths["images"], out=out, keep=KEEP, split="all", batch_size=batch,
                           precision="fp32")
    return out


def _job_args(job: str, paths: dict, work: Path, batch: int, precision: str) -> tuple[list[str], dict]:
    """The job as CLI arguments and as library keyword arguments."""
    data, run = paths["images"], paths["run"]
    if job == "analyze-kl":
        out = work / f"active-{precision}.json"
        return ([job, run, "--data", data, "--split", "all", "--keep", KEEP, "--out", str(out),
                 "--batch-size", str(batch), "--precision", precision, "--json"],
                dict(out=out, keep=KEEP, split="all", batch_size=batch, precision=precision))
    if job == "encode":
        active = _active_file(work, paths, batch)
        out = work / f"store-{precision}.zarr"
        return ([job, run, "--data", data, "--split", "all", "--active", str(active), "--out", str(out),
                 "--overwrite", "--batch-size", str(batch), "--precision", precision, "--json", "--quiet"],
                dict(out=out, active_file=active, split="all", overwrite=True, batch_size=batch, precision=precision))
    return ([job, run, "--data", data, "--split", "all", "--batch-size", str(batch), "--json"],
            dict(split="all", batch_size=batch))


def run_library(job: str, paths: dict, work: Path, batch: int, precision: str) -> dict:
    """One job through its library call, in this (fresh) process."""
    start = time.perf_counter()
    _, kwargs = _job_args(job, paths, work, batch, precision)
    if job == "analyze-kl":
        from vdvae_latents.latents.analyze import analyze_checkpoint as call
    elif job == "encode":
        from vdvae_latents.stores.encode import encode_to_store as call
    else:
        from vdvae_latents.model.evaluation import eval_checkpoint as call
    if job == "encode":
        result = call(paths["run"], paths["images"], kwargs.pop("out"), **kwargs)
    else:
        result = call(paths["run"], paths["images"], **kwargs)
    return {"seconds": result["seconds"], "process_seconds": time.perf_counter() - start,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "value": result.get("bits_per_dim", result.get("kl_share_kept"))}


def run_cli(job: str, paths: dict, work: Path, batch: int, precision: str) -> dict:
    """One job as the whole `vdvl` command: wall time and the command's own peak RSS (wait4)."""
    args, _ = _job_args(job, paths, work, batch, precision)
    start = time.perf_counter()
    with tempfile.TemporaryFile() as stdout, tempfile.TemporaryFile() as stderr:
        proc = subprocess.Popen([VDVL, *args], stdout=stdout, stderr=stderr)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - start
        stdout.seek(0)
        stderr.seek(0)
        if proc.returncode:
            raise RuntimeError(f"vdvl {job} failed: {stderr.read().decode()[-2000:]}")
        result = json.loads(stdout.read().decode())
    return {"seconds": result["seconds"], "process_seconds": wall, "peak_rss_mib": usage.ru_maxrss / 1024,
            "value": result.get("bits_per_dim", result.get("kl_share_kept"))}


def measure(job: str, path: str, precision: str, paths: dict, work: Path, batch: int) -> dict:
    """One measurement in a fresh process; a failure becomes a row with the reason."""
    import numpy as np

    n = len(np.load(paths["images"], mmap_mode="r"))
    row = {"impl": "vdvl", "job": job, "path": path, "precision": precision, "images": n, "batch": batch}
    if job == "eval" and precision != "fp32":
        precision = "fp32"  # eval's default precision is fp32: nothing else to measure
        row["precision"] = "fp32 (eval's default)"
    if job == "encode":
        _active_file(work, paths, batch)  # made here, so the measured process does only the encoding
    cmd = [sys.executable, __file__, "--one", job, "--path", path, "--precision", precision, "--batch", str(batch),
           "--work", str(work), "--paths", json.dumps(paths)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        return {**row, "error": (proc.stderr.strip().splitlines() or ["failed"])[-1]}
    row.update(json.loads(proc.stdout.strip().splitlines()[-1]))
    row["images_per_s"] = n / row["seconds"]
    row["command_images_per_s"] = n / row["process_seconds"]
    return row


def _model_active_batch(paths: dict, work: Path, batch: int, *, channels_last: bool):
    """The EMA model (eval mode; channels_last or the checkpoint's layout), the 3% active set and
    the first ``batch`` images as model input: what the encode timings below run on."""
    import numpy as np

    from vdvae_latents.latents.active_set import ActiveSet
    from vdvae_latents.model.checkpoints import load_model
    from vdvae_latents.model.inputs import prepare_batch

    model, _ = load_model(paths["run"], ema=True, device="cpu")
    model.eval()
    if channels_last:
        model.use_channels_last()
    active = ActiveSet.load(_active_file(work, paths, batch))
    x = prepare_batch(model.cfg, np.array(np.load(paths["images"], mmap_mode="r")[:batch]), device="cpu")
    return model, active, x


def depth_sweep(paths: dict, work: Path, batch: int, layers: list[int], repeats: int = 2) -> list[dict]:
    """Encoder pass vs the full pass for active sets whose deepest kept layer is each of ``layers``."""
    import numpy as np
    import torch

    from vdvae_latents.latents.encoder import Encoder

    model, active, x = _model_active_batch(paths, work, batch, channels_last=True)

    def best(fn) -> float:
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return min(times)

    rows = []
    with torch.no_grad():
        for k in layers:
            one = np.flatnonzero(active.table.layer == k)[:1]  # variate 0 of layer k: the deepest kept layer
            enc = Encoder(model, dataclasses.replace(active, selected=one))
            masks = enc.active.layer_masks()
            full = best(lambda: model(x, active=masks, posterior="mean", masked="mean"))
            short = best(lambda: enc.encode(x))
            rows.append({"deepest_layer": k, "resolution": int(active.layer_shapes[k][1]),
                         "full_pass_s": full, "encode_s": short, "speedup": full / short})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def posterior_ab(paths: dict, work: Path, batch: int, rounds: int = 4) -> dict:
    """The 3% active set's model pass three ways, interleaved ``rounds`` times (median seconds):
    the full pass; stopped after the deepest kept layer with every layer's posterior net; and
    stopped there with the kept layers' posterior nets only (what ``Encoder.encode`` runs)."""
    import numpy as np
    import torch

    from vdvae_latents.latents.encoder import Encoder

    # The checkpoint's layout, which `vdvl encode` runs in.
    model, active, x = _model_active_batch(paths, work, batch, channels_last=False)
    enc = Encoder(model, active)
    masks, kept = active.layer_masks(), enc.kept_layers
    ways = {
        "full_pass": lambda: model(x, active=masks, posterior="mean", masked="mean"),
        "stopped_every_posterior": lambda: model(x, active=masks, posterior="mean", masked="mean",
                                                 stop_after=enc.deepest_layer, likelihood=False),
        "stopped_kept_posteriors": lambda: model(x, active=masks, posterior="mean", masked="mean",
                                                 stop_after=enc.deepest_layer, likelihood=False,
                                                 posterior_layers=kept),
    }
    times: dict[str, list[float]] = {k: [] for k in ways}
    with torch.no_grad():
        for fn in ways.values():
            fn()  # warm-up
        for _ in range(rounds):
            for name, fn in ways.items():
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
    out = {name: float(np.median(t)) for name, t in times.items()}
    out.update(batch=batch, rounds=rounds, deepest_layer=enc.deepest_layer, layers=len(kept),
               layers_with_kept_variates=int(sum(kept)))
    print(json.dumps(out), flush=True)
    return out


def write_results(results: Path, tag: str, rows: list[dict], *, note: str = "", extra: dict | None = None,
                  sweep: list[dict] | None = None, ab: dict | None = None) -> None:
    results.mkdir(parents=True, exist_ok=True)
    result = {"benchmark": "inference", "date": time.strftime("%Y-%m-%d"), "machine": machine(), "note": note,
              **(extra or {}), "rows": rows, "depth_sweep": sweep or [], "posterior_ab": ab}
    (results / f"inference-{tag}.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"# inference ({tag}), {result['date']}", "", f"Machine: `{json.dumps(result['machine'])}`", ""]
    if extra:
        lines += [f"{k}: `{v}`" for k, v in extra.items()] + [""]
    if rows:
        lines += ["| round | impl | job | path | precision | job images/s | process images/s | peak RSS (MiB) |",
                  "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        name = f"| {r.get('round', 0)} | {r['impl']} | {r['job']} | {r.get('path', 'their loop')} | {r.get('precision', '')}"
        if "error" in r:
            lines.append(f"{name} | failed: {r['error']} | | |")
        else:
            cmd = r.get("command_images_per_s")
            lines.append(f"{name} | {r['images_per_s']:.2f} | {'' if cmd is None else f'{cmd:.2f}'} | "
                         f"{r['peak_rss_mib']:.0f} |")
    if sweep:
        lines += ["", "Encode (library model pass, batch of images, best of 2) against the full pass, by the deepest "
                  "kept layer:", "", "| deepest kept layer | resolution | full pass (s) | encode (s) | speed-up |",
                  "|---|---|---|---|---|"]
        lines += [f"| {s['deepest_layer']} | {s['resolution']} | {s['full_pass_s']:.3f} | {s['encode_s']:.3f} | "
                  f"{s['speedup']:.2f}x |" for s in sweep]
    if ab:
        full = ab["full_pass"]
        lines += ["", f"Encode's model pass on the 3% active set (batch {ab['batch']}, median of {ab['rounds']} "
                  f"interleaved rounds; deepest kept layer {ab['deepest_layer']} of {ab['layers']}, "
                  f"{ab['layers_with_kept_variates']} layers with a kept variate):", "",
                  "| pass | seconds | speed-up over the full pass |", "|---|---|---|"]
        for name, label in (("full_pass", "full pass (every layer, likelihood)"),
                            ("stopped_every_posterior", "stopped after the deepest kept layer, every posterior net"),
                            ("stopped_kept_posteriors", "stopped there, kept layers' posterior nets only (encode)")):
            lines.append(f"| {label} | {ab[name]:.3f} | {full / ab[name]:.2f}x |")
    if note:
        lines += ["", note]
    (results / f"inference-{tag}.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--jobs", nargs="*", default=["analyze-kl", "encode", "eval"])
    ap.add_argument("--paths-kind", dest="kinds", nargs="*", default=["library", "cli"])
    ap.add_argument("--precisions", nargs="*", default=["fp32", "auto"])
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--images", type=int, default=512)
    ap.add_argument("--work", type=Path, default=None, help="folder holding (or to hold) the model and images")
    ap.add_argument("--depth-sweep", action="store_true")
    ap.add_argument("--posterior-ab", action="store_true",
                    help="encode's pass with every posterior net against the kept layers' only")
    ap.add_argument("--tag", default="cpu")
    ap.add_argument("--note", default="")
    ap.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--dry-run", action="store_true", help="8 images, results to a temporary folder")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--path", help=argparse.SUPPRESS)
    ap.add_argument("--precision", help=argparse.SUPPRESS)
    ap.add_argument("--paths", help=argparse.SUPPRESS)
    args = ap.parse_args()
    import torch

    torch.set_num_threads(int(os.environ.get("VDVL_BENCH_THREADS", "2")))
    if args.one:
        run = run_library if args.path == "library" else run_cli
        print(json.dumps(run(args.one, json.loads(args.paths), args.work, args.batch, args.precision)))
        return
    if args.dry_run:
        args.images, args.rounds = 8, 1
        args.results = Path(tempfile.mkdtemp(prefix="vdvl-inference-dry-"))
    checkout = os.environ.get("VDVL_REF_EFFICIENT")
    if not checkout:
        raise SystemExit("set VDVL_REF_EFFICIENT: the model is the official C1 config, built by their code.")
    from official_inference import prepare

    args.work = args.work or Path(tempfile.mkdtemp(prefix="vdvl-inference-"))
    paths = prepare(args.work, Path(checkout), Path(checkout) / "egs/cifar10_C1.cfg", args.images,
                    os.environ.get("VDVL_REF_HPARAMS"))
    rows = []
    for r in range(args.rounds):
        for job in args.jobs:
            for kind in args.kinds:
                for precision in args.precisions:
                    rows.append({"round": r, **measure(job, kind, precision, paths, args.work, args.batch)})
                    print(json.dumps(rows[-1]), flush=True)
    sweep = depth_sweep(paths, args.work, args.batch, [0, 12, 24, 36, 46]) if args.depth_sweep else None
    ab = posterior_ab(paths, args.work, args.batch) if args.posterior_ab else None
    write_results(args.results, args.tag, rows, note=args.note, sweep=sweep, ab=ab)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT / "benchmarks"))
    main()
