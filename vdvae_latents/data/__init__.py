"""Image data: every source read by row, split, streamed to the model, or packed into Zarr.

Nothing holds a data set in memory unless it is small. A data *spec* names a source
(:func:`describe_sources`); :func:`open_images` returns one split of it as
:class:`LazyImages` (random access by position, nothing read until asked) and
:func:`load_images` reads a split into an in-memory :class:`ImageSet`. Commands stream a
split with :meth:`LazyImages.batches` (or :func:`stream`, which picks the number of reading
processes) or, for training, :class:`TrainLoader` (a seeded order that resumes exactly);
both run ``torch.utils.data.DataLoader`` with ``workers`` processes. :func:`pack_images`
(``vdvl pack``) turns an image folder or the downsampled-ImageNet files into one chunked
Zarr store that every command reads. :func:`to_uint8` and :func:`save_grid` turn model
outputs back into pixels and PNG grids (labelled figures, whose bare grid :func:`read_grid`
returns).

Modules: ``readers`` (the reader interface), ``memory_sources`` (digits, IDX, CIFAR-10),
``array_files`` (npy, npz, HDF5, Zarr, downsampled ImageNet), ``packed`` (reading what
``pack`` writes), ``image_folder``, ``sources`` (spec -> reader), ``splits`` (splits,
LazyImages, ImageSet), ``loading`` (DataLoader, training order), ``pack`` (``vdvl pack``),
``model_input`` (uint8 -> model input), ``grids`` (model output -> PNG). Every problem
with the user's data raises :class:`~vdvae_latents.core.DataError` with one sentence
naming the file (or spec).
"""

from ..core.lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(__name__, {
    "splits": ["SPLITS", "ImageSet", "LazyImages", "open_images", "load_images"],
    "loading": ["Batch", "BatchLoader", "TrainLoader", "TrainOrder", "ImageDataset", "resolve_workers", "stream"],
    "memory_sources": ["FASHION_MNIST_DIR"],
    "model_input": ["to_model_input", "binarize"],
    "pack": ["pack_images"],
    "sources": ["describe_sources"],
    "grids": ["to_uint8", "make_grid", "save_grid", "read_grid"],
})
