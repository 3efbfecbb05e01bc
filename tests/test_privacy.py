"""Client-level DP (chainfed_core.privacy): clipping, the noise on the average, the accountant's
epsilon in the record, the bitwise no-op at z = 0 and C = infinity, Flower equal to the
simulator, and bad input refused before training."""

import math

import numpy as np
import pytest
import torch
from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

from chainfed_core import privacy
from chainfed_core.aggregation import fedavg, fedavg_by_tensor
from chainfed_core.checkpoint import load_final_state
from chainfed_core.config import DPConfig, RunConfig
from chainfed_core.experiments import config_hash
from chainfed_core.federated import run

from runtime_checks import assert_flower_equals_simulator, assert_same_state, without_timing

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(dp: dict | None = None, method: str = "chainfed", **fed) -> RunConfig:
    """tests/test_federated.py's tiny ChainFed run; 200 examples over 20 IID clients: 10 each."""
    return RunConfig.from_dict({
        "method": method, "seed": 3, "model": {"name": "tiny-bert"}, "adapter": {"bottleneck": 4},
        "chain": {"window": 2, "start_layer": 1},
        "data": {"dataset": "synthetic", "num_clients": 20, "max_train_examples": 200, "max_test_examples": 32},
        "fed": {"rounds": 3, "clients_per_round": 3, "eval_every": 2, "memory_aware": False, **fed},
        **({"dp": dp} if dp is not None else {})})


def without_dp(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in m.items() if not k.startswith("dp_")} for m in without_timing(history)]


# ---------------------------------------------------------------- the config section
def test_the_section_at_its_default_leaves_the_hash_alone():
    plain = RunConfig()
    assert "dp" not in plain.to_dict()
    assert RunConfig.from_dict(plain.to_dict()).dp == DPConfig()
    private = RunConfig.from_dict({"dp": {"enabled": True, "noise_multiplier": 1.0}})
    assert private.to_dict()["dp"]["noise_multiplier"] == 1.0 and config_hash(private) != config_hash(plain)
    assert RunConfig.from_dict(private.to_dict()) == private


@pytest.mark.parametrize("dp,message", [
    ({"enabled": True, "clip_norm": 0.0, "noise_multiplier": 1.0}, r"DPConfig.clip_norm: must be > 0, got 0.0"),
    ({"enabled": True, "clip_norm": -1.0, "noise_multiplier": 1.0}, r"DPConfig.clip_norm: must be > 0"),
    ({"enabled": True, "noise_multiplier": -0.5}, r"DPConfig.noise_multiplier: must be >= 0, got -0.5"),
    ({"enabled": True}, r"DPConfig.noise_multiplier: give exactly one of noise_multiplier and target_epsilon"),
    ({"enabled": True, "noise_multiplier": 1.0, "target_epsilon": 4.0}, r"give exactly one"),
    ({"enabled": True, "clip_norm": None, "noise_multiplier": 1.0}, r"DPConfig.clip_norm: None \(no clipping\)"),
    ({"enabled": True, "target_epsilon": 0.01}, r"DPConfig.target_epsilon: no noise level reaches epsilon 0.01"),
    ({"enabled": True, "noise_multiplier": 1.0, "delta": 0.0}, r"DPConfig.delta: must be in \(0, 1\)"),
    ({"enabled": True, "noise_multiplier": 1.0, "sampling": "uniform"}, r"DPConfig.sampling: 'uniform' is not one"),
    ({"enabled": True, "noise_multiplier": 1.0, "clipnorm": 1.0}, r"DPConfig: unknown key\(s\) \['clipnorm'\]"),
])
def test_bad_dp_input_is_refused_at_construction(dp, message):
    with pytest.raises(ValueError, match=message):
        tiny(dp)


def test_methods_without_a_clippable_update_and_poisson_with_memory_selection_are_refused():
    with pytest.raises(ValueError, match=r"DPConfig.enabled: client-level DP is not defined for 'fedkseed': "
                                         r"its clients send seed scalars"):
        tiny({"enabled": True, "noise_multiplier": 1.0}, method="fedkseed")
    for method in privacy.UNSUPPORTED:
        with pytest.raises(ValueError, match=f"not defined for '{method}'"):
            tiny({"enabled": True, "noise_multiplier": 1.0}, method=method)
    with pytest.raises(ValueError, match=r"DPConfig.sampling: 'poisson' takes q = K/N"):
        tiny({"enabled": True, "noise_multiplier": 1.0, "sampling": "poisson"}, memory_aware=True)


# ---------------------------------------------------------------- clipping and noise
def test_the_clipped_update_never_exceeds_the_clip_norm():
    g = torch.Generator().manual_seed(0)
    sent = {"a": torch.randn(7, 5, generator=g), "b": torch.randn(11, generator=g)}
    for scale in (1e-3, 0.1, 1.0, 10.0, 1e3):
        for _ in range(50):
            state = {n: t + scale * torch.randn(t.shape, generator=g) for n, t in sent.items()}
            out, norm = privacy.clip(state, sent, 0.5)
            after = math.sqrt(sum(float((out[n].double() - sent[n].double()).pow(2).sum()) for n in sent))
            assert after <= 0.5 * (1 + 1e-6)
            if norm <= 0.5:
                assert out is state                       # within the norm: untouched, bit for bit
            else:
                assert after == pytest.approx(0.5, rel=1e-5)
    same, _ = privacy.clip(state, sent, None)
    assert same is state


def test_the_noise_on_the_average_has_std_z_c_over_m():
    """Zero updates from m clients: the method's average (FedAvg, weight 1 each) is the noise alone."""
    z, c, m = 1.3, 0.7, 4
    cfg = tiny({"enabled": True, "noise_multiplier": z, "clip_norm": c})
    zero = {"w": torch.zeros(40, 25), "b": torch.zeros(10)}
    draws = []
    for r in range(100):                        # 100 rounds x 1010 coordinates
        updates, metrics = privacy.privatize(cfg, r, [(zero, 10)] * m, [zero] * m)
        assert [n for _, n in updates] == [1] * m and metrics["dp_noise_std"] == pytest.approx(z * c / m)
        avg = fedavg(updates)
        draws.append(torch.cat([avg["w"].reshape(-1), avg["b"]]).double())
    draws = torch.stack(draws)
    assert float(draws.std()) == pytest.approx(z * c / m, rel=0.05)
    assert abs(float(draws.mean())) < 0.05 * z * c / m
    again, _ = privacy.privatize(cfg, 7, [(zero, 10)] * m, [zero] * m)          # (seed, round): the same draw
    assert torch.equal(fedavg(again)["w"].double(), draws[7][:1000].view(40, 25))


def test_a_tensor_averaged_over_fewer_clients_gets_the_noise_of_its_own_count():
    """FedRA's layers: each tensor's mean is over the clients that trained it (m_t), its noise z·C/m_t."""
    z, c = 2.0, 1.0
    a, b = {"a": torch.zeros(2000)}, {"b": torch.zeros(2000)}
    states = [dict(a, **b), dict(a, **b), dict(a, **b), dict(a)]           # a: 4 clients, b: 3
    noisy = privacy.add_noise(states, z * c, privacy.noise_generator(0, 0))
    avg = fedavg_by_tensor([(s, 1) for s in noisy])
    assert float(avg["a"].std()) == pytest.approx(z * c / 4, rel=0.05)
    assert float(avg["b"].std()) == pytest.approx(z * c / 3, rel=0.05)


# ---------------------------------------------------------------- accounting
def test_epsilon_matches_an_independent_call_of_the_accountant():
    orders = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)) + [80, 96, 128, 192, 256]
    for q, z, T, delta in [(1.0, 1.0, 10, 1e-5), (0.1, 1.0, 100, 1e-5), (0.25, 0.8, 12, 1e-6)]:
        eps, _ = get_privacy_spent(orders=orders, rdp=compute_rdp(q=q, noise_multiplier=z, steps=T, orders=orders),
                                   delta=delta)
        assert privacy.epsilon(q, z, T, delta) == pytest.approx(float(eps), rel=1e-12)
    assert privacy.epsilon(1.0, 0.0, 5, 1e-5) == math.inf


def test_a_target_epsilon_is_solved_for_before_training():
    cfg = tiny({"enabled": True, "target_epsilon": 4.0, "sampling": "poisson"}, rounds=12)
    z = privacy.noise_multiplier(cfg)
    spent = privacy.epsilon(3 / 20, z, 12, 1e-5)
    assert spent <= 4.0 and spent == pytest.approx(4.0, abs=0.01)
    assert privacy.epsilon(3 / 20, z * 0.98, 12, 1e-5) > spent      # no much smaller noise would do


def test_a_dp_run_records_epsilon_per_round_as_the_accountant_gives_it(tmp_path):
    cfg = tiny({"enabled": True, "noise_multiplier": 1.1, "clip_norm": 0.5, "sampling": "poisson"})
    record = run(cfg, tmp_path, progress=False)
    orders = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)) + [80, 96, 128, 192, 256]
    for m in record["history"]:
        T = m["round"] + 1
        eps, _ = get_privacy_spent(orders=orders, rdp=compute_rdp(q=3 / 20, noise_multiplier=1.1, steps=T,
                                                                  orders=orders), delta=1e-5)
        assert m["dp_epsilon"] == pytest.approx(float(eps), rel=1e-12)
        assert m["dp_sample_rate"] == 3 / 20 and m["dp_noise_std"] == pytest.approx(1.1 * 0.5 / 3)
        assert len(m["dp_update_norms"]) == 3 and m["dp_clipped"] == sum(n > 0.5 for n in m["dp_update_norms"])
    assert record["final"]["dp_epsilon"] == record["history"][-1]["dp_epsilon"]
    row = privacy.tradeoff_row(cfg, record)                   # what the trade-off notebook reads
    d = record["history"][0]["bytes_up"] / 4 / 3
    assert row["epsilon"] == record["final"]["dp_epsilon"] and row["coordinates"] == pytest.approx(d)
    assert row["snr"] == pytest.approx(0.5 / (1.1 * 0.5 / 3 * math.sqrt(d)))
    assert row["clipped"] == pytest.approx(np.mean([m["dp_clipped"] / 3 for m in record["history"]]))
    assert privacy.tradeoff_row(tiny(), record)["epsilon"] == math.inf


def test_the_tradeoff_grid_is_the_experiment_grid_at_each_target():
    runs = privacy.tradeoff_grid("quick", ["ChainFed", "Full Adapters"], [None, 4], clip_norm=0.3, partitions=["iid"])
    assert [(r.variant, r.config.dp.enabled, r.config.dp.target_epsilon) for r in runs] == [
        ("ChainFed", False, None), ("Full Adapters", False, None), ("ChainFed", True, 4.0), ("Full Adapters", True, 4.0)]
    assert "dp" not in runs[0].config.to_dict() and runs[2].config.dp.clip_norm == 0.3


# ---------------------------------------------------------------- runs
def test_z_zero_and_no_clipping_equals_the_non_dp_run_bitwise(tmp_path):
    plain = run(tiny(), tmp_path / "plain", progress=False)
    private = run(tiny({"enabled": True, "clip_norm": None, "noise_multiplier": 0.0}), tmp_path / "dp", progress=False)
    assert_same_state(load_final_state(tmp_path / "plain"), load_final_state(tmp_path / "dp"))
    assert without_dp(private["history"]) == without_timing(plain["history"])
    assert private["final"]["dp_epsilon"] == math.inf and private["final"]["dp_clipped"] == 0


def test_noise_changes_the_run_and_the_same_seed_gives_the_same_noise(tmp_path):
    cfg = tiny({"enabled": True, "noise_multiplier": 0.5, "clip_norm": 0.1})
    run(cfg, tmp_path / "a", progress=False)
    run(cfg, tmp_path / "b", progress=False)
    run(tiny(), tmp_path / "plain", progress=False)
    a, b, plain = (load_final_state(tmp_path / x) for x in ("a", "b", "plain"))
    assert_same_state(a, b)
    assert any(not torch.equal(a[n], plain[n]) for n in a)


def test_a_dp_run_on_the_flower_apps_equals_the_simulator_bitwise(tmp_path):
    sim, _ = assert_flower_equals_simulator(tiny({"enabled": True, "noise_multiplier": 0.8, "clip_norm": 0.2}),
                                            tmp_path)
    assert sim["final"]["dp_noise_multiplier"] == 0.8


def test_signal_to_noise_grows_as_the_square_root_of_fewer_coordinates():
    full, window = privacy.signal_to_noise(1.0, 0.2, 6 * 1000), privacy.signal_to_noise(1.0, 0.2, 2 * 1000)
    assert window / full == pytest.approx(np.sqrt(6 / 2))
