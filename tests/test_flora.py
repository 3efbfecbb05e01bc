"""FLoRA: ranks by memory, stacking exactly Σ p_k B_k A_k, the merge, the counted bytes, the
simulator, the Flower apps, resume after kill -9 and the memory estimate."""

import numpy as np
import pytest
import torch

from chainfed_core import experiments as ex
from chainfed_core.aggregation import state_bytes
from chainfed_core.checkpoint import load_final_state
from chainfed_core.config import RunConfig
from chainfed_core.federated import run
from chainfed_core.lora import LoRALinear, attach, detach, lora_elements, target_weight_names
from chainfed_core.memory_meter import MemoryMeter
from chainfed_core.methods import get_method
from chainfed_core.methods.flora import ORIGINAL_RANKS, FLoRAOptions, rank_of, stacked_delta
from chainfed_core.population import device_capacity_gb
from chainfed_core.schedule import TrainPlan
from chainfed_core.task import build_task
from chainfed_core.tiny import tiny_backbone, tiny_batch, tiny_dataset
from chainfed_core.train import get_state, trainable_names

from runtime_checks import assert_flower_equals_simulator, assert_kill_9_resumes_bitwise

HIDDEN, LABELS, LAYERS = 32, 3, 4
HEAD = HIDDEN * HIDDEN + HIDDEN + HIDDEN * LABELS + LABELS           # bert.pooler + classifier


pytestmark = pytest.mark.usefixtures("one_thread")


def config(**fed) -> RunConfig:
    return RunConfig.from_dict({
        "method": "flora", "method_options": {"ranks": [8, 4, 2]}, "seed": 3, "model": {"name": "tiny-bert"},
        "train": {"optimizer": "adamw", "lr": 3e-3},
        "data": {"dataset": "synthetic", "num_clients": 4, "max_train_examples": 60, "max_test_examples": 16},
        "fed": {"rounds": 2, "clients_per_round": 3, "eval_every": 1, "memory_aware": False,
                "memory_profile": "paper", **fed}})


# ---------------------------------------------------------------- configs, grid, ranks
@pytest.mark.parametrize("options,message", [
    ({"ranks": [4, 0]}, r"FLoRAOptions.ranks: every rank must be >= 1"),
    ({"ranks": []}, r"FLoRAOptions.ranks: every rank must be >= 1"),
    ({"scaling": 0}, r"FLoRAOptions.scaling: must be > 0"),
    ({"rank": 4}, r"FLoRAOptions: unknown key\(s\) \['rank'\]"),
])
def test_bad_configs_fail_at_construction_naming_the_field(options, message):
    with pytest.raises(ValueError, match=message):
        RunConfig.from_dict({"method": "flora", "method_options": options})


def test_grid_lists_flora_with_the_original_optimizer():
    assert ex.variant("FLoRA").overrides == {"train": {"optimizer": "adamw", "lr": 3e-4}}
    assert "FLoRA" not in ex.missing_baselines()
    assert FLoRAOptions().ranks == [64, 32, 16, 16, 8, 8, 4, 4, 4, 4] and FLoRAOptions().scaling == 2.0


def test_ranks_follow_the_memory_quantile():
    capacities = np.arange(10.0, 0.0, -1.0)                  # ten distinct devices, largest first
    assert [rank_of(c, capacities, ORIGINAL_RANKS) for c in capacities] == ORIGINAL_RANKS
    tiers = np.array([12.0, 8.0, 8.0, 4.0])                  # ties share a rank
    assert [rank_of(c, tiers, [8, 4, 2, 1]) for c in tiers] == [8, 4, 4, 1]


# ---------------------------------------------------------------- the math
def test_stacked_aggregation_equals_the_weighted_sum_of_products():
    """Ranks {2, 4, 8} on a (24, 32) target: the stack's product and Σ p_k s B_k A_k agree to
    float64 precision; the float32 sum differs from both only by float32 rounding."""
    g = torch.Generator().manual_seed(0)
    factors = [(torch.randn(r, 32, generator=g), torch.randn(24, r, generator=g)) for r in (2, 4, 8)]
    p = [30 / 60, 20 / 60, 10 / 60]
    delta = stacked_delta(factors, p, 2.0)
    direct64 = sum(2.0 * w * B.double() @ A.double() for (A, B), w in zip(factors, p))
    direct32 = sum(2.0 * w * B @ A for (A, B), w in zip(factors, p))
    err64 = float((delta - direct64).abs().max() / direct64.abs().max())
    err32 = float((delta - direct32.double()).abs().max() / direct64.abs().max())
    print(f"stacked vs Σ p_k s B_k A_k: relative max error {err64:.1e} (float64), {err32:.1e} (float32 sum)")
    assert err64 < 1e-14 and err32 < 1e-6


def test_the_server_merges_the_stack_into_the_base_and_the_merged_model_equals_base_plus_delta():
    cfg = config()
    bb = tiny_backbone("bert", seed=0)
    method = get_method("flora")(cfg, bb.num_layers, bb.family)
    method.global_state = get_state(bb, method.exchanged_names(bb))
    g = torch.Generator().manual_seed(5)
    updates = []
    for k, (rank, n) in enumerate([(2, 30), (4, 20), (8, 10)]):
        modules = attach(bb, rank, 2.0, generator=g)
        with torch.no_grad():
            for m in modules:
                m.lora_B.normal_(generator=g)
        plan = TrainPlan(range(0, 0), range(0, 4), range(4, 4), lora_rank=rank)
        updates.append((get_state(bb, trainable_names(bb, plan)), n))
        detach(bb)
    new = method.aggregate(updates, round_index=0, clients=[0, 1, 2])
    p = [0.5, 1 / 3, 1 / 6]
    for name in target_weight_names(bb):
        target = name.removesuffix(".weight")
        delta = sum(2.0 * w * s[f"{target}.lora_B"].double() @ s[f"{target}.lora_A"].double()
                    for (s, _), w in zip(updates, p))
        assert torch.equal(new[name], (method.global_state[name].double() + delta).float())
    # the merged model computes what the base with the stacked LoRA computes
    batch = tiny_batch(4, 8)
    modules = attach(bb, 14, 2.0)
    with torch.no_grad():
        for m, name in zip(modules, target_weight_names(bb)):
            target = name.removesuffix(".weight")
            m.lora_A.copy_(torch.cat([w * s[f"{target}.lora_A"] for (s, _), w in zip(updates, p)]))
            m.lora_B.copy_(torch.cat([s[f"{target}.lora_B"] for s, _ in updates], dim=1))
    with_lora = bb.forward(batch)
    detach(bb)
    method.load_state(bb, new)
    torch.testing.assert_close(bb.forward(batch), with_lora, rtol=1e-5, atol=1e-5)


def test_a_client_uploads_its_rank_and_leaves_the_model_as_it_found_it():
    cfg = config()
    bb = tiny_backbone("bert", seed=0)
    method = get_method("flora")(cfg, bb.num_layers, bb.family)
    before = get_state(bb, target_weight_names(bb))
    plan = TrainPlan(range(0, 0), range(0, 4), range(4, 4), lora_rank=4)
    res = method.client_update(bb, tiny_dataset(16), plan, seed=7)
    assert state_bytes(res.state) == 4 * (LAYERS * lora_elements(bb.config, 4) + HEAD)
    assert sum(n.endswith(".lora_A") for n in res.state) == 2 * LAYERS
    assert all(res.state[n].shape[0] == 4 for n in res.state if n.endswith(".lora_A"))
    assert not any(isinstance(m, LoRALinear) for m in bb.model.modules())
    after = get_state(bb, target_weight_names(bb))
    assert all(torch.equal(before[n], after[n]) for n in before)


# ---------------------------------------------------------------- runtimes
def test_runs_in_the_simulator_with_exact_bytes(tmp_path):
    cfg = config()
    record = run(cfg, tmp_path, progress=False)
    task = build_task(cfg)
    bb = task.make_backbone()
    capacity = device_capacity_gb(cfg.seed, np.arange(4), "paper")
    rank = {c: rank_of(capacity[c], capacity, [8, 4, 2]) for c in range(4)}
    assert len(set(rank.values())) > 1                        # heterogeneous ranks
    dense = 4 * len(target_weight_names(bb)) * HIDDEN * HIDDEN
    for m in record["history"]:
        assert m["bytes_up"] == 4 * sum(LAYERS * lora_elements(bb.config, rank[c]) + HEAD for c in m["trained"])
        assert m["bytes_down"] == 4 * HEAD * len(m["clients"])
        assert m["bytes_down_context"] == (0 if m["round"] == 0 else dense * len(m["clients"]))
    final = load_final_state(tmp_path)
    initial = get_state(bb, final)
    assert sorted(final) == sorted(target_weight_names(bb) + list(bb.head_parameters()))
    assert all(not torch.equal(final[k], initial[k]) for k in final)


def test_runs_on_the_flower_apps_like_the_simulator_bitwise(tmp_path):
    cfg = config()
    assert_flower_equals_simulator(cfg, tmp_path)


def test_kill_9_and_restart_is_bitwise_identical(tmp_path):
    cfg = config(rounds=4, eval_every=2)
    assert_kill_9_resumes_bitwise(cfg, tmp_path)


# ---------------------------------------------------------------- memory
@pytest.mark.parametrize("family,optimizer", [("bert", "adamw"), ("llama", "sgd")])
def test_memory_estimate_within_ten_percent_of_the_meter(family, optimizer):
    L, B, T, r = 4, 8, 32, min(ORIGINAL_RANKS)
    bb = tiny_backbone(family, num_layers=L, hidden=64)
    data = tiny_dataset(2 * B, T, seed=1).map(lambda row: {"attention_mask": [1] * T})
    cfg = RunConfig.from_dict({"method": "flora", "train": {"batch_size": B, "optimizer": optimizer}})
    method = get_method("flora")(cfg, L, family)
    plan = TrainPlan(range(0, 0), range(0, L), range(L, L), lora_rank=r)
    with MemoryMeter(bb) as meter:
        method.client_update(bb, data, plan, seed=0)
    measured = meter.report().peak_bytes
    estimate = method.peak_bytes(bb.config, 1, batch_size=B, seq_len=T, bottleneck=64, optimizer=optimizer,
                                 dtype="float32").total
    print(f"FLoRA {family} r={r} {optimizer}: estimate / meter = {estimate / measured:.3f}")
    assert abs(estimate / measured - 1) <= 0.10
