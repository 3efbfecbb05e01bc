"""FwdLLM: forward gradients without backpropagation, perturbation sampling, variance-controlled
pacing and FedSGD; its memory estimate against the meter; the simulator, Flower and kill -9."""

import math
from pathlib import Path

import pytest
import torch

from chainfed_core import experiments as ex
from chainfed_core.checkpoint import CHECKPOINT_FILE, load_final_state, read_checkpoint
from chainfed_core.config import RunConfig
from chainfed_core.federated import run
from chainfed_core.memory_meter import MemoryMeter
from chainfed_core.methods import get_method
from chainfed_core.methods.fwdllm import (REFERENCE, UNMEASURED, VARIANCE, central_difference, half_variance,
                                          local_steps, lr_at, pooled_variance, sample_perturbation)
from chainfed_core.task import build_task
from chainfed_core.tiny import tiny_backbone, tiny_batch, tiny_config, tiny_dataset
from chainfed_core.train import get_state, tensors_by_name, trainable_names

from runtime_checks import assert_flower_equals_simulator, assert_kill_9_resumes_bitwise

ROOT = Path(__file__).resolve().parent.parent


pytestmark = pytest.mark.usefixtures("one_thread")


def fwd_config(rounds: int = 3, **options) -> dict:
    return {"method": "fwdllm", "method_options": {"lr": 0.5, **options}, "seed": 2,
            "model": {"name": "tiny-bert"}, "adapter": {"bottleneck": 4},
            "data": {"dataset": "synthetic", "num_clients": 3, "max_train_examples": 60, "max_test_examples": 16},
            "fed": {"rounds": rounds, "clients_per_round": 2, "eval_every": 1, "memory_aware": False}}


def method_for(cfg: RunConfig, bb):
    method = get_method("fwdllm")(cfg, bb.num_layers, bb.family)
    method.prepare(bb)
    method.load_state(bb, method.initial_state(bb))
    return method


# ---------------------------------------------------------------------- the parts
def test_schedule_variance_and_steps_are_exact():
    assert [lr_at(t, 10, 0.01, 0.2) for t in (0, 1, 2, 6, 9)] == [0.005, 0.01, 0.01, 0.005, 0.00125]
    assert lr_at(0, 10, 0.01, 0.0) == 0.01 and lr_at(10, 10, 0.01, 0.0) == 0.0
    first, second = [torch.tensor([2.0, 0.0])], [torch.tensor([0.0, 4.0])]
    assert half_variance(first, 2, second, 2) == ((1 - 0) ** 2 / 2 + (0 - 2) ** 2 / 2) / 2
    assert math.isnan(half_variance(first, 0, second, 1))
    assert pooled_variance([0.4, 0.2], [1.0, 3.0]) == (1 * 0.4 + 9 * 0.2) / 16
    assert pooled_variance([0.4, math.nan], [2.0, 5.0]) == 0.4
    assert math.isnan(pooled_variance([math.nan], [3.0]))
    assert pooled_variance([0.4, UNMEASURED], [2.0, 5.0]) == 0.4
    assert local_steps(20, 8, 2, None) == 6 and local_steps(20, 8, 2, 4) == 4


def test_sampling_keeps_the_candidate_most_aligned_with_the_reference():
    params = [torch.zeros(3, 5), torch.zeros(7)]
    reference = [torch.randn(3, 5, generator=torch.Generator().manual_seed(1)), torch.ones(7)]
    v = sample_perturbation(params, reference, 10, torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(0)
    for p, ref, got in zip(params, reference, v):
        pool = torch.randn((10, p.numel()), generator=g)
        cos = torch.cosine_similarity(pool, ref.reshape(1, -1), dim=1)
        assert torch.equal(got.reshape(-1), pool[cos.argmax()]) and cos.max() > cos.median()
    plain = sample_perturbation(params, None, 10, torch.Generator().manual_seed(0))
    assert [t.shape for t in plain] == [p.shape for p in params]


def test_the_mean_of_many_forward_gradients_approaches_the_true_gradient():
    """One layer, d = 141 adapter and head elements: the mean of N = 1500 central-difference
    forward gradients has cosine > 0.9 with the backprop gradient (expected about
    1 / sqrt(1 + d / N) = 0.96)."""
    bb = tiny_backbone("bert", num_layers=1, hidden=8, seed=0)
    cfg = RunConfig.from_dict({**fwd_config(), "adapter": {"bottleneck": 2}})
    method = method_for(cfg, bb)
    names = trainable_names(bb, method.widest_plan())
    params = list(tensors_by_name(bb, names).values())
    with torch.no_grad():                       # adapters away from their zero initialisation
        for p in params:
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.3)
    batch = tiny_batch(4, 8)

    def loss():
        hidden, ctx = bb.embed(batch)
        return bb.head_loss(bb.run_layers(range(bb.num_layers), hidden, ctx), batch, ctx)

    for p in params:
        p.requires_grad_(True)
    true = torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss()[0], params)])
    for p in params:
        p.requires_grad_(False)
    assert true.numel() == 141
    n, total, origin = 1500, torch.zeros_like(true), [p.clone() for p in params]
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _ in range(n):
            v = sample_perturbation(params, None, 1, generator)
            _, jvp, _ = central_difference(loss, params, v, 0.01, origin)
            total += jvp * torch.cat([t.reshape(-1) for t in v])
    assert all(torch.equal(p, o) for p, o in zip(params, origin))      # θ restored bit for bit
    assert torch.cosine_similarity(total / n, true, dim=0) > 0.9


def test_no_backward_pass_ever_runs_on_a_client(monkeypatch):
    bb = tiny_backbone("bert", seed=0)
    cfg = RunConfig.from_dict(fwd_config())
    method = method_for(cfg, bb)
    method.reference.normal_(generator=torch.Generator().manual_seed(3))     # sampling on, too
    backward_calls = []
    for module in bb.model.modules():
        module.register_full_backward_hook(lambda *args: backward_calls.append(args))

    def refuse(*args, **kwargs):
        raise AssertionError("a backward pass ran")
    monkeypatch.setattr(torch.autograd, "backward", refuse)
    monkeypatch.setattr(torch.autograd, "grad", refuse)
    before = get_state(bb, method.exchanged_names(bb))
    result = method.client_update(bb, tiny_dataset(20), method.widest_plan(), seed=5)
    names = trainable_names(bb, method.widest_plan())
    assert not backward_calls and all(p.grad is None for p in bb.model.parameters())
    assert list(result.state) == names + [VARIANCE] and result.steps == 3 and math.isfinite(result.loss)
    assert math.isfinite(float(result.state[VARIANCE]))
    assert all(torch.equal(a, b) for a, b in zip(before.values(), get_state(bb, before).values()))
    assert any(bool(result.state[n].any()) for n in names)


def test_a_client_with_one_batch_is_averaged_not_rejected():
    """One forward gradient has no two halves to compare: its variance is UNMEASURED (finite),
    so validation lets its gradient into the average and the pacing ignores the scalar."""
    from chainfed_core.validation import update_problem

    bb = tiny_backbone("bert", seed=0)
    method = method_for(RunConfig.from_dict(fwd_config()), bb)
    result = method.client_update(bb, tiny_dataset(5), method.widest_plan(), seed=5)
    window = get_state(bb, trainable_names(bb, method.widest_plan()))
    assert result.steps == 1 and float(result.state[VARIANCE]) == UNMEASURED
    assert update_problem(result.state, window, result.num_examples, same_names=False) is None


# ---------------------------------------------------------------------- configs, grid
def test_bad_configs_fail_at_construction_naming_the_field():
    for options, message in [({"h": 0}, r"FwdLLMOptions.h: must be > 0"),
                             ({"candidates": 0}, r"FwdLLMOptions.candidates: must be >= 1"),
                             ({"warmup_ratio": 1.0}, r"FwdLLMOptions.warmup_ratio: must be in \[0, 1\)"),
                             ({"var_threshold": -1.0}, r"FwdLLMOptions.var_threshold: must be > 0"),
                             ({"lr": "big"}, r"FwdLLMOptions.lr: expected float"),
                             ({"pertubations": 3}, r"FwdLLMOptions: unknown key\(s\) \['pertubations'\]")]:
        with pytest.raises(ValueError, match=message):
            RunConfig.from_dict({**fwd_config(), "method_options": options})
    cfg = RunConfig.from_dict({**fwd_config(), "method_options": {"check_layer": 4}})
    with pytest.raises(ValueError, match=r"FwdLLMOptions.check_layer: 4 is past the last layer \(3\)"):
        get_method("fwdllm")(cfg, 4, "bert")
    assert get_method("fwdllm")(RunConfig.from_dict({"method": "fwdllm"}), 6, "distilbert").threshold == 0.1
    assert ex.variant("FwdLLM") == ex.Variant("FwdLLM", "fwdllm", {}) and "FwdLLM" not in ex.missing_baselines()


# ---------------------------------------------------------------------- memory
@pytest.mark.parametrize("family,hidden,bottleneck,batch", [("bert", 32, 4, 8), ("distilbert", 64, 8, 4),
                                                            ("roberta", 48, 16, 8)])
def test_memory_estimate_matches_the_meter(family, hidden, bottleneck, batch):
    bb = tiny_backbone(family, hidden=hidden, seed=0)
    cfg = RunConfig.from_dict({**fwd_config(), "adapter": {"bottleneck": bottleneck},
                               "train": {"batch_size": batch}})
    method = method_for(cfg, bb)
    method.reference.normal_(generator=torch.Generator().manual_seed(3))
    data = tiny_dataset(2 * batch, seq_len=12)
    with MemoryMeter(bb, {"gradients": [method.reference]}) as meter:
        method.client_update(bb, data, method.widest_plan(), seed=1)
    measured = meter.report().peak_bytes
    estimate = get_method("fwdllm").peak_bytes(tiny_config(family, hidden=hidden), 1, batch_size=batch,
                                               seq_len=12, bottleneck=bottleneck, optimizer="sgd",
                                               dtype="float32").total
    print(f"{family} H={hidden} r={bottleneck} B={batch}: estimate / meter = {estimate / measured:.3f}")
    assert abs(estimate / measured - 1) < 0.10


# ---------------------------------------------------------------------- federated
def test_fedsgd_step_and_bytes_in_the_simulator(tmp_path):
    """Without pacing, each round applies θ - η_t * mean gradient; a client sends |θ| + 1 floats."""
    cfg = RunConfig.from_dict(fwd_config(rounds=2, max_deferred=0))
    record = run(cfg, tmp_path, progress=False)
    hidden, r, labels = 32, 4, 3
    theta = 4 * (2 * hidden * r + hidden + r) + hidden * hidden + hidden + hidden * labels + labels
    for m in record["history"]:
        assert m["bytes_up"] == 4 * (theta + 1) * len(m["trained"])
        assert m["bytes_down"] == 4 * theta * len(m["clients"])
    assert record["history"][0]["bytes_down_context"] == 0             # no reference before round 0
    assert record["history"][1]["bytes_down_context"] == 4 * theta * 2
    final = load_final_state(tmp_path)
    model = [k for k in final if k != REFERENCE]
    initial = get_state(build_task(cfg).make_backbone(), model)
    assert all(not torch.equal(final[k], initial[k]) for k in model) and final[REFERENCE].any()
    assert read_checkpoint(tmp_path / CHECKPOINT_FILE)["method"]["pending"] is None


def test_pacing_defers_then_applies_everything_cached(tmp_path):
    cfg = RunConfig.from_dict(fwd_config(rounds=3, var_threshold=1e-12, max_deferred=1))
    run(cfg, tmp_path, progress=False)
    saved = read_checkpoint(tmp_path / CHECKPOINT_FILE)["method"]
    assert saved["deferred_rounds"] == [0, 2] and saved["pending"]["deferred"] == 1
    assert len(saved["pending"]["weights"]) == 2 and len(saved["variance"]) == 3


def test_fwdllm_on_the_flower_apps_equals_the_simulator_bitwise(tmp_path):
    cfg = RunConfig.from_dict(fwd_config(rounds=3, var_threshold=1e-12, max_deferred=1))
    assert_flower_equals_simulator(cfg, tmp_path)


def test_kill_9_and_restart_is_bitwise_identical(tmp_path):
    """Killed while the server holds cached gradients (rounds 0 and 2 defer)."""
    cfg = RunConfig.from_dict(fwd_config(rounds=5, var_threshold=1e-12, max_deferred=1))
    out, ref = assert_kill_9_resumes_bitwise(cfg, tmp_path, after_rounds=1)
    mine, theirs = (read_checkpoint(d / CHECKPOINT_FILE)["method"] for d in (out, ref))
    assert mine["deferred_rounds"] == theirs["deferred_rounds"] == [0, 2, 4]
    assert mine["variance"] == theirs["variance"] and torch.equal(mine["pending"]["sum"], theirs["pending"]["sum"])
