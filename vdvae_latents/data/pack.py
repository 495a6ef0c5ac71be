"""``vdvl pack``: any source (an image folder, downsampled-ImageNet files, ...) into one Zarr store.

Decoding PNG/JPEG files every epoch costs more than the model on small images, and
compressed ``.npz`` archives cannot be read by index; a packed store is read by chunks
instead. Layout (a Zarr v3 group; every command reads it as ``--data DATA.zarr``):

=====================  =============  ================================================
``images``             (N, H, W, C)   uint8, chunks of ``chunk_rows`` rows (~512 KiB), zstd
``labels``             (N,)           int64, when the source has labels
``names``              (N,)           string: each row's file (relative path, or
                                      ``<file>:<row>`` for batch files), when it has names
``ok``                 (N,)           bool: False for a file skipped as unreadable
                                      (``--skip-bad``); readers leave those rows out
``blocks_written``     (n_blocks,)    uint8: 1 once block i (``block_rows`` rows) is written
=====================  =============  ================================================

Attributes: ``schema`` ("vdvl-packed-images"), ``schema_version``, ``source``, ``resize``,
``n_train`` (the source's own train/test split, if any), ``class_names``, ``chunk_rows``,
``block_rows``, ``rows_sha256`` (which rows, for resuming), ``n_skipped``, ``skipped`` (the
first few skipped files) and ``complete``.

Resuming: a block's pixels are written before its flag, and ``complete`` only after the
last block, so a pack killed at any moment (``kill -9`` included) leaves a store that
readers refuse and that ``vdvl pack ... --resume`` finishes by writing the missing blocks.
Blocks are decoded by ``workers`` processes and written in order by the main process.
"""

from __future__ import annotations

import hashlib
import math
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from ..core.errors import DataError, UserError
from ..core.interrupts import resumable_writes
from ..core.outputs import prepare_output
from ..core.writer_lock import lock_store
from .loading import BatchLoader, ReadFailure
from .packed import PACK_SCHEMA
from .sources import open_reader
from .splits import LazyImages, check_split_options

__all__ = ["pack_images"]

PACK_VERSION = 1
_CHUNK_BYTES = 512 << 10
_BLOCK_BYTES = 32 << 20
_IDENTITY = ("schema", "schema_version", "source", "resize", "shape", "n_rows", "rows_sha256")


def pack_images(source: str, out: str | Path, *, resize: int | tuple[int, int] | None = None,
                workers: int | None = None,
                skip_bad: bool = False, resume: bool = False, overwrite: bool = False,
                block_rows: int | None = None, progress: Callable[[int], None] | None = None,
                on_block: Callable[[int], None] | None = None) -> dict:
    """Pack the source named by ``source`` (a data spec) into the Zarr store ``out``.

    ``resize`` (S or (H, W)) resizes every image (required for an image folder of mixed
    sizes); ``skip_bad`` skips unreadable image files and counts them instead of stopping
    at the first; ``resume`` finishes an interrupted pack with the same arguments;
    ``overwrite`` replaces ``out``. ``workers`` decode in parallel (default: one per core, at
    most 8). ``block_rows`` is the unit of writing and resuming (default ~32 MiB of pixels).
    Returns the numbers ``vdvl pack`` prints.
    """
    out = Path(out)
    if out.suffix.lower() != ".zarr":
        raise UserError(f"--out {out} must be a .zarr path (the packed store is a Zarr group).")
    if resume and overwrite:
        raise UserError("give at most one of --resume and --overwrite.")
    if workers is None:
        workers = min(8, os.cpu_count() or 1)
    if workers < 0:
        raise UserError(f"--workers must be >= 0, not {workers}.")
    if isinstance(resize, int):
        resize = (resize, resize)
    check_split_options("all", 0.1, 0.1, resize, None)
    if out.exists() and not (resume or overwrite):
        raise UserError(f"store '{out}' exists; use --resume to finish it or --overwrite to replace it.")
    if resume and not out.exists():
        raise UserError(f"store '{out}' does not exist, so there is nothing to resume.")

    prepare_output(out, what="store", kind="folder")  # before the source is scanned
    with lock_store(out):  # one writer: a second pack (or --resume) of this store is refused
        reader = open_reader(source, resize, sequential=True, skip_bad=skip_bad)
        images = LazyImages(reader, np.arange(reader.n_rows, dtype=np.int64), source, "all", resize)
        h, w, c = (int(x) for x in images.shape)
        chunk_rows = _power_of_two_rows(_CHUNK_BYTES // (h * w * c))
        if block_rows is None:
            block_rows = chunk_rows * max(1, _BLOCK_BYTES // (chunk_rows * h * w * c))
        elif block_rows < 1:
            raise UserError(f"block_rows must be positive, not {block_rows}.")
        chunk_rows = math.gcd(chunk_rows, block_rows)  # a block is whole chunks, so no chunk is written twice
        names = reader.names(images.source_index) if reader.has_names else None
        attrs = {"schema": PACK_SCHEMA, "schema_version": PACK_VERSION, "source": _source_text(source),
                 "resize": None if resize is None else list(resize), "shape": [reader.n_rows, h, w, c],
                 "n_rows": reader.n_rows, "rows_sha256": _rows_digest(names, reader.labels, reader.n_rows),
                 "chunk_rows": chunk_rows, "block_rows": block_rows, "n_train": reader.n_train,
                 "class_names": None if reader.class_names is None else list(reader.class_names),
                 "header_skipped": list(getattr(reader, "skipped", [])), "complete": False}

        if resume:
            group = _reopen(out, attrs)
            # the store's chunking, not today's defaults
            chunk_rows, block_rows = group.attrs["chunk_rows"], group.attrs["block_rows"]
        else:
            if out.exists():
                _remove_store(out)
            group = _create(out, attrs, names, reader.labels)
        n_blocks = group["blocks_written"].shape[0]
        missing = [b for b, done in enumerate(group["blocks_written"][...]) if not done]
        start, written = time.perf_counter(), 0
        # A write that fails (a full disk) or an interrupt leaves the store incomplete: say how to finish it.
        with resumable_writes(out, what="packed store"):
            if missing:
                batches = [np.arange(b * block_rows, min(reader.n_rows, (b + 1) * block_rows)) for b in missing]
                loader = BatchLoader(images, batches, workers=workers, reads=_PackReads(images, skip_bad))
                for b, (pixels, ok) in zip(missing, loader):
                    lo = b * block_rows
                    group["images"][lo:lo + len(ok)] = pixels.numpy()
                    group["ok"][lo:lo + len(ok)] = ok.numpy()
                    group["blocks_written"][b] = 1  # after the block's data: a killed pack redoes it
                    written += len(ok)
                    if progress is not None:
                        progress(len(ok))
                    if on_block is not None:
                        on_block(b)
            seconds = time.perf_counter() - start
            ok = group["ok"][...]
            skipped = list(attrs["header_skipped"])
            if names is not None:
                skipped += [names[i] for i in np.flatnonzero(~ok)]
            group.attrs.update({"n_skipped": len(skipped), "skipped": skipped[:20], "complete": True})
        rows = int(ok.sum())
        return {"store": str(out), "source": source, "rows": rows, "shape": [rows, h, w, c],
                "labels": reader.labels is not None, "names": names is not None, "n_train": reader.n_train,
                "skipped": len(skipped), "skipped_files": skipped[:20], "blocks": n_blocks,
                "blocks_written": len(missing),
                "bytes_on_disk": sum(f.stat().st_size for f in out.rglob("*") if f.is_file()),
                "raw_bytes": rows * h * w * c, "seconds": seconds,
                "images_per_s": written / seconds if seconds else 0.0}


class _PackReads(torch.utils.data.Dataset):
    """Items are blocks: (pixels NHWC, ok) with unreadable files zeroed under ``skip_bad``."""

    def __init__(self, images: LazyImages, skip_bad: bool) -> None:
        self.images, self.skip_bad = images, skip_bad

    def __getitem__(self, positions: np.ndarray):
        ok = np.ones(len(positions), dtype=bool)
        try:
            return self.images.read(positions), ok
        except DataError as exc:
            if not self.skip_bad:
                return ReadFailure(f"{exc}; --skip-bad skips unreadable files (then --resume finishes the pack)")
        pixels = np.zeros((len(positions), *self.images.shape), dtype=np.uint8)
        for k, p in enumerate(positions):  # find the bad files one by one
            try:
                pixels[k] = self.images.read([p])[0]
            except DataError:
                ok[k] = False
        return pixels, ok


# ----------------------------------------------------------------------------- helpers


def _create(out: Path, attrs: dict, names: list[str] | None, labels: np.ndarray | None):
    try:
        return _create_arrays(out, attrs, names, labels)
    except OSError as exc:
        shutil.rmtree(out, ignore_errors=True)  # half a store would only confuse a later --resume
        raise UserError(f"cannot create packed store {out} ({exc.strerror or exc}).") from exc


def _create_arrays(out: Path, attrs: dict, names: list[str] | None, labels: np.ndarray | None):
    import zarr

    n, h, w, c = attrs["shape"]
    chunk_rows, block_rows = attrs["chunk_rows"], attrs["block_rows"]
    group = zarr.open_group(str(out), mode="w")
    group.create_array("images", shape=(n, h, w, c), chunks=(chunk_rows, h, w, c), dtype="uint8",
                       dimension_names=("row", "y", "x", "channel"))
    group.create_array("ok", shape=(n,), chunks=(min(n, 1 << 16),), dtype="bool", fill_value=False,
                       dimension_names=("row",))
    if labels is not None:
        group.create_array("labels", data=np.asarray(labels, dtype=np.int64), chunks=(min(n, 1 << 16),),
                           dimension_names=("row",))
    if names is not None:
        array = group.create_array("names", shape=(n,), chunks=(min(n, 1 << 16),), dtype=str,
                                   dimension_names=("row",))
        array[:] = np.array(names)
    n_blocks = -(-n // block_rows)
    group.create_array("blocks_written", shape=(n_blocks,), chunks=(n_blocks,), dtype="uint8", fill_value=0)
    group.attrs.update(attrs)  # last: a store with these attributes has all its arrays
    return group


def _reopen(out: Path, attrs: dict):
    import zarr

    try:
        group = zarr.open_group(str(out), mode="r+")
        found = dict(group.attrs)
    except (OSError, ValueError, KeyError) as exc:
        raise UserError(f"store '{out}' cannot be opened to resume it ({exc}).") from exc
    if found.get("schema") != PACK_SCHEMA:
        raise UserError(f"store '{out}' is not a packed image store, so it cannot be resumed.")
    for key in _IDENTITY:
        if found.get(key) != attrs[key]:
            raise UserError(f"store '{out}' was packed with another {key} ({found.get(key)!r}, now {attrs[key]!r}); "
                            "use --overwrite to start again.")
    return group


def _remove_store(out: Path) -> None:
    if out.is_dir() and (out / "zarr.json").is_file():
        shutil.rmtree(out)
    elif out.is_file():
        out.unlink()
    else:
        raise UserError(f"'{out}' is not a Zarr store; refusing to replace it with --overwrite.")


def _power_of_two_rows(rows: int) -> int:
    return 1 << max(0, min(10, int(rows).bit_length() - 1)) if rows >= 1 else 1


def _rows_digest(names: list[str] | None, labels: np.ndarray | None, n_rows: int) -> str:
    h = hashlib.sha256(str(n_rows).encode())
    if names is not None:
        for name in names:
            h.update(name.encode() + b"\0")
    if labels is not None:
        h.update(np.ascontiguousarray(labels, dtype=np.int64).tobytes())
    return h.hexdigest()


def _source_text(source: str) -> str:
    """The spec as given, with a path made absolute (so --resume from elsewhere matches)."""
    path = Path(source).expanduser()
    return str(path.resolve()) if path.exists() else source
