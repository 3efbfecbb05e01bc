"""Bottleneck adapter (paper Eq. 1) and its insertion after transformer layers.

The math (:class:`Adapter`) is kept apart from the wiring (:func:`inject_adapters`), which
adds a forward hook to each chosen layer instead of forking the model's code: the base
model's state-dict keys stay unchanged and the model's own ``forward`` sees the adapters
exactly as the chain engine's layer-by-layer runner does.
"""

from __future__ import annotations

import torch
from torch import nn

from .config import AdapterConfig

_ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh}
ADAPTERS_ATTR = "chainfed_adapters"


class Adapter(nn.Module):
    """h + f(h W_down) W_up, with W_up zero-initialised so a new adapter is the identity."""

    def __init__(self, hidden_size: int, config: AdapterConfig):
        super().__init__()
        self.down = nn.Linear(hidden_size, config.bottleneck)
        self.act = _ACTIVATIONS[config.activation]()
        self.up = nn.Linear(config.bottleneck, hidden_size)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:  # (B, T, H) -> (B, T, H)
        delta = self.up(self.act(self.down(h.to(self.down.weight.dtype))))
        return h + delta.to(h.dtype)


def _apply_to_output(adapter: Adapter, output):
    """Layers return a tensor or a tuple whose first item is the hidden states."""
    if isinstance(output, tuple):
        return (adapter(output[0]),) + tuple(output[1:])
    return adapter(output)


def inject_adapters(model: nn.Module, layers: nn.ModuleList, hidden_size: int,
                    config: AdapterConfig, indices: list[int] | None = None) -> nn.ModuleDict:
    """Insert an adapter after each layer in ``indices`` (default: all).

    The adapters live in ``model.chainfed_adapters`` (a ``ModuleDict`` keyed by layer
    index as a string) so ``model.parameters()`` and ``.to()`` see them. Their weights are
    read and written as plain dicts by ``chainfed_core.train.get_state`` / ``set_state``.
    """
    if hasattr(model, ADAPTERS_ATTR):
        raise ValueError("model already has adapters injected")
    indices = list(range(len(layers))) if indices is None else list(indices)
    bad = [i for i in indices if not 0 <= i < len(layers)]
    if bad:
        raise ValueError(f"adapter indices {bad} outside 0..{len(layers) - 1}")
    adapters = nn.ModuleDict()
    for i in indices:
        adapter = Adapter(hidden_size, config)
        adapters[str(i)] = adapter
        layers[i].register_forward_hook(lambda _m, _args, out, a=adapter: _apply_to_output(a, out))
    # Adapter weights follow the device of the model; keep them in float32 for training.
    device = next(model.parameters()).device
    model.add_module(ADAPTERS_ATTR, adapters.to(device))
    return adapters


def get_adapters(model: nn.Module) -> nn.ModuleDict:
    if not hasattr(model, ADAPTERS_ATTR):
        raise ValueError("model has no adapters: call inject_adapters first")
    return getattr(model, ADAPTERS_ATTR)
