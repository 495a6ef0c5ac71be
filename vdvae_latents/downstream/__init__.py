"""Downstream: what the encodings are worth, and how to use them in other models.

:func:`run_probe` (``vdvl probe``) fits scikit-learn probes on a store beside pixel, PCA,
full-latent and random-dimension baselines under one protocol (``protocol``, ``feature_sets``,
``inputs``), streaming feature sets that do not fit in memory (``streaming``).
:class:`ActiveLatents` is the scikit-learn transformer (images -> active features) and
:class:`EncodingsDataset` a torch Dataset over a store. :class:`LatentOODDetector` is a scikit-learn
novelty detector on the L^{>k} scores of the hierarchy, and :func:`run_ood` (``vdvl ood``) measures
every such score's AUROC / AUPRC / FPR80 against out-of-distribution sets.
"""

from ..core.lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(__name__, {
    "probe": ["run_probe", "BASELINES", "DEFAULT_BASELINES"],
    "figures": ["probe_figure", "plot_probe"],
    "protocol": ["probe_features", "probe_pipeline", "RowSpaceProjection", "MODELS"],
    "transformer": ["ActiveLatents"],
    "torch_dataset": ["EncodingsDataset", "ChunkShuffleSampler"],
    "ood": ["LatentOODDetector", "ood_metrics", "choose_k"],
    "ood_report": ["run_ood"],
})
