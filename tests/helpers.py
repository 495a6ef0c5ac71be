"""Plain helpers the test modules import (``from helpers import run_cli``)."""

from __future__ import annotations

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
