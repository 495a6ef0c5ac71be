"""The `vdvl` command line: one module per command group over the library, rendering in ``render``.

``vdvl`` (the console script) and ``python -m vdvae_latents`` both run :func:`main`.
"""

from .app import app, main, run

__all__ = ["app", "main", "run"]
