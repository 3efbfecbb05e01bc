"""Compute-prefetch-evict streaming, the upcast linear and the frozen-prefix activation cache."""

import os

import pytest
import torch

from chainfed_core import upcast
from chainfed_core.actcache import ActivationCache
from chainfed_core.bench import step_times
from chainfed_core.config import AdapterConfig, TrainConfig
from chainfed_core.layer_store import save_layer_store, write_random_store
from chainfed_core.memory_meter import MemoryMeter
from chainfed_core.methods import plan_for
from chainfed_core.model_parts import shard_key
from chainfed_core.schedule import stage_at
from chainfed_core.streaming import load_streamed
from chainfed_core.tiny import tiny_backbone, tiny_config, tiny_dataset
from chainfed_core.train import set_state, train_local

L, W = 5, 2
CFG = TrainConfig(batch_size=4, lr=0.1, local_epochs=1)


def _pair(family, tmp_path, **kw):
    """An in-memory backbone and its streamed twin with identical adapters."""
    bb = tiny_backbone(family, num_layers=L, hidden=32)
    save_layer_store(bb, tmp_path / "store")
    sb = load_streamed(tmp_path / "store", **kw)
    for model in (bb, sb):
        torch.manual_seed(1)
        model.add_adapters(AdapterConfig(bottleneck=8))
    return bb, sb


def _max_diff(a, b):
    return max((a.state[k] - b.state[k]).abs().max().item() for k in a.state)


@pytest.mark.parametrize("family", ["bert", "roberta", "mpnet", "distilbert", "llama"])
@pytest.mark.parametrize("cached", [False, True])
def test_streamed_training_matches_in_memory(family, cached, tmp_path):
    bb, sb = _pair(family, tmp_path)
    data = tiny_dataset(16, 10, seed=3)
    cache = ActivationCache(sb, batch_size=5)
    for r in range(3):                                    # the window slides: fill, extend, extend
        plan = plan_for("chainfed", L, stage_at(r, L, 1, W, 1), lam=0.3)
        ref = train_local(bb, data, plan, CFG, seed=r)
        sb.follow(plan, cached=cached)
        got = train_local(sb, data, plan, CFG, seed=r, prefix=cache.prefix("c", data, plan) if cached else None)
        assert ref.steps == got.steps == 4
        assert max(abs(a - b) for a, b in zip(ref.history, got.history)) <= 1e-6
        assert _max_diff(ref, got) <= 1e-6
        if not cached:                                    # same ops on the same weights: bit-identical
            assert ref.history == got.history
        set_state(bb, ref.state)
        set_state(sb, ref.state)
    if cached:
        assert (cache.stats.fills, cache.stats.extensions) == (1, 2)
        assert cache.stats.example_layers == 16 * 1 + 2 * 16    # fill 1 layer, then one layer per slide


def test_cache_is_bit_identical_without_padding(tmp_path):
    bb = tiny_backbone("bert", num_layers=L, hidden=32)
    torch.manual_seed(1)
    bb.add_adapters(AdapterConfig(bottleneck=8))
    data = tiny_dataset(12, 10, seed=4).map(lambda r: {"attention_mask": [1] * 10})
    plan = plan_for("chainfed", L, stage_at(2, L, 0, W, 1), lam=0.3)
    start = {k: v.clone() for k, v in bb.model.state_dict().items()}
    ref = train_local(bb, data, plan, CFG, seed=0)
    bb.model.load_state_dict(start)
    cache = ActivationCache(bb, max_memory_bytes=0, folder=tmp_path / "cache", batch_size=5)   # on disk
    got = train_local(bb, data, plan, CFG, seed=0, prefix=cache.prefix("c", data, plan))
    assert cache.stats.disk_entries == 1 and cache.memory_bytes == 0
    assert ref.history == got.history
    assert all(torch.equal(ref.state[k], got.state[k]) for k in ref.state)


def test_cache_rebuilds_when_an_earlier_adapter_changes():
    bb = tiny_backbone("llama", num_layers=L, hidden=32)
    bb.add_adapters(AdapterConfig(bottleneck=8))
    data = tiny_dataset(8, 10)
    cache = ActivationCache(bb)
    plan = plan_for("chainfed", L, stage_at(2, L, 0, W, 1))
    cache.prefix("c", data, plan)
    cache.prefix("c", data, plan)
    assert (cache.stats.fills, cache.stats.hits) == (1, 1)
    with torch.no_grad():
        bb.adapter(0).up.bias.add_(0.1)                    # a new pass changed a layer before the window
    cache.prefix("c", data, plan)
    assert cache.stats.fills == 2
    with pytest.raises(KeyError, match="not among the examples cached"):
        cache.prefix("c", data, plan)(next(iter([{"input_ids": torch.tensor([[9, 9, 9]]),
                                                  "attention_mask": torch.ones(1, 3, dtype=torch.long)}])))


@pytest.mark.parametrize("prefetch", [True, False])
@pytest.mark.parametrize("memory_map", [True, False])
def test_prefetch_keeps_window_plus_one_resident(prefetch, memory_map, tmp_path):
    bb, sb = _pair("llama", tmp_path, prefetch=prefetch, memory_map=memory_map)
    data = tiny_dataset(12, 10)
    plan = plan_for("chainfed", L, stage_at(3, L, 0, W, 1), lam=0.2)
    sb.follow(plan)
    sb.streamer.reset_stats()
    ref = train_local(bb, data, plan, CFG, seed=0)
    got = train_local(sb, data, plan, CFG, seed=0)
    assert ref.history == got.history
    assert sb.streamer.max_resident_layers <= W + 1
    steps = got.steps
    parts_per_step = 1 + 3 + W                             # embeddings, frozen layers 0..2, window
    assert sb.streamer.loads == steps * parts_per_step
    assert sb.streamer.prefetched == (steps * parts_per_step if prefetch else 0)


def test_cached_window_stays_resident(tmp_path):
    _, sb = _pair("bert", tmp_path)
    data = tiny_dataset(12, 10)
    plan = plan_for("chainfed", L, stage_at(3, L, 0, W, 1))
    cache = ActivationCache(sb)
    prefix = cache.prefix("c", data, plan)                 # the fill streamed layers 0..2
    sb.follow(plan, cached=True)
    assert sb.streamer.resident <= {"head", "rest"}         # nothing of the prefix stays behind
    sb.streamer.reset_stats()
    with MemoryMeter(sb, {"cache": cache.tensors()}) as meter:
        train_local(sb, data, plan, CFG, seed=0, prefix=prefix)
    assert sb.streamer.loads == W                          # the window is read once for all steps
    assert sb.streamer.max_resident_layers <= W
    window_bytes = sum(sb.streamer.store.nbytes(shard_key(i)) for i in plan.training)
    assert meter.report().breakdown["frozen_weights"] == window_bytes


def _mapped_file(address: int) -> str | None:
    """The file mapped at ``address`` in this process (Linux /proc/self/maps)."""
    for line in open("/proc/self/maps"):
        fields = line.split(maxsplit=5)
        begin, end = (int(x, 16) for x in fields[0].split("-"))
        if begin <= address < end:
            return fields[5].strip() if len(fields) == 6 else None
    return None


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="needs Linux /proc")
def test_mapped_layers_are_not_copied_and_never_write_their_shard(tmp_path):
    _, sb = _pair("bert", tmp_path, prefetch=False)
    store = sb.streamer.store
    files = {key: store.path(key).read_bytes() for key in store.manifest["shards"]}
    plan = plan_for("chainfed", L, stage_at(1, L, 0, W, 1), lam=0.2)
    sb.follow(plan)
    train_local(sb, tiny_dataset(8, 10), plan, CFG, seed=0)     # the head trains in place
    with sb.resident("layer.0"):
        weight = sb.model.bert.encoder.layer[0].attention.self.query.weight
        assert _mapped_file(weight.data_ptr()) == str(store.path("layer.0"))  # the page cache's, not a copy
        weight.add_(1.0)                                   # copy-on-write: this process's page only
    assert {key: store.path(key).read_bytes() for key in files} == files


def test_random_bf16_store_with_float32_compute(tmp_path):
    config = tiny_config("llama", num_layers=3, hidden=32)
    write_random_store(config, tmp_path, dtype=torch.bfloat16)
    streamed = load_streamed(tmp_path, compute_dtype=torch.float32)
    in_memory = load_streamed(tmp_path, compute_dtype=torch.float32, resident="all", prefetch=False)
    assert streamed.streamer.store.manifest["dtype"] == "bfloat16"
    batch = {"input_ids": torch.randint(5, 100, (2, 8)), "attention_mask": torch.ones(2, 8, dtype=torch.long)}
    a, b = streamed.forward(batch), in_memory.forward(batch)
    assert a.dtype == torch.float32 and torch.equal(a, b)
    assert streamed.streamer.max_resident_layers <= 2


def test_upcast_linear_in_row_blocks_matches_one_block(monkeypatch):
    torch.manual_seed(0)
    weight = torch.randn(37, 16).to(torch.bfloat16)
    bias = torch.randn(37).to(torch.bfloat16)
    x = torch.randn(3, 5, 16)

    def run():
        xi = x.clone().requires_grad_(True)
        y = upcast.UpcastLinear.apply(xi, weight, bias)
        y.square().sum().backward()
        return y, xi.grad

    ref = run()
    monkeypatch.setattr(upcast, "UPCAST_CHUNK_BYTES", 10 * 16 * 4)     # blocks of 10 rows: 4 blocks
    got = run()
    assert torch.allclose(ref[0], got[0], atol=1e-5) and torch.allclose(ref[1], got[1], atol=1e-4)
    assert torch.allclose(ref[0], x @ weight.float().T + bias.float(), atol=1e-5)
    assert sum(1 for _ in upcast.row_chunks(weight, torch.float32)) == 4



def test_step_times_times_three_settings_in_turn(tmp_path):
    store = save_layer_store(tiny_backbone("bert", num_layers=3, hidden=32), tmp_path / "store")
    out = step_times(store, 1, tiny_dataset(2, 8), repeats=2, local_steps=1)
    assert {k: len(v) for k, v in out["seconds"].items()} == {"prefetch": 2, "no_prefetch": 2, "in_memory": 2}
    best = {k: min(v) for k, v in out["seconds"].items()}
    assert out["prefetch_over_in_memory"] == best["prefetch"] / best["in_memory"]
