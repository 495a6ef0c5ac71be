"""Interop: checkpoints of the reference code bases as vdvl run directories.

:func:`import_efficient_vdvae` reads an official Efficient-VDVAE checkpoint and its
``hparams-*.cfg`` (``hparams_cfg`` parses it, never evaluates it); :func:`import_openai_vdvae`
reads openai/vdvae's weight files. Both go one way: read the tensors safely, map their keys,
permute what differs in layout (the output's mixture-of-logistics channels), check every
shape against the model, and write the run (``run_dir``).
"""

from ..core.lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(__name__, {
    "efficient": ["import_efficient_vdvae", "official_layout", "config_from_hparams", "convert_state",
                  "to_official_state"],
    "openai": ["import_openai_vdvae", "openai_key_map", "openai_to_vdvl", "vdvl_to_openai"],
    "hparams_cfg": ["parse_hparams", "read_hparams"],
    "run_dir": ["write_imported_run"],
})
