"""FedAvg of the window: the server's weighted average of client updates.

Clients send back only the tensors they trained this round (the window's adapters and
the head) as a plain ``dict[str, Tensor]``; the server averages each tensor over the
clients that sent it, weighted by their sample counts, and writes the result into the
global state. Tensors outside the window are neither sent nor touched.
"""

from __future__ import annotations

from typing import Iterable, Mapping

import numpy as np
import torch


def fedavg(updates: list[tuple[dict[str, torch.Tensor], int]]) -> dict[str, torch.Tensor]:
    """Sample-weighted mean of each tensor: sum_k n_k x_k / sum_k n_k.

    Every update must carry the same tensor names. Accumulates in float64 and casts back
    to each tensor's dtype, so the result does not depend on float32 rounding order.
    """
    if not updates:
        raise ValueError("fedavg needs at least one update")
    names = set(updates[0][0])
    for state, n in updates:
        if set(state) != names:
            raise ValueError(f"updates carry different tensors: {sorted(names ^ set(state))[:5]}")
        if n <= 0:
            raise ValueError(f"every update needs a positive sample count, got {n}")
    total = float(sum(n for _, n in updates))
    weights = np.array([n / total for _, n in updates])
    return {name: _weighted_mean([state[name].detach() for state, _ in updates], weights)
            for name in updates[0][0]}


_NUMPY_DTYPES = {torch.float32, torch.float64, torch.float16}


def _weighted_mean(tensors: list[torch.Tensor], weights: np.ndarray) -> torch.Tensor:
    """sum_k w_k x_k in float64, clients added in order, cast back to the tensors' dtype.

    CPU tensors go through numpy (a dozen ops per tensor cost a tenth of torch's dispatch);
    others (CUDA, bfloat16) through :func:`_weighted_mean_torch`, the same arithmetic.
    """
    first = tensors[0]
    if first.device.type != "cpu" or first.dtype not in _NUMPY_DTYPES:
        return _weighted_mean_torch(tensors, weights)
    stacked = np.stack([t.numpy() for t in tensors]).astype(np.float64)
    mean = (stacked * weights.reshape(-1, *[1] * first.dim())).sum(axis=0)
    return torch.from_numpy(np.asarray(mean)).to(first.dtype)


def _weighted_mean_torch(tensors: list[torch.Tensor], weights: np.ndarray) -> torch.Tensor:
    first = tensors[0]
    stacked = torch.stack(tensors).to(torch.float64)
    w = torch.from_numpy(weights).to(stacked.device).view(-1, *[1] * first.dim())
    return (stacked * w).sum(0).to(first.dtype)


def state_bytes(state: Mapping[str, torch.Tensor]) -> int:
    """Payload size of a state dict: the bytes of its tensors' elements."""
    return sum(t.numel() * t.element_size() for t in state.values())


def merge(global_state: dict[str, torch.Tensor], update: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A new global state with ``update``'s tensors replaced; unknown names are an error."""
    unknown = sorted(set(update) - set(global_state))
    if unknown:
        raise KeyError(f"update has tensors the global state lacks: {unknown[:5]}")
    return {**global_state, **{k: v.detach().clone() for k, v in update.items()}}


def stale_names(names: Iterable[str], versions: Mapping[str, int], last_sync: int) -> list[str]:
    """Tensors a client must be sent besides the window: those updated after its last sync.

    ``versions[name]`` is the round that last changed a tensor (-1: its seeded initial
    value, which every client rebuilds locally); ``last_sync`` the round at which the
    client last received the global state (-1: never).
    """
    return [n for n in names if versions.get(n, -1) > last_sync]
