"""The model families a :class:`~chainfed_core.backbone.Backbone` can split, in one table.

:data:`SPECS` says, for each family, where the HF task model keeps its pieces (attribute
paths), which HF ``model_type`` values it covers and, for a decoder, how its layers get
their positions. :func:`detect_family` reads a HF config and refuses, in one line, a model
it cannot run layer by layer; :func:`check_supported` refuses a config of a known family
that asks for something the layer loop does not build.

A decoder layer needs more than the hidden states: the causal mask of its attention type
(full, or sliding-window as Mistral, Qwen2, Phi3 and every other Gemma2/Gemma3 layer use)
and the rotary tables (one set shared by all layers, or one per attention type as in
Gemma3). :func:`decoder_layer_inputs` builds both with the installed transformers' own
mask functions, the way each model's forward does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch

FULL, SLIDING = "full_attention", "sliding_attention"


@dataclass(frozen=True)
class FamilySpec:
    """Where a family keeps its pieces, by attribute path on the HF task model."""
    base: str                          # the base model inside the task model
    layers: str                        # the layer list, relative to base
    embed: tuple[str, ...]             # embedding modules in the order they run (absent ones skipped)
    head: tuple[str, ...] = ()         # trainable head modules (a classifier's)
    frozen_head: tuple[str, ...] = ()  # a causal LM's final norm and LM head, in the order they run
    model_types: tuple[str, ...] = ()  # HF model_type values detected as this family (default: its name)
    rotary: Literal["shared", "per_type", "none"] = "shared"   # decoders: how layers get positions

    @property
    def causal_lm(self) -> bool:
        return bool(self.frozen_head)


_DECODER = dict(base="model", layers="layers", embed=("model.embed_tokens",), frozen_head=("model.norm", "lm_head"))

SPECS: dict[str, FamilySpec] = {
    "bert": FamilySpec("bert", "encoder.layer", ("bert.embeddings",), ("bert.pooler", "classifier")),
    "roberta": FamilySpec("roberta", "encoder.layer", ("roberta.embeddings",), ("classifier",)),
    "mpnet": FamilySpec("mpnet", "encoder.layer", ("mpnet.embeddings",), ("classifier",)),
    "distilbert": FamilySpec("distilbert", "transformer.layer", ("distilbert.embeddings",),
                             ("pre_classifier", "classifier")),
    "electra": FamilySpec("electra", "encoder.layer", ("electra.embeddings", "electra.embeddings_project"),
                          ("classifier",)),
    "llama": FamilySpec(**_DECODER),
    "qwen2": FamilySpec(**_DECODER),
    "mistral": FamilySpec(**_DECODER),
    "phi3": FamilySpec(**_DECODER),
    "gemma2": FamilySpec(**_DECODER),
    "gemma3": FamilySpec(**_DECODER, model_types=("gemma3_text",), rotary="per_type"),
    "gpt2": FamilySpec("transformer", "h", ("transformer.wte", "transformer.wpe"),
                       frozen_head=("transformer.ln_f", "lm_head"), rotary="none"),
}

_BY_MODEL_TYPE = {t: name for name, spec in SPECS.items() for t in (spec.model_types or (name,))}

# Model types that are known not to run layer by layer here, and what is missing.
_REFUSED = {
    "gemma3": "a multimodal Gemma3 (vision tower + text model); load its text model "
              "(model_type 'gemma3_text', Gemma3ForCausalLM) instead",
    "albert": "ALBERT shares one layer's weights across all layers; per-layer adapters and the "
              "layer store need a module per layer",
    "deberta-v2": "DeBERTa's relative position embeddings live in the encoder, outside its layers; "
                  "the layer loop does not pass them",
    "t5": "an encoder-decoder model; only encoder-only and decoder-only families split into one layer chain",
}


def detect_family(config) -> str:
    """The family of a HF config, by its ``model_type`` (checked with :func:`check_supported`)."""
    model_type = getattr(config, "model_type", None)
    if model_type in _REFUSED:
        raise ValueError(f"ModelConfig.family: model_type {model_type!r} is not supported: {_REFUSED[model_type]}")
    if model_type not in _BY_MODEL_TYPE:
        raise ValueError(f"ModelConfig.family: model_type {model_type!r} is not one of {list(_BY_MODEL_TYPE)}")
    family = _BY_MODEL_TYPE[model_type]
    check_supported(family, config)
    return family


def check_supported(family: str, config) -> None:
    """Refuse a config the family's layer loop would run wrongly: a model type of another
    family (its layers would get the wrong masks or positions), or a feature not built."""
    own = _BY_MODEL_TYPE.get(getattr(config, "model_type", None))
    if own is not None and own != family:
        raise ValueError(f"ModelConfig.family: {family!r} does not match the config's model_type "
                         f"{config.model_type!r} (family {own!r})")
    if SPECS[family].causal_lm:
        unknown = sorted(set(attention_types(config)) - {FULL, SLIDING})
        if unknown:
            raise ValueError(f"ModelConfig.family: {family} layer types {unknown} are not supported "
                             f"(only {FULL!r} and {SLIDING!r} masks are built)")
    if getattr(config, "add_cross_attention", False):
        raise ValueError(f"ModelConfig.family: {family} with add_cross_attention (an encoder-decoder's "
                         "decoder) is not supported: the layer loop passes no encoder states")
    if getattr(config, "use_bidirectional_attention", False):
        raise ValueError(f"ModelConfig.family: {family} with use_bidirectional_attention (EmbeddingGemma) "
                         "is not supported: only causal masks are built")


def attention_types(config) -> list[str]:
    """Each layer's attention type: the config's ``layer_types``, else every layer
    sliding-window if the config sets a ``sliding_window`` (Mistral, Phi3), else full."""
    types = getattr(config, "layer_types", None)
    if types is not None:
        return list(types)
    kind = SLIDING if getattr(config, "sliding_window", None) is not None else FULL
    return [kind] * config.num_hidden_layers


def decoder_layer_inputs(spec: FamilySpec, base: torch.nn.Module, config, hidden: torch.Tensor,
                         mask2d: torch.Tensor) -> tuple[dict[str, Any], tuple[str, ...], dict[str, dict]]:
    """The keyword arguments of a decoder's layers for one batch.

    Returns the arguments every layer shares, each layer's attention type, and the extra
    arguments of each type (its mask; with Gemma3 also its rotary tables). When all layers
    have one type, its arguments join the shared ones and the types come back empty.
    """
    from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

    position_ids = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)   # (1, T)
    types = attention_types(config)
    by_type: dict[str, dict] = {}
    for kind in dict.fromkeys(types):                  # each type once, in order of first use
        make = create_sliding_window_causal_mask if kind == SLIDING else create_causal_mask
        by_type[kind] = {"attention_mask": make(config=config, inputs_embeds=hidden, attention_mask=mask2d,
                                                past_key_values=None, position_ids=position_ids)}
        if spec.rotary == "per_type":
            by_type[kind]["position_embeddings"] = base.rotary_emb(hidden, position_ids, kind)
    shared: dict[str, Any] = {"position_ids": position_ids}
    if spec.rotary == "shared":
        shared["position_embeddings"] = base.rotary_emb(hidden, position_ids=position_ids)
    if len(by_type) == 1:
        return {**shared, **by_type[types[0]]}, (), {}
    return shared, tuple(types), by_type
