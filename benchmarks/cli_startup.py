"""Start-up time of the `vdvl` command line: help, every command's help and a usage error.

Each case runs as a fresh process, in turn with the others, ``--rounds`` times; the report
gives the median and range of wall time and the peak RSS, beside ``python -c pass`` (the
floor any Python command pays) and ``python -c "import torch"`` (what a command that needs the
model pays on top). A case also records which heavy packages the process imported, so a
regression that brings torch back into ``vdvl --help`` shows in the table, not only in time.

``--baseline DIR`` also times the same cases on another checkout of the project (for example
the commit before the layered package, whose CLI was ``python -m cli.main``), run by this
interpreter with ``PYTHONPATH=DIR``.

    .venv/bin/python benchmarks/cli_startup.py                         # results/cli_startup-cpu.*
    .venv/bin/python benchmarks/cli_startup.py --baseline /tmp/old --rounds 9
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
HEAVY = ("torch", "sklearn", "zarr", "h5py", "numpy", "scipy", "matplotlib")

# Every command's --help, the bare command (help) and a usage error (exit 2), as argv after `vdvl`.
CASES = {
    "vdvl --help": ["--help"],
    "vdvl (no arguments)": [],
    "vdvl train --bogus (usage error)": ["train", "--bogus"],
    **{f"vdvl {c} --help": [*c.split(), "--help"] for c in (
        "presets", "model", "train", "eval", "sample", "reconstruct", "first-k", "info", "analyze-kl", "encode",
        "pack", "decode", "verify", "probe", "import efficient-vdvae", "import openai-vdvae")},
}

# Runs the CLI in-process after the given module import, then reports which heavy packages it loaded.
RUNNER = """
import sys, json, runpy
argv = json.loads(sys.argv[1]); heavy = json.loads(sys.argv[2]); module = sys.argv[3]
sys.argv = ["vdvl", *argv]
code = 0
try:
    runpy.run_module(module, run_name="__main__")
except SystemExit as e:
    code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
loaded = sorted({m.split(".")[0] for m in sys.modules} & set(heavy))
sys.stderr.write("\\nCLI_STARTUP " + json.dumps({"exit": code, "loaded": loaded}) + "\\n")
sys.exit(code)
"""


def run_once(cmd: list[str], env: dict) -> dict:
    """Wall seconds, peak RSS (MiB) and the runner's report of one fresh process."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, cwd="/")
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    err = proc.stderr.read().decode(errors="replace")
    proc.stderr.close()
    report = {}
    for line in err.splitlines():
        if line.startswith("CLI_STARTUP "):
            report = json.loads(line[len("CLI_STARTUP "):])
    return {"seconds": seconds, "rss_mib": usage.ru_maxrss / 1024, "exit": os.waitstatus_to_exitcode(status),
            **{k: v for k, v in report.items() if k != "exit"}}


def commands(baseline: Path | None) -> dict[str, tuple[list[str], dict]]:
    """Label -> (argv, environment) of every case, this checkout's and the baseline's."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    py = sys.executable
    out = {"python -c pass": ([py, "-c", "pass"], env),
           "python -c 'import torch'": ([py, "-c", "import torch"], env),
           "python -c 'import vdvae_latents'": ([py, "-c", "import vdvae_latents"], env)}
    heavy = json.dumps(HEAVY)
    for label, argv in CASES.items():
        out[label] = ([py, "-c", RUNNER, json.dumps(argv), heavy, "vdvae_latents"], env)
    if baseline is not None:
        old_env = {**env, "PYTHONPATH": str(baseline)}
        for label in ("vdvl --help", "vdvl train --bogus (usage error)", "vdvl encode --help"):
            out[f"baseline: {label}"] = ([py, "-c", RUNNER, json.dumps(CASES[label]), heavy, "cli.main"], old_env)
    return out


def cpu_description() -> str:
    model, flags = platform.processor() or platform.machine(), []
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and model in ("", platform.machine(), platform.processor()):
                model = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = [f for f in line.split(":", 1)[1].split() if f.startswith(("avx", "amx", "sse4"))]
                break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} cores, {' '.join(sorted(set(flags)))}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=7, help="runs of every case (interleaved)")
    ap.add_argument("--baseline", type=Path, default=None, help="another checkout to time beside this one")
    ap.add_argument("--results", type=Path, default=RESULTS, help="results folder (default: benchmarks/results)")
    ap.add_argument("--tag", default="cpu", help="results file suffix")
    args = ap.parse_args()
    cases = commands(args.baseline)
    runs: dict[str, list[dict]] = {label: [] for label in cases}
    for _ in range(args.rounds):  # interleaved, so a slow moment of the machine hits every case alike
        for label, (cmd, env) in cases.items():
            runs[label].append(run_once(cmd, env))
    floor = statistics.median(r["seconds"] for r in runs["python -c pass"])
    rows = []
    for label, rs in runs.items():
        times = [r["seconds"] for r in rs]
        med = statistics.median(times)
        rows.append({"case": label, "median_s": med, "min_s": min(times), "max_s": max(times),
                     "above_python_s": med - floor, "peak_rss_mib": max(r["rss_mib"] for r in rs),
                     "exit": sorted({r["exit"] for r in rs}), "imported": rs[-1].get("loaded")})
    meta = {"benchmark": "cli_startup", "rounds": args.rounds, "python": sys.version.split()[0],
            "cpu": cpu_description(), "date": time.strftime("%Y-%m-%d"),
            "baseline": str(args.baseline) if args.baseline else None}
    by_case = {r["case"]: r for r in rows}
    if args.baseline is not None:
        meta["help_speedup_vs_baseline"] = (by_case["baseline: vdvl --help"]["median_s"]
                                            / by_case["vdvl --help"]["median_s"])
    args.results.mkdir(parents=True, exist_ok=True)
    stem = args.results / f"cli_startup-{args.tag}"
    stem.with_suffix(".json").write_text(json.dumps({**meta, "rows": rows}, indent=1) + "\n")
    lines = [f"# CLI start-up ({meta['date']})", "",
             f"`benchmarks/cli_startup.py --rounds {args.rounds}`"
             + (f" `--baseline {args.baseline}`" if args.baseline else "") + f"; {meta['cpu']}; Python {meta['python']}.",
             "Each case is a fresh process; cases interleaved; median (min-max) wall seconds, peak RSS.", "",
             "| case | median s | min-max s | above `python -c pass` | peak RSS MiB | exit | heavy imports |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        imported = ", ".join(r["imported"]) if r["imported"] else ("none" if r["imported"] is not None else "")
        lines.append(f"| {r['case']} | {r['median_s']:.3f} | {r['min_s']:.3f}-{r['max_s']:.3f} | "
                     f"{r['above_python_s']:+.3f} | {r['peak_rss_mib']:.0f} | {','.join(map(str, r['exit']))} | "
                     f"{imported} |")
    if args.baseline is not None:
        lines += ["", f"`vdvl --help` is {meta['help_speedup_vs_baseline']:.1f}x faster than the baseline checkout."]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
