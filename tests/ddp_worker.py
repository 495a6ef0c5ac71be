"""The DDP training part of tests/torchrun_worker.py (2 gloo ranks): trains tiny for a few steps,
then each rank writes a digest of the weights it holds itself, so that
tests/test_training.py can check that the ranks stayed in sync.

Standalone: ``torchrun --nproc_per_node 2 tests/ddp_worker.py RUN_DIR``."""

import hashlib
import json
import sys
from dataclasses import replace
from pathlib import Path

import torch.distributed as dist

from vdvae_latents.train.run_config import resolve_run_config
from vdvae_latents.train.loop import train


def run(run_dir: Path) -> None:
    """Train (joining the process group torchrun set up, or the one already initialised)."""
    run = resolve_run_config(preset="tiny", data="digits")
    run = replace(run, train=replace(run.train, steps=4, batch_size=16, log_every=2, val_limit=32, warmup_steps=1))
    result = train(run_dir, run, quiet=True)
    rank = dist.get_rank()
    digest = {
        "model": {k: hashlib.sha256(v.detach().cpu().numpy().tobytes()).hexdigest()
                  for k, v in result.model.state_dict().items()},
        "ema": {k: hashlib.sha256(v.detach().cpu().numpy().tobytes()).hexdigest()
                for k, v in result.ema.shadow.items()},
        "validation": result.validation,
    }
    (Path(run_dir) / f"rank{rank}.json").write_text(json.dumps(digest, sort_keys=True))


if __name__ == "__main__":
    run(Path(sys.argv[1]))
    dist.destroy_process_group()
