"""What every command shares: the console, JSON output, progress bars, --set parsing, number formats.

Imports only typer's companions (rich) and the library's core: the CLI's start-up path.
"""

from __future__ import annotations

import json
import sys

from rich.console import Console

from ..core.errors import UserError

# Wide enough for the tables when piped (rich falls back to 80 columns off a terminal).
out = Console(width=None if sys.stdout.isatty() else 140)

# The help text of --workers, the same for every command that reads data.
WORKERS_HELP = "Data-loading processes (default: 0 on CPU or for in-memory data, up to 8 on CUDA)."


def print_json(obj) -> None:
    sys.stdout.write(json.dumps(obj, indent=2) + "\n")


class progress:  # noqa: N801 - used like a function: `with progress("eval", quiet) as tick:`
    """A rich progress bar over images on a terminal (nothing otherwise); yields a tick(n) callback."""

    def __init__(self, label: str, quiet: bool) -> None:
        self.label, self.quiet, self.bar = label, quiet or not sys.stderr.isatty(), None

    def __enter__(self):
        if self.quiet:
            return None
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        self.bar = Progress(TextColumn(self.label), BarColumn(), TextColumn("{task.completed} images"),
                            TimeElapsedColumn(), console=Console(stderr=True))
        self.bar.start()
        task = self.bar.add_task(self.label, total=None)
        return lambda n: self.bar.advance(task, n)

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.stop()


def parse_sets(items: list[str]) -> dict[str, str]:
    """``--set key=value`` options as a dict (later keys win); the values are parsed by the library."""
    pairs = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"--set expects key=value, got '{item}'.")
        pairs[key.strip()] = value.strip()
    return pairs


def fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def elbo_text(r: dict) -> str:
    """A negative ELBO and its parts: nats per image for binary data (the paper's unit), else bits/dim."""
    if "nats_per_image" in r:
        return (f"negative ELBO {r['nats_per_image']:.2f} nats/image (reconstruction "
                f"{r['recon_nats_per_image']:.2f}, KL {r['kl_nats_per_image']:.2f})")
    return (f"negative ELBO {r['bits_per_dim']:.4f} bits/dim (reconstruction {r['recon_bits_per_dim']:.4f}, "
            f"KL {r['kl_bits_per_dim']:.4f})")
