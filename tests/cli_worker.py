"""Run several `vdvl` commands one after another in one process, as a user would type them.

    cli_worker.py COMMANDS.json RESULTS.json

COMMANDS.json maps a name to an argv list (without `vdvl`); RESULTS.json gets, per name, the exit
code and what the command printed. Exits 1 if any command failed. Used by subprocess fixtures
(tests/background.py) that make a module's reference outputs on the background thread.
"""

import contextlib
import io
import json
import sys

import torch

from vdvae_latents.cli import main

torch.set_num_threads(1)
commands = json.loads(open(sys.argv[1]).read())
results = {}
for name, argv in commands.items():
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    results[name] = {"code": code, "stdout": out.getvalue(), "stderr": err.getvalue()}
with open(sys.argv[2], "w") as f:
    json.dump(results, f)
sys.exit(0 if all(r["code"] == 0 for r in results.values()) else 1)
