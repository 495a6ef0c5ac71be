"""vdvae-latents: Efficient-VDVAE in PyTorch, latent KL analysis, pruning and compact encodings.

Data flows one way: data -> model -> (train | KL stats -> active set -> store -> probe).
"""

from .config import ModelConfig
from .data import ImageDataset, ImageSet, LazyImages, load_images, open_images
from .errors import CheckpointError, ConfigError, DataError, UserError
from .presets import PRESETS, get_preset, preset_names
from .vae import VAE, VAEOutput, count_parameters


def open_encodings(path, *, allow_incomplete: bool = False, verify: bool = True):
    """Open a store written by `vdvl encode` (Zarr or HDF5); see :mod:`vdvae_latents.stores`."""
    from .stores import open_encodings as _open

    return _open(path, allow_incomplete=allow_incomplete, verify=verify)


def __getattr__(name: str):
    # The scikit-learn transformer is imported lazily so `import vdvae_latents` stays light.
    if name == "ActiveLatents":
        from .sklearn_api import ActiveLatents

        return ActiveLatents
    if name == "EncodingsDataset":
        from .torch_dataset import EncodingsDataset

        return EncodingsDataset
    raise AttributeError(f"module 'vdvae_latents' has no attribute {name!r}")

__version__ = "0.1.0"

__all__ = [
    "ModelConfig", "VAE", "VAEOutput", "count_parameters", "PRESETS", "get_preset", "preset_names",
    "ImageSet", "ImageDataset", "LazyImages", "load_images", "open_images", "UserError", "ConfigError", "DataError", "CheckpointError",
    "open_encodings", "ActiveLatents", "EncodingsDataset",
]
