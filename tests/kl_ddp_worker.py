"""Two-process KL reduction: the KL part of tests/torchrun_worker.py (2 gloo ranks on CPU), checked
by tests/test_kl_analysis.py.

Every rank builds the same seeded model, fits LatentKL(posterior="mean", batch_size=1)
on its shard ``images[rank::world]`` of a fixed uint8 array, and writes what it ends
with to ``OUT/rank{rank}.npz``. The test compares each rank's result with a
single-process fit on all the images. batch_size=1 makes every per-image forward pass
identical in both settings, so only the float64 summation order differs.

The test imports ``build_model`` and ``fixed_images`` from this file, so the model
and data are defined once.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

N_IMAGES = 64


def build_model(seed: int = 0):
    """The tiny preset with perturbed posterior nets (a fresh posterior almost equals the prior)."""
    from vdvae_latents import VAE, get_preset

    torch.manual_seed(seed)
    model = VAE(get_preset("tiny").config)
    with torch.no_grad():
        for blocks in model.up_blocks:
            for block in blocks:
                for p in block.posterior.parameters():
                    p.add_(torch.randn_like(p) * 0.3)
                block.posterior_params.bias.normal_(0.0, 0.7)
                block.posterior_params.weight.normal_(0.0, 0.3)
    return model


def fixed_images() -> np.ndarray:
    """The first N_IMAGES digits, uint8 (N, 8, 8, 1)."""
    from vdvae_latents import load_images

    return load_images("digits", split="all", limit=N_IMAGES).images


def run(out_dir: Path) -> None:
    """Needs an initialised process group."""
    import torch.distributed as dist

    from vdvae_latents.latents.stats import LatentKL

    rank, world = dist.get_rank(), dist.get_world_size()
    model = build_model()
    images = fixed_images()[rank::world]
    stats = LatentKL(batch_size=1, posterior="mean").fit(model, images)
    arrays = {"n_images": np.array(stats.n_images_), "shard_images": np.array(len(images))}
    for k, (kl, au) in enumerate(zip(stats.element_kl_, stats.element_au_)):
        arrays[f"kl{k}"] = kl
        arrays[f"au{k}"] = au
    out_dir.mkdir(parents=True, exist_ok=True)
    np.savez(out_dir / f"rank{rank}.npz", **arrays)
    dist.barrier()


if __name__ == "__main__":  # standalone: torchrun --nproc_per_node 2 tests/kl_ddp_worker.py OUT
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group(backend="gloo")
    run(Path(sys.argv[1]))
    dist.destroy_process_group()
