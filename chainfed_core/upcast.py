"""Linear layers that keep narrow weights (bf16) and multiply in their input's dtype.

A CPU without bf16 matrix units computes a bf16 window fastest in float32; upcasting the
whole model would double its weights. :func:`upcast_linears` makes every ``nn.Linear`` of
a model run :class:`UpcastLinear`, which upcasts its weight a block of output rows at a
time and saves the narrow weight, not its upcast copy, for the backward pass.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# Bytes of a weight upcast at once by UpcastLinear: a LLaMA2-7B LM head (32000 x 4096) in
# float32 would be 500 MB, more than the two bf16 layers of a W=2 window.
UPCAST_CHUNK_BYTES = 64 << 20


def row_chunks(weight: torch.Tensor, dtype: torch.dtype):
    """(row slice, that block of ``weight`` in ``dtype``), a block of about UPCAST_CHUNK_BYTES at a time."""
    rows = max(1, UPCAST_CHUNK_BYTES // max(1, weight.shape[1] * torch.empty((), dtype=dtype).element_size()))
    for begin in range(0, weight.shape[0], rows):
        block = slice(begin, begin + rows)
        yield block, weight[block].to(dtype)


class UpcastLinear(torch.autograd.Function):
    """y = x W^T + b with W stored in a narrow dtype and multiplied in x's dtype.

    Saves the narrow weight, not its upcast copy, and upcasts it a block of output rows at
    a time, so a bf16 window on a CPU without bf16 matrix units computes in float32 while
    holding bf16 weights plus one block.
    """

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(weight)
        if weight.shape[0] * weight.shape[1] * x.element_size() <= UPCAST_CHUNK_BYTES:
            return F.linear(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype))
        out = torch.cat([F.linear(x, w) for _, w in row_chunks(weight, x.dtype)], dim=-1)
        return out if bias is None else out + bias.to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        if weight.shape[0] * weight.shape[1] * grad.element_size() <= UPCAST_CHUNK_BYTES:
            return grad @ weight.to(grad.dtype), None, None
        out = None
        for block, w in row_chunks(weight, grad.dtype):
            part = grad[..., block] @ w
            out = part if out is None else out.add_(part)
        return out, None, None


def _upcast_linear_forward(module: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return UpcastLinear.apply(x, module.weight, module.bias)


def upcast_linears(model: nn.Module) -> None:
    """Make every ``nn.Linear`` of ``model`` multiply in its input's dtype (:class:`UpcastLinear`)."""
    for module in model.modules():
        if isinstance(module, nn.Linear):
            module.forward = _upcast_linear_forward.__get__(module)
