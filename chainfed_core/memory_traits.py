"""What the analytic memory model (:mod:`chainfed_core.memory_model`) reads of a model family.

Families differ in what autograd saves per token and in the head they train; :func:`family_traits`
reads those differences from a HF config (with the family table of :mod:`chainfed_core.families`),
so the estimate branches on properties, not on family names. :func:`as_deployed` counts a
causal LM whose head is tied to its embeddings as the runs hold it (untied).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

from .families import SPECS, attention_types, detect_family
from .model_parts import hf_config


@dataclass(frozen=True)
class FamilyTraits:
    """What the estimate needs to know of a model family, read from its config.

    ``causal_lm``: a decoder with a frozen LM head (else a classifier whose head trains);
    ``gated``: decoder layers of RMSNorms and a gated feed-forward (LLaMA, Qwen2, Mistral, Phi3,
    Gemma2, Gemma3), else LayerNorm layers (the encoders, GPT-2); ``layer_norms``: normalisations
    per gated layer (Gemma's pre and post norms: 4); ``qk_norm``: q and k normalised per head
    (Gemma3); ``fused_qkv``: one projection makes q, k and v, and v, a view of it, keeps all of it
    saved (Phi3); ``mlp_saves``: feed-forward-wide tensors autograd saves in a LayerNorm layer
    (GELU's input; GPT-2's tanh-form ``gelu_new`` keeps four); ``logit_cap``: the final logits are
    soft-capped (Gemma2); ``mask_types``: distinct attention masks a batch builds (full and
    sliding-window: 2); ``rotary_sets``: rotary tables
    (GPT-2: none, Gemma3: one per attention type); ``eager``: attention materialises its
    probabilities (MPNet; a decoder configured with eager attention).
    """
    family: str
    causal_lm: bool
    gated: bool = False
    layer_norms: int = 2
    qk_norm: bool = False
    fused_qkv: bool = False
    mlp_saves: int = 1
    logit_cap: bool = False
    mask_types: int = 1
    rotary_sets: int = 1
    eager: bool = False


_GEMMA = ("gemma2", "gemma3")


def family_traits(config_like) -> FamilyTraits:
    """The :class:`FamilyTraits` of a HF config (or a dict with ``model_type``); its family as
    :func:`~chainfed_core.families.detect_family` names it (a refused model type raises)."""
    config = hf_config(config_like)
    family = detect_family(config)
    spec = SPECS[family]
    mlp_saves = 4 if getattr(config, "activation_function", None) == "gelu_new" else 1
    if not spec.causal_lm:
        return FamilyTraits(family, causal_lm=False, eager=family == "mpnet", mlp_saves=mlp_saves)
    types = attention_types(config) if spec.rotary != "none" else ["full_attention"]
    return FamilyTraits(family, causal_lm=True, gated=spec.rotary != "none",
                        layer_norms=4 if family in _GEMMA else 2, qk_norm=family == "gemma3",
                        fused_qkv=family == "phi3", mlp_saves=mlp_saves,
                        logit_cap=getattr(config, "final_logit_softcapping", None) is not None,
                        mask_types=len(set(types)),
                        rotary_sets={"none": 0, "shared": 1}.get(spec.rotary, len(set(types))),
                        eager=_attention_of(config) == "eager")


def _attention_of(config) -> str:
    """The attention a decoder built from ``config`` runs: the one it asks for, else SDPA where its
    class supports it, else eager (Gemma2, whose attention logits are soft-capped)."""
    from transformers import AutoModelForCausalLM

    requested = getattr(config, "_attn_implementation", None)
    if requested:
        return requested
    task_class = AutoModelForCausalLM._model_mapping[type(config)]
    return "sdpa" if task_class._supports_sdpa else "eager"


def as_deployed(config):
    """A causal LM whose head shares the token embeddings (SmolLM2, Gemma3) counted as the runs
    hold it: untied, the head a frozen copy of its own
    (:func:`chainfed_core.instruct_runs.untie_head`; the layer store keeps them as two parts)."""
    if SPECS[detect_family(config)].causal_lm and getattr(config, "tie_word_embeddings", False):
        config = copy.deepcopy(config)
        config.tie_word_embeddings = False
    return config
