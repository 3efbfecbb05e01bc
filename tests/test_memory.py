"""Memory meter, process peak RSS and the analytic memory model."""

import pytest
import torch

from chainfed_core.bench import measure_peak
from chainfed_core.config import AdapterConfig, TrainConfig
from chainfed_core.memory_meter import CATEGORIES, MemoryMeter, metered_training, tagged
from chainfed_core.memory_model import client_peak_bytes, peak_training_bytes, prefix_fill_bytes, streamed_chainfed_bytes
from chainfed_core.methods import plan_for
from chainfed_core.rss import current_rss, measure_rss
from chainfed_core.schedule import stage_at
from chainfed_core.tiny import tiny_backbone, tiny_config, tiny_dataset
from chainfed_core.train import evaluate


def test_meter_counts_exact_bytes_and_frees():
    with MemoryMeter() as meter:
        a = torch.empty(1000)                       # 4000 bytes
        b = torch.empty(500, dtype=torch.float64)   # 4000 bytes, live with a: peak 8000
        view = a[10:]                               # a view allocates nothing
        del a, b, view
        with tagged("cache"):
            c = torch.empty(300)                    # 1200 bytes after the others died
        del c
    report = meter.report()
    assert report.peak_bytes == 8000
    assert report.final_bytes == 0
    assert report.breakdown["activations"] == 8000 and report.breakdown["cache"] == 0


def test_tag_rejects_unknown_category():
    with pytest.raises(ValueError, match="not one of"):
        with tagged("weights"):
            pass


def test_breakdown_of_a_training_step_sums_to_the_peak():
    bb = tiny_backbone("bert", num_layers=4, hidden=64)
    bb.add_adapters(AdapterConfig(bottleneck=16))
    data = tiny_dataset(16, 24)
    plan = plan_for("chainfed", 4, stage_at(1, 4, 0, 2, 1), lam=0.2)
    report, result = metered_training(bb, data, plan, TrainConfig(batch_size=8, local_steps=2))
    assert result.steps == 2
    assert sum(report.breakdown.values()) == report.peak_bytes
    assert set(report.breakdown) == set(CATEGORIES)
    weights = sum(p.numel() * 4 for n, p in bb.model.named_parameters() if "chainfed_adapters" not in n
                  and not n.startswith(("bert.pooler", "classifier")))
    weights += sum(b.numel() * b.element_size() for b in bb.model.buffers())
    trainable = sum(p.numel() * 4 for p in bb.adapters.parameters()) + \
        sum(p.numel() * 4 for p in bb.head_parameters().values())
    assert report.breakdown["frozen_weights"] == weights
    assert report.breakdown["trainable"] == trainable
    assert report.breakdown["activations"] > 0
    window = sum(p.numel() * 4 for i in (1, 2) for p in bb.adapter(i).parameters())
    head = sum(p.numel() * 4 for p in bb.head_parameters().values())
    assert report.breakdown["optimizer_state"] == window + head      # SGD momentum of the trained tensors


def _metered_step(bb, method: str, window: int, start: int, B: int = 8, T: int = 32):
    """The meter's report of two local steps of ``method`` on ``bb`` (6 layers; chainfed's window
    at ``start``), and the analytic estimate of the same step (adapters of bottleneck 16)."""
    L = bb.num_layers
    data = tiny_dataset(2 * B, T, seed=1).map(lambda r: {"attention_mask": [1] * T})
    stage = stage_at(start, L, 0, window, 1) if method == "chainfed" else None
    report, _ = metered_training(bb, data, plan_for(method, L, stage, lam=0.2),
                                 TrainConfig(batch_size=B, local_steps=2))
    return report, peak_training_bytes(bb.config, method, window, B, T, bottleneck=16, window_start=start)


@pytest.mark.parametrize("family", ["bert", "llama"])
@pytest.mark.parametrize("method,window,start", [("full_adapters", 6, 0), ("chainfed", 2, 1), ("chainfed", 1, 3)])
def test_analytic_model_within_ten_percent_of_meter(family, method, window, start):
    bb = tiny_backbone(family, num_layers=6, hidden=64)
    bb.add_adapters(AdapterConfig(bottleneck=16))
    report, estimate = _metered_step(bb, method, window, start)
    assert report.breakdown["activations"] > 0.3 * report.peak_bytes   # activations matter on this shape
    assert abs(estimate.total / report.peak_bytes - 1) <= 0.10


@pytest.mark.parametrize("family", ["bert", "mpnet", "llama"])
@pytest.mark.parametrize("method", ["fft", "linear_probe", "no_ft"])
def test_analytic_model_of_baselines_within_ten_percent_of_meter(family, method):
    L, B, T = 6, 8, 32
    bb = tiny_backbone(family, num_layers=L, hidden=64)              # no adapters: these methods add none
    data = tiny_dataset(2 * B, T, seed=1).map(lambda r: {"attention_mask": [1] * T})
    if method == "no_ft":                                             # inference: forward passes of B examples
        with MemoryMeter(bb) as meter:
            evaluate(bb, data, batch_size=B)
        report = meter.report()
    else:
        report, _ = metered_training(bb, data, plan_for(method, L), TrainConfig(batch_size=B, local_steps=2))
    estimate = peak_training_bytes(bb.config, method, 1, B, T)
    assert abs(estimate.total / report.peak_bytes - 1) <= 0.10
    if method == "fft":
        assert estimate.gradients == report.breakdown["gradients"]     # every layer's weights and the head
    if method == "no_ft":
        assert estimate.gradients == estimate.optimizer_state == 0


def test_only_chainfed_streams():
    with pytest.raises(ValueError, match="streamed/cached"):
        peak_training_bytes(tiny_backbone("bert").config, "full_adapters", streamed=True)
    with pytest.raises(ValueError, match="method: 'lora'"):
        peak_training_bytes(tiny_backbone("bert").config, "lora")


def test_client_estimate_orders_methods_and_streams_chainfed():
    roberta_large = {"model_type": "roberta", "hidden_size": 1024, "num_hidden_layers": 24,
                     "num_attention_heads": 16, "intermediate_size": 4096, "vocab_size": 50265,
                     "max_position_embeddings": 514, "pad_token_id": 1}
    peak = {m: client_peak_bytes(roberta_large, m, 2, batch_size=8, seq_len=128).total
            for m in ("no_ft", "linear_probe", "chainfed", "full_adapters", "fft")}
    assert peak["chainfed"] < peak["no_ft"] < peak["linear_probe"] < peak["full_adapters"] < peak["fft"]
    deployed = streamed_chainfed_bytes(roberta_large, 2, batch_size=8, seq_len=128)
    assert peak["chainfed"] == deployed.total and deployed.notes["phase"] == "window step"
    assert deployed.cache == 8 * 128 * 1024 * 4                      # one batch of window inputs in memory
    fill = prefix_fill_bytes(roberta_large, 8, 128, cache_bytes=deployed.cache)
    assert fill.total < deployed.total and fill.gradients == 0      # the cache fill is forward only


def test_deployed_chainfed_estimate_follows_the_meter_and_opens_the_small_devices(tmp_path):
    # the MiniLM-L6 shape with random weights (a 90 MB store): on toy widths the fixed terms of the
    # activation model weigh more (hidden 64: +10-17%), on the real shape it is within 5%
    minilm = {"model_type": "bert", "hidden_size": 384, "num_hidden_layers": 6, "num_attention_heads": 12,
              "intermediate_size": 1536, "vocab_size": 30522, "max_position_embeddings": 512}
    for window in (2, 3):
        report = measure_peak(minilm, "chainfed", window, batch_size=8, seq_len=32, streamed=True, cached=True,
                              folder=tmp_path / "store")
        estimate = client_peak_bytes(minilm, "chainfed", window, batch_size=8, seq_len=32)
        assert abs(estimate.total / report.peak_bytes - 1) <= 0.10, (window, estimate.total, report.peak_bytes)
        assert abs(estimate.frozen_weights / report.breakdown["frozen_weights"] - 1) <= 0.01
    full = client_peak_bytes(minilm, "full_adapters", 6, batch_size=8, seq_len=32).total
    chain = client_peak_bytes(minilm, "chainfed", 2, batch_size=8, seq_len=32).total
    assert full / chain > 3          # the 4 GB tier (a third of the 12 GB that holds Full Adapters) holds W = 2


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma2"])
def test_measured_peak_of_a_shape_agrees_with_the_client_estimate(family, tmp_path):
    config = tiny_config(family, num_layers=4, hidden=64)
    for method, window in [("full_adapters", 1), ("chainfed", 2)]:      # chainfed streamed and cached, as deployed
        report = measure_peak(config, method, window, batch_size=8, seq_len=32, bottleneck=16,
                              streamed=method == "chainfed", cached=method == "chainfed", folder=tmp_path / "store")
        estimate = client_peak_bytes(config, method, window, batch_size=8, seq_len=32, bottleneck=16)
        assert abs(estimate.total / report.peak_bytes - 1) <= 0.10
        assert abs(estimate.frozen_weights / report.breakdown["frozen_weights"] - 1) <= 0.01


def test_analytic_model_scales_to_llama_7b_without_memory():
    H, I, V, L, heads = 4096, 11008, 32000, 32, 32
    llama7b = {"model_type": "llama", "hidden_size": H, "intermediate_size": I, "num_hidden_layers": L,
               "num_attention_heads": heads, "num_key_value_heads": heads, "vocab_size": V}
    full = peak_training_bytes(llama7b, "full_adapters", 32, 1, 64, dtype="bfloat16")
    chain = peak_training_bytes(llama7b, "chainfed", 2, 1, 64, dtype="bfloat16", streamed=True, cached=True)
    # embeddings and LM head; per layer q, k, v, o, gate, up, down and two RMSNorms; the final norm
    params = 2 * V * H + L * (4 * H * H + 3 * H * I + 2 * H) + H
    assert params == 6_738_415_616                                   # LLaMA2-7B's parameter count
    rotary = 2 * (H // heads // 2)                                   # inv_freq and original_inv_freq buffers
    assert full.frozen_weights == 2 * (params + rotary)               # every frozen tensor in bf16
    assert full.total > 10 * chain.total


def _allocate(mb: int) -> int:
    block = torch.ones(mb << 20, dtype=torch.uint8)
    return int(block.sum())


def test_measure_rss_sees_a_fresh_process_peak():
    small = measure_rss("tests.test_memory:_allocate", {"mb": 1}, threads=1)
    large = measure_rss("tests.test_memory:_allocate", {"mb": 200}, threads=1)
    assert large["result"] == 200 << 20
    assert large["peak_rss"] - small["peak_rss"] > 150 << 20
    assert 0 < large["baseline_rss"] <= large["peak_rss"]


def test_current_rss_sees_a_new_block():
    import mmap

    # a fresh anonymous mapping: a tensor may reuse resident pages the allocator kept from earlier tests
    block = mmap.mmap(-1, 64 << 20)
    before = current_rss()
    for offset in range(0, len(block), 4096):                         # 64 MiB, every page touched
        block[offset] = 1
    assert current_rss() - before > 48 << 20
    block.close()


DECODERS = ["qwen2", "mistral", "phi3", "gemma2", "gemma3", "gpt2"]


@pytest.mark.parametrize("family", DECODERS)
@pytest.mark.parametrize("method,window,start", [("full_adapters", 6, 0), ("chainfed", 2, 1), ("fft", 1, 0),
                                                 ("no_ft", 1, 0)])
def test_analytic_model_of_every_decoder_family_within_ten_percent_of_meter(family, method, window, start):
    # each family's own layer (Gemma's four norms and q/k norms, Phi3's fused qkv, GPT-2's LayerNorms and
    # tanh GELU, Gemma2's eager attention and capped logits), its masks (sliding and full) and its LM head
    L, B, T = 6, 8, 32
    bb = tiny_backbone(family, num_layers=L, hidden=64)
    if method in ("full_adapters", "chainfed"):
        bb.add_adapters(AdapterConfig(bottleneck=16))
    if method == "no_ft":
        data = tiny_dataset(2 * B, T, seed=1).map(lambda r: {"attention_mask": [1] * T})
        with MemoryMeter(bb) as meter:
            evaluate(bb, data, batch_size=B)
        report = meter.report()
        estimate = peak_training_bytes(bb.config, method, window, B, T, bottleneck=16, window_start=start)
    else:
        report, estimate = _metered_step(bb, method, window, start, B, T)
    assert abs(estimate.total / report.peak_bytes - 1) <= 0.10, (estimate.total, report.peak_bytes)
    assert estimate.notes["family"] == family
    if method != "fft":
        assert estimate.frozen_weights == report.breakdown["frozen_weights"]   # the LM head is frozen


@pytest.mark.parametrize("method,window,start", [("full_adapters", 6, 0), ("chainfed", 2, 1), ("chainfed", 2, 4),
                                                 ("fft", 1, 0)])
def test_the_lm_losss_logits_tensors_are_counted_where_they_dominate(method, window, start):
    # a vocabulary of 16,384 on a hidden size of 64: the logits-sized tensors are most of the peak. One branch
    # holds four at the backward's start (logits, log-softmax, their gradients), GPO's two branches six
    B, T, V = 4, 32, 16384
    bb = tiny_backbone("llama", num_layers=6, hidden=64)
    bb.model.resize_token_embeddings(V)
    if method != "fft":
        bb.add_adapters(AdapterConfig(bottleneck=16))
    report, estimate = _metered_step(bb, method, window, start, B, T)
    assert bb.config.vocab_size == V and report.breakdown["activations"] > 4 * B * T * V * 4 * 0.9
    assert abs(estimate.total / report.peak_bytes - 1) <= 0.03, (estimate.total, report.peak_bytes)


def test_family_traits_are_read_from_the_config():
    from chainfed_core.memory_model import family_traits

    llama, gemma3, gemma2, gpt2, bert = (family_traits(tiny_config(f, 6, 64))
                                         for f in ("llama", "gemma3", "gemma2", "gpt2", "bert"))
    assert (llama.causal_lm, llama.gated, llama.layer_norms, llama.mask_types, llama.rotary_sets) == \
        (True, True, 2, 1, 1)
    assert (gemma3.family, gemma3.layer_norms, gemma3.qk_norm, gemma3.mask_types, gemma3.rotary_sets) == \
        ("gemma3", 4, True, 2, 2)                                   # full and sliding layers, a rotary table each
    assert gemma2.logit_cap and gemma2.eager and not gemma3.logit_cap
    assert (gpt2.causal_lm, gpt2.gated, gpt2.rotary_sets, gpt2.mlp_saves) == (True, False, 0, 4)
    assert not bert.causal_lm and bert.mlp_saves == 1
    with pytest.raises(ValueError, match="model_type 't5' is not supported"):
        family_traits({"model_type": "t5"})


def test_a_tied_lm_head_counts_as_the_untied_copy_the_runs_hold():
    from chainfed_core.memory_model import part_sizes

    untied = tiny_config("gemma3", 4, 64)
    tied = tiny_config("gemma3", 4, 64)
    tied.tie_word_embeddings = True
    assert part_sizes(tied) == part_sizes(untied) and part_sizes(tied)["head"] >= part_sizes(tied)["embed"]
    for method in ("full_adapters", "chainfed"):
        assert client_peak_bytes(tied, method, 2, batch_size=2, seq_len=16).total == \
            client_peak_bytes(untied, method, 2, batch_size=2, seq_len=16).total
    assert tied.tie_word_embeddings                                  # the caller's config is left as it was




def test_eligibility_follows_the_window_the_chain_really_holds():
    """A window wider than the layers left after the start layer is clipped, so once the start
    is known the estimate counts the clipped window and more devices hold it."""
    import numpy as np

    from chainfed_core.config import RunConfig
    from chainfed_core.server import Server

    def server(window, start):
        cfg = RunConfig.from_dict({
            "method": "chainfed", "seed": 0, "model": {"name": "tiny-bert"}, "adapter": {"bottleneck": 4},
            "chain": {"window": window, "start_layer": start, "foat_tau": 0.8},
            "data": {"dataset": "synthetic", "num_clients": 40},
            "fed": {"clients_per_round": 3, "memory_aware": True, "fewer_eligible": True}})
        return Server(cfg, tiny_backbone("bert", num_layers=4), np.linspace(1.0, 12.0, 40), seq_len=16)

    clipped, narrow, whole = server(4, 2), server(2, 2), server(4, 0)
    assert clipped.held_window == 2 and whole.held_window == 4
    assert clipped.need_bytes == narrow.need_bytes < whole.need_bytes
    assert list(clipped.eligible) == list(narrow.eligible) and len(clipped.eligible) > len(whole.eligible)
    chosen = server(4, None)                                   # FOAT: the whole window until the start is known
    assert chosen.need_bytes == whole.need_bytes
    chosen.set_start([[0.99, 0.95, 0.5, 0.4]], [1.0])         # layer 2 is the first below τ = 0.8
    assert chosen.state["start_layer"] == 2 and list(chosen.eligible) == list(narrow.eligible)


def test_who_profiles_for_foat_does_not_depend_on_the_window():
    """FOAT's sample comes from the devices that hold W = 1 (the profile is a streamed forward
    pass), so a wide window, which fewer devices hold, profiles on the same clients."""
    import numpy as np

    from chainfed_core.config import RunConfig
    from chainfed_core.server import Server

    def server(window):
        cfg = RunConfig.from_dict({
            "method": "chainfed", "seed": 0, "model": {"name": "tiny-bert"}, "adapter": {"bottleneck": 4},
            "chain": {"window": window, "foat_tau": 0.8}, "data": {"dataset": "synthetic", "num_clients": 40},
            "fed": {"clients_per_round": 5, "memory_aware": True, "fewer_eligible": True}})
        return Server(cfg, tiny_backbone("bert", num_layers=4), np.linspace(1.0, 12.0, 40), seq_len=16)

    narrow, wide = server(1), server(4)
    assert len(wide.eligible) < len(narrow.eligible)
    assert wide.foat_clients() == narrow.foat_clients()
    assert set(narrow.foat_clients()) <= set(narrow.eligible)
