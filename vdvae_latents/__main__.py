"""``python -m vdvae_latents``: the `vdvl` command line."""

from .cli import run

run()
