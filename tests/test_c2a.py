"""C2A: the hypernetwork's parts, clients' different adapters from one hypernetwork, what travels,
the memory estimate against the meter, bad configs, the simulator, Flower and kill -9."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from chainfed_core import experiments as ex
from chainfed_core.checkpoint import load_final_state
from chainfed_core.config import RunConfig
from chainfed_core.federated import run
from chainfed_core.memory_meter import MemoryMeter
from chainfed_core.methods import c2a, get_method
from chainfed_core.methods.c2a import (MODULE, adapt, context_summary, generate, generator_weights, hypernetwork,
                                       hypernetwork_size, label_histogram, token)
from chainfed_core.population import device_capacity_gb
from chainfed_core.task import build_task, seq_len
from chainfed_core.tiny import tiny_backbone, tiny_dataset
from chainfed_core.train import get_state

from runtime_checks import assert_flower_equals_simulator, assert_kill_9_resumes_bitwise


pytestmark = pytest.mark.usefixtures("one_thread")


def c2a_config(rounds: int = 2, model: str = "tiny-bert", **fed) -> RunConfig:
    return RunConfig.from_dict({
        "method": "c2a", "seed": 6, "model": {"name": model}, "adapter": {"bottleneck": 4},
        "train": {"optimizer": "adamw", "lr": 1e-2},
        "data": {"dataset": "synthetic", "num_clients": 3, "max_train_examples": 60, "max_test_examples": 16},
        "fed": {"rounds": rounds, "clients_per_round": 2, "eval_every": 1, "memory_aware": False,
                "memory_scale": 1e12, **fed}})       # unconstrained: every device holds the model


def prepared(family: str = "bert", rank: int = 4, hidden: int = 32, num_layers: int = 4, **train):
    bb = tiny_backbone(family, num_layers=num_layers, hidden=hidden, seed=0)
    cfg = RunConfig.from_dict({"method": "c2a", "adapter": {"bottleneck": rank}, "train": train})
    method = get_method("c2a")(cfg, bb.num_layers, bb.family)
    method.prepare(bb)
    return bb, method


def labelled(n: int, label: int, seed: int = 0):
    """A tiny dataset whose examples all carry ``label``."""
    return tiny_dataset(n, seed=seed).map(lambda row: {"label": label})


# ---------------------------------------------------------------------- the parts
def test_label_histogram_and_context_are_exact():
    assert torch.equal(label_histogram(torch.tensor([2, 0, 2, 2]), 4), torch.tensor([0.25, 0.0, 0.75, 0.0]))
    h = torch.tensor([[[3.0, 0.0], [1.0, 0.0]], [[0.0, 1.0], [0.0, 3.0]]])        # (B=2, T=2, H=2)
    assert torch.allclose(context_summary(h), torch.tensor([0.5, 0.5]))             # mean of [1, 0] and [0, 1]


def test_weights_are_generated_as_the_formula_says():
    """W = rownormalize(reshape(H_low @ H_high + b, (d, H r))); θ = e·W; W_up and W_down tied views."""
    bb, _ = prepared("bert", rank=4, hidden=32)
    hyper = hypernetwork(bb)
    with torch.no_grad():
        hyper["up_bias"].weight.normal_(generator=torch.Generator().manual_seed(1))
        hyper["down_bias"].weight.normal_(generator=torch.Generator().manual_seed(2))
        d, r, H = 8, 4, 32
        product = hyper["low"].weight @ hyper["high"].weight.T + hyper["high"].bias      # (d r, H)
        rows = product.reshape(d, r * H)
        assert torch.allclose(generator_weights(hyper), rows / rows.norm(dim=1, keepdim=True))
        h = torch.randn(2, 5, H, generator=torch.Generator().manual_seed(3))
        ctx = F.normalize(h.mean(1), dim=-1).mean(0)
        p = torch.full((3,), 1 / 3)
        e = hyper["label"](p) + hyper["layer"].weight[2] + hyper["context"](ctx)
        assert torch.allclose(token(hyper, 2, ctx), e)
        theta = e @ generator_weights(hyper)
        expected = h + F.gelu(h @ theta.view(H, r) + hyper["up_bias"].weight[2]) @ theta.view(r, H) \
            + hyper["down_bias"].weight[2]
        assert torch.allclose(adapt(hyper, 2, h), expected, atol=1e-6)
    assert sum(p.numel() for p in hyper.parameters()) == hypernetwork_size(32, 4, 3, 4)
    assert hypernetwork_size(768, 6, 10, 16) == 40_432     # distilbert's shape, XGLUE-NC's ten classes


def test_two_label_distributions_get_two_adapters_from_one_hypernetwork(monkeypatch):
    bb, method = prepared("bert")
    hyper = hypernetwork(bb)
    ctx = torch.randn(32, generator=torch.Generator().manual_seed(0))
    adapters = []
    with torch.no_grad():
        for label in (0, 2):                     # client A holds only class 0, client B only class 2
            hyper.label_distribution = label_histogram(torch.full((8,), label), 3)
            adapters.append(generate(hyper, 1, ctx))
        hyper.label_distribution = None
        uniform = generate(hyper, 1, ctx)
        hyper.label_distribution = torch.full((3,), 1 / 3)
        assert torch.equal(generate(hyper, 1, ctx), uniform)      # evaluation: a uniform p
    hyper.label_distribution = None
    assert adapters[0].shape == (32 * 4,) and not torch.allclose(adapters[0], adapters[1])
    # in training each client's batches condition its adapters; the uniform p is back after
    seen = []
    monkeypatch.setattr(c2a, "label_histogram", lambda labels, k: seen.append(label_histogram(labels, k)) or seen[-1])
    for client, label in ((0, 0), (1, 2)):
        method.client_update(bb, labelled(8, label, seed=client), method.widest_plan(), seed=client)
        assert hyper.label_distribution is None
    assert torch.equal(seen[0], torch.tensor([1.0, 0, 0])) and torch.equal(seen[1], torch.tensor([0, 0, 1.0]))


@pytest.mark.parametrize("family", ["bert", "mpnet", "roberta", "llama"])
def test_only_the_hypernetwork_and_head_train_and_travel(family):
    bb, method = prepared(family)
    before = {n: p.detach().clone() for n, p in bb.model.named_parameters()}
    result = method.client_update(bb, tiny_dataset(16), method.widest_plan(), seed=0)
    sent = list(result.state)
    hyper_names = [f"modules.{MODULE}.{n}" for n, _ in hypernetwork(bb).named_parameters()]
    head_names = list(bb.head_parameters())
    assert sent == hyper_names + head_names == method.exchanged_names(bb)
    assert (head_names == []) == (family == "llama")          # a causal LM's head is frozen
    changed = {n for n, p in bb.model.named_parameters() if not torch.equal(p, before[n])}
    hyper_params = {f"chainfed_modules.{MODULE}.{n}" for n, _ in hypernetwork(bb).named_parameters()}
    head_params = {n for n, p in bb.model.named_parameters() if any(p is q for q in bb.head_parameters().values())}
    assert changed and changed <= hyper_params | head_params      # the backbone is frozen
    assert hypernetwork(bb).label_distribution is None and np.isfinite(result.loss)


# ---------------------------------------------------------------------- configs, grid
@pytest.mark.parametrize("options,message", [
    ({"con_dim": 0}, r"C2AOptions.con_dim: must be >= 1"),
    ({"task_dim": 0}, r"C2AOptions.task_dim: must be >= 1"),
    ({"task_dim": "eight"}, r"C2AOptions.task_dim: expected int"),
    ({"rank": 16}, r"C2AOptions: unknown key\(s\) \['rank'\]"),
])
def test_bad_configs_fail_at_construction_naming_the_field(options, message):
    with pytest.raises(ValueError, match=message):
        RunConfig.from_dict({"method": "c2a", "method_options": options})


def test_the_variant_carries_the_original_settings_into_the_grid():
    v = ex.variant("C2A")
    assert v.method == "c2a" and "C2A" not in ex.missing_baselines()
    (run_,) = ex.grid("quick", ["C2A"], partitions=["dirichlet"])
    assert run_.config.adapter.bottleneck == 16 and run_.config.train.optimizer == "adamw"
    assert run_.config.train.lr == 2e-3 and run_.config.method_options == {}
    assert get_method("c2a").Options().con_dim == 32 and get_method("c2a").Options().task_dim == 8


# ---------------------------------------------------------------------- memory
@pytest.mark.parametrize("family,hidden,rank,batch,optimizer", [
    ("bert", 64, 16, 8, "adamw"), ("distilbert", 64, 8, 8, "sgd"), ("mpnet", 48, 16, 4, "adamw"),
    ("llama", 64, 16, 8, "adamw")])
def test_memory_estimate_within_ten_percent_of_the_meter(family, hidden, rank, batch, optimizer):
    T = 24
    bb, method = prepared(family, rank=rank, hidden=hidden, num_layers=6, batch_size=batch, optimizer=optimizer,
                          lr=1e-3)
    data = tiny_dataset(2 * batch, T, seed=1).map(lambda row: {"attention_mask": [1] * T})
    with MemoryMeter(bb) as meter:
        method.client_update(bb, data, method.widest_plan(), seed=0)
    report = meter.report()
    estimate = method.peak_bytes(bb.config, 1, batch_size=batch, seq_len=T, bottleneck=rank, optimizer=optimizer,
                                 dtype="float32")
    hyper_bytes = 4 * sum(p.numel() for p in hypernetwork(bb).parameters())
    assert estimate.trainable == report.breakdown["trainable"] == hyper_bytes + 4 * sum(
        p.numel() for p in bb.head_parameters().values())
    everything = 4 * sum(p.numel() for p in bb.model.parameters()) + 4 * sum(b.numel() for b in bb.model.buffers())
    assert estimate.frozen_weights + estimate.trainable >= everything - 1024       # the whole model is held
    print(f"{family} H={hidden} r={rank} B={batch} {optimizer}: estimate / meter = "
          f"{estimate.total / report.peak_bytes:.3f}")
    assert abs(estimate.total / report.peak_bytes - 1) <= 0.10


# ---------------------------------------------------------------------- federated
def test_bytes_and_training_in_the_simulator(tmp_path):
    cfg = c2a_config(rounds=2)
    record = run(cfg, tmp_path, progress=False)
    hidden, labels, layers, r = 32, 3, 4, 4
    floats = hypernetwork_size(hidden, layers, labels, r) + hidden * hidden + hidden + hidden * labels + labels
    for m in record["history"]:          # the hypernetwork and the head (bert.pooler + classifier), each way
        assert m["bytes_up"] == 4 * floats * len(m["trained"])
        assert m["bytes_down"] == 4 * floats * len(m["clients"]) and m["bytes_down_context"] == 0
    final = load_final_state(tmp_path)
    assert sorted({k.split(".")[0] for k in final}) == ["head", "modules"]
    initial = get_state(build_task(cfg).make_backbone(), final)
    assert all(not torch.equal(final[k], initial[k]) for k in final)
    assert np.isfinite(record["history"][-1]["test_accuracy"])


def test_memory_aware_selection_keeps_the_devices_that_hold_the_model(tmp_path):
    """With 7 GB-equivalent for C2A's peak, only the 8 and 12 GB devices of the paper's profile take part."""
    base = c2a_config(rounds=1).to_dict()
    data = {**base["data"], "num_clients": 20, "max_train_examples": 200}
    task = build_task(RunConfig.from_dict(base))
    need = get_method("c2a").peak_bytes(task.make_backbone().config, 1, batch_size=8, seq_len=seq_len(task.train),
                                        bottleneck=4, optimizer="adamw", dtype="float32").total
    cfg = RunConfig.from_dict({**base, "data": data, "fed": {**base["fed"], "memory_aware": True,
                                                            "memory_scale": need / 7, "memory_profile": "paper"}})
    record = run(cfg, tmp_path, progress=False)
    caps = device_capacity_gb(cfg.seed, np.arange(20), "paper")
    assert record["need_gb"] == pytest.approx(7.0)
    assert record["eligible_clients"] == int((caps >= 8).sum()) < 20
    assert all(caps[c] >= 8 for c in record["history"][0]["clients"])


def test_a_llama_run_sends_only_the_hypernetwork(tmp_path):
    record = run(c2a_config(rounds=1, model="tiny-llama"), tmp_path, progress=False)
    floats = hypernetwork_size(32, 4, 0, 4)
    assert record["history"][0]["bytes_up"] == 4 * floats * 2
    assert set(load_final_state(tmp_path)) == {f"modules.{MODULE}.{n}" for n in
                                               ("layer.weight", "context.weight", "context.bias", "low.weight",
                                                "high.weight", "high.bias", "up_bias.weight", "down_bias.weight")}


def test_c2a_on_the_flower_apps_equals_the_simulator_bitwise(tmp_path):
    cfg = c2a_config(rounds=2)
    assert_flower_equals_simulator(cfg, tmp_path)


def test_kill_9_and_restart_is_bitwise_identical(tmp_path):
    """A forked copy of this process (no second start-up of torch), killed with SIGKILL after two
    rounds; the restart resumes from its checkpoint (AdamW's moments restart each round: local)."""
    cfg = c2a_config(rounds=4)
    assert_kill_9_resumes_bitwise(cfg, tmp_path)
