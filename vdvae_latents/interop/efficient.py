"""Import checkpoints of the official Efficient-VDVAE PyTorch code as vdvl runs.

The official code saves ``checkpoints-<run>``: a ``torch.save`` dict with
``global_step``, ``model_state_dict``, ``ema_model_state_dict`` and the optimiser and
scheduler states; its architecture lives in a separate ``hparams-<run>.cfg`` (read by
:mod:`vdvae_latents.interop.hparams_cfg`, never evaluated). This module turns the ``.cfg``
into a :class:`~vdvae_latents.model.config.ModelConfig` with the same tensors, maps every
official tensor name onto :class:`~vdvae_latents.model.vae.VAE`'s, and writes an ordinary
run directory (see :mod:`vdvae_latents.interop.run_dir`).

How the official network maps onto vdvl's:

* The official bottom-up path is a list of blocks (``up_strides``); each block runs
  ``up_n_blocks_per_res[j] + 1`` residual cells, projects a skip, and pools when its
  stride is above 1. The top-down path is the mirror list (``down_strides``); group
  ``g`` unpools when its stride is above 1 and runs ``1 + down_n_blocks_per_res[g]``
  latent blocks that all read skip ``g`` (the bottom-up skips in reverse). Per
  resolution these are vdvl's ``down_skip_groups`` / ``up_skip_groups``.
* The unpool's ``scale_bias`` is vdvl's ``res_bias_<i>``; the official code creates it
  during its first forward pass, so a checkpoint saved before one lacks it (imported
  as the zeros it would have started from, and recorded as such).
* The output conv's mixture-of-logistics channels are reordered from the PixelCNN++
  layout (logits | per colour: means, log-scales, coefficients) to vdvl's head layout.
* Binarized MNIST: the official encoder sees pixels in {0, 1} (padding 0); vdvl's data
  are {-1, 1} (padding -1), so the imported model normalises its input with
  ``input_shift = 1``, ``input_scale = 0.5`` (weights unchanged).
* 5-bit models: the official code truncates 8-bit pixels to their top bits for both the
  encoder's input and the target and treats the highest level as the top edge bin:
  ``bit_reduction = "truncate-all"``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..core.errors import CheckpointError, ConfigError
from ..core.outputs import require_input
from ..model.checkpoints import file_sha256
from ..model.config import ModelConfig
from .hparams_cfg import read_hparams
from .run_dir import claim_new_run_dir, write_imported_run
from .weights import WeightMap, from_vdvl, read_weight_file, to_vdvl

__all__ = ["SOURCE_KIND", "OfficialLayout", "official_layout", "config_from_hparams", "official_to_vdvl_keys",
           "official_weight_map", "load_official_checkpoint", "convert_state", "to_official_state",
           "import_efficient_vdvae"]

SOURCE_KIND = "efficient-vdvae"
MNIST_PAD = 2  # the official Bernoulli loss scores pixels [2:30] of the 32x32 input
_CELL_CONVS = {"c1": 1, "c2": 3, "c3": 5, "c4": 7}  # Sequential(SiLU, Conv, SiLU, Conv, ...) indices
_PARAMS = ("weight", "bias")


@dataclass
class OfficialLayout:
    """Where every official block sits in vdvl's per-resolution structure."""

    cfg: ModelConfig
    # bottom-up block j -> (resolution index, skip group k (top-down numbering), first cell, cells)
    down: list[tuple[int, int, int, int]]
    # top-down group g -> (resolution index, first latent block at that resolution, blocks)
    up: list[tuple[int, int, int]]
    strides: list[int]  # up_strides (bottom-up order)
    binary: bool


def _model_value(hp: dict, key: str, section: str = "model", kind: Any = None) -> Any:
    """A setting, converted by ``kind`` (int, float, _kernel) when given; missing or mistyped ones are named."""
    try:
        value = hp[section][key]
    except KeyError:
        raise ConfigError(f"hparams file has no '{section}.{key}' setting, which the model needs.") from None
    if kind is None:
        return value
    try:
        if isinstance(value, bool) or (kind is not _kernel and not isinstance(value, (int, float))):
            raise TypeError
        return kind(value)
    except (TypeError, ValueError, OverflowError):
        raise ConfigError(f"hparams value '{section}.{key}' has the wrong type ({value!r}).") from None


def _per_block(hp: dict, key: str, n: int, kind: Any = int) -> list:
    """A per-block list of ``n`` numbers (or kernel sizes), converted by ``kind``."""
    value = _model_value(hp, key)
    if not isinstance(value, (list, tuple)) or len(value) != n:
        raise ConfigError(f"hparams value 'model.{key}' must be a list of {n} entries (one per block).")
    try:
        if kind is not _kernel and any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in value):
            raise TypeError
        return [kind(v) for v in value]
    except (TypeError, ValueError, IndexError, OverflowError):
        raise ConfigError(f"hparams value 'model.{key}' holds an entry of the wrong type.") from None


def _kernel(value: Any) -> int | None:
    """A square kernel size as one int (None when it is not square)."""
    if isinstance(value, (list, tuple)):
        return int(value[0]) if len(value) == 2 and value[0] == value[1] else None
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError
    return value


def _require(ok: bool, key: str, why: str) -> None:
    if not ok:
        raise ConfigError(f"hparams value 'model.{key}' {why}, which vdvl's model does not express.")


def _one_per_resolution(values: dict[int, set], key: str, resolutions: list[int]) -> list:
    out = []
    for i, res in enumerate(resolutions):
        found = values.get(i, set())
        _require(len(found) == 1, key, f"differs between the blocks at resolution {res} ({sorted(found)})")
        out.append(next(iter(found)))
    return out


def official_layout(hp: dict[str, dict[str, Any]]) -> OfficialLayout:
    """Check an official hparams dict and derive the equivalent vdvl layout.

    Raises ConfigError naming the setting vdvl cannot express (or that has a value of
    the wrong type).
    """
    try:
        return _official_layout(hp)
    except ConfigError:
        raise
    except (TypeError, ValueError, KeyError, IndexError, AttributeError) as exc:
        raise ConfigError(f"hparams file has a model setting of the wrong type or length ({exc}).") from None


def _official_layout(hp: dict[str, dict[str, Any]]) -> OfficialLayout:
    target = _model_value(hp, "target_res", "data", int)
    channels = _model_value(hp, "channels", "data", int)
    binary = hp.get("data", {}).get("dataset_source") == "binarized_mnist"
    strides = _up_strides(hp)
    _check_fixed_settings(hp, len(strides), binary=binary, target=target, channels=channels)
    res_of_block, resolutions = _block_resolutions(target, strides)
    found: dict[str, dict[int, set]] = {}  # per setting, per resolution index: the values its blocks have
    up_groups, up_at = _top_down_groups(hp, strides[::-1], resolutions, found)
    down_groups, down_at = _bottom_up_blocks(hp, strides, res_of_block, resolutions, up_groups, found)
    width = _one_per_resolution(found["width"], "up_filters/down_filters", resolutions)
    options = _output_options(hp, binary)
    try:
        cfg = ModelConfig(
            image_size=target, channels=channels, resolutions=resolutions,
            up_blocks=[sum(g) for g in up_groups], down_blocks=[sum(g) for g in down_groups],
            widths=width, skip_widths=width,
            bottleneck=_one_per_resolution(found["bottleneck"], "up_mid_filters_ratio/down_mid_filters_ratio",
                                           resolutions),
            variates=_one_per_resolution(found["variates"], "down_latent_variates", resolutions),
            latent_beta=_model_value(hp, "gradient_smoothing_beta", kind=float),
            up_skip_groups=up_groups, down_skip_groups=down_groups, output_gain=False, init="xavier",
            name=str(hp.get("run", {}).get("name", "efficient-vdvae")), **options)
    except ConfigError as exc:
        raise ConfigError(f"hparams file describes a model vdvl cannot build: {str(exc).rstrip('.')}.") from None
    return OfficialLayout(cfg, down_at, up_at, strides, binary)


def _up_strides(hp: dict) -> list[int]:
    """``up_strides`` (bottom-up order), checked to be ``down_strides`` reversed."""
    up_strides = _model_value(hp, "up_strides")
    if not isinstance(up_strides, (list, tuple)) or not up_strides:
        raise ConfigError("hparams value 'model.up_strides' must be a non-empty list.")
    k_up = len(up_strides)
    up_strides = _per_block(hp, "up_strides", k_up)
    down_strides = _per_block(hp, "down_strides", k_up)
    _require(down_strides == up_strides[::-1], "down_strides", "is not up_strides reversed")
    return up_strides


def _check_fixed_settings(hp: dict, k_up: int, *, binary: bool, target: int, channels: int) -> None:
    """The settings for which vdvl's model has one value only."""
    for key in ("up_n_blocks", "down_n_blocks"):
        _require(all(b == 1 for b in _per_block(hp, key, k_up)), key, "is not 1 everywhere")
    for key in ("up_n_layers", "down_n_layers"):
        _require(all(b == 2 for b in _per_block(hp, key, k_up)), key, "is not 2 everywhere")
    _require(_model_value(hp, "use_1x1_conv") is True, "use_1x1_conv", "is not True")
    _require(_model_value(hp, "use_residual_distribution") is False, "use_residual_distribution", "is not False")
    _require(_model_value(hp, "distribution_base") == "std", "distribution_base", "is not 'std'")
    _require(_model_value(hp, "input_kernel_size", kind=_kernel) == 1, "input_kernel_size", "is not 1x1")
    _require(_model_value(hp, "output_kernel_size", kind=_kernel) == 1, "output_kernel_size", "is not 1x1")
    if binary:
        _require(target == 32 and channels == 1, "target_res", "is not 32 with one channel for binarized MNIST")
    else:
        _require(channels == 3, "channels", "is not 3 (the official mixture of logistics is RGB only)")


def _block_resolutions(target: int, up_strides: list[int]) -> tuple[list[int], list[int]]:
    """The resolution each bottom-up block runs at, from the image down, and all resolutions (ascending)."""
    res, res_of_block = target, []
    for j, stride in enumerate(up_strides):
        res_of_block.append(res)
        if stride < 1 or res % stride:
            raise ConfigError(f"hparams value 'model.up_strides' does not divide the resolution {res} at block {j}.")
        res //= stride
    if res not in res_of_block:
        raise ConfigError("hparams value 'model.up_strides' leaves no block at the lowest resolution.")
    return res_of_block, sorted(set(res_of_block))


def _note(found: dict[str, dict[int, set]], i: int, **values: Any) -> None:
    """Record the values of one block at resolution index ``i`` (vdvl has one per resolution)."""
    for key, value in values.items():
        found.setdefault(key, {}).setdefault(i, set()).add(value)


def _top_down_groups(hp: dict, down_strides: list[int], resolutions: list[int], found: dict
                     ) -> tuple[list[list[int]], list[tuple[int, int, int]]]:
    """Top-down groups from the lowest resolution up: vdvl's ``up_skip_groups`` (blocks per
    group, per resolution) and, per group, (resolution index, first block there, blocks)."""
    k = len(down_strides)
    n_extra = _per_block(hp, "down_n_blocks_per_res", k)
    filters = _per_block(hp, "down_filters", k)
    in_filters = [filters[0]] + filters[:-1]
    ratio = _per_block(hp, "down_mid_filters_ratio", k, float)
    kernel = _per_block(hp, "down_kernel_size", k, _kernel)
    variates = _per_block(hp, "down_latent_variates", k)
    groups: list[list[int]] = [[] for _ in resolutions]
    blocks_at: list[tuple[int, int, int]] = []
    res = resolutions[0]
    for g, stride in enumerate(down_strides):
        res *= stride
        i = resolutions.index(res)
        if stride == 1:
            _require(in_filters[g] == filters[g], "down_filters", f"changes width without upsampling at block {g}")
        _note(found, i, width=filters[g], bottleneck=ratio[g], variates=variates[g])
        _require(kernel[g] == (3 if res > 1 else 1), "down_kernel_size", f"is not 3 (1 at 1x1) at block {g}")
        size = 1 + n_extra[g]
        blocks_at.append((i, sum(groups[i]), size))
        groups[i].append(size)
    return groups, blocks_at


def _bottom_up_blocks(hp: dict, up_strides: list[int], res_of_block: list[int], resolutions: list[int],
                      up_groups: list[list[int]], found: dict
                      ) -> tuple[list[list[int]], list[tuple[int, int, int, int]]]:
    """Bottom-up blocks, each with its skip group numbered in top-down order at its resolution:
    vdvl's ``down_skip_groups`` (cells per skip, per resolution) and, per block, (resolution
    index, skip group, first cell, cells)."""
    k = len(up_strides)
    n_extra = _per_block(hp, "up_n_blocks_per_res", k)
    filters = _per_block(hp, "up_filters", k)
    in_filters = [_model_value(hp, "input_conv_filters", kind=int)] + filters[:-1]
    ratio = _per_block(hp, "up_mid_filters_ratio", k, float)
    kernel = _per_block(hp, "up_kernel_size", k, _kernel)
    skip_filters = _per_block(hp, "up_skip_filters", k)
    groups: list[list[int]] = [[0] * len(g) for g in up_groups]
    seen, cells_so_far = [0] * len(resolutions), [0] * len(resolutions)
    blocks_at: list[tuple[int, int, int, int]] = []
    for j, stride in enumerate(up_strides):
        i = resolutions.index(res_of_block[j])
        skip = len(up_groups[i]) - 1 - seen[i]
        if skip < 0:
            raise ConfigError("hparams values 'model.up_strides' and 'model.down_strides' give resolution "
                              f"{resolutions[i]} different numbers of skips.")
        seen[i] += 1
        cells = n_extra[j] + 1
        blocks_at.append((i, skip, cells_so_far[i], cells))
        cells_so_far[i] += cells
        groups[i][skip] = cells
        _note(found, i, width=in_filters[j], bottleneck=ratio[j])
        _require(stride > 1 or filters[j] == in_filters[j], "up_filters", f"changes width without pooling at block {j}")
        _require(skip_filters[j] == in_filters[j], "up_skip_filters",
                 f"differs from the block's width at block {j} (the official posterior assumes they are equal)")
        _require(kernel[j] == (3 if res_of_block[j] > 1 else 1), "up_kernel_size", f"is not 3 (1 at 1x1) at block {j}")
    if seen != [len(g) for g in up_groups]:
        raise ConfigError("hparams values 'model.up_strides' and 'model.down_strides' give the resolutions "
                          "different numbers of skips.")
    return groups, blocks_at


def _output_options(hp: dict, binary: bool) -> dict[str, Any]:
    """ModelConfig's likelihood and input settings: the official mixture of logistics, or
    binarized MNIST's Bernoulli output on the padded {0, 1} input."""
    output_base = _model_value(hp, "output_distribution_base")
    _require(output_base in ("std", "logstd"), "output_distribution_base", "is neither 'std' nor 'logstd'")
    if binary:  # {-1, 1} data -> the official {0, 1} input
        return dict(output="bernoulli", pad=MNIST_PAD, n_bits=8, input_shift=1.0, input_scale=0.5)
    options = dict(
        output="mol", pad=0, n_mixtures=_model_value(hp, "num_output_mixtures", kind=int),
        mol_scale="softplus" if output_base == "std" else "logstd", mol_tail="pixelcnn",
        mol_log_scale_floor=_model_value(hp, "min_mol_logscale", "loss", float),
        output_beta=_model_value(hp, "output_gradient_smoothing_beta", kind=float),
        n_bits=_model_value(hp, "num_bits", "data", int))
    if options["n_bits"] < 8:
        options.update(bit_reduction="truncate-all")
    return options


def config_from_hparams(hp: dict[str, dict[str, Any]]) -> ModelConfig:
    """The vdvl :class:`ModelConfig` with exactly the official model's tensors."""
    return official_layout(hp).cfg


# --------------------------------------------------------------------------- key mapping


def _cell_keys(vdvl: str, official: str) -> dict[str, str]:
    return {f"{vdvl}.{c}.{p}": f"{official}.convs.{idx}.{p}" for c, idx in _CELL_CONVS.items() for p in _PARAMS}


def _conv_keys(vdvl: str, official: str) -> dict[str, str]:
    return {f"{vdvl}.{p}": f"{official}.{p}" for p in _PARAMS}


def official_to_vdvl_keys(layout: OfficialLayout) -> dict[str, str]:
    """``{vdvl name: official name}`` for every tensor of the model."""
    keys = _conv_keys("input_conv", "bottom_up.input_conv")
    for j, (i, k, first, cells) in enumerate(layout.down):
        for m in range(cells - 1):  # the block's extra cells (levels_up), then its own (levels_up_downsample)
            keys |= _cell_keys(f"down_cells.{i}.{first + m}", f"bottom_up.levels_up.{j}.{m}.residual_block.0")
        block = f"bottom_up.levels_up_downsample.{j}"
        keys |= _cell_keys(f"down_cells.{i}.{first + cells - 1}", f"{block}.residual_block.0")
        keys |= _conv_keys(f"skip_proj.{i}.{k}", f"{block}.skip_projection")
        if layout.strides[j] > 1:
            keys |= _conv_keys(f"pools.{i}.conv", f"{block}.pool.ops.0")
    keys["initial_state"] = "top_down.trainable_h"
    for g, (i, first, size) in enumerate(layout.up):
        for m in range(size):
            official = f"top_down.levels_down_upsample.{g}" if m == 0 else f"top_down.levels_down.{g}.{m - 1}"
            vdvl = f"up_blocks.{i}.{first + m}"
            if m == 0 and layout.strides[len(layout.strides) - 1 - g] > 1:
                keys |= _conv_keys(f"unpools.{i}.conv", f"{official}.unpool.ops.0")
                keys[f"res_bias_{i}"] = f"{official}.unpool.scale_bias"
            keys |= _cell_keys(f"{vdvl}.prior", f"{official}.prior_net.0")
            keys |= _cell_keys(f"{vdvl}.posterior", f"{official}.posterior_net.0")
            keys |= _cell_keys(f"{vdvl}.cell", f"{official}.residual_block.0")
            keys |= _conv_keys(f"{vdvl}.prior_params", f"{official}.prior_layer.projection")
            keys |= _conv_keys(f"{vdvl}.posterior_params", f"{official}.posterior_layer.projection")
            keys |= _conv_keys(f"{vdvl}.z_proj", f"{official}.z_projection")
    keys |= _conv_keys("head.out", "top_down.output_conv")
    return keys


def official_weight_map(layout: OfficialLayout) -> WeightMap:
    """:func:`official_to_vdvl_keys` for the shared import path; unpool biases may be absent."""
    pairs = tuple((official, name) for name, official in official_to_vdvl_keys(layout).items())
    return WeightMap(layout.cfg, pairs, model="the --config model", hint=" (is the .cfg the run's own?)",
                     optional=_made_by_first_forward)


def _made_by_first_forward(official: str) -> bool:
    """The official code creates the unpool's scale_bias in its first forward pass (zeros until then)."""
    return official.endswith("unpool.scale_bias")




def convert_state(state: dict[str, torch.Tensor], layout: OfficialLayout, *, which: str = "model",
                  source: str = "the checkpoint") -> tuple[dict[str, torch.Tensor], list[str]]:
    """Official state dict -> vdvl state dict; also the official names filled with zeros.

    Raises CheckpointError naming ``source`` and the first tensor that is missing,
    unexpected or of the wrong shape for the configuration.
    """
    return to_vdvl(state, official_weight_map(layout), source, f"{which} tensor")


def to_official_state(state: dict[str, torch.Tensor], layout: OfficialLayout) -> dict[str, torch.Tensor]:
    """The inverse of :func:`convert_state`: vdvl weights under the official names and layout."""
    return from_vdvl(state, official_weight_map(layout))


# --------------------------------------------------------------------------- import


def load_official_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read an official checkpoint with the safe loader and check it is one."""
    payload = read_weight_file(path, "Checkpoint file")
    if not isinstance(payload, dict) or not isinstance(payload.get("model_state_dict"), dict):
        raise CheckpointError(f"Checkpoint file {path} is not an official Efficient-VDVAE checkpoint "
                              "(it has no 'model_state_dict').")
    return payload


def import_efficient_vdvae(checkpoint: str | Path, config: str | Path, run_dir: str | Path, *,
                           data: str = "") -> dict[str, Any]:
    """Write ``run_dir`` from an official checkpoint and its ``hparams-<run>.cfg``.

    Both the model and the EMA weights are imported (the EMA ones become the weights
    vdvl evaluates with, as for its own runs). Returns a summary: the run directory,
    the checkpoint written, the step, the parameter count and the official tensors
    that were absent and imported as zeros.

    Raises:
        ConfigError: the .cfg cannot be read or describes a model vdvl cannot express.
        CheckpointError: the file is not a safe, complete official checkpoint, or its
            tensors do not fit the .cfg (the first mismatching tensor is named).
    """
    require_input(checkpoint, what="Checkpoint file", error=CheckpointError)
    require_input(config, what="hparams file", error=ConfigError)
    with claim_new_run_dir(run_dir):
        return _import_efficient(Path(checkpoint), Path(config), Path(run_dir), data)


def _import_efficient(checkpoint: Path, config: Path, run_dir: Path, data: str) -> dict[str, Any]:
    hp = read_hparams(config)
    layout = official_layout(hp)
    payload = load_official_checkpoint(checkpoint)
    mapping, where = official_weight_map(layout), f"Checkpoint file {checkpoint}"
    weights, filled = to_vdvl(payload["model_state_dict"], mapping, where, "model tensor")
    ema_state = payload.get("ema_model_state_dict")
    ema, ema_filled = ((None, []) if not isinstance(ema_state, dict)
                       else to_vdvl(ema_state, mapping, where, "EMA tensor"))
    step = payload.get("global_step", 0)
    step = step.item() if isinstance(step, torch.Tensor) and step.numel() == 1 else step
    step = max(int(step), 0) if type(step) is int or (type(step) is float and math.isfinite(step)) else 0
    source = {
        "kind": SOURCE_KIND,
        "files": {"checkpoint": {"path": str(checkpoint.resolve()), "sha256": file_sha256(checkpoint)},
                  "hparams": {"path": str(config.resolve()), "sha256": file_sha256(config)}},
        "key_mapping": {name: official for official, name in mapping.pairs},
        "transforms": {"head.out": "mixture-of-logistics channels reordered from the PixelCNN++ layout"}
        if not layout.binary else {"input": "input_shift=1, input_scale=0.5: the official {0, 1} input"},
        "zero_filled": sorted(set(filled) | set(ema_filled)),
        "hparams": _plain(hp),
    }
    written = write_imported_run(run_dir, layout.cfg, weights, ema, step=step, source=source, data=data)
    return {"run_dir": str(run_dir), "checkpoint": str(written), "step": step, "ema": ema is not None,
            "parameters": sum(t.numel() for t in weights.values()), "zero_filled": source["zero_filled"]}


def _plain(value: Any) -> Any:
    """The parsed hparams as plain checkpoint data (tuples become lists)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
