"""vdvae-latents: Efficient-VDVAE in PyTorch, latent KL analysis, pruning and compact encodings.

Data flows one way: data -> model -> (train | KL stats -> active set -> store -> probe).
The subpackages follow it, each importing only those below it (``core`` at the bottom,
``cli`` at the top; docs/architecture.md draws the layers). Every name below is loaded on
first use, so ``import vdvae_latents`` imports neither torch nor scikit-learn nor zarr.
"""

from .core.lazy import lazy_exports

__version__ = "0.1.0"

__getattr__, __dir__, __all__ = lazy_exports(__name__, {
    "model": ["ModelConfig", "VAE", "VAEOutput", "count_parameters"],
    "train": ["PRESETS", "get_preset", "preset_names"],
    "data": ["ImageSet", "ImageDataset", "LazyImages", "load_images", "open_images"],
    "core": ["UserError", "ConfigError", "DataError", "CheckpointError"],
    "stores": ["open_encodings"],
    "downstream": ["ActiveLatents", "EncodingsDataset", "LatentOODDetector"],
})
