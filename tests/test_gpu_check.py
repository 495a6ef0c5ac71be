"""benchmarks/gpu_check.sh --dry-run: every stage of the GPU check on the CPU at tiny sizes.

The dry run is a chain of subprocesses that leaves pytest idle: the ``gpu_check_dry_run``
session fixture (tests/conftest.py) starts it in the background as the session begins."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_dry_run_writes_every_result(gpu_check_dry_run):
    proc, out = gpu_check_dry_run, gpu_check_dry_run.out
    assert proc.returncode == 0, proc.stderr[-3000:]
    speed = json.loads((out / "train_step-dry-run-speed.json").read_text())
    memory = json.loads((out / "train_step-dry-run-memory.json").read_text())
    assert speed["rows"] and all("error" not in r and r["images_per_s"] > 0 for r in speed["rows"])
    assert {r["sets"]["train.checkpoint_activations"] for r in memory["rows"]} == {"false", "true"}
    train = json.loads((out / "gpu_check-dry-run-train.json").read_text())
    assert train["passed"] and train["skips"] == 0 and train["last_logged_loss"] < train["first_logged_loss"]
    encode = json.loads((out / "encode-dry-run.json").read_text())
    assert encode["rows"][0]["encode_images_per_s"] > 0


def test_gpu_check_refuses_unknown_arguments():
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--fast"], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2 and "unknown argument '--fast'" in proc.stderr
