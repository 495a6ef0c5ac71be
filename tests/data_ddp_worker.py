"""The data part of tests/torchrun_worker.py (2 gloo ranks): each rank streams its shard of a
split as training (one epoch) and as evaluation would, and writes the source rows it read, so
that tests/test_data_streaming.py can check that the ranks cover the split exactly once.

Standalone: ``torchrun --nproc_per_node 2 tests/data_ddp_worker.py SPEC OUT``."""

import json
import sys
from pathlib import Path

import torch.distributed as dist

from vdvae_latents.data import TrainLoader, open_images


def run(spec: str, out: Path) -> None:
    """Needs an initialised process group."""
    rank, world = dist.get_rank(), dist.get_world_size()
    split = open_images(spec, "train", seed=1)
    loader = TrainLoader(split, batch_size=8, seed=5, rank=rank, world_size=world, workers=1)
    train_rows = [split.source_index[b.positions.numpy()].tolist()
                  for b in loader.steps(0, loader.batches_per_epoch)]
    shard = split.shard(rank, world)
    eval_rows = [shard.source_index[b.positions.numpy()].tolist() for b in shard.batches(5, workers=1)]
    Path(out).mkdir(parents=True, exist_ok=True)
    Path(out).joinpath(f"rank{rank}.json").write_text(json.dumps({"train": train_rows, "eval": eval_rows,
                                                                  "split": split.source_index.tolist()}))
    dist.barrier()


if __name__ == "__main__":
    dist.init_process_group("gloo")
    run(sys.argv[1], Path(sys.argv[2]))
    dist.destroy_process_group()
