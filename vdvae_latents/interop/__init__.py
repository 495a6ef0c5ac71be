"""Interop: checkpoints of the reference code bases as vdvl run directories.

:func:`import_efficient_vdvae` reads an official Efficient-VDVAE checkpoint and its
``hparams-*.cfg`` (``hparams_cfg`` parses it, never evaluates it); :func:`import_openai_vdvae`
reads openai/vdvae's weight files. Both go one way, the shared path of ``weights``: read the
file safely (:func:`read_weight_file`), map the keys, permute what differs in layout (the
output's mixture-of-logistics channels) and check every tensor against the model
(:func:`to_vdvl`, given the importer's :class:`WeightMap`), then write the run (``run_dir``).
"""

from ..core.lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(__name__, {
    "efficient": ["import_efficient_vdvae", "official_layout", "config_from_hparams", "convert_state",
                  "to_official_state"],
    "openai": ["import_openai_vdvae", "openai_key_map", "openai_to_vdvl", "vdvl_to_openai"],
    "weights": ["WeightMap", "read_weight_file", "to_vdvl", "from_vdvl", "mol_channel_order"],
    "hparams_cfg": ["parse_hparams", "read_hparams"],
    "run_dir": ["write_imported_run"],
})
