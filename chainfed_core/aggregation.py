"""FedAvg of the window: the server's weighted average of client updates.

Clients send back only the tensors they trained this round (the window's adapters and
the head) as a plain ``dict[str, Tensor]``; the server averages each tensor over the
clients that sent it, weighted by their sample counts, and writes the result into the
global state. Tensors outside the window are neither sent nor touched.
"""

from __future__ import annotations

from typing import Iterable, Mapping

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
    out = {}
    for name in updates[0][0]:
        acc = torch.zeros_like(updates[0][0][name], dtype=torch.float64)
        for state, n in updates:
            acc += state[name].to(torch.float64) * (n / total)
        out[name] = acc.to(updates[0][0][name].dtype)
    return out


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
