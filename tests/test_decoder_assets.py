"""The packaged real decoders: each loads, generates a sensible continuation, and our layer-by-layer
backbone (family auto-detected) gives the HF model's own logits.

All ``slow``: they read the real assets (fetched on first use; Qwen2.5-Coder-1.5B is heavy, 7 GB in
float32, and is only checked where it was fetched already). ``pytest -s`` prints the logits' max abs
difference of each model.
"""

import pytest
import torch

from chainfed_core.asset_cache import MARKER, cache_dir
from chainfed_core.backbone import load_backbone
from chainfed_core.config import ModelConfig

PROMPT = "Monday, Tuesday, Wednesday,"
# (asset, family, layers, hidden, the word greedy decoding must produce within 8 tokens)
DECODERS = [("smollm2-135m", "llama", 30, 576, "Thursday"),
            ("gemma3-270m", "gemma3", 18, 640, "Thursday"),
            ("qwen2.5-coder-0.5b", "qwen2", 24, 896, "Thursday"),
            ("qwen2.5-coder-1.5b", "qwen2", 28, 1536, "Thursday")]
HEAVY = {"qwen2.5-coder-1.5b"}
TOLERANCE = 1e-4   # float32, the same weights through the same modules; only the loop over layers is ours


def _batch(tokenizer, texts):
    """Right-padded ids and mask of ``texts`` (rows of different lengths: the masks matter)."""
    rows = [tokenizer(t)["input_ids"] for t in texts]
    width = max(map(len, rows))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    return {"input_ids": ids, "attention_mask": mask}


def _max_diff(bb, batch) -> float:
    """Max abs difference of our layer loop's logits from the HF forward's, on real tokens only."""
    with torch.no_grad():
        ours = bb.forward(batch)
        theirs = bb.model(**batch).logits
    real = batch["attention_mask"].bool()
    return float((ours - theirs)[real].abs().max())


@pytest.mark.slow
@pytest.mark.parametrize("name,family,layers,hidden,word", DECODERS, ids=[d[0] for d in DECODERS])
def test_real_decoder_generates_and_matches_hf_logits(name, family, layers, hidden, word):
    from transformers import AutoTokenizer

    if name in HEAVY and not (cache_dir() / name / MARKER).exists():
        pytest.skip(f"{name} is heavy: run `python -m chainfed_core.assets {name}` first")
    torch.manual_seed(0)
    bb = load_backbone(ModelConfig(name=name))
    tokenizer = AutoTokenizer.from_pretrained(bb.model.name_or_path)
    assert (bb.family, bb.num_layers, bb.hidden_size) == (family, layers, hidden)
    batch = _batch(tokenizer, [PROMPT, "The capital of France is", "Write a Python function that adds two numbers."])
    diff = _max_diff(bb, batch)
    one = _batch(tokenizer, [PROMPT])
    with torch.no_grad():
        out = bb.model.generate(**one, max_new_tokens=8, do_sample=False)
    text = tokenizer.decode(out[0, one["input_ids"].shape[1]:])
    print(f"\n{name}: {family}, {layers} layers, hidden {hidden}; logits max abs diff {diff:.3g}; "
          f"{PROMPT!r} -> {text!r}")
    assert diff <= TOLERANCE
    assert word in text


@pytest.mark.slow
def test_gemma3_sliding_window_layers_match_hf_beyond_the_window():
    """Gemma 3 270M's sliding layers see 512 tokens: a 600-token row makes their mask differ
    from the full layers' (a wrong mask would show here, not on a short prompt)."""
    from transformers import AutoTokenizer

    bb = load_backbone(ModelConfig(name="gemma3-270m"))
    assert bb.config.sliding_window == 512
    tokenizer = AutoTokenizer.from_pretrained(bb.model.name_or_path)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(10, 20000, (1, 600), generator=g)
    diff = _max_diff(bb, {"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    print(f"\ngemma3-270m, 600 tokens: logits max abs diff {diff:.3g}")
    assert diff <= TOLERANCE
    assert tokenizer.pad_token_id is not None
