"""vdvae-latents: Efficient-VDVAE in PyTorch, latent KL analysis, pruning and compact encodings.

Data flows one way: data -> model -> (train | KL stats -> active set -> store -> probe).
"""

from .config import ModelConfig
from .data import ImageDataset, ImageSet, load_images
from .errors import CheckpointError, ConfigError, DataError, UserError
from .presets import PRESETS, get_preset, preset_names
from .vae import VAE, VAEOutput, count_parameters

__version__ = "0.1.0"

__all__ = [
    "ModelConfig", "VAE", "VAEOutput", "count_parameters", "PRESETS", "get_preset", "preset_names",
    "ImageSet", "ImageDataset", "load_images", "UserError", "ConfigError", "DataError", "CheckpointError",
]
