"""Chain engine: adapters (Eq. 1), DLCT schedule, GPO (Eq. 2), FOAT (Eq. 3-4), local training."""

import math

import numpy as np
import pytest
import torch

from chainfed_core import foat, schedule
from chainfed_core.config import AdapterConfig, ChainConfig, ModelConfig, RunConfig, TrainConfig
from chainfed_core.gpo import gpo_loss
from chainfed_core.layer_store import save_layer_store
from chainfed_core.tiny import tiny_backbone, tiny_batch, tiny_dataset
from chainfed_core.methods import plan_for
from chainfed_core.streaming import load_streamed
from chainfed_core.train import get_state, named_tensors, train_local

FAMILIES = ["bert", "distilbert", "roberta", "mpnet", "llama"]


def _hf_logits(bb, batch):
    return bb.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


# ---------------------------------------------------------------- adapters
@pytest.mark.parametrize("family", FAMILIES)
def test_zero_initialised_adapters_change_no_output(family):
    bb = tiny_backbone(family, num_layers=3)
    batch = tiny_batch()
    with torch.no_grad():
        before = _hf_logits(bb, batch)
        bb.add_adapters(AdapterConfig(bottleneck=8))
        after_hf = _hf_logits(bb, batch)
        after_ours = bb.forward(batch)
    assert (after_hf - before).abs().max() <= 1e-6
    assert (after_ours - before).abs().max() <= 1e-6


@pytest.mark.parametrize("family", FAMILIES)
def test_layer_runner_sees_trained_adapters_like_the_hf_forward(family):
    bb = tiny_backbone(family, num_layers=3)
    bb.add_adapters(AdapterConfig(bottleneck=8))
    with torch.no_grad():
        for p in bb.adapters.parameters():
            p.normal_(0, 0.1)
        batch = tiny_batch()
        assert (bb.forward(batch) - _hf_logits(bb, batch)).abs().max() <= 1e-5
        # the adapters now matter: outputs differ from the bare model's
        bare = tiny_backbone(family, num_layers=3)
        assert (bb.forward(batch) - bare.forward(batch)).abs().max() > 1e-4


@pytest.mark.parametrize("family", ["bert", "distilbert", "roberta", "mpnet"])
def test_mean_pooling_reads_the_masked_mean_of_token_states(family):
    bb = tiny_backbone(family, num_layers=2, pooling="mean")
    batch = tiny_batch()
    with torch.no_grad():
        hidden, ctx = bb.embed(batch)
        hidden = bb.run_layers(range(bb.num_layers), hidden, ctx)
        logits = bb.logits(hidden, ctx)
        # the padded positions do not count: scrambling them changes nothing
        noisy = hidden.clone()
        noisy[batch["attention_mask"] == 0] = 1e3
        assert (bb.logits(noisy, ctx) - logits).abs().max() <= 1e-5
        # and every real token does
        moved = hidden.clone()
        moved[:, 1] += 1.0
        assert (bb.logits(moved, ctx) - logits).abs().max() > 1e-4
    heads = {k.split(".")[1] for k in bb.head_parameters()}
    assert "bert" not in heads            # BERT's [CLS] pooler is neither trained nor sent
    with pytest.raises(ValueError, match="pooling"):
        tiny_backbone("llama", num_layers=1, pooling="mean")


def test_auto_pooling_follows_the_sentence_transformers_pooling_config(tmp_path):
    from chainfed_core.backbone import resolve_pooling
    assert resolve_pooling("auto", tmp_path) == "cls"
    (tmp_path / "1_Pooling").mkdir()
    config = tmp_path / "1_Pooling" / "config.json"
    config.write_text('{"pooling_mode_cls_token": false, "pooling_mode_mean_tokens": true}')
    assert resolve_pooling("auto", tmp_path) == "mean"
    assert resolve_pooling("cls", tmp_path) == "cls"
    config.write_text('{"pooling_mode_cls_token": true, "pooling_mode_mean_tokens": false}')
    assert resolve_pooling("auto", tmp_path) == "cls"
    config.write_text("{not json")
    with pytest.raises(ValueError, match="pooling.*config.json"):
        resolve_pooling("auto", tmp_path)
    with pytest.raises(ValueError, match="pooling"):
        ModelConfig(pooling="max")


@pytest.mark.parametrize("family", FAMILIES)
def test_lookup_by_name_finds_the_same_tensors_as_the_full_walk(family):
    from chainfed_core.train import tensors_by_name
    bb = tiny_backbone(family, num_layers=3)
    bb.add_adapters(AdapterConfig(bottleneck=4), indices=[0, 2])
    every = named_tensors(bb)
    found = tensors_by_name(bb, list(every))
    assert list(found) == list(every) and all(found[n] is every[n] for n in every)
    for bad in ["adapters.1.down.weight", "layers.9.x", "head.nothing", "bias"]:
        with pytest.raises(KeyError, match="unknown tensors"):
            tensors_by_name(bb, [bad])


def test_adapter_state_is_limited_to_chosen_layers():
    from chainfed_core.train import adapter_names, set_state

    bb = tiny_backbone("bert", num_layers=4)
    bb.add_adapters(AdapterConfig(bottleneck=4))
    state = get_state(bb, adapter_names(bb, [1, 2]))
    assert sorted({k.split(".")[1] for k in state}) == ["1", "2"]
    assert all(k.startswith("adapters.") and isinstance(v, torch.Tensor) for k, v in state.items())
    set_state(bb, {k: torch.ones_like(v) for k, v in state.items()})
    assert torch.equal(bb.adapter(1).up.weight, torch.ones_like(bb.adapter(1).up.weight))
    assert torch.equal(bb.adapter(0).up.weight, torch.zeros_like(bb.adapter(0).up.weight))
    with pytest.raises(KeyError, match="unknown tensors"):
        set_state(bb, {"adapters.9.up.weight": torch.zeros(1)})


# ---------------------------------------------------------------- schedule (DLCT)
def test_schedule_matches_paper_figure5_example():
    # L=6, W=2: stage 1 co-tunes adapters 1,2; stage 2 adapters 2,3; ... stage 5 adapters 5,6.
    got = [list(schedule.stage_at(r, 6, 0, 2, 1).training) for r in range(5)]
    assert got == [[0, 1], [1, 2], [2, 3], [3, 4], [4, 5]]
    s = schedule.stage_at(2, 6, 0, 2, 1)
    assert list(s.frozen) == [0, 1] and list(s.idle) == [4, 5] and not s.is_last
    assert schedule.stage_at(4, 6, 0, 2, 1).is_last
    assert schedule.total_rounds(6, 0, 2, 1) == 5


def test_schedule_passes_wrap_around_to_the_start_layer():
    per_pass = schedule.stages_per_pass(6, 2, 2)       # windows [2,3] [3,4] [4,5]
    assert per_pass == 3
    got = [(s.pass_index, list(s.training), s.new_pass)
           for s in (schedule.stage_at(r, 6, 2, 2, 2) for r in range(6))]
    assert got == [(0, [2, 3], True), (0, [3, 4], False), (0, [4, 5], False),
                   (1, [2, 3], True), (1, [3, 4], False), (1, [4, 5], False)]
    # past the end the last stage repeats
    assert list(schedule.stage_at(10, 6, 2, 2, 2).training) == [4, 5]


def test_cycling_goes_on_past_the_passes_from_the_start_layer():
    # chain.cycle: round 10 of windows [2,3] [3,4] [4,5] is the fourth pass's second window
    s = schedule.stage_at(10, 6, 2, 2, 2, cycle=True)
    assert (s.pass_index, list(s.training), list(s.frozen)) == (3, [3, 4], [0, 1, 2])
    assert [schedule.stage_at(r, 6, 2, 2, 2, cycle=True).new_pass for r in range(6, 10)] == [True, False, False, True]
    # within the passes the two agree
    assert all(schedule.stage_at(r, 6, 2, 2, 2, cycle=True) == schedule.stage_at(r, 6, 2, 2, 2) for r in range(6))


def test_window_one_is_the_plain_chain_and_overlap_is_w_minus_one():
    assert [list(schedule.stage_at(r, 4, 0, 1, 1).training) for r in range(4)] == [[0], [1], [2], [3]]
    for r in range(3):
        a, b = (set(schedule.stage_at(r + k, 6, 0, 3, 1).training) for k in (0, 1))
        assert len(a & b) == 2


@pytest.mark.parametrize("args", [(6, 0, 0, 1), (6, 0, 7, 1), (6, 6, 2, 1), (6, 0, 2, 0)])
def test_schedule_rejects_bad_arguments(args):
    with pytest.raises(ValueError):
        schedule.stage_at(0, *args)


# ---------------------------------------------------------------- FOAT
def _direct_cka(x, y):
    k, l = x @ x.T, y @ y.T
    return float(foat.hsic(k, l) / torch.sqrt(foat.hsic(k, k) * foat.hsic(l, l)))


def test_linear_cka_properties():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 16, generator=g, dtype=torch.float64)
    y = x @ torch.randn(16, 12, generator=g, dtype=torch.float64) + 0.5 * torch.randn(40, 12, generator=g, dtype=torch.float64)
    assert foat.linear_cka(x, x) == pytest.approx(1.0, abs=1e-12)
    q, _ = torch.linalg.qr(torch.randn(12, 12, generator=g, dtype=torch.float64))
    base = foat.linear_cka(x, y)
    assert foat.linear_cka(x, y @ q) == pytest.approx(base, abs=1e-10)        # orthogonal transform
    assert foat.linear_cka(x, 3.7 * y) == pytest.approx(base, abs=1e-10)      # isotropic scaling
    assert base == pytest.approx(_direct_cka(x, y), abs=1e-6)                 # equals the HSIC form
    assert 0.0 < base < 1.0


def test_linear_cka_rejects_mismatched_inputs():
    with pytest.raises(ValueError, match="equal n"):
        foat.linear_cka(torch.randn(5, 3), torch.randn(6, 3))


def test_start_layer_rule_on_handmade_scores():
    scores = [0.99, 0.95, 0.91, 0.85, 0.7, 0.5]
    assert foat.start_layer(scores, 0.9) == 3
    assert foat.start_layer(scores, 0.8) == 4
    assert foat.start_layer(scores, 1.0) == 0          # w/o FOAT: every layer
    assert foat.start_layer([0.99, 0.98], 0.5) == 1    # none below tau: last layer alone
    with pytest.raises(ValueError, match="tau"):
        foat.start_layer(scores, 0.0)


def test_score_aggregation_is_weighted_by_sample_counts():
    agg = foat.aggregate_scores([[1.0, 0.5], [0.0, 0.5]], [3, 1])
    np.testing.assert_allclose(agg, [0.75, 0.5])


def test_profile_client_scores_each_layer_against_the_embeddings():
    bb = tiny_backbone("bert", num_layers=4)
    batch = tiny_batch(6, 10)
    with torch.no_grad():                       # the HF forward's own hidden states: embeddings, then each layer
        states = bb.model.bert(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                               output_hidden_states=True).hidden_states
    tokens = [foat.token_matrix(h, batch["attention_mask"]) for h in states]
    expected = [foat.linear_cka(tokens[0], t) for t in tokens[1:]]
    assert foat.profile_client(bb, batch) == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("prefetch", [True, False])
@pytest.mark.parametrize("block_size", [1, 2, 3, 4])
def test_streamed_profile_holds_one_block_at_a_time_and_scores_exactly(block_size, prefetch, tmp_path):
    L = 4
    bb = tiny_backbone("bert", num_layers=L)
    batch = tiny_batch(6, 10)
    save_layer_store(bb, tmp_path)
    sb = load_streamed(tmp_path, prefetch=prefetch)
    held, ensure = [], sb.streamer.ensure

    def ensure_and_record(index):               # layers resident or being read after each use
        ensure(index)
        held.append({k for k in sb.streamer.resident | set(sb.streamer.pending) if k.startswith("layer.")})

    sb.streamer.ensure = ensure_and_record
    scores = foat.profile_client(sb, batch, block_size)
    assert scores == foat.profile_client(bb, batch)                   # the all-resident profile, exactly
    blocks = [{f"layer.{i}" for i in range(b, min(b + block_size, L))} for b in range(0, L, block_size)]
    assert all(any(layers <= block for block in blocks) for layers in held)
    assert max(len(layers) for layers in held) == block_size
    assert sb.streamer.resident == {"head", "rest"}                   # the last block was evicted too


# ---------------------------------------------------------------- GPO
def _window_setup(lam):
    bb = tiny_backbone("bert", num_layers=6)
    bb.add_adapters(AdapterConfig(bottleneck=8))
    with torch.no_grad():                       # non-trivial later adapters
        for i in range(3, 6):
            bb.adapter(i).up.weight.normal_(0, 0.2)
    batch = tiny_batch()
    plan = plan_for("chainfed", 6, schedule.stage_at(1, 6, 0, 2, 1), lam=lam)
    return bb, batch, plan


def _window_grads(bb, batch, plan, use_global: bool):
    params = [p for i in plan.training for p in bb.adapter(i).parameters()]
    for p in params:
        p.requires_grad_(True)
        p.grad = None
    hidden, ctx = bb.embed(batch)
    hidden = bb.run_layers(plan.frozen, hidden, ctx)
    hidden = bb.run_layers(plan.training, hidden, ctx)
    out = gpo_loss(bb, hidden, batch, ctx, list(plan.idle), plan.lam)
    (out.total if use_global else (1 - plan.lam) * out.local).backward()
    return [p.grad.clone() for p in params], out


def test_gpo_lambda_zero_gives_no_gradient_from_the_global_branch():
    bb, batch, plan = _window_setup(lam=0.0)
    with_branch, out = _window_grads(bb, batch, plan, use_global=True)
    local_only, _ = _window_grads(bb, batch, plan, use_global=False)
    assert out.global_ is not None
    for a, b in zip(with_branch, local_only):
        assert torch.equal(a, b)


def test_gpo_global_branch_changes_the_gradient_and_uses_the_mix():
    bb, batch, plan = _window_setup(lam=0.5)
    mixed, out = _window_grads(bb, batch, plan, use_global=True)
    local_only, _ = _window_grads(bb, batch, plan, use_global=False)
    assert any((a - b).abs().max() > 1e-8 for a, b in zip(mixed, local_only))
    total, local, global_ = (float(t.detach()) for t in (out.total, out.local, out.global_))
    assert total == pytest.approx(0.5 * local + 0.5 * global_, rel=1e-6)


def test_gpo_last_stage_uses_the_end_to_end_loss_alone():
    bb = tiny_backbone("bert", num_layers=4)
    bb.add_adapters(AdapterConfig(bottleneck=8))
    batch = tiny_batch()
    hidden, ctx = bb.embed(batch)
    hidden = bb.run_layers(range(4), hidden, ctx)
    out = gpo_loss(bb, hidden, batch, ctx, [], lam=0.2)
    assert out.global_ is None and torch.equal(out.total, out.local)


# ---------------------------------------------------------------- local training
@pytest.mark.parametrize("family", ["bert", "llama"])
def test_training_step_changes_only_the_window_and_head(family):
    bb = tiny_backbone(family, num_layers=6)
    bb.add_adapters(AdapterConfig(bottleneck=8))
    plan = plan_for("chainfed", 6, schedule.stage_at(2, 6, 0, 2, 1), lam=0.2)   # window [2, 3]
    before = {n: p.detach().clone() for n, p in named_tensors(bb).items()}
    embeddings_before = {n: p.detach().clone() for n, p in bb.model.named_parameters()}
    grads = {}
    hooks = [p.register_hook(lambda g, n=n: grads.__setitem__(n, g)) for n, p in named_tensors(bb).items()]
    train_local(bb, tiny_dataset(8), plan, TrainConfig(lr=0.1, batch_size=4, local_steps=2))
    for h in hooks:
        h.remove()
    changed = {n for n, p in named_tensors(bb).items() if not torch.equal(p, before[n])}
    expected = {n for n in before if n.startswith(("adapters.2.", "adapters.3.", "head."))}
    # up-projections start at zero, so after two steps every window tensor has moved
    assert changed == expected
    assert all(n in expected for n in grads)          # frozen and idle tensors received no gradient
    for n, p in bb.model.named_parameters():
        if "chainfed_adapters" not in n and not any(h in n for h in ("classifier", "pooler")):
            assert torch.equal(p, embeddings_before[n]), n


def test_layers_after_the_window_are_never_called():
    bb = tiny_backbone("bert", num_layers=6)
    bb.add_adapters(AdapterConfig(bottleneck=8))
    calls = []
    for i, layer in enumerate(bb.layers):
        layer.register_forward_pre_hook(lambda _m, _a, i=i: calls.append(i))
    plan = plan_for("chainfed", 6, schedule.stage_at(1, 6, 0, 2, 1), lam=0.2)  # window [1, 2]
    train_local(bb, tiny_dataset(8), plan, TrainConfig(batch_size=4, local_steps=2))
    assert set(calls) == {0, 1, 2}


def test_frozen_prefix_runs_without_autograd():
    bb = tiny_backbone("bert", num_layers=4)
    bb.add_adapters(AdapterConfig(bottleneck=8))
    seen = {}
    for i, layer in enumerate(bb.layers):
        layer.register_forward_hook(lambda _m, _a, out, i=i: seen.__setitem__(i, torch.is_grad_enabled()))
    plan = plan_for("chainfed", 4, schedule.stage_at(2, 4, 0, 1, 1), lam=0.2)   # window [2]
    train_local(bb, tiny_dataset(4), plan, TrainConfig(batch_size=4, local_steps=1))
    assert seen == {0: False, 1: False, 2: True}


def test_local_training_is_deterministic_and_reduces_loss():
    def run():
        bb = tiny_backbone("bert", num_layers=4, seed=3)
        bb.add_adapters(AdapterConfig(bottleneck=8))
        plan = plan_for("full_adapters", 4)
        return train_local(bb, tiny_dataset(32, seed=1), plan,
                           TrainConfig(lr=0.1, batch_size=8, local_epochs=5), seed=7)
    a, b = run(), run()
    assert a.history == b.history
    assert all(torch.equal(a.state[k], b.state[k]) for k in a.state)
    assert np.mean(a.history[-4:]) < np.mean(a.history[:4])


def test_method_plans():
    assert plan_for("linear_probe", 4).training == range(4, 4)
    assert plan_for("no_ft", 4).trains_anything is False
    assert plan_for("fft", 4).train_base
    with pytest.raises(ValueError, match="method"):
        plan_for("fedsgd", 4)


# ---------------------------------------------------------------- bad configurations
@pytest.mark.parametrize("data, field", [
    ({"chain": {"window": 0}}, "window"),
    ({"chain": {"gpo_lambda": 1.5}}, "gpo_lambda"),
    ({"chain": {"gpo_lambda": -0.1}}, "gpo_lambda"),
    ({"chain": {"foat_tau": 0.0}}, "foat_tau"),
    ({"chain": {"foat_tau": 1.2}}, "foat_tau"),
    ({"model": {"family": "bloom"}}, "family"),
    ({"method": "fedprox"}, "method"),
    ({"chain": {"windw": 2}}, "windw"),
    ({"train": {"lr": "fast"}}, "lr"),
])
def test_bad_configurations_name_the_field(data, field):
    with pytest.raises(ValueError, match=field):
        RunConfig.from_dict(data)


def test_depth_dependent_checks_name_the_field():
    with pytest.raises(ValueError, match="window"):
        ChainConfig(window=7).validate_for(6)
    with pytest.raises(ValueError, match="start_layer"):
        ChainConfig(start_layer=6).validate_for(6)


def test_family_defaults_for_lambda_and_tau():
    c = ChainConfig()
    assert (c.resolved_lambda("bert"), c.resolved_tau("bert")) == (0.1, 0.9)
    assert (c.resolved_lambda("llama"), c.resolved_tau("llama")) == (0.2, 0.8)
    assert RunConfig.from_dict({"chain": {"window": 3}}).chain.window == 3
    assert RunConfig.from_dict(RunConfig().to_dict()) == RunConfig()
