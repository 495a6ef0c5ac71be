"""Run by tests/test_writer_lock.py in the background: two `vdvl train` processes on one run
directory, the second started once the first holds the run's writer lock.

    writers_worker.py RUN_DIR OUT.json

Writes {first: {returncode, stderr}, second: {returncode, stderr, seconds}} to OUT.json.
"""

import json
import subprocess
import sys
import time
from pathlib import Path

run_dir, out = Path(sys.argv[1]), Path(sys.argv[2])
train = [sys.executable, "-m", "vdvae_latents", "train", "--run-dir", str(run_dir), "--preset", "tiny",
         "--data", "digits", "--steps", "20", "--batch-size", "32", "--checkpoint-every", "10", "--device", "cpu",
         "--set", "train.log_every=5", "--set", "train.val_limit=16", "--quiet"]
first = subprocess.Popen(train, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
lock = run_dir / ".vdvl-writer.lock"
deadline = time.monotonic() + 120
while not lock.exists() and first.poll() is None and time.monotonic() < deadline:
    time.sleep(0.02)
start = time.monotonic()
second = subprocess.run(train, capture_output=True, text=True, timeout=120)
seconds = time.monotonic() - start
_, first_err = first.communicate(timeout=600)
json.dump({"first": {"returncode": first.returncode, "stderr": first_err, "pid": first.pid},
           "second": {"returncode": second.returncode, "stderr": second.stderr, "seconds": seconds}},
          open(out, "w"))
