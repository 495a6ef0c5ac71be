"""Foreign weights as vdvl's: the one path every importer takes.

read the file safely (:func:`read_weight_file`: ``torch.load(weights_only=True)`` through
:func:`~vdvae_latents.model.checkpoints.read_torch_file`) -> map the keys -> reorder the
output's mixture-of-logistics channels -> check every tensor against ``VAE(cfg).state_dict()``
on the meta device, naming the first mismatch (:func:`to_vdvl`) -> write the run
(:func:`~vdvae_latents.interop.run_dir.write_imported_run`).

An importer supplies a :class:`WeightMap`: the vdvl configuration, its ``(foreign name,
vdvl name)`` pairs, the foreign tensors that may be absent (its quirks), and how its error
messages name the model. Everything else is done here, the same way for every importer.
"""

from __future__ import annotations

import pickle
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from ..core.errors import CheckpointError
from ..model.checkpoints import read_torch_file
from ..model.config import ModelConfig
from .run_dir import meta_state_dict

__all__ = ["DDP_PREFIX", "MOL_OUT", "WeightMap", "read_weight_file", "has_ddp_prefix", "strip_ddp",
           "mol_channel_order", "reorder_mol_out", "to_vdvl", "from_vdvl"]

DDP_PREFIX = "module."
MOL_OUT = ("head.out.weight", "head.out.bias")  # vdvl tensors whose rows are the MoL output channels


def read_weight_file(path: str | Path, what: str = "weight file") -> Any:
    """The object in a PyTorch file, loaded without running any code (``weights_only=True``).

    Errors name the file as ``f"{what} {path}"``.

    Raises:
        CheckpointError: the file is missing, needs more than tensors and plain data to
            load, is truncated, unreadable or not a PyTorch file.
    """
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"{what} {p} does not exist or is not a file.")
    try:
        with warnings.catch_warnings():  # torch warns about foreign pickles before refusing them
            warnings.simplefilter("ignore")
            return read_torch_file(p)
    except CheckpointError as exc:  # read_torch_file's wording is for vdvl's own checkpoints
        raise CheckpointError(_read_failure(f"{what} {p}", exc.__cause__)) from exc.__cause__


def _read_failure(where: str, cause: BaseException | None) -> str:
    """One sentence for what torch raised while loading ``where``."""
    if isinstance(cause, pickle.UnpicklingError):
        if "Unsupported global" in str(cause):
            return f"{where} holds Python objects besides tensors and was refused (loading it would run code)."
        return f"{where} is not a PyTorch weight file."
    if isinstance(cause, PermissionError):
        return f"{where} cannot be read ({cause.strerror or cause})."
    return f"{where} is not a readable PyTorch file (it may be truncated)."


def has_ddp_prefix(state: Mapping) -> bool:
    """Whether every key of a non-empty state dict has DistributedDataParallel's ``module.`` prefix."""
    return bool(state) and all(isinstance(k, str) and k.startswith(DDP_PREFIX) for k in state)


def strip_ddp(state: Mapping) -> Mapping:
    """``state`` without the ``module.`` prefix of a DistributedDataParallel state dict (all keys or none)."""
    if has_ddp_prefix(state):
        return {k[len(DDP_PREFIX):]: v for k, v in state.items()}
    return state


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

    def reference(colour: int, part: int, k: int) -> int:  # part: 0 means, 1 log-scales, 2 coefficients
        return m + colour * 3 * m + part * m + k

    order = list(range(m))
    for part in range(3):
        order += [reference(c, part, k) for k in range(m) for c in range(3)]
    return torch.tensor(order)


def reorder_mol_out(state: dict[str, torch.Tensor], cfg: ModelConfig, *, inverse: bool = False
                    ) -> dict[str, torch.Tensor]:
    """In place (and returned): the output conv's channels from the PixelCNN++ layout to vdvl's
    (back with ``inverse``); nothing for outputs other than the mixture of logistics."""
    if cfg.output == "mol":
        order = mol_channel_order(cfg.n_mixtures, cfg.channels)
        if inverse:
            order = torch.argsort(order)
        for key in MOL_OUT:
            state[key] = state[key][order].contiguous()
    return state


def _never(name: str) -> bool:
    return False


@dataclass(frozen=True)
class WeightMap:
    """How a foreign state dict maps onto ``VAE(cfg)``'s state dict.

    ``pairs`` are ``(foreign name, vdvl name)`` for every tensor of the model, in the order
    mismatches are looked for. ``optional`` says which foreign tensors may be absent (they
    are imported as zeros). Error messages name the model as ``model`` and end with ``hint``.
    """

    cfg: ModelConfig
    pairs: tuple[tuple[str, str], ...]
    model: str = "the model"
    hint: str = ""
    optional: Callable[[str], bool] = _never

    @cached_property
    def expected(self) -> dict[str, torch.Tensor]:
        """``VAE(cfg).state_dict()`` on the meta device (shapes, no memory)."""
        expected = meta_state_dict(self.cfg)
        mapped = [dst for _, dst in self.pairs]
        sources = {src for src, _ in self.pairs}
        if sorted(mapped) != sorted(expected) or len(sources) != len(self.pairs):  # a bug, not the user's file
            raise RuntimeError(f"{self.model}'s key mapping is not one to one onto the model: "
                               f"{sorted(set(expected) ^ set(mapped))[:3]}")
        return expected


def to_vdvl(state: Mapping, mapping: WeightMap, origin: str, tensor: str = "tensor"
            ) -> tuple[dict[str, torch.Tensor], list[str]]:
    """A foreign state dict (``module.`` prefixes dropped) as vdvl's, and the foreign names filled with zeros.

    Each foreign tensor keeps its values; only the output conv's channels are reordered.

    Raises:
        CheckpointError: naming ``origin`` ("weight file X") and the first ``tensor`` that
            is missing, of the wrong shape or not floating point (in the order of
            ``mapping.pairs``), or else the first one the model does not have.
    """
    expected, state = mapping.expected, strip_ddp(state)
    out, filled = {}, []
    for src, dst in mapping.pairs:
        value, shape = state.get(src), expected[dst].shape
        if value is None and mapping.optional(src):
            value = torch.zeros(shape)
            filled.append(src)
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{origin} has no {tensor} '{src}', which {mapping.model} needs{mapping.hint}.")
        if value.shape != shape:
            raise CheckpointError(f"{origin} has {tensor} '{src}' of shape {list(value.shape)}, but {mapping.model} "
                                  f"expects {list(shape)}{mapping.hint}.")
        if not value.is_floating_point():
            raise CheckpointError(f"{origin} has {tensor} '{src}' of type {value.dtype}, not floating point.")
        if value.is_meta or value.layout != torch.strided:  # shapes without values, or a sparse tensor
            kind = "meta" if value.is_meta else str(value.layout).removeprefix("torch.")
            raise CheckpointError(f"{origin} has {tensor} '{src}' as a {kind} tensor, not plain values.")
        out[dst] = value
    known = {src for src, _ in mapping.pairs}
    extra = next((k for k in state if k not in known), None)
    if extra is not None:
        raise CheckpointError(f"{origin} has {tensor} '{extra}', which {mapping.model} does not have{mapping.hint}.")
    return reorder_mol_out(out, mapping.cfg), filled


def from_vdvl(state: Mapping[str, torch.Tensor], mapping: WeightMap) -> dict[str, torch.Tensor]:
    """The inverse of :func:`to_vdvl`: a vdvl state dict under the foreign names and layout."""
    state = reorder_mol_out(dict(state), mapping.cfg, inverse=True)
    return {src: state[dst] for src, dst in mapping.pairs}
