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

import pickle
import re
import warnings
from pathlib import Path
from typing import Any

import torch

from ..core.errors import CheckpointError
from ..model.checkpoints import file_sha256
from ..model.openai_hps import (
    NO_BIAS_ABOVE,
    OpenAIHps,
    get_openai_hps,
    openai_config,
    openai_layout,
    parse_blocks,
)
from ..model.vae import VAE
from ..train.presets import PRESETS
from .run_dir import write_imported_run

_DDP_PREFIX = "module."
_STEP_IN_NAME = re.compile(r"iter-(\d+)-model(?:-ema)?\.th$")


def read_tensor_file(path: str | Path) -> dict[str, torch.Tensor]:
    """A file holding one ``{name: tensor}`` dict, loaded without running any code.

    Raises:
        CheckpointError: the file is missing, needs more than tensors to load, is
            truncated or not a PyTorch file, or is not a flat dict of tensors.
    """
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"weight file {p} does not exist or is not a file.")
    try:
        with warnings.catch_warnings():  # torch warns about foreign pickles before refusing them
            warnings.simplefilter("ignore")
            state = torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "Unsupported global" in str(exc):
            raise CheckpointError(f"weight file {p} holds Python objects besides tensors and was refused "
                                  "(loading it would run code).") from exc
        raise CheckpointError(f"weight file {p} is not a PyTorch weight file.") from exc
    except PermissionError as exc:
        raise CheckpointError(f"weight file {p} cannot be read ({exc.strerror or exc}).") from exc
    except Exception as exc:  # noqa: BLE001 - torch reports damage as OSError, RuntimeError, EOFError, KeyError, ...
        raise CheckpointError(f"weight file {p} is not a readable PyTorch file (it may be truncated).") from exc
    if not isinstance(state, dict):
        raise CheckpointError(f"weight file {p} holds a {type(state).__name__}, not a dict of named tensors.")
    for key, value in state.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise CheckpointError(f"weight file {p} is not a model state dict (entry {key!r} is not a named tensor).")
    return state


def _strip_ddp(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop the ``module.`` prefix of a DistributedDataParallel state dict (all keys or none)."""
    if state and all(k.startswith(_DDP_PREFIX) for k in state):
        return {k[len(_DDP_PREFIX):]: v for k, v in state.items()}
    return state


def check_openai_state(state: dict[str, torch.Tensor], hps: str | OpenAIHps, path: Path) -> None:
    """Raise naming the first tensor where ``state`` differs from openai's ``--hps`` model."""
    hps = get_openai_hps(hps)
    cfg = openai_config(hps)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in VAE(cfg).state_dict().items()}
    pairs = openai_key_map(hps)
    for src, dst in pairs:
        if src not in state:
            raise CheckpointError(f"weight file {path} has no tensor '{src}', which --hps {hps.name} needs "
                                  "(are the weights from another --hps?).")
        if state[src].shape != shapes[dst]:
            raise CheckpointError(f"weight file {path} has tensor '{src}' of shape {list(state[src].shape)}, "
                                  f"but --hps {hps.name} expects {list(shapes[dst])}.")
    known = {src for src, _ in pairs}
    extra = [k for k in state if k not in known]
    if extra:
        raise CheckpointError(f"weight file {path} has tensor '{extra[0]}', which --hps {hps.name} does not have.")


def _load_openai(path: str | Path, hps: OpenAIHps) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """vdvl weights from one openai file, and the file's provenance record."""
    p = Path(path)
    raw = read_tensor_file(p)
    state = _strip_ddp(raw)
    check_openai_state(state, hps, p)
    for name, t in state.items():
        if not t.is_floating_point():
            raise CheckpointError(f"weight file {p} has tensor '{name}' of type {t.dtype}, not floating point.")
    record = {"file": str(p), "sha256": file_sha256(p), "ddp_prefix": len(raw) > 0 and raw is not state}
    return openai_to_vdvl(state, hps), record


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
    h = get_openai_hps(hps)
    cfg = openai_config(h)
    weights, model_record = _load_openai(model_path, h)
    ema, ema_record = _load_openai(ema_path, h) if ema_path is not None else (None, None)
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
        "mapping": {src: dst for src, dst in openai_key_map(h)},
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


__all__ = ["import_openai_vdvae", "read_tensor_file", "check_openai_state", "openai_key_map", "mol_channel_order",
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


def mol_channel_order(n_mixtures: int, channels: int = 3) -> torch.Tensor:
    """For each output channel of vdvl's MoL head, the reference channel it takes.

    vdvl's head emits [logits (M) | means (M x C) | scales (M x C) | coeffs (M x 3)],
    mixture-major; openai/vdvae and Efficient-VDVAE emit PixelCNN++'s [logits (M) |
    per colour c: means (M), log-scales (M), coeffs (M)], where colour c's coefficient
    block is vdvl's coefficient c. ``vdvl_out = reference_out[order]``.
    """
    if channels != 3:
        raise ValueError("the PixelCNN++ channel layout is defined for RGB only")
    m = n_mixtures
    order = list(range(m))
    order += [m + c * 3 * m + j for j in range(m) for c in range(3)]            # means
    order += [m + c * 3 * m + m + j for j in range(m) for c in range(3)]        # log-scales
    order += [m + k * 3 * m + 2 * m + j for j in range(m) for k in range(3)]    # coeffs
    return torch.tensor(order)


def openai_to_vdvl(state: dict[str, torch.Tensor], name: str | OpenAIHps) -> dict[str, torch.Tensor]:
    """openai/vdvae weights (no ``module.`` prefix, names and shapes already checked) as vdvl's."""
    order = mol_channel_order(get_openai_hps(name).num_mixtures)
    out = {}
    for src, dst in openai_key_map(name):
        t = state[src]
        out[dst] = t[order].contiguous() if src.startswith("decoder.out_net.") else t
    return out


def vdvl_to_openai(state: dict[str, torch.Tensor], name: str | OpenAIHps) -> dict[str, torch.Tensor]:
    """The inverse of :func:`openai_to_vdvl`: a vdvl state dict in openai/vdvae's names and layout."""
    inverse = torch.argsort(mol_channel_order(get_openai_hps(name).num_mixtures))
    out = {}
    for src, dst in openai_key_map(name):
        t = state[dst]
        out[src] = t[inverse].contiguous() if src.startswith("decoder.out_net.") else t
    return out
