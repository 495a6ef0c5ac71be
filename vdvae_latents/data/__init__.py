"""Image data: every source read by row, split, streamed to the model, or packed into Zarr.

Nothing holds a data set in memory unless it is small. A data *spec* names a source
(:func:`describe_sources`); :func:`open_images` returns one split of it as
:class:`LazyImages` (random access by position, nothing read until asked) and
:func:`load_images` reads a split into an in-memory :class:`ImageSet`. Commands stream a
split with :meth:`LazyImages.batches` or, for training, :class:`TrainLoader` (a seeded
order that resumes exactly); both run ``torch.utils.data.DataLoader`` with ``workers``
processes. :func:`pack_images` (``vdvl pack``) turns an image folder or the
downsampled-ImageNet files into one chunked Zarr store that every command reads.

Modules: ``readers`` (the reader interface), ``memory_sources`` (digits, IDX, CIFAR-10),
``array_files`` (npy, npz, HDF5, Zarr, downsampled ImageNet), ``image_folder``,
``sources`` (spec -> reader), ``splits`` (splits, LazyImages, ImageSet), ``loading``
(DataLoader, training order), ``pack`` (``vdvl pack``), ``model_input`` (uint8 -> model
input). Every problem with the user's data raises
:class:`~vdvae_latents.errors.DataError` with one sentence naming the file (or spec).
"""

from .loading import Batch, BatchLoader, ImageDataset, TrainLoader, TrainOrder, resolve_workers
from .memory_sources import FASHION_MNIST_DIR
from .model_input import binarize, to_model_input
from .pack import pack_images
from .sources import describe_sources
from .splits import SPLITS, ImageSet, LazyImages, load_images, open_images

__all__ = [
    "ImageSet",
    "LazyImages",
    "ImageDataset",
    "Batch",
    "BatchLoader",
    "TrainLoader",
    "TrainOrder",
    "open_images",
    "load_images",
    "pack_images",
    "resolve_workers",
    "to_model_input",
    "binarize",
    "describe_sources",
    "FASHION_MNIST_DIR",
    "SPLITS",
]
