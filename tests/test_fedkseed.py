"""FedKSeed: seeds, the bitwise replay, the counted bytes, the server's pool, Pro's probabilities,
the simulator, the Flower apps, resume after kill -9 and the memory estimate."""

import numpy as np
import pytest
import torch

from chainfed_core import experiments as ex
from chainfed_core.aggregation import state_bytes
from chainfed_core.checkpoint import load_final_state
from chainfed_core.config import RunConfig
from chainfed_core.federated import run
from chainfed_core.memory_meter import MemoryMeter
from chainfed_core.methods import get_method
from chainfed_core.methods.fedkseed import (POOL, PROBABILITIES, SCALARS, FedKSeedOptions, candidate_seeds,
                                            noise, perturb, replay_walk, seed_order,
                                            seed_probabilities, zo_step)
from chainfed_core.seeding import client_seed
from chainfed_core.task import build_task
from chainfed_core.tiny import tiny_backbone, tiny_dataset
from chainfed_core.train import tensors_by_name

from runtime_checks import assert_flower_equals_simulator, assert_kill_9_resumes_bitwise

K, TAU = 64, 8


def config(pro: bool = False, **fed) -> RunConfig:
    return RunConfig.from_dict({
        "method": "fedkseed", "seed": 4, "model": {"name": "tiny-bert"},
        "method_options": {"num_seeds": K, "local_steps": TAU, "probability_differentiated": pro},
        "data": {"dataset": "synthetic", "num_clients": 3, "max_train_examples": 60, "max_test_examples": 16},
        "fed": {"rounds": 3, "clients_per_round": 2, "eval_every": 1, "memory_aware": False, **fed}})


def party(cfg: RunConfig):
    """A fresh backbone and method instance, as the server or a Flower node builds them."""
    task = build_task(cfg)
    backbone = task.make_backbone()
    method = get_method("fedkseed")(cfg, backbone.num_layers, backbone.family)
    return task, backbone, method, method.initial_state(backbone)


def weights(backbone) -> dict:
    return {n: p.detach().clone() for n, p in backbone.model.named_parameters()}


# ---------------------------------------------------------------- configs
@pytest.mark.parametrize("options,message", [
    ({"num_seeds": 0}, r"FedKSeedOptions.num_seeds: must be >= 1"),
    ({"local_steps": 0}, r"FedKSeedOptions.local_steps: must be >= 1"),
    ({"num_seeds": 4, "local_steps": 5}, r"FedKSeedOptions.local_steps: τ=5 exceeds num_seeds K=4"),
    ({"eps": 0.0}, r"FedKSeedOptions.eps: must be > 0"),
    ({"lr": -1e-3}, r"FedKSeedOptions.lr: must be > 0"),
    ({"seeds": 4}, r"FedKSeedOptions: unknown key\(s\) \['seeds'\]"),
])
def test_bad_configs_fail_at_construction_naming_the_field(options, message):
    with pytest.raises(ValueError, match=message):
        RunConfig.from_dict({"method": "fedkseed", "method_options": options})


def test_weight_decay_is_refused_because_replay_would_not_be_exact():
    cfg = RunConfig.from_dict({"method": "fedkseed", "train": {"weight_decay": 0.01}})
    with pytest.raises(ValueError, match="TrainConfig.weight_decay: FedKSeed replays seeds"):
        get_method("fedkseed")(cfg, 4, "bert")


def test_grid_lists_fedkseed_and_pro():
    assert ex.variant("FedKSeed").overrides == {}
    assert ex.variant("FedKSeed-Pro").overrides == {"method_options": {"probability_differentiated": True}}
    assert FedKSeedOptions().num_seeds == 1024 and FedKSeedOptions().eps == 5e-4


# ---------------------------------------------------------------- pure parts
def test_candidate_seeds_and_seed_order_are_pure_and_distinct():
    seeds = candidate_seeds(3, 100)
    assert np.array_equal(seeds, candidate_seeds(3, 100)) and not np.array_equal(seeds, candidate_seeds(4, 100))
    assert seeds.dtype == np.int64 and seeds.min() >= 1 and seeds.max() < 10 ** 11
    order = seed_order(7, 100, 30)
    assert order == seed_order(7, 100, 30) and len(set(order)) == 30 and max(order) < 100
    p = torch.zeros(100)
    p[[5, 9, 11]] = 1 / 3                          # only three seeds can be drawn
    assert sorted(seed_order(7, 100, 3, p)) == [5, 9, 11]


def test_pro_probabilities_are_the_softmax_of_the_minmax_mean():
    abs_sum, count = np.array([0.0, 3.0, 8.0, 0.0]), np.array([0.0, 1.0, 3.0, 0.0])
    mean = np.array([0.0, 1.5, 2.0, 0.0])          # histories [0], [0, 3], [0, ., ., .] summing to 8, [0]
    x = mean / 2.0
    expected = np.exp(x) / np.exp(x).sum()
    np.testing.assert_allclose(seed_probabilities(abs_sum, count), expected, rtol=1e-6)
    assert seed_probabilities(np.zeros(4), np.zeros(4)).tolist() == [0.25] * 4      # no history: uniform


def test_perturbations_regenerate_the_same_z_per_seed():
    a, b = [torch.zeros(3, 4), torch.zeros(5)], [torch.zeros(3, 4), torch.zeros(5)]
    perturb(a, 11, 1.0)
    perturb(b, 11, 2.0)
    assert all(torch.equal(2 * x, y) for x, y in zip(a, b))
    gen = torch.Generator().manual_seed(11)
    assert torch.equal(a[0], torch.randn(3, 4, generator=gen)) and torch.equal(a[1], torch.randn(5, generator=gen))


def test_a_step_holding_z_is_bitwise_the_step_regenerating_it():
    """zo_step draws z once for its four updates; regenerating z for each (the original's way,
    perturb without z) gives the same parameters bit for bit."""
    torch.manual_seed(0)
    start = [torch.randn(30, 7), torch.randn(50)]
    held, regenerated = [t.clone() for t in start], [t.clone() for t in start]
    g, _ = zo_step(held, 5, 1e-2, 1e-3, loss=lambda: float(held[0].sum() + held[1].pow(2).sum()))
    lean = [t.clone() for t in start]
    g_lean, _ = zo_step(lean, 5, 1e-2, 1e-3, loss=lambda: float(lean[0].sum() + lean[1].pow(2).sum()), hold=False)
    for scale in (1e-2, -2e-2, 1e-2, -1e-3 * g):
        perturb(regenerated, 5, scale)
    assert g != 0 and g == g_lean
    assert all(torch.equal(a, b) and torch.equal(a, c) for a, b, c in zip(held, regenerated, lean))
    assert all(torch.equal(a, b) for a, b in zip(noise(start, 5), noise(start, 5)))


# ---------------------------------------------------------------- the replay, bit for bit
def test_replaying_the_seed_scalars_rebuilds_a_clients_model_bitwise_and_upload_is_the_counted_bytes():
    cfg = config()
    task, backbone, method, _ = party(cfg)
    theta0 = weights(backbone)
    pool = torch.zeros(K)
    pool[[3, 17, 40]] = torch.tensor([0.5, -1.25, 2.0])          # a global model other than θ0
    method.load_state(backbone, {POOL: pool})
    seed = client_seed(cfg.seed, 0, 1)
    res = method.client_update(backbone, task.train.select(range(20)), method.widest_plan(), seed=seed)
    trained = weights(backbone)
    assert list(res.state) == [SCALARS] and res.steps == TAU
    assert state_bytes(res.state) == 4 * TAU <= 4 * K                # one float32 per used seed

    _, other, replayer, _ = party(cfg)                               # another party, from θ0
    replayer.load_state(other, {POOL: pool})
    params = list(tensors_by_name(other, replayer.tuned_names(other)).values())
    used = [int(replayer.seeds[i]) for i in seed_order(seed, K, TAU)]
    replay_walk(params, used, res.state[SCALARS].tolist(), 5e-4, replayer.options.lr)
    rebuilt = weights(other)
    assert trained.keys() == rebuilt.keys() and all(torch.equal(trained[n], rebuilt[n]) for n in trained)
    tuned = [n for n in trained if ".layer." in n or n.startswith(("bert.pooler", "classifier"))]
    assert all(not torch.equal(trained[n], theta0[n]) for n in tuned)
    assert all(torch.equal(trained[n], theta0[n]) for n in trained if "embeddings" in n)   # frozen


def test_every_party_rebuilds_the_same_global_model_from_the_pool():
    cfg = config()
    _, a, ma, _ = party(cfg)
    _, b, mb, _ = party(cfg)
    theta0 = weights(a)
    pool = torch.zeros(K)
    pool[[0, 9, 63]] = torch.tensor([1.0, -2.0, 0.25])
    ma.load_state(a, {POOL: pool})
    mb.load_state(b, {POOL: torch.zeros(K)})
    assert all(torch.equal(p, theta0[n]) for n, p in b.model.named_parameters())       # G = 0 is θ0
    mb.load_state(b, {POOL: pool})
    wa, wb = weights(a), weights(b)
    assert all(torch.equal(wa[n], wb[n]) for n in wa)
    name = "bert.encoder.layer.2.output.dense.weight"                   # θ0 − η Σ G_s z_s, summed otherwise
    z = {}
    for s in (0, 9, 63):
        zs = [torch.zeros_like(p) for p in tensors_by_name(a, ma.tuned_names(a)).values()]
        perturb(zs, int(ma.seeds[s]), 1.0)
        z[s] = dict(zip(ma.tuned_names(a), zs))["layers.2.output.dense.weight"]
    expected = theta0[name] - ma.options.lr * (1.0 * z[0] - 2.0 * z[9] + 0.25 * z[63])
    torch.testing.assert_close(wa[name], expected, rtol=0, atol=1e-6)


def test_the_server_adds_weighted_scalars_at_each_clients_seeds():
    cfg = config(pro=True)
    method = get_method("fedkseed")(cfg, 4, "bert")
    g = {0: torch.arange(1.0, TAU + 1), 2: -torch.ones(TAU)}
    used = {c: method.client_seeds(1, c) for c in g}                  # by the round's p: uniform so far
    assert used[0] == seed_order(client_seed(cfg.seed, 1, 0), K, TAU, torch.full((K,), 1 / K))
    out = method.aggregate([({SCALARS: g[0]}, 30), ({SCALARS: g[2]}, 10)], round_index=1, clients=[0, 2])
    expected, abs_sum, count = np.zeros(K), np.zeros(K), np.zeros(K)
    for c, w in ((0, 0.75), (2, 0.25)):
        np.add.at(expected, used[c], w * g[c].numpy())
        np.add.at(abs_sum, used[c], g[c].abs().numpy())
        np.add.at(count, used[c], 1)
    assert torch.equal(out[POOL], torch.from_numpy(expected.astype(np.float32)))
    assert torch.equal(out[PROBABILITIES], torch.from_numpy(seed_probabilities(abs_sum, count)))
    assert method.client_seeds(1, 0) != used[0]                        # the next draws follow the new p


# ---------------------------------------------------------------- runtimes
def test_runs_in_the_simulator_and_only_the_scalars_travel(tmp_path):
    record = run(config(pro=True, rounds=2), tmp_path, progress=False)
    last_sync = {}
    for m in record["history"]:
        assert m["bytes_up"] == 4 * TAU * len(m["trained"])
        stale = [c for c in m["clients"] if m["round"] > 0 and last_sync.get(c, 0) <= m["round"] - 1]
        assert m["bytes_down"] == 0 and m["bytes_down_context"] == 2 * 4 * K * len(stale)   # G and p, when changed
        last_sync.update({c: m["round"] for c in m["clients"]})
        assert np.isfinite(m["test_loss"])
    final = load_final_state(tmp_path)
    assert sorted(final) == [POOL, PROBABILITIES]
    assert 0 < int((final[POOL] != 0).sum()) <= 2 * 2 * TAU
    assert not torch.equal(final[PROBABILITIES], torch.full((K,), 1 / K))


def test_runs_on_the_flower_apps_like_the_simulator_bitwise(tmp_path):
    cfg = config(pro=True, rounds=2)
    assert_flower_equals_simulator(cfg, tmp_path)


def test_kill_9_and_restart_is_bitwise_identical(tmp_path):
    """The run is a forked copy of this process (no second start-up of torch), killed with
    SIGKILL after two rounds; the restart resumes from its checkpoint."""
    cfg = config(rounds=4, eval_every=2)
    assert_kill_9_resumes_bitwise(cfg, tmp_path)


# ---------------------------------------------------------------- memory
@pytest.mark.parametrize("family", ["bert", "llama", "gemma3"])       # gemma3: model_type gemma3_text
def test_memory_estimate_within_ten_percent_of_the_meter(family):
    L, B, T = 6, 8, 32
    bb = tiny_backbone(family, num_layers=L, hidden=64)
    data = tiny_dataset(2 * B, T, seed=1).map(lambda r: {"attention_mask": [1] * T})
    cfg = RunConfig.from_dict({"method": "fedkseed", "train": {"batch_size": B},        # a device's lean path
                               "method_options": {"num_seeds": 16, "local_steps": 2, "hold_noise": False}})
    method = get_method("fedkseed")(cfg, L, family)
    method.initial_state(bb)
    method.load_state(bb, {POOL: torch.zeros(16)})                    # the rebuild's copies: outside the step
    with MemoryMeter(bb) as meter:
        res = method.client_update(bb, data, method.widest_plan(), seed=0)
    report = meter.report()
    assert res.steps == 2 and report.breakdown["gradients"] == report.breakdown["optimizer_state"] == 0
    estimate = method.peak_bytes(bb.config, 1, batch_size=B, seq_len=T, bottleneck=64, optimizer="sgd",
                                 dtype="float32")
    assert estimate.gradients == estimate.optimizer_state == 0
    assert abs(estimate.total / report.peak_bytes - 1) <= 0.10
