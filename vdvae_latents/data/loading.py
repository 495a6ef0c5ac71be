"""Streaming batches to the model: ``torch.utils.data.DataLoader`` over a :class:`~.splits.LazyImages`.

A DataLoader item is a whole batch (:class:`BatchReads`): the sampler hands a worker the
positions of one batch and the worker reads them in one call, so a Zarr chunk or an HDF5
run is decompressed once per batch rather than once per image. Workers (``workers`` > 0)
read ahead (``prefetch`` batches each); on CUDA, batches land in pinned memory so the
copy to the GPU can be non-blocking. Workers are forked and open their own file handles;
a source held in memory is shared with them, not copied.

Training order (:class:`TrainOrder`): a permutation per epoch that depends only on
``(seed, epoch)``, cut into global batches of which each rank reads only its slice. It is
a pure function of the step, so a run resumed at step ``s`` (after Ctrl-C or ``kill -9``)
reads exactly the batches an uninterrupted run would, whatever the number of workers.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
from collections.abc import Iterable, Iterator
from typing import NamedTuple, Protocol

import numpy as np
import torch

from ..core.errors import DataError

__all__ = ["Batch", "BatchReads", "BatchLoader", "ReadFailure", "TrainOrder", "TrainLoader", "ImageDataset", "consecutive",
           "resolve_workers", "stream"]


class LazyImages(Protocol):
    """What the loaders need of a split, as :class:`~vdvae_latents.data.splits.LazyImages` provides it.

    A protocol rather than an import: ``splits`` builds its loaders from this module, so this
    module names the split's interface instead of importing it back.
    """

    labels: np.ndarray | None
    in_memory: bool

    def __len__(self) -> int: ...

    def read(self, positions: np.ndarray) -> np.ndarray: ...

    def batches(self, batch_size: int, *, workers: int = 0, pin_memory: bool = False, prefetch: int = 2): ...


class ImageSet(Protocol):
    """An in-memory split, as :class:`~vdvae_latents.data.splits.ImageSet` holds it: uint8 NHWC images, labels."""

    images: np.ndarray
    labels: np.ndarray | None


class Batch(NamedTuple):
    """What a loader yields: uint8 images (B, C, H, W), int64 labels (-1 unknown), positions in the split."""

    images: torch.Tensor
    labels: torch.Tensor
    positions: torch.Tensor


class ReadFailure:
    """A DataError raised in a worker, carried back as a value so the main process can raise
    it as the one-sentence error it is (the DataLoader would wrap it in a worker traceback)."""

    def __init__(self, message: str) -> None:
        self.message = message


class BatchReads(torch.utils.data.Dataset):
    """Map-style dataset whose items are batches: ``dataset[positions]`` reads those rows."""

    def __init__(self, images: LazyImages) -> None:
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, positions: np.ndarray) -> Batch | ReadFailure:
        positions = np.asarray(positions, dtype=np.int64)
        try:
            pixels = self.images.read(positions)
        except DataError as exc:
            return ReadFailure(str(exc))
        labels = self.images.labels
        labels = np.full(len(positions), -1, np.int64) if labels is None else labels[positions]
        # NHWC -> NCHW here, in the worker, so the main process gets a ready contiguous batch.
        images = torch.from_numpy(np.ascontiguousarray(pixels.transpose(0, 3, 1, 2)))
        return Batch(images, torch.from_numpy(np.ascontiguousarray(labels)), torch.from_numpy(positions))


class consecutive:  # noqa: N801 - used like range()
    """Positions 0..n-1 cut into consecutive batches of ``batch_size`` (the last may be short)."""

    def __init__(self, n: int, batch_size: int, start: int = 0) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.n, self.batch_size, self.start = n, batch_size, start

    def __len__(self) -> int:
        return -(-(self.n - self.start) // self.batch_size)

    def __iter__(self) -> Iterator[np.ndarray]:
        for lo in range(self.start, self.n, self.batch_size):
            yield np.arange(lo, min(self.n, lo + self.batch_size), dtype=np.int64)


class BatchLoader:
    """Re-iterable stream of :class:`Batch` es of ``images`` at the positions ``batches`` lists.

    ``reads`` replaces :class:`BatchReads` as what turns positions into an item (packing
    uses it to mark unreadable files instead of stopping).

    Each pass runs one DataLoader; leaving a pass early (``break``, an error) shuts its
    workers down. A read error in any worker is raised here as its DataError.
    """

    def __init__(self, images: LazyImages, batches: Iterable[np.ndarray], *, workers: int = 0,
                 pin_memory: bool = False, prefetch: int = 2, reads: torch.utils.data.Dataset | None = None) -> None:
        if workers < 0:
            raise ValueError(f"workers must be >= 0, got {workers}")
        self.images, self.batches = images, batches
        self.reads = BatchReads(images) if reads is None else reads  # what one item of a batch's positions is
        self.workers, self.pin_memory, self.prefetch = workers, pin_memory, prefetch

    def __len__(self) -> int:
        return len(self.batches)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[Batch]:
        parallel = self.workers > 0
        loader = torch.utils.data.DataLoader(
            self.reads, batch_size=None, sampler=self.batches, num_workers=self.workers,
            pin_memory=self.pin_memory, prefetch_factor=self.prefetch if parallel else None,
            worker_init_fn=_worker_init if parallel else None,
            multiprocessing_context=_fork_context() if parallel else None)
        stream = iter(loader)
        try:
            for item in stream:
                if isinstance(item, ReadFailure):
                    raise DataError(item.message)
                yield item
        finally:
            del stream  # the DataLoader iterator stops its workers when it goes away


def _worker_init(worker_id: int) -> None:
    # Ctrl-C reaches the whole process group: the main process saves a checkpoint and then
    # stops the workers itself; a worker dying first would turn that into a crash.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.set_num_threads(1)  # readers decode; the model's threads are the main process's


def _fork_context():
    # fork shares an in-memory source with the workers instead of pickling a copy to each
    # (Python 3.14 makes forkserver the default on Linux).
    return multiprocessing.get_context("fork") if "fork" in multiprocessing.get_all_start_methods() else None


def resolve_workers(requested: int | None, images: LazyImages, device_type: str, world_size: int = 1) -> int:
    """``requested`` worker processes, or (None / negative) a default.

    The default reads in the main process (0 workers) on the CPU, where the model needs
    the cores and a batch read is a small fraction of a step, and for sources held in
    memory; on CUDA it uses up to 8 workers per process, leaving one core to the process.
    """
    if requested is not None and requested >= 0:
        return requested
    if images.in_memory or device_type != "cuda":
        return 0
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(8, cpus // max(1, world_size) - 1))


# --------------------------------------------------------------------------- training


class TrainOrder:
    """Positions read at each training step, on one rank: a pure function of the step.

    Epoch ``e`` reads a permutation of the ``n`` positions drawn from a generator seeded
    with ``(seed, e)`` alone, cut into ``n // batch_size`` global batches (the remainder
    is dropped); rank ``r`` of ``world_size`` reads the ``r``-th slice of each batch.
    """

    def __init__(self, n: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1) -> None:
        if batch_size % world_size:
            raise ValueError(f"batch_size {batch_size} does not divide across {world_size} processes")
        if n < batch_size:
            raise ValueError(f"batch_size {batch_size} exceeds the {n} images")
        self.n, self.batch_size, self.seed, self.rank, self.world_size = n, batch_size, seed, rank, world_size
        self.local_batch = batch_size // world_size
        self.batches_per_epoch = n // batch_size
        self._cached: tuple[int, np.ndarray] | None = None

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The permutation of epoch ``epoch`` (int64 (n,))."""
        if self._cached is None or self._cached[0] != epoch:
            # The seed formula of training.step_generator(seed, -1 - epoch, rank 0), so runs
            # keep the data order they had before the loader moved here.
            g = torch.Generator().manual_seed((self.seed * 1_000_003 - 1 - epoch) * 1_009)
            self._cached = (epoch, torch.randperm(self.n, generator=g).numpy())
        return self._cached[1]

    def rows(self, step: int) -> np.ndarray:
        """This rank's positions at ``step``."""
        epoch, offset = divmod(step, self.batches_per_epoch)
        start = offset * self.batch_size + self.rank * self.local_batch
        return self.epoch_order(epoch)[start:start + self.local_batch]

    def position(self, step: int) -> dict[str, int]:
        """Where step ``step`` reads: the checkpoint's ``data_position``."""
        epoch, batch = divmod(step, self.batches_per_epoch)
        return {"epoch": epoch, "batch": batch, "batches_per_epoch": self.batches_per_epoch, "images": self.n}

    def resume_problems(self, saved: dict | None) -> list[str]:
        """Why a checkpoint's ``data_position`` cannot be continued by this order (empty: it can)."""
        saved = saved or {}
        for key, now in (("images", self.n), ("batches_per_epoch", self.batches_per_epoch)):
            if key in saved and saved[key] != now:
                return [f"its training split had {saved[key]} {key.replace('_', ' ')} and now has {now} "
                        "(the data changed, so the data order cannot continue)"]
        return []


class _Steps:
    """The sampler of a training pass: positions for steps ``start .. end-1``."""

    def __init__(self, order: TrainOrder, start: int, end: int) -> None:
        self.order, self.start, self.end = order, start, end

    def __len__(self) -> int:
        return max(0, self.end - self.start)

    def __iter__(self) -> Iterator[np.ndarray]:
        for step in range(self.start, self.end):
            yield self.order.rows(step)


class TrainLoader:
    """The training batches of one rank (see :class:`TrainOrder`), streamed by a DataLoader."""

    def __init__(self, images: LazyImages, *, batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                 workers: int = 0, pin_memory: bool = False, prefetch: int = 2) -> None:
        self.images = images
        self.order = TrainOrder(len(images), batch_size, seed, rank, world_size)
        self.workers, self.pin_memory, self.prefetch = workers, pin_memory, prefetch

    @property
    def batches_per_epoch(self) -> int:
        return self.order.batches_per_epoch

    def position(self, step: int) -> dict[str, int]:
        return self.order.position(step)

    def resume_problems(self, saved: dict | None) -> list[str]:
        return self.order.resume_problems(saved)

    def steps(self, start: int, end: int) -> BatchLoader:
        """Batches for steps ``start`` .. ``end - 1``, in order."""
        return BatchLoader(self.images, _Steps(self.order, start, end), workers=self.workers,
                           pin_memory=self.pin_memory, prefetch=self.prefetch)


# ---------------------------------------------------------------- in-memory datasets


class ImageDataset(torch.utils.data.Dataset):
    """A map-style dataset over an :class:`ImageSet` held in memory.

    ``dataset[i]`` is ``(uint8 tensor (C, H, W), label)`` with label -1 when the set
    has no labels. The images are converted to one contiguous NCHW tensor up front so
    that an item is just an index, with no per-item decoding or copying.
    """

    def __init__(self, data: ImageSet) -> None:
        self.data = data
        self._images = torch.from_numpy(np.ascontiguousarray(data.images.transpose(0, 3, 1, 2)))
        if data.labels is None:
            self._labels = torch.full((len(data),), -1, dtype=torch.int64)
        else:
            self._labels = torch.from_numpy(np.asarray(data.labels, dtype=np.int64))

    @property
    def images(self) -> torch.Tensor:
        """All images as one uint8 (N, C, H, W) tensor (index it with a batch of rows)."""
        return self._images

    @property
    def labels(self) -> torch.Tensor:
        """int64 (N,), -1 where unknown."""
        return self._labels

    def __len__(self) -> int:
        return int(self._images.shape[0])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self._images[index], int(self._labels[index])


def stream(images, batch_size: int, workers: int | None, dev: torch.device, world_size: int = 1):
    """Batches of a lazy split for a job on ``dev``: ``workers`` processes (None: the default), pinned on CUDA."""
    return images.batches(batch_size, workers=resolve_workers(workers, images, dev.type, world_size),
                          pin_memory=dev.type == "cuda")
