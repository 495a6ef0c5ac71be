"""`vdvl import openai-vdvae`: openai/vdvae weight files as a vdvl run directory.

openai/vdvae saves ``{name}-model.th`` (the state dict of its DistributedDataParallel
wrapper, every key prefixed ``module.``) and ``{name}-model-ema.th`` (the EMA copy, no
prefix); both hold only tensors. The published CIFAR-10 models are EMA files alone,
which import fine as the only weights. The model is chosen by ``--hps`` (the
hyper-parameter set the weights were trained with, as in openai's ``train.py``);
:mod:`~vdvae_latents.interop.openai` knows each set's vdvl configuration and how the
tensors map. Files are read with ``torch.load(weights_only=True)``: nothing in them is
ever executed.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from ..core.errors import CheckpointError
from ..core.outputs import require_input
from ..model.checkpoints import file_sha256
from ..model.openai_hps import (
    NO_BIAS_ABOVE,
    OpenAIHps,
    get_openai_hps,
    openai_config,
    openai_layout,
    parse_blocks,
)
from ..train.presets import PRESETS
from .run_dir import claim_new_run_dir, write_imported_run
from .weights import WeightMap, from_vdvl, has_ddp_prefix, mol_channel_order, read_weight_file, to_vdvl

_STEP_IN_NAME = re.compile(r"iter-(\d+)-model(?:-ema)?\.th$")


def read_tensor_file(path: str | Path) -> dict[str, torch.Tensor]:
    """A file holding one ``{name: tensor}`` dict, loaded without running any code.

    Raises:
        CheckpointError: the file is missing, needs more than tensors to load, is
            truncated or not a PyTorch file, or is not a flat dict of tensors.
    """
    p = Path(path)
    state = read_weight_file(p)
    if not isinstance(state, dict):
        raise CheckpointError(f"weight file {p} holds a {type(state).__name__}, not a dict of named tensors.")
    for key, value in state.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise CheckpointError(f"weight file {p} is not a model state dict (entry {key!r} is not a named tensor).")
    return state


def openai_weight_map(hps: str | OpenAIHps) -> WeightMap:
    """:func:`openai_key_map` for the shared import path (errors name ``--hps``)."""
    h = get_openai_hps(hps)
    return WeightMap(openai_config(h), tuple(openai_key_map(h)), model=f"--hps {h.name}",
                     hint=" (are the weights from another --hps?)")


def _load_openai(path: str | Path, mapping: WeightMap) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """vdvl weights from one openai file, and the file's provenance record."""
    p = Path(path)
    raw = read_tensor_file(p)
    weights, _ = to_vdvl(raw, mapping, f"weight file {p}")
    return weights, {"file": str(p), "sha256": file_sha256(p), "ddp_prefix": has_ddp_prefix(raw)}


def import_openai_vdvae(model_path: str | Path, *, hps: str | OpenAIHps, run_dir: str | Path,
                        ema_path: str | Path | None = None, step: int | None = None) -> dict[str, Any]:
    """Write ``run_dir``: openai/vdvae weights as a vdvl run every command accepts.

    Args:
        model_path: ``{name}-model.th`` (``module.`` prefixes are dropped), or a lone
            EMA file.
        hps: openai's hyper-parameter set the weights belong to (cifar10, imagenet32,
            imagenet64, ffhq256, ffhq1024), or an :class:`OpenAIHps` for weights
            trained with other hyper-parameters.
        run_dir: an empty (or new) directory.
        ema_path: ``{name}-model-ema.th``, stored as the run's EMA weights (what
            eval, sample and encode use).
        step: the checkpoint's step; default: the ``iter-N`` in the file name, else 0.

    Returns:
        A summary: run directory, checkpoint, preset, parameter count, step, sha256s.
    """
    h = get_openai_hps(hps)  # an unknown name is refused before the run directory is touched
    for path in (model_path, ema_path):
        if path is not None:
            require_input(path, what="Checkpoint file", error=CheckpointError)
    with claim_new_run_dir(run_dir):
        return _import_openai(model_path, h, Path(run_dir), ema_path, step)


def _import_openai(model_path: str | Path, h: OpenAIHps, run_dir: Path, ema_path: str | Path | None,
                   step: int | None) -> dict[str, Any]:
    mapping = openai_weight_map(h)
    cfg = mapping.cfg
    weights, model_record = _load_openai(model_path, mapping)
    ema, ema_record = _load_openai(ema_path, mapping) if ema_path is not None else (None, None)
    if step is None:
        match = _STEP_IN_NAME.search(Path(model_path).name)
        step = int(match.group(1)) if match else 0
    if step < 0:
        raise CheckpointError(f"--step must be non-negative, not {step}.")
    source = {
        "kind": "openai-vdvae",
        "hps": h.as_dict(),
        "model_file": model_record,
        "ema_file": ema_record,
        "mapping": dict(mapping.pairs),
        "notes": "head.out takes decoder.out_net.out_conv's channels reordered from PixelCNN++'s "
                 "per-colour layout to vdvl's (interop.openai.mol_channel_order)",
    }
    # A published hyper-parameter set is exactly a vdvl preset.
    preset = f"{h.name}-vdvae"
    if preset not in PRESETS or PRESETS[preset].config != cfg:
        preset = None
    path = write_imported_run(run_dir, cfg, weights, ema, step=step, source=source, preset=preset)
    return {
        "run_dir": str(run_dir), "checkpoint": str(path), "preset": preset, "hps": h.name, "step": step,
        "parameters": sum(t.numel() for t in weights.values()),
        "model_sha256": model_record["sha256"], "ema_sha256": None if ema_record is None else ema_record["sha256"],
    }


__all__ = ["import_openai_vdvae", "read_tensor_file", "openai_weight_map", "openai_key_map", "mol_channel_order",
           "openai_to_vdvl", "vdvl_to_openai"]


_CELL = ("c1", "c2", "c3", "c4")


def _cell_pairs(src: str, dst: str) -> list[tuple[str, str]]:
    return [(f"{src}.{c}.{p}", f"{dst}.{c}.{p}") for c in _CELL for p in ("weight", "bias")]


def openai_key_map(name: str | OpenAIHps) -> list[tuple[str, str]]:
    """``(openai key, vdvl key)`` for every tensor, in openai's state-dict order.

    openai keys have no ``module.`` prefix. The output conv (``decoder.out_net.out_conv``)
    also needs its channels reordered: see :func:`mol_channel_order`.
    """
    h = get_openai_hps(name)
    res, _, _ = openai_layout(h)
    pairs = [("encoder.in_conv.weight", "input_conv.weight"), ("encoder.in_conv.bias", "input_conv.bias")]
    seen = [0] * len(res)
    for k, (r, kind, _) in enumerate(parse_blocks(h.enc_blocks)):
        i = res.index(r)
        dst = f"pools.{i}.cell" if kind == "d" else f"down_cells.{i}.{seen[i]}"
        seen[i] += kind == "x"
        pairs += _cell_pairs(f"encoder.enc_blocks.{k}", dst)
    seen = [0] * len(res)
    for k, (r, _, _) in enumerate(parse_blocks(h.dec_blocks)):
        i = res.index(r)
        src, dst = f"decoder.dec_blocks.{k}", f"up_blocks.{i}.{seen[i]}"
        seen[i] += 1
        pairs += _cell_pairs(f"{src}.enc", f"{dst}.posterior") + _cell_pairs(f"{src}.prior", f"{dst}.prior")
        pairs += [(f"{src}.z_proj.{p}", f"{dst}.z_proj.{p}") for p in ("weight", "bias")]
        pairs += _cell_pairs(f"{src}.resnet", f"{dst}.cell")
    biased = [i for i, r in enumerate(res) if r <= NO_BIAS_ABOVE]
    pairs += [(f"decoder.bias_xs.{n}", "initial_state" if i == 0 else f"res_bias_{i}") for n, i in enumerate(biased)]
    pairs += [("decoder.out_net.out_conv.weight", "head.out.weight"), ("decoder.out_net.out_conv.bias", "head.out.bias")]
    pairs += [("decoder.gain", "final_gain"), ("decoder.bias", "final_bias")]
    return pairs


def openai_to_vdvl(state: dict[str, torch.Tensor], name: str | OpenAIHps) -> dict[str, torch.Tensor]:
    """openai/vdvae weights (``module.`` prefixes dropped) as vdvl's; the first mismatching tensor is named."""
    return to_vdvl(state, openai_weight_map(name), "the openai state dict")[0]


def vdvl_to_openai(state: dict[str, torch.Tensor], name: str | OpenAIHps) -> dict[str, torch.Tensor]:
    """The inverse of :func:`openai_to_vdvl`: a vdvl state dict in openai/vdvae's names and layout."""
    return from_vdvl(state, openai_weight_map(name))
