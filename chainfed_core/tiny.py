"""Tiny random-weight models of every supported family, built from configs (unit tests)."""

from __future__ import annotations

import torch

from .backbone import Backbone, from_model
from .model_parts import build_model

VOCAB = 128
WINDOW = 4        # sliding-window span of the tiny decoders: shorter than tiny_batch's sequences


def tiny_config(family: str, num_layers: int = 4, hidden: int = 32, num_labels: int = 3):
    """A config of the family's real shape, shrunk to a few layers and a small width."""
    from transformers import BertConfig, DistilBertConfig, ElectraConfig, LlamaConfig, MPNetConfig, RobertaConfig

    common = dict(vocab_size=VOCAB, num_labels=num_labels)
    if family == "bert":
        return BertConfig(hidden_size=hidden, num_hidden_layers=num_layers, num_attention_heads=2,
                          intermediate_size=2 * hidden, max_position_embeddings=64, **common)
    if family == "roberta":
        return RobertaConfig(hidden_size=hidden, num_hidden_layers=num_layers, num_attention_heads=2,
                             intermediate_size=2 * hidden, max_position_embeddings=70, pad_token_id=1, **common)
    if family == "mpnet":
        return MPNetConfig(hidden_size=hidden, num_hidden_layers=num_layers, num_attention_heads=2,
                           intermediate_size=2 * hidden, max_position_embeddings=70, **common)
    if family == "distilbert":
        return DistilBertConfig(dim=hidden, n_layers=num_layers, n_heads=2, hidden_dim=2 * hidden,
                                max_position_embeddings=64, **common)
    if family == "electra":     # embeddings narrower than the layers, as in ELECTRA-small
        return ElectraConfig(embedding_size=hidden // 2, hidden_size=hidden, num_hidden_layers=num_layers,
                             num_attention_heads=2, intermediate_size=2 * hidden, max_position_embeddings=64,
                             **common)
    if family == "llama":
        return LlamaConfig(hidden_size=hidden, num_hidden_layers=num_layers, num_attention_heads=2,
                           num_key_value_heads=1, intermediate_size=2 * hidden, max_position_embeddings=64,
                           vocab_size=VOCAB, tie_word_embeddings=False)
    return _tiny_decoder_config(family, num_layers, hidden)


def _tiny_decoder_config(family: str, num_layers: int, hidden: int):
    """The decoders besides LLaMA, each with what sets it apart switched on: sliding-window
    layers (Qwen2 from ``max_window_layers`` on; every layer of Mistral and Phi3; every other
    one of Gemma2 and Gemma3, whose full and sliding layers use different rotary bases),
    Gemma's scaled embeddings and a final logit cap small enough to matter (Gemma2)."""
    from transformers import (Gemma2Config, Gemma3TextConfig, GPT2Config, MistralConfig, Phi3Config,
                              Qwen2Config)

    ids = dict(vocab_size=VOCAB, pad_token_id=0, bos_token_id=2, eos_token_id=3, tie_word_embeddings=False)
    if family == "gpt2":
        return GPT2Config(n_embd=hidden, n_layer=num_layers, n_head=2, n_inner=2 * hidden, n_positions=64, **ids)
    shape = dict(hidden_size=hidden, num_hidden_layers=num_layers, num_attention_heads=2, num_key_value_heads=1,
                 intermediate_size=2 * hidden, max_position_embeddings=64, sliding_window=WINDOW, **ids)
    gemma = dict(head_dim=hidden // 2, query_pre_attn_scalar=hidden // 2,
                 layer_types=["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(num_layers)])
    if family == "qwen2":
        return Qwen2Config(use_sliding_window=True, max_window_layers=num_layers // 2, **shape)
    if family == "mistral":
        return MistralConfig(**shape)
    if family == "phi3":
        return Phi3Config(**shape)
    if family == "gemma2":
        return Gemma2Config(final_logit_softcapping=1.0, **gemma, **shape)
    if family == "gemma3":
        return Gemma3TextConfig(**gemma, **shape)
    raise ValueError(f"unknown family {family!r}")


def tiny_backbone(family: str, num_layers: int = 4, hidden: int = 32, num_labels: int = 3,
                  seed: int = 0, pooling: str = "cls") -> Backbone:
    """A random-weight model of ``family`` wrapped as a :class:`Backbone` (eval mode)."""
    config = tiny_config(family, num_layers, hidden, num_labels)
    torch.manual_seed(seed)
    return from_model(build_model(config, family), family, pooling)


def tiny_batch(batch_size: int = 4, seq_len: int = 12, num_labels: int = 3, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random token ids with some right padding, and labels."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, VOCAB, (batch_size, seq_len), generator=g)
    mask = torch.ones(batch_size, seq_len, dtype=torch.long)
    for row in range(1, batch_size):
        mask[row, seq_len - min(row, seq_len - 2):] = 0     # rows padded by 0..T-2 tokens
    ids = ids.masked_fill(mask == 0, 1)
    labels = torch.randint(0, num_labels, (batch_size,), generator=g)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def tiny_dataset(n: int = 16, seq_len: int = 10, num_labels: int = 3, seed: int = 0):
    """A tokenized ``datasets.Dataset`` of random ids, in the layout the loaders produce."""
    from datasets import Dataset

    b = tiny_batch(n, seq_len, num_labels, seed)
    return Dataset.from_dict({"input_ids": b["input_ids"].tolist(),
                              "attention_mask": b["attention_mask"].tolist(),
                              "label": b["labels"].tolist()})
