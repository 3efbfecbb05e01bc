"""A tiny byte-level tokenizer and a tiny random LLaMA that reads it (tests of text pipelines).

Every byte is one token (no merges; ids in the order of GPT-2's ``bytes_to_unicode``), so
a string of n bytes is n tokens and a continuation such as " A" is two.
"""

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast
from transformers.convert_slow_tokenizer import bytes_to_unicode

from chainfed_core.tiny import tiny_config

SPECIALS = ["<pad>", "<s>", "</s>"]          # ids 256, 257, 258


def tiny_tokenizer(bos: bool = False) -> PreTrainedTokenizerFast:
    """Byte-level tokenizer: 256 byte tokens, then <pad>, <s>, </s> (256-258); ``bos`` prepends <s>."""
    vocab = {ch: i for i, ch in enumerate(bytes_to_unicode().values())}
    vocab.update({tok: 256 + i for i, tok in enumerate(SPECIALS)})
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    if bos:
        from tokenizers import processors
        core.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 257)])
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def tiny_llama(seed: int = 0, num_layers: int = 2, hidden: int = 16) -> LlamaForCausalLM:
    """A random LLaMA over the tiny tokenizer's 259 ids (eval mode)."""
    config = tiny_config("llama", num_layers, hidden)
    config.vocab_size = 256 + len(SPECIALS)
    config.max_position_embeddings = 512
    config.pad_token_id, config.bos_token_id, config.eos_token_id = 256, 257, 258
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()
