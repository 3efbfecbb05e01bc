"""LoRA (Hu et al. 2021) on the attention query and value projections: the home of FLoRA's
and FedRA's low-rank updates.

A target projection y = W x + b gains a rank-r update, y = W x + b + s · B A x, with A (r, d_in)
drawn like PEFT's (Kaiming-uniform, a = sqrt 5), B (d_out, r) zero and s = alpha / r. The
targets are the query and value projections of every family (BERT/RoBERTa ``query``/``value``,
DistilBERT ``q_lin``/``v_lin``, MPNet ``q``/``v``, LLaMA ``q_proj``/``v_proj``).

:class:`LoRALinear` takes the place of the projection in its layer and keeps the projection's
own ``weight`` and ``bias`` Parameters under their names, so an exchange name
(``layers.<i>.attention.self.query.weight``) means the same tensor with or without LoRA, and
LoRA's own tensors are ``layers.<i>.<target>.lora_A`` / ``.lora_B`` (:func:`lora_names`).
:func:`detach` puts the original projections back.

Written here rather than taken from PEFT: ``peft`` is not in the project's pinned
environment (requirements.lock), and the methods need LoRA as a part of our layer-wise
model, not a wrapped model: a FLoRA client attaches a fresh LoRA of its own rank to the
model every simulated client shares and removes it after its round; a FedRA client runs a
subset of the layers through ``Backbone.run_layer``; both exchange tensors by the project's
names. The math (forward, initialisation, scaling, merge) is PEFT's ``lora.Linear``'s, without
dropout (the core runs the frozen model in eval mode).
"""

from __future__ import annotations

import math
from typing import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

# Attention query and value projections, by family, relative to a transformer layer.
TARGETS: dict[str, tuple[str, ...]] = {
    "bert": ("attention.self.query", "attention.self.value"),
    "roberta": ("attention.self.query", "attention.self.value"),
    "mpnet": ("attention.attn.q", "attention.attn.v"),
    "distilbert": ("attention.q_lin", "attention.v_lin"),
    "llama": ("self_attn.q_proj", "self_attn.v_proj"),
}


class LoRALinear(nn.Module):
    """y = W x + b + s · B (A x): a frozen ``nn.Linear`` (its own Parameters) plus rank r."""

    def __init__(self, base: nn.Linear, rank: int, scaling: float, generator: torch.Generator | None = None):
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        self.original = (base,)                 # a tuple: not registered as a submodule
        self.weight, self.bias = base.weight, base.bias
        self.scaling = scaling
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, device=base.weight.device))   # (r, d_in)
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=base.weight.device))  # (d_out, r)
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5), generator=generator)

    @property
    def rank(self) -> int:
        return self.lora_A.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight, self.bias)                              # (..., d_out)
        low = F.linear(F.linear(x.to(self.lora_A.dtype), self.lora_A), self.lora_B)   # (..., r) -> (..., d_out)
        return out + (low * self.scaling).to(out.dtype)


def _parent(layer: nn.Module, path: str) -> tuple[nn.Module, str]:
    *parents, leaf = path.split(".")
    for part in parents:
        layer = getattr(layer, part)
    return layer, leaf


def attach(backbone, rank: int, scaling: float, indices: Iterable[int] | None = None,
           generator: torch.Generator | None = None) -> list[LoRALinear]:
    """Put a fresh LoRA of ``rank`` on the targets of layers ``indices`` (default: all), in
    layer order, A drawn from ``generator``; returns the new modules."""
    modules = []
    for i in range(backbone.num_layers) if indices is None else indices:
        for path in TARGETS[backbone.family]:
            parent, leaf = _parent(backbone.layers[i], path)
            base = getattr(parent, leaf)
            if isinstance(base, LoRALinear):
                raise ValueError(f"layer {i} already has a LoRA on {path}")
            modules.append(LoRALinear(base, rank, scaling, generator))
            setattr(parent, leaf, modules[-1])
    return modules


def detach(backbone) -> None:
    """Put the original projections back wherever a LoRA is attached (their weights as they are)."""
    for layer in backbone.layers:
        for path in TARGETS[backbone.family]:
            parent, leaf = _parent(layer, path)
            module = getattr(parent, leaf)
            if isinstance(module, LoRALinear):
                setattr(parent, leaf, module.original[0])


def lora_names(backbone, indices: Iterable[int]) -> list[str]:
    """Exchange names of the LoRA tensors of layers ``indices`` (layers without LoRA are skipped)."""
    names = []
    for i in indices:
        for path in TARGETS[backbone.family]:
            if isinstance(getattr(*_parent(backbone.layers[i], path)), LoRALinear):
                names += [f"layers.{i}.{path}.lora_A", f"layers.{i}.{path}.lora_B"]
    return names


def target_weight_names(backbone) -> list[str]:
    """Exchange names of the target projections' dense weights, every layer (what FLoRA merges into)."""
    return [f"layers.{i}.{path}.weight" for i in range(backbone.num_layers) for path in TARGETS[backbone.family]]


# ---------------------------------------------------------------------- the math of aggregation
def stack(factors: Sequence[tuple[torch.Tensor, torch.Tensor]], weights: Sequence[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """FLoRA's stacking of client LoRAs (A_k (r_k, d_in), B_k (d_out, r_k)) with weights p_k:
    A = [p_1 A_1; ...; p_K A_K] (Σr, d_in), B = [B_1, ..., B_K] (d_out, Σr), in float64, so that
    B A = Σ_k p_k B_k A_k with no cross terms."""
    a = torch.cat([p * A.double() for (A, _), p in zip(factors, weights)], dim=0)    # (Σr, d_in)
    b = torch.cat([B.double() for _, B in factors], dim=1)                          # (d_out, Σr)
    return a, b


def merged(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
    """W + s · B A in float64, cast back to W's dtype (PEFT's merge)."""
    return (weight.double() + scaling * (b.double() @ a.double())).to(weight.dtype)      # (d_out, d_in)


def lora_elements(hf_config, rank: int) -> int:
    """Elements of one layer's LoRA: r (d_in + d_out) summed over the targets."""
    hidden = int(getattr(hf_config, "hidden_size", None) or hf_config.dim)
    heads = int(getattr(hf_config, "num_attention_heads", None) or hf_config.n_heads)
    head_dim = int(getattr(hf_config, "head_dim", None) or hidden // heads)
    kv = int(getattr(hf_config, "num_key_value_heads", None) or heads)
    value_out = kv * head_dim if hf_config.model_type == "llama" else hidden
    return rank * (2 * hidden + hidden + value_out)


# ---------------------------------------------------------------------- memory
def lora_peak_bytes(hf_config, layers: int | None, rank: int, *, batch_size: int, seq_len: int, optimizer: str,
                    dtype: str, method: str):
    """Peak bytes of a client step training LoRA of ``rank`` on every layer it holds (``layers``;
    None: all), and the head: those layers' frozen weights with the embeddings and the rest,
    LoRA and head float32 with their gradients and optimizer state, and the activations.

    Activations are the analytic model's for adapters of bottleneck 2r on every one of the
    layers, the first included: a LoRA layer saves what an adapter layer saves, with the
    projections' input (H, the adapter's input in the model) for A's gradient and the two
    rank-r intermediates for B's; unlike an adapter layer, the first layer saves all of it (its
    LoRA feeds the attention). The model counts a first layer as H + r only, so it is asked for
    one more layer and that first layer's H + 2r taken off."""
    from .memory_model import MemoryEstimate, part_sizes, peak_training_bytes
    from .model_parts import hf_config as to_hf_config

    config = to_hf_config(hf_config)
    sizes = part_sizes(config)
    held = sizes["num_layers"] if layers is None else layers
    wb = torch.finfo(getattr(torch, dtype)).bits // 8
    causal = config.model_type == "llama"                  # an LM head stays frozen
    frozen = (sizes["embed"] + sizes["rest"] + held * sizes["layer"] + (sizes["head"] if causal else 0)) * wb
    trainable = held * lora_elements(config, rank) * 4 + (0 if causal else sizes["head"] * 4)
    deeper = {**config.to_dict(), "num_hidden_layers": held + 1}
    model = peak_training_bytes(deeper, "full_adapters", 1, batch_size=batch_size, seq_len=seq_len, dtype=dtype,
                                bottleneck=2 * rank, optimizer=optimizer)
    hidden = int(getattr(config, "hidden_size", None) or config.dim)
    activations = model.activations - batch_size * seq_len * (hidden + 2 * rank) * wb
    return MemoryEstimate(frozen_weights=frozen, trainable=trainable, gradients=trainable,
                          optimizer_state=trainable * (2 if optimizer == "adamw" else 1), activations=activations,
                          notes={**model.notes, "num_layers": held, "lora_rank": rank, "method": method})
