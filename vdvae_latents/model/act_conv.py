"""``conv(act(x))`` that keeps only ``x`` for the backward pass.

Autograd would keep two tensors per activation -> convolution pair: ``x`` for the
activation's gradient and ``act(x)`` for the convolution's weight gradient. The residual
cells are four such pairs, and these tensors are most of a training step's memory. Here
the backward pass recomputes ``act(x)`` (one elementwise op) and calls the same
``convolution_backward`` and activation-backward kernels autograd would, so gradients are
those of the plain path, for about half the activation memory.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

_ACTS = {"silu": F.silu, "gelu": F.gelu}


def _act_backward(name: str, grad: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    if name == "silu":
        return torch.ops.aten.silu_backward(grad, x)
    return torch.ops.aten.gelu_backward(grad, x)


class _ActConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, name, stride, padding, dilation, groups):
        # Runs under the caller's autocast: conv2d picks its dtype as in the plain path.
        out = F.conv2d(_ACTS[name](x), weight, bias, stride, padding, dilation, groups)
        ctx.save_for_backward(x, weight)
        ctx.conf = (name, stride, padding, dilation, groups, bias is not None)
        ctx.conv_dtype = out.dtype  # the dtype autocast chose for the convolution
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        name, stride, padding, dilation, groups, has_bias = ctx.conf
        a = _ACTS[name](x).to(ctx.conv_dtype)
        w = weight.to(ctx.conv_dtype)
        needs = ctx.needs_input_grad
        grad_a, grad_w, grad_b = torch.ops.aten.convolution_backward(
            grad_out.to(ctx.conv_dtype), a, w, [w.shape[0]] if has_bias else None, stride, padding, dilation,
            False, [0, 0], groups, [needs[0], needs[1], has_bias and needs[2]])
        grad_x = _act_backward(name, grad_a.to(x.dtype), x) if needs[0] else None
        return (grad_x, None if grad_w is None else grad_w.to(weight.dtype),
                None if grad_b is None else grad_b.to(weight.dtype), None, None, None, None, None)


def act_conv(conv: nn.Conv2d, x: torch.Tensor, activation: str) -> torch.Tensor:
    """``conv(act(x))`` for ``activation`` "silu" or "gelu"; memory-lean when gradients are on."""
    if not torch.is_grad_enabled():
        return conv(_ACTS[activation](x))
    return _ActConv.apply(x, conv.weight, conv.bias, activation, list(conv.stride), list(conv.padding),
                          list(conv.dilation), conv.groups)


__all__ = ["act_conv"]
