"""Activation checkpointing for the VAE's blocks (``train.checkpoint_activations``).

A checkpointed block keeps only its inputs during the forward pass and recomputes its
activations in the backward pass (``torch.utils.checkpoint``, non-reentrant): memory
falls from the sum of all blocks' activations to one block's, for one more forward
pass of compute. The gradients are exactly those of the plain path provided the
recomputation draws the same noise; torch restores its global RNG by itself, and for
a top-down block that samples from an explicit ``torch.Generator`` (a training step's
generator) the generator's state is replayed here.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.utils.checkpoint import checkpoint


def run_checkpointed(block: Callable, *args, generator: torch.Generator | None = None,
                     uses_global_rng: bool = False):
    """``block(*args)`` under activation checkpointing, with identical results and gradients.

    ``generator``: the generator ``block`` draws from, replayed from the same state in the
    recomputation (and put back where the forward pass left it afterwards).
    ``uses_global_rng``: the block draws from torch's global RNG (torch then stashes and
    restores it; skipped otherwise, since it costs a state copy per call).
    """
    if generator is None:
        return checkpoint(block, *args, use_reentrant=False, preserve_rng_state=uses_global_rng)
    start = generator.get_state()
    calls = 0

    def replay(*inputs):
        nonlocal calls
        calls += 1
        if calls == 1:  # the forward pass itself
            return block(*inputs)
        end = generator.get_state()
        generator.set_state(start)
        try:
            return block(*inputs)
        finally:
            generator.set_state(end)

    return checkpoint(replay, *args, use_reentrant=False, preserve_rng_state=uses_global_rng)


__all__ = ["run_checkpointed"]
