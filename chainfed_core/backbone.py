"""A transformer split into the three pieces chain training needs: embeddings, layers, head.

Chain optimization runs a model one layer at a time: the frozen prefix forward only, the
window with gradients, the rest not at all. :class:`Backbone` gives every supported
family (BERT/MiniLM, DistilBERT, RoBERTa, MPNet, ELECTRA encoders with a classification
head; LLaMA, Qwen2, Mistral, Phi3, Gemma2, Gemma3 and GPT-2 decoders with the LM head; the
table and the per-family layer inputs are in :mod:`chainfed_core.families`) the same three
calls:

    hidden, ctx = bb.embed(batch)          # (B, T, H) and the per-batch layer context
    hidden = bb.run_layer(i, hidden, ctx)  # one transformer layer (+ its adapter, if any)
    loss, logits = bb.head_loss(hidden, batch, ctx)

The HF model object itself is used unchanged (its modules and weights); only the loop
over layers is ours. ``Backbone.residency`` is the hook the layer store uses to
materialise a layer just before it runs.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from .adapter import Adapter, inject_adapters, get_adapters
from .config import POOLINGS, AdapterConfig, ModelConfig
from .families import SPECS, check_supported, decoder_layer_inputs, detect_family

IGNORE_INDEX = -100
METHOD_MODULES_ATTR = "chainfed_modules"     # modules a method adds (Backbone.add_method_module)


class Residency(Protocol):
    """Called around each layer's use; the in-memory default does nothing."""

    def ensure(self, index: int) -> None: ...


class _AlwaysResident:
    def ensure(self, index: int) -> None:
        return None


@dataclass
class LayerContext:
    """What every layer of a batch needs besides the hidden states."""
    attention_mask: torch.Tensor                 # (B, T) 1 for real tokens
    layer_kwargs: dict[str, Any] = field(default_factory=dict)      # shared by every layer
    layer_types: tuple[str, ...] = ()            # per layer, where layers differ (sliding vs full)
    type_kwargs: dict[str, dict[str, Any]] = field(default_factory=dict)   # extra kwargs per type

    def kwargs_of(self, index: int) -> dict[str, Any]:
        """The keyword arguments of layer ``index``."""
        if not self.layer_types:
            return self.layer_kwargs
        return {**self.layer_kwargs, **self.type_kwargs[self.layer_types[index]]}


def _attr(obj: Any, path: str) -> Any:
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


class Backbone:
    """A HF task model viewed as embeddings -> layers[0..L-1] -> head."""

    def __init__(self, model: nn.Module, family: str, pooling: str = "cls"):
        if family not in SPECS:
            raise ValueError(f"ModelConfig.family: {family!r} is not one of {list(SPECS)}")
        if pooling not in POOLINGS:
            raise ValueError(f"ModelConfig.pooling: {pooling!r} is not one of {POOLINGS}")
        if pooling == "mean" and SPECS[family].causal_lm:
            raise ValueError(f"ModelConfig.pooling: 'mean' applies to classifiers, not the {family} causal LM")
        check_supported(family, model.config)
        self.model = model
        self.family = family
        self.pooling = pooling
        self.spec = SPECS[family]
        # Mean pooling replaces BERT's [CLS] pooler, which then neither trains nor travels.
        self.head_paths = tuple(p for p in self.spec.head if not (pooling == "mean" and p == "bert.pooler"))
        self.base = _attr(model, self.spec.base)
        self.layers: nn.ModuleList = _attr(self.base, self.spec.layers)
        self.config = model.config
        self.hidden_size = int(getattr(model.config, "hidden_size", None) or model.config.dim)
        self.residency: Residency = _AlwaysResident()

    # ------------------------------------------------------------------ structure
    @property
    def device(self) -> torch.device:
        """Where the model computes: the device of its first parameter not on ``meta`` (a
        streamed backbone's layers stay on ``meta`` until they are read in); CPU if none is."""
        return next((p.device for p in self.model.parameters() if p.device.type != "meta"), torch.device("cpu"))

    def to(self, device: torch.device | str) -> "Backbone":
        """Move the model (layers, adapters, heads, a method's modules) to ``device``; returns self."""
        self.model.to(device)
        return self

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def is_causal_lm(self) -> bool:
        return self.spec.causal_lm

    def head_modules(self) -> list[nn.Module]:
        """Modules trained alongside the adapters (classifier heads; none for an LM head)."""
        return [_attr(self.model, p) for p in self.head_paths if _attr(self.model, p) is not None]

    def head_parameters(self) -> dict[str, nn.Parameter]:
        return {f"head.{path}.{name}": p
                for path in self.head_paths if _attr(self.model, path) is not None
                for name, p in _attr(self.model, path).named_parameters()}

    def add_adapters(self, config: AdapterConfig, indices: list[int] | None = None) -> nn.ModuleDict:
        return inject_adapters(self.model, self.layers, self.hidden_size, config, indices)

    @property
    def adapters(self) -> nn.ModuleDict:
        return get_adapters(self.model)

    def add_method_module(self, key: str, module: nn.Module) -> nn.Module:
        """Give the model a module a method trains besides adapters and head (C2A's
        hypernetwork): it moves with the model and is exchanged as ``modules.<key>.<param>``."""
        if not hasattr(self.model, METHOD_MODULES_ATTR):
            self.model.add_module(METHOD_MODULES_ATTR, nn.ModuleDict())
        modules = getattr(self.model, METHOD_MODULES_ATTR)
        if key in modules:
            raise ValueError(f"model already has a method module {key!r}")
        modules[key] = module.to(next(self.model.parameters()).device)
        return module

    @property
    def method_modules(self) -> nn.ModuleDict:
        """The modules of :meth:`add_method_module`, by key (empty if none)."""
        return getattr(self.model, METHOD_MODULES_ATTR, nn.ModuleDict())

    def adapter(self, index: int) -> Adapter | None:
        adapters = getattr(self.model, "chainfed_adapters", None)
        if adapters is None or str(index) not in adapters:
            return None
        return adapters[str(index)]

    # ------------------------------------------------------------------ forward pieces
    def embed(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, LayerContext]:
        """Embedding output (B, T, H) and the context every layer of this batch needs."""
        ids = batch["input_ids"]
        if self.family == "gpt2":                     # learned positions, added to the tokens'
            positions = torch.arange(ids.shape[1], device=ids.device).unsqueeze(0)   # (1, T)
            hidden = self.base.drop(self.base.wte(ids) + self.base.wpe(positions))
        elif self.spec.causal_lm:                     # (Gemma scales by sqrt(H) inside embed_tokens)
            hidden = self.base.embed_tokens(ids)
        elif self.family in ("bert", "electra"):
            hidden = self.base.embeddings(input_ids=ids, token_type_ids=batch.get("token_type_ids"))
            if self.family == "electra" and hasattr(self.base, "embeddings_project"):
                hidden = self.base.embeddings_project(hidden)   # embedding width -> hidden width
        else:
            hidden = self.base.embeddings(input_ids=ids)
        return hidden, self.context(batch, hidden)

    def context(self, batch: dict[str, torch.Tensor], hidden: torch.Tensor) -> LayerContext:
        """Masks and position terms for a batch, rebuilt from the batch alone (cheap)."""
        from transformers.masking_utils import create_bidirectional_mask

        mask2d = batch["attention_mask"]
        if self.spec.causal_lm:
            kwargs, types, by_type = decoder_layer_inputs(self.spec, self.base, self.config, hidden, mask2d)
            return LayerContext(attention_mask=mask2d, layer_kwargs=kwargs, layer_types=types, type_kwargs=by_type)
        mask = create_bidirectional_mask(config=self.config, inputs_embeds=hidden, attention_mask=mask2d)
        kwargs = {"attention_mask": mask}
        if self.family == "mpnet":
            kwargs["position_bias"] = self.base.encoder.compute_position_bias(hidden)
        return LayerContext(attention_mask=mask2d, layer_kwargs=kwargs)

    def run_layer(self, index: int, hidden: torch.Tensor, ctx: LayerContext) -> torch.Tensor:
        """One transformer layer, followed by its adapter if one is injected."""
        self.residency.ensure(index)
        out = self.layers[index](hidden, **ctx.kwargs_of(index))
        return out[0] if isinstance(out, tuple) else out   # (B, T, H)

    def run_layers(self, indices, hidden: torch.Tensor, ctx: LayerContext) -> torch.Tensor:
        for i in indices:
            hidden = self.run_layer(i, hidden, ctx)
        return hidden

    def logits(self, hidden: torch.Tensor, ctx: LayerContext) -> torch.Tensor:
        """Head on hidden states of any depth: (B, K) for classifiers, (B, T, V) for LMs."""
        m = self.model
        if self.spec.causal_lm:
            norm, lm_head = (_attr(m, path) for path in self.spec.frozen_head)
            logits = lm_head(norm(hidden))                                      # (B, T, V)
            cap = getattr(self.config, "final_logit_softcapping", None)         # Gemma2
            return logits if cap is None else torch.tanh(logits / cap) * cap
        if self.pooling == "mean":
            mask = ctx.attention_mask.unsqueeze(-1).to(hidden.dtype)          # (B, T, 1)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)         # (B, H)
            if self.family == "bert":
                return m.classifier(m.dropout(pooled))
            if self.family == "distilbert":
                return m.classifier(m.dropout(F.relu(m.pre_classifier(pooled))))
            return m.classifier(pooled.unsqueeze(1))        # roberta / mpnet / electra heads read token 0
        if self.family == "bert":
            pooled = self.base.pooler(hidden)                 # (B, H) from [CLS]
            return m.classifier(m.dropout(pooled))
        if self.family == "distilbert":
            pooled = F.relu(m.pre_classifier(hidden[:, 0]))   # (B, H)
            return m.classifier(m.dropout(pooled))
        return m.classifier(hidden)                           # roberta / mpnet / electra take <s> inside

    def head_loss(self, hidden: torch.Tensor, batch: dict[str, torch.Tensor],
                  ctx: LayerContext) -> tuple[torch.Tensor, torch.Tensor]:
        """Task loss of the head applied to ``hidden``: cross-entropy, shifted for LMs."""
        logits = self.logits(hidden, ctx)
        if self.is_causal_lm:
            labels = batch.get("lm_labels")   # (B, T) with IGNORE_INDEX on prompt/pad tokens
            if labels is None:
                labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, IGNORE_INDEX)
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                                   labels[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX)
        else:
            loss = F.cross_entropy(logits.float(), batch["labels"])
        return loss, logits

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """End-to-end logits through every layer (evaluation, end-to-end baselines)."""
        hidden, ctx = self.embed(batch)
        hidden = self.run_layers(range(self.num_layers), hidden, ctx)
        return self.logits(hidden, ctx)


def resolve_device(name: str) -> torch.device:
    """The device of ``TrainConfig.device``: 'cpu', 'cuda' (an error where torch sees no CUDA
    device, before any training), or 'auto' (CUDA where there is one, else the CPU)."""
    if name == "cpu":
        return torch.device("cpu")
    if name not in ("cuda", "auto"):
        raise ValueError(f"TrainConfig.device: {name!r} is not one of ['cpu', 'cuda', 'auto']")
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    if name == "cuda":
        raise ValueError("TrainConfig.device: 'cuda', but torch sees no CUDA device here "
                         f"(torch {torch.__version__}, built for CUDA {torch.version.cuda}); use 'auto' or 'cpu'")
    return torch.device("cpu")


def describe_device(device: torch.device) -> str:
    """A device as a record names it: ``cpu``, or ``cuda:0 (NVIDIA H200)``."""
    if device.type != "cuda":
        return str(device)
    return f"{device} ({torch.cuda.get_device_name(device)})"


def from_model(model: nn.Module, family: str | None = None, pooling: str = "cls") -> Backbone:
    """Wrap an already built HF model (eval mode: the frozen base runs without dropout)."""
    model.eval()
    return Backbone(model, family or detect_family(model.config), pooling)


def resolve_pooling(pooling: str, path: str | os.PathLike) -> str:
    """``auto``: ``mean`` for a sentence-transformers checkpoint whose ``1_Pooling/config.json``
    asks for mean pooling (all-MiniLM-L6-v2, all-mpnet-base-v2 were trained that way), else
    ``cls`` (the task head as transformers builds it)."""
    if pooling != "auto":
        return pooling
    pooling_config = Path(path) / "1_Pooling" / "config.json"
    if pooling_config.is_file():
        try:
            modes = json.loads(pooling_config.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"ModelConfig.pooling: {pooling_config} is not valid JSON ({err})") from err
        if modes.get("pooling_mode_mean_tokens"):
            return "mean"
    return "cls"


def load_backbone(config: ModelConfig, num_labels: int | None = None) -> Backbone:
    """Load a model by asset name or local folder through ``from_pretrained``.

    Encoders load as ``AutoModelForSequenceClassification`` with ``num_labels`` classes;
    decoders load as ``AutoModelForCausalLM``. The frozen base is cast to ``config.dtype``;
    heads stay float32.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    from .assets import model_path

    path = Path(model_path(config.name))
    hf_config = AutoConfig.from_pretrained(path)
    family = config.family or detect_family(hf_config)
    dtype = getattr(torch, config.dtype)
    if SPECS[family].causal_lm:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    else:
        if num_labels is None:
            raise ValueError("num_labels is required for a classification model")
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels, dtype=dtype)
    pooling = "cls" if SPECS[family].causal_lm else resolve_pooling(config.pooling, path)
    bb = from_model(model, family, pooling)
    for module in bb.head_modules():
        module.float()
    return bb
