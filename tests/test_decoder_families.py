"""Families beyond BERT and LLaMA: detected from their configs, run layer by layer exactly
like the HF forward (sliding-window masks, per-type rotary tables, scaled embeddings, logit
caps), streamed from a layer store exactly like in memory, or refused with what is missing."""

import pytest
import torch

from chainfed_core import families
from chainfed_core.backbone import from_model, load_backbone
from chainfed_core.config import FAMILIES, AdapterConfig, ModelConfig, TrainConfig
from chainfed_core.families import FULL, SPECS, detect_family
from chainfed_core.layer_store import save_layer_store
from chainfed_core.methods import plan_for
from chainfed_core.model_parts import build_model
from chainfed_core.schedule import stage_at
from chainfed_core.streaming import load_streamed
from chainfed_core.tiny import tiny_backbone, tiny_batch, tiny_config, tiny_dataset
from chainfed_core.train import train_local

pytestmark = pytest.mark.usefixtures("one_thread")

NEW = ["qwen2", "mistral", "phi3", "gemma2", "gemma3", "gpt2", "electra"]
SLIDING = ["qwen2", "mistral", "phi3", "gemma2", "gemma3"]      # tiny configs with sliding-window layers
L = 4


def _hf_logits(bb, batch):
    return bb.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def _max_diff(a, b):
    return (a - b).abs().max().item()


# ---------------------------------------------------------------- detection
@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_is_detected_from_its_config(family):
    config = tiny_config(family, num_layers=2)
    assert detect_family(config) == family
    assert ModelConfig(family=family).family == family


def test_the_config_names_the_families_the_table_holds():
    assert set(FAMILIES) == set(SPECS)


def test_load_backbone_detects_gemma3_from_a_saved_text_model(tmp_path):
    torch.manual_seed(0)
    build_model(tiny_config("gemma3", num_layers=2), "gemma3").save_pretrained(tmp_path)
    bb = load_backbone(ModelConfig(name=str(tmp_path)))
    assert (bb.family, bb.is_causal_lm, bb.num_layers) == ("gemma3", True, 2)


# ---------------------------------------------------------------- exact forward
@pytest.mark.parametrize("family", NEW + ["llama"])
def test_zero_initialised_adapters_leave_the_hf_logits_unchanged(family):
    bb = tiny_backbone(family, num_layers=L)
    batch = tiny_batch()
    with torch.no_grad():
        before = _hf_logits(bb, batch)
        bb.add_adapters(AdapterConfig(bottleneck=8))
        assert _max_diff(bb.forward(batch), before) <= 1e-6
        assert _max_diff(_hf_logits(bb, batch), before) <= 1e-6


@pytest.mark.parametrize("family", NEW)
def test_trained_adapters_act_in_the_layer_loop_as_in_the_hf_forward(family):
    bb = tiny_backbone(family, num_layers=L)
    batch = tiny_batch()
    with torch.no_grad():
        bare = bb.forward(batch)
        bb.add_adapters(AdapterConfig(bottleneck=8))
        for p in bb.adapters.parameters():
            p.normal_(0, 0.1)
        ours = bb.forward(batch)
        assert _max_diff(ours, _hf_logits(bb, batch)) <= 1e-5
        assert _max_diff(ours, bare) > 1e-4


@pytest.mark.parametrize("family", SLIDING)
def test_the_tiny_configs_sliding_windows_matter(family, monkeypatch):
    """One full mask for every layer (what a LLaMA loop would pass) is measurably wrong, so
    the exact match above checks the per-layer masks."""
    bb = tiny_backbone(family, num_layers=L)
    batch = tiny_batch()
    with torch.no_grad():
        reference = _hf_logits(bb, batch)
        monkeypatch.setattr(families, "attention_types", lambda config: [FULL] * L)
        assert _max_diff(bb.forward(batch), reference) > 1e-3


def test_gemma2s_final_logit_cap_matters():
    bb = tiny_backbone("gemma2", num_layers=L)
    batch = tiny_batch()
    with torch.no_grad():
        reference = _hf_logits(bb, batch)
        bb.config.final_logit_softcapping = None
        assert _max_diff(bb.forward(batch), reference) > 1e-3


# ---------------------------------------------------------------- streamed
def _pair(family, tmp_path):
    """An in-memory backbone and its streamed twin with identical adapters."""
    bb = tiny_backbone(family, num_layers=L)
    save_layer_store(bb, tmp_path / "store")
    sb = load_streamed(tmp_path / "store")
    for model in (bb, sb):
        torch.manual_seed(1)
        model.add_adapters(AdapterConfig(bottleneck=8))
        with torch.no_grad():
            for p in model.adapters.parameters():
                p.normal_(0, 0.1)
    return bb, sb


@pytest.mark.parametrize("family", NEW)
def test_streamed_forward_equals_in_memory(family, tmp_path):
    bb, sb = _pair(family, tmp_path)
    assert sb.streamer.store.manifest["task"] == ("sequence_classification" if family == "electra" else "causal_lm")
    batch = tiny_batch()
    with torch.no_grad():
        assert torch.equal(sb.forward(batch), bb.forward(batch))


@pytest.mark.parametrize("family", ["gemma2", "gemma3", "gpt2", "electra"])
def test_streamed_training_equals_in_memory(family, tmp_path):
    bb, sb = _pair(family, tmp_path)
    data = tiny_dataset(8, 10, seed=3)
    plan = plan_for("chainfed", L, stage_at(1, L, 1, 2, 1), lam=0.3)
    config = TrainConfig(batch_size=4, lr=0.1, local_epochs=1)
    ref = train_local(bb, data, plan, config, seed=0)
    sb.follow(plan)
    got = train_local(sb, data, plan, config, seed=0)
    assert ref.steps == got.steps == 2 and ref.history == got.history
    assert all(torch.equal(ref.state[k], got.state[k]) for k in ref.state)


# ---------------------------------------------------------------- refused
def _refusal(make):
    with pytest.raises(ValueError) as err:
        make()
    message = str(err.value)
    assert "\n" not in message and message.startswith("ModelConfig.family: ")
    return message


def test_unsupported_models_are_refused_with_what_is_missing():
    from transformers import AlbertConfig, BloomConfig, Gemma3Config, Gemma3TextConfig, GPT2Config

    assert "load its text model (model_type 'gemma3_text'" in _refusal(lambda: detect_family(Gemma3Config()))
    assert "shares one layer's weights" in _refusal(lambda: detect_family(AlbertConfig()))
    assert "'bloom' is not one of" in _refusal(lambda: detect_family(BloomConfig()))
    assert "add_cross_attention" in _refusal(lambda: detect_family(GPT2Config(add_cross_attention=True)))
    bidirectional = Gemma3TextConfig(use_bidirectional_attention=True)
    assert "use_bidirectional_attention" in _refusal(lambda: detect_family(bidirectional))
    chunked = tiny_config("qwen2", num_layers=2)
    chunked.layer_types = ["chunked_attention", "full_attention"]
    assert "['chunked_attention'] are not supported" in _refusal(lambda: detect_family(chunked))


def test_a_forced_family_must_match_the_configs_model_type():
    """Forced to ``llama``, a Gemma2 model would run with one full mask for its sliding layers."""
    model = tiny_backbone("gemma2", num_layers=2).model
    message = _refusal(lambda: from_model(model, "llama"))
    assert "'llama' does not match the config's model_type 'gemma2'" in message
