"""Plain helpers the test modules import (``from helpers import run_cli``)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from vdvae_latents.cli import main


def pixels(n: int, h: int, w: int, c: int, seed: int) -> np.ndarray:
    """Images whose first pixel is their number, so rows can be told apart."""
    images = np.random.default_rng(seed).integers(0, 256, (n, h, w, c), dtype=np.uint8)
    images[:, 0, 0, 0] = np.arange(n) % 256
    return images


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    """Run `vdvl ARGV...` in-process: (exit code, stdout, stderr)."""
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line_error(code: int, err: str, needle: str) -> None:
    """The CLI contract for user mistakes: exit 2, one line on stderr naming ``needle``, no traceback."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1, err
    assert "Traceback" not in err
    assert needle in lines[0], lines[0]


def copy_run(src: Path, dst: Path) -> Path:
    """A private copy of a (session) run directory, to write into."""
    shutil.copytree(src, dst)
    return dst


def rewrite_checkpoint(path: Path, *, spread_posterior_biases: float | None = None, seed: int = 1,
                       drop_optimizer: bool = False) -> Path:
    """Rewrite a checkpoint in place: optionally add N(0, spread^2) noise to the EMA posterior
    biases (so the KL of the variates is far from zero and well separated, and the posterior
    means carry signal), optionally without the optimizer state (which nothing but resuming
    reads; without it the file loads about 2.5x faster)."""
    import torch

    from vdvae_latents.model.checkpoints import load_checkpoint, save_checkpoint

    payload = load_checkpoint(path)
    if spread_posterior_biases is not None:
        g = torch.Generator().manual_seed(seed)
        for key, value in payload["ema"].items():
            if key.endswith("posterior_params.bias"):
                payload["ema"][key] = value + torch.randn(value.shape, generator=g) * spread_posterior_biases
    if drop_optimizer:
        payload.pop("optimizer", None)
    for key in ("format", "format_version"):
        payload.pop(key, None)
    save_checkpoint(path, payload)
    return path
