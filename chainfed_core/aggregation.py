"""FedAvg of the window: the server's weighted average of client updates.

Clients send back only the tensors they trained this round (the window's adapters and
the head) as a plain ``dict[str, Tensor]``; the server averages each tensor over the
clients that sent it, weighted by their sample counts, and writes the result into the
global state. Tensors outside the window are neither sent nor touched. A client's update is a
:class:`PackedState`: a read-only dict whose tensors are views of one flat buffer, so it
is copied, counted and averaged as one array however many tensors the window holds.
"""

from __future__ import annotations

import math
from typing import Iterable, Mapping

import numpy as np
import torch


class PackedState(dict):
    """A read-only state dict whose tensors are views of one flat buffer, ``flat``, laid out
    in the dict's order. Built by :func:`pack`; pickles as the one buffer."""

    flat: torch.Tensor

    def _read_only(self, *args, **kwargs):
        raise TypeError("a PackedState is read-only: change a copy, dict(state)")

    __setitem__ = __delitem__ = __ior__ = pop = popitem = clear = update = setdefault = _read_only

    def __reduce__(self):
        return _unflatten, (list(self), [t.shape for t in self.values()], self.flat)


def pack(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached copies of ``tensors``: one :class:`PackedState` when they share a dtype and a
    device (one copy instead of one per tensor), else a plain dict of clones."""
    values = [t.detach() for t in tensors.values()]
    if not values or any(t.dtype != values[0].dtype or t.device != values[0].device for t in values):
        return {n: t.clone() for n, t in zip(tensors, values)}
    return _unflatten(list(tensors), [t.shape for t in values], torch.cat([t.reshape(-1) for t in values]))


def _unflatten(names: list[str], shapes: list[torch.Size], flat: torch.Tensor) -> PackedState:
    views = flat.split([math.prod(shape) for shape in shapes])
    state = PackedState(zip(names, (v.view(shape) for v, shape in zip(views, shapes))))
    state.flat = flat
    return state


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
    first = updates[0][0]
    if all(t.device.type == "cpu" and t.dtype in _NUMPY_OF for t in first.values()):
        return _fedavg_packed(updates, weights)
    return {name: _weighted_mean_torch([state[name].detach() for state, _ in updates], weights)
            for name in first}


def fedavg_by_tensor(updates: list[tuple[dict[str, torch.Tensor], int]]) -> dict[str, torch.Tensor]:
    """FedAvg of each tensor over the clients that sent it, for methods whose clients train
    different parts of the model (each client's weight is its sample count among those)."""
    names = dict.fromkeys(name for state, _ in updates for name in state)     # first-seen order
    return {name: fedavg([({name: state[name]}, n) for state, n in updates if name in state])[name]
            for name in names}


_NUMPY_OF = {torch.float32: np.float32, torch.float64: np.float64, torch.float16: np.float16}


def _fedavg_packed(updates: list[tuple[dict[str, torch.Tensor], int]], weights: np.ndarray) -> dict[str, torch.Tensor]:
    """FedAvg of CPU tensors numpy can hold, each client's tensors as one row (its
    :class:`PackedState` buffer, or packed here): a few array operations per client whatever
    the number of tensors (per-tensor operations cost tens of microseconds of dispatch each).
    sum_k w_k x_k in float64, clients added in order, as :func:`_weighted_mean_torch` does
    (tested bit for bit)."""
    first = updates[0][0]
    names = list(first)
    size = sum(first[n].numel() for n in names)
    total, term = np.empty(size), np.empty(size)          # float64
    np.copyto(total, _row(first, names))
    total *= weights[0]
    for (state, _), w in zip(updates[1:], weights[1:]):
        np.copyto(term, _row(state, names))       # exact: float16/32 -> float64
        term *= w
        total += term
    out, begin = {}, 0
    for name in names:
        t = first[name]
        out[name] = torch.from_numpy(total[begin:begin + t.numel()].astype(_NUMPY_OF[t.dtype]).reshape(t.shape))
        begin += t.numel()
    return out


def _row(state: Mapping[str, torch.Tensor], names: list[str]) -> np.ndarray:
    """The tensors of ``names`` in ``state``, flat and in that order."""
    if isinstance(state, PackedState) and list(state) == names:
        return state.flat.numpy()
    return np.concatenate([state[n].detach().numpy().reshape(-1) for n in names])


def _weighted_mean_torch(tensors: list[torch.Tensor], weights: np.ndarray) -> torch.Tensor:
    first = tensors[0]
    stacked = torch.stack(tensors).to(torch.float64)
    w = torch.from_numpy(weights).to(stacked.device).view(-1, *[1] * first.dim())
    return (stacked * w).sum(0).to(first.dtype)


def state_bytes(state: Mapping[str, torch.Tensor]) -> int:
    """Payload size of a state dict: the bytes of its tensors' elements."""
    if isinstance(state, PackedState):
        return state.flat.numel() * state.flat.element_size()
    return sum(t.numel() * t.element_size() for t in state.values())


def merge(global_state: dict[str, torch.Tensor], update: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A new global state with ``update``'s tensors replaced; unknown names are an error."""
    unknown = sorted(set(update) - set(global_state))
    if unknown:
        raise KeyError(f"update has tensors the global state lacks: {unknown[:5]}")
    return {**global_state, **{k: v.detach().clone() for k, v in update.items()}}


def stale_names(names: Iterable[str], versions: Mapping[str, int], last_sync: int) -> list[str]:
    """Tensors a client must be sent besides the window: those updated since its last sync.

    ``versions[name]`` is the round whose aggregation last changed a tensor (-1: its seeded
    initial value, which every client rebuilds locally); ``last_sync`` the round at which the
    client last received the global state (-1: never). A client synced at round s got the
    state *before* round s was aggregated, so it lacks every tensor of version >= s.
    """
    since = max(last_sync, 0)
    return [n for n in names if versions.get(n, -1) >= since]
