"""Training: run configs and their schedules, presets and recipes, the step and the loop.

A run is a :class:`RunConfig` (model config, :class:`TrainConfig`, data spec, preset),
resolved by :func:`resolve_run_config` from a preset or a TOML file plus ``--set``
overrides. :func:`train` runs it in a run directory (EMA, update skipping, checkpoints,
exact resumption, DDP under torchrun); :class:`TrainStep` is one optimisation step, the
code path the benchmarks time. ``presets`` names every model the paper and the reference
codes ship, each with the training recipe it was published with (``recipes``).
"""

from ..core.lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(__name__, {
    "config": ["TrainConfig"],
    "run_config": ["RunConfig", "resolve_run_config", "load_run_config", "dump_toml"],
    "presets": ["Preset", "PRESETS", "PAPER_PARAMETERS_M", "get_preset", "preset_names", "describe"],
    "recipes": ["Recipe", "RECIPES", "recipe_for_preset"],
    "step": ["EMA", "TrainStep", "StepStats", "build_model", "make_optimizer"],
    "loop": ["train", "TrainResult", "validate"],
    "inspect_preset": ["inspect_model"],
})
