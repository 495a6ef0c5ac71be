"""`vdvl pack`: a data source as one chunked, compressed uint8 Zarr store."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from . import render
from .common import print_json, progress


def pack(
    source: str = typer.Argument(..., help="Data spec to pack: an image folder, downsampled-ImageNet files, ..."),
    out_file: Path = typer.Option(..., "--out", help="DATA.zarr to write (then use --data DATA.zarr)."),
    resize: Optional[int] = typer.Option(None, "--resize", min=1, help="Resize every image to S x S "
                                         "(needed when the images differ in size)."),
    workers: Optional[int] = typer.Option(None, "--workers", min=0, help="Processes decoding images "
                                          "(default: one per core, at most 8; 0: decode in this process)."),
    skip_bad: bool = typer.Option(False, "--skip-bad", help="Skip and count unreadable files instead of stopping."),
    resume: bool = typer.Option(False, "--resume", help="Finish an interrupted pack (writes only missing blocks)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing store."),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Pack a data source into one chunked, compressed uint8 Zarr store with labels and file names.

    Epochs then read chunks instead of decoding files; an interrupted pack is refused by every
    command until `--resume` finishes it.
    """
    from ..data.pack import pack_images

    with progress("pack", quiet or as_json) as tick:
        result = pack_images(source, out_file, resize=resize, workers=workers, skip_bad=skip_bad, resume=resume,
                             overwrite=overwrite, progress=tick)
    print_json(result) if as_json else render.packed_store(result)
