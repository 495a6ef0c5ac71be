"""Which floating-point precision a pass runs in: fp32, or bf16 autocast where the hardware has it.

Training (``train.step``) and the inference jobs share the detection of a CPU that computes
bf16 natively. Inference jobs name a precision: ``"fp32"``, ``"bf16"`` (autocast; refused
where it would be emulated) or ``"auto"`` (bf16 on CUDA and on bf16-native CPUs, fp32
elsewhere). Jobs whose numbers are compared digit for digit (``eval``) default to fp32.
"""

from __future__ import annotations

import contextlib
import platform

import torch

from ..core.errors import UserError

PRECISIONS = ("auto", "fp32", "bf16")


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (x86: AVX512-BF16 or AMX; Arm: its BF16 extension).

    oneDNN also accepts bf16 on x86 CPUs with plain AVX-512, but emulates it there, and
    emulated bf16 runs slower than fp32, so those CPUs keep fp32.
    """
    try:
        if not (torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()):
            return False
    except (AttributeError, RuntimeError):
        return False
    if platform.machine().lower() in ("x86_64", "amd64", "i386", "i686"):
        probes = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
        return any(probe() for probe in probes if probe is not None)
    return True  # on Arm, oneDNN reports bf16 only where the CPU has the BF16 instructions


def device_has_native_bf16(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and cpu_has_native_bf16()


def resolve_precision(precision: str, device: torch.device | str) -> str:
    """``"fp32"`` or ``"bf16"`` for ``precision`` on ``device`` (a UserError for an unknown name)."""
    if precision not in PRECISIONS:
        raise UserError(f"--precision must be one of {', '.join(PRECISIONS)}, not '{precision}'.")
    if precision == "auto":
        return "bf16" if device_has_native_bf16(torch.device(device)) else "fp32"
    return precision


def autocast(precision: str, device: torch.device | str):
    """The context a pass runs under: bf16 autocast, or nothing for fp32."""
    device = torch.device(device)
    if resolve_precision(precision, device) == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


__all__ = ["PRECISIONS", "autocast", "cpu_has_native_bf16", "resolve_precision"]
