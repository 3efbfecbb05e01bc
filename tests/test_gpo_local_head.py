"""GPO's local head (``chain.local_head``): "shared", the model's head as before, or "stage", a
head of the stage's own that only the local loss trains and that travels with the window."""

import pytest
import torch

from chainfed_core import schedule
from chainfed_core.config import AdapterConfig, ChainConfig, RunConfig, TrainConfig
from chainfed_core.federated import run
from chainfed_core.checkpoint import load_final_state
from chainfed_core.gpo import add_stage_head, gpo_loss, stage_head_names, stage_head_parameters
from chainfed_core.methods import get_method, plan_for
from chainfed_core.task import build_task
from chainfed_core.tiny import tiny_backbone, tiny_batch, tiny_dataset
from chainfed_core.train import tensors_by_name, train_local, trainable_names

from runtime_checks import assert_flower_equals_simulator, assert_kill_9_resumes_bitwise, without_timing


def _config(rounds=5, **chain) -> RunConfig:
    return RunConfig.from_dict({
        "method": "chainfed", "seed": 3, "model": {"name": "tiny-bert"}, "adapter": {"bottleneck": 4},
        "chain": {"window": 2, "start_layer": 1, "passes": 2, **chain},
        "data": {"dataset": "synthetic", "num_clients": 10, "max_train_examples": 120, "max_test_examples": 32},
        "fed": {"rounds": rounds, "clients_per_round": 3, "eval_every": 2, "memory_aware": False}})


def _window(lam, stage: bool, family="bert"):
    """A 6-layer model with non-trivial adapters (the identity passes no gradient to a down
    projection), window [1, 2], batch and plan."""
    bb = tiny_backbone(family, num_layers=6)
    bb.add_adapters(AdapterConfig(bottleneck=8))
    with torch.no_grad():
        for i in range(6):
            bb.adapter(i).up.weight.normal_(0, 0.2)
    if stage:
        add_stage_head(bb, AdapterConfig(bottleneck=8))      # a causal LM's lens; an encoder's copies its head
    return bb, tiny_batch(), plan_for("chainfed", 6, schedule.stage_at(1, 6, 0, 2, 1), lam=lam)


def _grads(bb, batch, plan, branch: str) -> dict[str, torch.Tensor | None]:
    """Gradients of every plan tensor from the local branch, the global branch or the total."""
    tensors = tensors_by_name(bb, trainable_names(bb, plan))
    for p in tensors.values():
        p.requires_grad_(True)
        p.grad = None
    hidden, ctx = bb.embed(batch)
    hidden = bb.run_layers(plan.training, bb.run_layers(plan.frozen, hidden, ctx), ctx)
    out = gpo_loss(bb, hidden, batch, ctx, list(plan.idle), plan.lam)
    {"local": out.local, "global": out.global_, "total": out.total}[branch].backward()
    return {n: None if p.grad is None or not p.grad.any() else p.grad.clone() for n, p in tensors.items()}


# ---------------------------------------------------------------- the option
def test_bad_value_fails_at_construction_naming_the_field():
    with pytest.raises(ValueError, match=r"^ChainConfig.local_head: 'own' is not one of \['shared', 'stage'\]"):
        ChainConfig(local_head="own")
    with pytest.raises(ValueError, match=r"^ChainConfig.local_head"):
        RunConfig.from_dict({"chain": {"local_head": 1}})


def test_shared_is_the_default_and_leaves_config_hashes_alone():
    assert "local_head" not in RunConfig().to_dict()["chain"]             # configs written before it
    assert RunConfig.from_dict({"chain": {"local_head": "shared"}}) == RunConfig()
    assert RunConfig.from_dict({"chain": {"local_head": "stage"}}).to_dict()["chain"]["local_head"] == "stage"


def test_a_causal_lms_stage_head_is_a_lens_before_its_frozen_head(one_thread):
    with pytest.raises(ValueError, match="a causal LM's stage head is a lens"):
        add_stage_head(tiny_backbone("llama", num_layers=2))
    bb, batch, plan = _window(0.5, stage=True, family="llama")
    stage = set(stage_head_names(bb, plan))
    assert stage == set(stage_head_parameters(bb)) and all(n.startswith("stage_head.lens.") for n in stage)
    hidden, ctx = bb.embed(batch)
    hidden = bb.run_layers(range(0, 3), hidden, ctx)
    out = gpo_loss(bb, hidden, batch, ctx, list(plan.idle), plan.lam)
    assert torch.equal(out.local, bb.head_loss(hidden, batch, ctx)[0])      # the lens starts as the identity
    local, global_ = _grads(bb, batch, plan, "local"), _grads(bb, batch, plan, "global")
    assert local["stage_head.lens.up.weight"] is not None and global_["stage_head.lens.up.weight"] is None
    assert all(v is None for n, v in local.items() if n.startswith("head."))  # the LM head stays frozen


# ---------------------------------------------------------------- the loss
def test_shared_local_loss_is_the_model_heads_as_before():
    bb, batch, plan = _window(0.3, stage=False)
    hidden, ctx = bb.embed(batch)
    hidden = bb.run_layers(range(0, 3), hidden, ctx)
    out = gpo_loss(bb, hidden, batch, ctx, list(plan.idle), plan.lam)
    local, _ = bb.head_loss(hidden, batch, ctx)
    assert torch.equal(out.local, local)
    assert torch.equal(out.total, 0.7 * local + 0.3 * out.global_)
    assert stage_head_names(bb, plan) == []


@pytest.mark.parametrize("family", ["bert", "distilbert", "roberta"])
def test_stage_local_loss_trains_the_stage_head_and_window_the_global_loss_never_the_stage_head(family, one_thread):
    bb, batch, plan = _window(0.5, stage=True, family=family)
    stage = set(stage_head_names(bb, plan))
    window = {n for n in trainable_names(bb, plan) if n.startswith("adapters.")}
    assert stage == set(stage_head_parameters(bb)) and stage
    local = _grads(bb, batch, plan, "local")
    assert all(local[n] is not None for n in window | stage)             # reaches the window and the stage head
    assert all(local[n] is None for n in local if n.startswith("head."))   # not the model's head
    global_ = _grads(bb, batch, plan, "global")
    assert all(global_[n] is None for n in stage)                       # never the stage head
    assert all(global_[n] is not None for n in window)


def test_stage_head_and_model_head_start_equal_and_the_modules_are_put_back():
    bb, batch, plan = _window(0.5, stage=True)
    heads = [bb.model.bert.pooler, bb.model.classifier]
    hidden, ctx = bb.embed(batch)
    hidden = bb.run_layers(range(3), hidden, ctx)
    with torch.no_grad():
        out = gpo_loss(bb, hidden, batch, ctx, [], plan.lam)
        shared_local, _ = bb.head_loss(hidden, batch, ctx)
        staged = gpo_loss(bb, hidden, batch, ctx, list(plan.idle), plan.lam)
    assert torch.equal(out.local, shared_local) and torch.equal(staged.local, shared_local)   # a copy, at first
    assert [bb.model.bert.pooler, bb.model.classifier] == heads


def test_stage_head_trains_only_where_a_later_layer_and_a_local_weight_exist():
    bb = _window(0.2, stage=True)[0]
    last = plan_for("chainfed", 6, schedule.stage_at(4, 6, 0, 2, 1), lam=0.2)        # window [4, 5]
    assert stage_head_names(bb, last) == []
    assert stage_head_names(bb, plan_for("chainfed", 6, schedule.stage_at(1, 6, 0, 2, 1), lam=1.0)) == []
    assert stage_head_names(bb, plan_for("chainfed", 6, schedule.stage_at(1, 6, 0, 2, 1), lam=0.0))


def test_local_training_with_stage_at_lambda_zero_moves_the_stage_head_not_the_model_head(one_thread):
    bb, _, plan = _window(0.0, stage=True)
    before = {n: p.detach().clone() for n, p in {**bb.head_parameters(), **stage_head_parameters(bb)}.items()}
    result = train_local(bb, tiny_dataset(8), plan, TrainConfig(lr=0.1, batch_size=4, local_steps=2))
    assert set(stage_head_parameters(bb)) <= set(result.state)             # it travels back
    for n, p in {**bb.head_parameters(), **stage_head_parameters(bb)}.items():
        assert torch.equal(p, before[n]) == n.startswith("head."), n


# ---------------------------------------------------------------- federated
def test_shared_runs_bitwise_as_a_run_without_the_option(tmp_path, one_thread):
    plain = run(_config(), tmp_path / "plain", progress=False)
    shared = run(_config(local_head="shared"), tmp_path / "shared", progress=False)
    assert without_timing(plain["history"]) == without_timing(shared["history"])
    a, b = load_final_state(tmp_path / "plain"), load_final_state(tmp_path / "shared")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not any(k.startswith("stage_head.") for k in a)


def test_stage_head_is_exchanged_averaged_and_kept_by_window_position(tmp_path, one_thread):
    shared = run(_config(gpo_lambda=0.0), tmp_path / "shared", progress=False)
    stage = run(_config(gpo_lambda=0.0, local_head="stage"), tmp_path / "stage", progress=False)
    bb = build_task(_config()).make_backbone()
    head_bytes = 4 * sum(p.numel() for p in bb.head_parameters().values())
    for s, t in zip(shared["history"], stage["history"]):
        extra = head_bytes if t["window"][1] < 4 else 0                 # a later layer: the stage head travels
        assert t["bytes_down"] - s["bytes_down"] == extra * len(t["trained"])
        assert t["bytes_up"] - s["bytes_up"] == extra * len(t["trained"])
        assert t["bytes_down_context"] == s["bytes_down_context"]        # never part of the global state
    assert without_timing(shared["history"]) != without_timing(stage["history"])    # λ = 0 differs
    assert not any(k.startswith("stage_head.") for k in load_final_state(tmp_path / "stage"))


def test_at_lambda_one_the_readings_are_the_same_run(tmp_path, one_thread):
    shared = run(_config(rounds=3, gpo_lambda=1.0), tmp_path / "shared", progress=False)
    stage = run(_config(rounds=3, gpo_lambda=1.0, local_head="stage"), tmp_path / "stage", progress=False)
    assert without_timing(shared["history"]) == without_timing(stage["history"])


def test_server_averages_the_stage_head_and_reuses_it_on_the_next_pass():
    from chainfed_core.server import Server
    import numpy as np
    cfg = _config(local_head="stage")
    bb = tiny_backbone("bert", num_layers=4)
    method = get_method("chainfed")(cfg, 4, "bert")
    method.prepare(bb)
    server = Server(cfg, bb, np.full(10, 12.0), seq_len=16)
    server.state["start_layer"] = 1
    plan = server.plan(0)                                              # window [1, 3), layer 2's head
    window, _ = server.downlink(0, 0, plan)
    names = [n for n in window if n.startswith("stage_head.")]
    assert names == list(stage_head_parameters(bb))
    updates = [({n: window[n] + k for n in window}, 10 * k) for k in (1, 2)]
    avg = server.aggregate(0, updates, [0, 1])
    assert not any(n.startswith("stage_head.") for n in avg)
    kept = server.method.state["stage_heads"][2]
    assert all(torch.allclose(kept[n], window[n] + 5 / 3) for n in names)    # weighted by examples
    again, _ = server.downlink(2, 1, server.plan(2))                     # pass 2, same position
    assert all(torch.equal(again[n], kept[n]) for n in names)
    other, _ = server.downlink(1, 2, server.plan(1))                     # the last window: no stage head
    assert not any(n.startswith("stage_head.") for n in other)


def test_stage_runs_resume_bitwise_and_flower_equals_the_simulator(tmp_path, one_thread):
    cfg = _config(rounds=4, local_head="stage")
    assert_kill_9_resumes_bitwise(cfg, tmp_path / "kill", after_rounds=2)
    assert_flower_equals_simulator(cfg, tmp_path / "flower")
