"""FedRA: the allocation by memory, the sub-model that runs only its layers, per-layer
aggregation, the counted bytes, the simulator, the Flower apps, resume after kill -9 and the
memory estimate of a sub-model."""

from dataclasses import replace

import numpy as np
import pytest
import torch

from chainfed_core import experiments as ex
from chainfed_core.aggregation import merge, state_bytes
from chainfed_core.checkpoint import load_final_state
from chainfed_core.config import RunConfig
from chainfed_core.federated import run
from chainfed_core.lora import lora_elements, lora_names
from chainfed_core.memory_meter import MemoryMeter
from chainfed_core.methods import get_method
from chainfed_core.methods.fedra import FedRAOptions, allocation, allocation_matrix, layer_budget
from chainfed_core.population import Population
from chainfed_core.server import Server
from chainfed_core.task import build_task, seq_len
from chainfed_core.tiny import tiny_backbone, tiny_dataset
from chainfed_core.train import get_state, layer_of

from runtime_checks import assert_flower_equals_simulator, assert_kill_9_resumes_bitwise

HIDDEN, LABELS, LAYERS, RANK = 32, 3, 4, 4
HEAD = HIDDEN * HIDDEN + HIDDEN + HIDDEN * LABELS + LABELS           # bert.pooler + classifier


pytestmark = pytest.mark.usefixtures("one_thread")


def config(**fed) -> RunConfig:
    return RunConfig.from_dict({
        "method": "fedra", "method_options": {"rank": RANK, "alpha": 4.0}, "seed": 3, "model": {"name": "tiny-bert"},
        "data": {"dataset": "synthetic", "num_clients": 4, "max_train_examples": 60, "max_test_examples": 16},
        "fed": {"rounds": 2, "clients_per_round": 3, "eval_every": 1, "memory_aware": False,
                "memory_profile": "paper", **fed}})


def server_of(cfg: RunConfig):
    task = build_task(cfg)
    bb = task.make_backbone()
    return Server(cfg, bb, Population(cfg, task.train).capacity_gb, seq_len(task.train)), bb


# ---------------------------------------------------------------- configs, grid
@pytest.mark.parametrize("options,message", [
    ({"rank": 0}, r"FedRAOptions.rank: must be >= 1"),
    ({"alpha": -1.0}, r"FedRAOptions.alpha: must be > 0"),
    ({"ranks": [4]}, r"FedRAOptions: unknown key\(s\) \['ranks'\]"),
])
def test_bad_options_fail_at_construction_naming_the_field(options, message):
    with pytest.raises(ValueError, match=message):
        RunConfig.from_dict({"method": "fedra", "method_options": options})


def test_a_client_that_can_hold_no_layer_fails_at_construction():
    with pytest.raises(ValueError, match=r"FedConfig.memory_aware: FedRA client 0 cannot hold one layer"):
        server_of(config(memory_scale=1.0))                      # one byte per GB: nobody holds a layer
    with pytest.raises(ValueError, match=r"RunConfig.method: no client can fit 'fedra'"):
        server_of(config(memory_scale=1.0, memory_aware=True))


def test_grid_lists_fedra_with_the_original_optimizer():
    assert ex.variant("FedRA").overrides == {"train": {"optimizer": "sgd", "lr": 0.01, "momentum": 0.9,
                                                       "weight_decay": 1e-5}}
    assert "FedRA" not in ex.missing_baselines()
    assert (FedRAOptions().rank, FedRAOptions().alpha) == (8, 8.0)


# ---------------------------------------------------------------- allocation
def test_every_row_of_the_allocation_has_its_budget_of_ones_and_is_pure():
    budgets = [12, 10, 8, 6, 4, 3]                               # the original's budgets of 12 blocks
    m = allocation_matrix(7, 5, [0, 1, 2, 3, 4, 5], budgets, 12)
    assert m.sum(axis=1).tolist() == budgets and set(np.unique(m)) <= {0, 1}
    assert np.array_equal(m, allocation_matrix(7, 5, [0, 1, 2, 3, 4, 5], budgets, 12))
    assert not np.array_equal(m, allocation_matrix(7, 6, [0, 1, 2, 3, 4, 5], budgets, 12))   # redrawn each round
    rows = [allocation(7, r, 5, 3, 12) for r in range(200)]
    assert all(list(row) == sorted(set(row)) and len(row) == 3 for row in rows)
    counts = np.bincount(np.concatenate(rows), minlength=12)
    assert counts.min() > 20                                      # uniform: 50 expected per layer
    assert [layer_budget(c, [10, 20, 30]) for c in (5, 10, 29, 30, 99)] == [0, 1, 2, 3, 3]


def test_budgets_come_from_memory_and_plans_hold_those_layers():
    cfg = config()
    server, bb = server_of(cfg)
    method = server.method
    assert method.thresholds == sorted(method.thresholds) and server.need_bytes == method.thresholds[0]
    assert method.thresholds[-1] == method.peak_bytes(bb.config, LAYERS, batch_size=8, seq_len=seq_len(
        build_task(cfg).train), bottleneck=64, optimizer="sgd", dtype="float32").total
    budgets = [layer_budget(c, method.thresholds) for c in server.capacity_bytes]
    assert len(set(budgets)) > 1 and min(budgets) >= 1
    for c, budget in enumerate(budgets):
        plan = server.client_plan(1, c, server.plan(1))
        assert plan.training == allocation(cfg.seed, 1, c, budget, LAYERS) and len(plan.training) == budget
        assert plan.absent(LAYERS) == frozenset(range(LAYERS)) - set(plan.training)


# ---------------------------------------------------------------- client, server
def test_a_client_runs_only_its_layers_in_order_and_sends_only_their_lora():
    cfg = config()
    bb = tiny_backbone("bert", seed=0)
    method = get_method("fedra")(cfg, LAYERS, "bert")
    method.prepare(bb)
    ran = []
    for i, layer in enumerate(bb.layers):
        layer.register_forward_hook(lambda *args, i=i: ran.append(i))
    before = get_state(bb, method.exchanged_names(bb))
    plan = replace(method.widest_plan(), training=(0, 2))
    res = method.client_update(bb, tiny_dataset(16), plan, seed=1)
    assert ran == [0, 2] * res.steps
    assert list(res.state) == lora_names(bb, (0, 2)) + list(bb.head_parameters())
    assert state_bytes(res.state) == 4 * (2 * lora_elements(bb.config, RANK) + HEAD)
    after = get_state(bb, before)
    assert all(torch.equal(before[n], after[n]) for n in before if layer_of(n) in (1, 3))


def test_each_layer_is_averaged_over_exactly_the_clients_that_trained_it():
    cfg = config()
    bb = tiny_backbone("bert", seed=0)
    method = get_method("fedra")(cfg, LAYERS, "bert")
    method.prepare(bb)
    old = get_state(bb, method.exchanged_names(bb))
    g = torch.Generator().manual_seed(0)
    held = {0: (0, 1), 1: (1, 3), 2: (1,)}                    # layer 2 nobody trains
    head = list(bb.head_parameters())
    updates = [({n: torch.randn(old[n].shape, generator=g) for n in lora_names(bb, layers) + head}, 10 * (c + 1))
               for c, layers in held.items()]
    new = merge(old, method.aggregate(updates, round_index=0, clients=list(held)))
    for n in old:
        senders = [s[n] for s, _ in updates if n in s]
        if layer_of(n) == 2:
            assert not senders and torch.equal(new[n], old[n])          # kept, bit for bit
        else:
            assert torch.equal(new[n], sum(t.double() * (1 / len(senders)) for t in senders).float())   # unweighted
    assert {layer_of(n) for s, _ in updates for n in s} == {0, 1, 3, None}


# ---------------------------------------------------------------- runtimes
def test_runs_in_the_simulator_and_each_client_gets_and_sends_its_layers(tmp_path):
    cfg = config()
    record = run(cfg, tmp_path, progress=False)
    server, bb = server_of(cfg)
    budgets = {c: layer_budget(cap, server.method.thresholds) for c, cap in enumerate(server.capacity_bytes)}
    lora = 4 * lora_elements(bb.config, RANK)
    for m in record["history"]:
        assert m["bytes_up"] == sum(budgets[c] * lora + 4 * HEAD for c in m["trained"])
        assert m["bytes_down"] == sum(budgets[c] * lora + 4 * HEAD for c in m["clients"])
        assert m["bytes_down_context"] == 0                      # nothing of the absent layers travels
    final, initial = load_final_state(tmp_path), get_state(bb, server.method.exchanged_names(bb))
    trained = {j for m in record["history"] for c in m["trained"]
               for j in allocation(cfg.seed, m["round"], c, budgets[c], LAYERS)}
    for n in final:                 # B (zero-initialised) moves whenever its layer trains; A may not, at first
        if layer_of(n) is not None and layer_of(n) not in trained:
            assert torch.equal(final[n], initial[n])
        elif not n.endswith(".lora_A"):
            assert not torch.equal(final[n], initial[n])


def test_runs_on_the_flower_apps_like_the_simulator_bitwise(tmp_path):
    cfg = config()
    assert_flower_equals_simulator(cfg, tmp_path)


def test_kill_9_and_restart_is_bitwise_identical(tmp_path):
    cfg = config(rounds=4, eval_every=2)
    assert_kill_9_resumes_bitwise(cfg, tmp_path)


# ---------------------------------------------------------------- memory
@pytest.mark.parametrize("family,held", [("bert", (1, 4)), ("llama", (0, 2, 5))])
def test_memory_estimate_of_a_sub_model_within_ten_percent_of_the_meter(family, held):
    """The meter sees what the device holds: the embeddings, the held layers and the head."""
    L, B, T = 6, 8, 32
    bb = tiny_backbone(family, num_layers=L, hidden=64)
    data = tiny_dataset(2 * B, T, seed=1).map(lambda row: {"attention_mask": [1] * T})
    cfg = RunConfig.from_dict({"method": "fedra", "train": {"batch_size": B}})
    method = get_method("fedra")(cfg, L, family)
    method.prepare(bb)
    absent = {id(p) for i in range(L) if i not in held for p in bb.layers[i].parameters()}
    head = {id(p) for p in bb.head_parameters().values()}
    device = [t for t in [*bb.model.parameters(), *bb.model.buffers()] if id(t) not in absent | head]
    with MemoryMeter(None, {"frozen_weights": device, "trainable": list(bb.head_parameters().values())}) as meter:
        method.client_update(bb, data, replace(method.widest_plan(), training=held), seed=0)
    measured = meter.report().peak_bytes
    estimate = method.peak_bytes(bb.config, len(held), batch_size=B, seq_len=T, bottleneck=64, optimizer="sgd",
                                 dtype="float32").total
    print(f"FedRA {family} {len(held)} of {L} layers: estimate / meter = {estimate / measured:.3f}")
    assert abs(estimate / measured - 1) <= 0.10
