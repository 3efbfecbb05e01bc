"""A task model cut into the parts the layer store keeps: embeddings, each layer, head, rest.

Built from a config alone (on the meta device it costs no memory, so the analytic memory
model counts a LLaMA2-13B's parts as cheaply as a tiny model's), the parts are::

    embed      the embeddings (only the frozen prefix needs them)
    layer.i    transformer layer i
    head       the task head (classifier, or final norm + LM head)
    rest       anything else (rotary tables, relative position bias)
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .backbone import Backbone
from .families import SPECS


def shard_key(index: int) -> str:
    """The part name of transformer layer ``index``."""
    return f"layer.{index}"


def head_is_frozen(family: str) -> bool:
    """Whether the family's head is frozen (a causal LM's final norm and LM head) rather
    than a classifier that trains."""
    return family in SPECS and SPECS[family].causal_lm


def hf_config(config_like):
    """A HF config from a config or a dict with ``model_type`` and the config's fields."""
    from transformers import AutoConfig, PretrainedConfig

    if isinstance(config_like, PretrainedConfig):
        return config_like
    data = dict(config_like)
    return AutoConfig.for_model(data.pop("model_type"), **data)


def build_model(config, family: str, attn_implementation: str | None = None) -> nn.Module:
    """The task model of a config with fresh weights (on the current default device):
    a causal LM for a decoder family, a sequence classifier otherwise."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    kwargs = {} if attn_implementation is None else {"attn_implementation": attn_implementation}
    if SPECS[family].causal_lm:
        return AutoModelForCausalLM.from_config(config, **kwargs)
    return AutoModelForSequenceClassification.from_config(config, **kwargs)


def embedding_modules(model: nn.Module, family: str) -> list[nn.Module]:
    """The model's embedding modules (the ``embed`` part), in the order they run: one for
    most families, token and position tables for GPT-2, embeddings and projection for ELECTRA."""
    return [m for m in (_get(model, path) for path in SPECS[family].embed) if m is not None]


def _get(obj: Any, path: str) -> Any:
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def _part_modules(backbone: Backbone) -> dict[str, list[str]]:
    """Module paths (on the task model) of every part except the per-layer ones."""
    spec, model = backbone.spec, backbone.model
    return {"embed": [p for p in spec.embed if _get(model, p) is not None],
            "head": [p for p in spec.head + spec.frozen_head if _get(model, p) is not None],
            "layers": [f"{spec.base}.{spec.layers}"]}


def part_tensors(model: nn.Module, backbone: Backbone) -> dict[str, dict[str, torch.Tensor]]:
    """Every parameter and buffer (persistent or not) of the model, grouped into parts.

    Keys are full names on the task model. Tied tensors shared across parts are rejected.
    """
    paths = _part_modules(backbone)
    layers_path = paths.pop("layers")[0]
    parts: dict[str, dict[str, torch.Tensor]] = {"embed": {}, "head": {}, "rest": {}}
    parts.update({shard_key(i): {} for i in range(backbone.num_layers)})
    owner_of: dict[int, str] = {}
    named = list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers(remove_duplicate=False))
    for name, tensor in named:
        if name.startswith("chainfed_adapters."):
            continue
        if name.startswith(layers_path + "."):
            part = shard_key(int(name[len(layers_path) + 1:].split(".")[0]))
        else:
            part = next((k for k, ps in paths.items() for p in ps if name.startswith(p + ".")), "rest")
        ptr = id(tensor)
        if ptr in owner_of and owner_of[ptr] != part:
            raise ValueError(f"tensor {name} is tied across parts {owner_of[ptr]} and {part}: "
                             "the layer store keeps each part separately")
        owner_of[ptr] = part
        parts[part][name] = tensor
    return parts
