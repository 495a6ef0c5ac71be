"""Plain helpers the test modules import (``from helpers import run_cli``)."""

from __future__ import annotations

from vdvae_latents.cli import main


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
