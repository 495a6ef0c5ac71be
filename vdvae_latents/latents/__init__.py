"""Latents: the average KL of every latent dimension, the active set, pruning and the encoder.

:class:`LatentKL` measures each dimension's average KL over a data set exactly (float64,
streamed, reduced across torchrun processes); :func:`build_active_set` ranks the dimensions
and keeps the top P% or those above a threshold (:class:`ActiveSet`, saved as ACTIVE.json);
``pruning`` scores the pruned model (the paper's Table 5) and draws the KL figure;
:class:`Encoder` runs the pruned forward pass and keeps the active dimensions' posterior
statistics (and decodes them back). :func:`analyze_checkpoint` is ``vdvl analyze-kl``.
"""

from ..core.lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(__name__, {
    "stats": ["LatentKL", "DimTable", "dimension_table", "GRANULARITIES", "AU_THRESHOLD"],
    "active_set": ["ActiveSet", "build_active_set", "select_dimensions", "rank_dimensions", "parse_keep"],
    "pruning": ["pruning_sweep", "kl_figure", "plot_kl", "parse_sweep", "DEFAULT_SWEEP"],
    "encoder": ["Encoder", "ColumnMap", "column_map", "STATISTICS"],
    "analyze": ["analyze_checkpoint"],
})
