"""One process's part of a job that fills a store chunk by chunk: `vdvl encode` and `vdvl score`.

Under torchrun rank 0 creates (or re-opens) the store and every rank computes its own chunks
(Zarr: chunk i on rank i % world; an HDF5 file has one writer, rank 0). Only missing chunks
are computed, so an interrupted job resumes where it stopped; rank 0 marks the store complete
once every rank has written.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from ..core.errors import UserError
from ..data.loading import resolve_workers, stream
from ..data.splits import LazyImages
from ..model.inputs import prepare_batch
from .backends import store_format
from .writer import StoreWriter

#: ``compute(x, rows, generator) -> (values (B, F), std values (B, F) or None)``: a batch of
#: prepared images ``x``, their row numbers in the split, and the chunk's seeded generator.
Compute = Callable[[torch.Tensor, np.ndarray, torch.Generator], tuple]


@dataclass
class ChunkJob:
    """This rank's share of filling the store ``out`` with one row per image of ``images``."""

    model: torch.nn.Module
    images: LazyImages
    data: str
    split: str
    out: Path
    device: torch.device
    rank: int
    world: int
    batch_size: int
    workers: int | None
    seed: int
    values_name: str = "latents"  # what a row holds, for the message about NaN/inf rows

    @property
    def parallel(self) -> bool:
        return self.world > 1 and store_format(self.out) == "zarr"

    def stream(self, images: LazyImages):
        """This rank's shard of ``images``, batch by batch."""
        return stream(images.shard(self.rank, self.world), self.batch_size, self.workers, self.device, self.world)

    def open_writer(self, create, *, resume: bool, identity: dict) -> StoreWriter | None:
        """Rank 0 creates the store (``create()``) or re-opens it to resume; the other ranks open it
        once it exists (Zarr) or write nothing (HDF5)."""
        writer, failure = None, None
        if self.rank == 0:
            try:
                writer = StoreWriter.open(self.out, expect_attrs=identity) if resume and self.out.exists() else create()
            except UserError as err:
                if self.world == 1:
                    raise
                failure = str(err)
        if self.world > 1:
            # Every rank learns whether rank 0 could set the store up, so none waits forever.
            box = [failure]
            dist.broadcast_object_list(box, src=0)
            if box[0] is not None:
                raise UserError(box[0])
        if self.rank != 0:
            writer = StoreWriter.open(self.out, expect_attrs=identity) if self.parallel else None
        return writer

    def write_chunks(self, writer: StoreWriter | None, compute: Compute, *, check_data: bool, progress=None) -> int:
        """Compute and write this rank's missing chunks; the number of rows written."""
        if writer is None:
            return 0
        images, cfg, written = self.images, self.model.cfg, 0
        # A resumed store is read once: damaged chunks (deleted, corrupt) are rewritten too.
        mine = [i for i in writer.missing_chunks(check_data=check_data)
                if not self.parallel or i % self.world == self.rank]
        # One loader over every batch of this rank's chunks, in the order they are computed.
        order = [np.arange(b, min(hi, b + self.batch_size)) for lo, hi in map(writer.chunk_range, mine)
                 for b in range(lo, hi, self.batch_size)]
        loader = images.loader(order, workers=resolve_workers(self.workers, images, self.device.type, self.world),
                               pin_memory=self.device.type == "cuda")
        batches = iter(loader)  # a generator: close() (or garbage collection) stops its workers
        for i in mine:
            lo, hi = writer.chunk_range(i)
            values, stds = [], []
            # Seeded per chunk so a resumed run draws exactly what an uninterrupted one would.
            g = torch.Generator(device=self.device).manual_seed(self.seed * 1_000_003 + i)
            for b in range(lo, hi, self.batch_size):
                x = prepare_batch(cfg, next(batches).images, device=self.device)
                v, s = compute(x, np.arange(b, min(hi, b + self.batch_size)), g)
                values.append(v.cpu().numpy() if isinstance(v, torch.Tensor) else v)
                if s is not None:
                    stds.append(s.cpu().numpy() if isinstance(s, torch.Tensor) else s)
                if progress is not None:
                    progress(len(x))
            where = (lo, self.data, self.split, self.values_name)
            writer.write_chunk(i, finite_rows(np.concatenate(values), *where),
                               features_std=finite_rows(np.concatenate(stds), *where) if stds else None,
                               labels=None if images.labels is None else images.labels[lo:hi],
                               sample_index=np.arange(lo, hi), source_index=images.source_index[lo:hi],
                               source_names=None if images.source_names is None else images.source_names[lo:hi])
            written += hi - lo
        batches.close()
        return written

    def finish(self, writer: StoreWriter | None, codec: str | None) -> tuple[dict, str | None]:
        """Once every rank has written: rank 0 summarises the errors and marks the store complete."""
        if self.world > 1:
            dist.barrier()
        errors: dict = {}
        if self.rank == 0:
            errors = writer.error_summary()  # every rank's chunks are written by now
            codec = writer.layout.attrs.get("codec")
            writer.finalize()
        elif writer is not None:
            writer.close()
        if self.world > 1:
            dist.barrier()
        return errors, codec


def finite_rows(values: np.ndarray, first_row: int, data: str, split: str, what: str = "latents") -> np.ndarray:
    """The chunk's values, or a UserError naming the rows the checkpoint turned into NaN/inf."""
    bad = np.flatnonzero(~np.isfinite(values).all(axis=1))
    if len(bad):
        rows = first_row + bad
        raise UserError(f"the checkpoint produced NaN or infinite {what} for {len(rows)} image(s) of {data}:{split} "
                        f"(rows {', '.join(map(str, rows[:5]))}{', ...' if len(rows) > 5 else ''}); nothing was "
                        f"written for them.")
    return values


__all__ = ["ChunkJob", "Compute", "finite_rows"]
