"""FedAdapter: the trial groups and their window, the search's move to the best group, only the
top d layers training at width w, the counted bytes, the memory estimate against the meter,
the simulator, the Flower apps and resume after kill -9."""

import pytest
import torch

from chainfed_core import experiments as ex
from chainfed_core.checkpoint import CHECKPOINT_FILE, load_final_state, read_checkpoint
from chainfed_core.config import RunConfig
from chainfed_core.federated import run
from chainfed_core.memory_meter import MemoryMeter
from chainfed_core.methods import get_method
from chainfed_core.methods.fedadapter import (SCORE, best_group, narrow, original_depth, round_seconds,
                                              trial_configs, widen, window_seconds)
from chainfed_core.tiny import tiny_backbone, tiny_config, tiny_dataset
from chainfed_core.train import get_state

from runtime_checks import assert_flower_equals_simulator, assert_kill_9_resumes_bitwise

HIDDEN, LABELS, L = 32, 3, 4
HEAD = HIDDEN * HIDDEN + HIDDEN + HIDDEN * LABELS + LABELS          # bert.pooler + classifier


pytestmark = pytest.mark.usefixtures("one_thread")


def fa_config(rounds: int = 3, clients_per_round: int = 3, **options) -> RunConfig:
    """Units of 2 in adapters of 4: widths 2 and 4. A depth-1 window (0.5 s) ends after one
    round (0.3 s x 3 steps), a depth-2 one (0.5 x 9 s) after three (0.3 x 2 x 3 s each)."""
    return RunConfig.from_dict({
        "method": "fedadapter", "seed": 3, "model": {"name": "tiny-bert"}, "adapter": {"bottleneck": 4},
        "method_options": {"unit": 2, "width": 2, "time_threshold": 0.5, **options},
        "data": {"dataset": "synthetic", "num_clients": 4, "max_train_examples": 80, "max_test_examples": 16},
        "fed": {"rounds": rounds, "clients_per_round": clients_per_round, "eval_every": 1, "memory_aware": False}})


def method_for(cfg: RunConfig, bb):
    method = get_method("fedadapter")(cfg, bb.num_layers, bb.family)
    method.prepare(bb)
    method.load_state(bb, method.initial_state(bb))
    return method


def adapter_bytes(width: int) -> int:
    return 4 * (2 * HIDDEN * width + HIDDEN + width)


# ---------------------------------------------------------------------- the parts
def test_trial_groups_window_and_cost_model_are_exact():
    assert trial_configs(1, 8, 12, 64, 8) == {"shallow": (1, 8), "deep": (2, 8), "wide": (1, 16)}
    assert trial_configs(12, 64, 12, 64, 8) == {"shallow": (12, 64)}          # capped: no deep, no wide
    assert trial_configs(3, 60, 12, 64, 8) == {"shallow": (3, 60), "deep": (4, 60)}
    assert [original_depth(d) for d in (1, 2, 5)] == [0, 2, 5]
    assert window_seconds(1, 60, 4) == 60 and window_seconds(2, 60, 4) == 540
    assert round_seconds(2, 5, 0.3, 500_000, 1.0) == 0.3 * 2 * 5 + 1.0


def test_the_winner_is_compared_as_a_number_and_ties_keep_the_incumbent():
    assert best_group({"shallow": 9.5, "deep": 10.2}) == "deep"        # as strings, "9.5" > "10.2"
    assert best_group({"shallow": 0.5, "deep": 0.5, "wide": 0.5}) == "shallow"
    assert best_group({"deep": 0.1, "wide": 0.2}) == "wide"


def test_narrow_keeps_the_first_units_and_widen_puts_them_back():
    full = {"adapters.3.down.weight": torch.arange(24.0).reshape(4, 6), "adapters.3.down.bias": torch.arange(4.0),
            "adapters.3.up.weight": torch.arange(24.0).reshape(6, 4), "adapters.3.up.bias": torch.arange(6.0),
            "head.classifier.weight": torch.ones(2, 6)}
    small = {n: narrow(n, t, 2) for n, t in full.items()}
    assert [tuple(t.shape) for t in small.values()] == [(2, 6), (2,), (6, 2), (6,), (2, 6)]
    assert torch.equal(small["adapters.3.up.weight"], full["adapters.3.up.weight"][:, :2])
    back = {n: widen(n, torch.zeros_like(full[n]), t) for n, t in small.items()}
    assert torch.equal(back["adapters.3.down.weight"][:2], full["adapters.3.down.weight"][:2])
    assert not back["adapters.3.down.weight"][2:].any() and not back["adapters.3.up.weight"][:, 2:].any()


# ---------------------------------------------------------------------- configs, grid
@pytest.mark.parametrize("options,message", [
    ({"width": 12}, r"FedAdapterOptions.width: 12 is not a multiple of unit 8"),
    ({"unit": 0}, r"FedAdapterOptions.unit: must be >= 1"),
    ({"time_threshold": 0}, r"FedAdapterOptions.time_threshold: must be > 0"),
    ({"depth": 0}, r"FedAdapterOptions.depth: must be >= 1"),
    ({"widths": 8}, r"FedAdapterOptions: unknown key\(s\) \['widths'\]"),
])
def test_bad_configs_fail_at_construction_naming_the_field(options, message):
    with pytest.raises(ValueError, match=message):
        RunConfig.from_dict({"method": "fedadapter", "method_options": options})


def test_bad_configs_against_the_model_fail_when_the_method_is_built():
    FedAdapter = get_method("fedadapter")
    with pytest.raises(ValueError, match=r"AdapterConfig.bottleneck: FedAdapter's widest adapter \(60\)"):
        FedAdapter(RunConfig.from_dict({"method": "fedadapter", "adapter": {"bottleneck": 60}}), 12, "bert")
    with pytest.raises(ValueError, match=r"FedAdapterOptions.width: 72 exceeds AdapterConfig.bottleneck 64"):
        FedAdapter(RunConfig.from_dict({"method": "fedadapter", "method_options": {"width": 72}}), 12, "bert")
    with pytest.raises(ValueError, match=r"FedAdapterOptions.depth: 5 exceeds the model's 4 layers"):
        FedAdapter(RunConfig.from_dict({"method": "fedadapter", "method_options": {"depth": 5}}), 4, "bert")
    assert ex.variant("FedAdapter") == ex.Variant("FedAdapter", "fedadapter", {})
    assert "FedAdapter" not in ex.missing_baselines()


# ---------------------------------------------------------------------- one client
def test_only_the_top_d_layers_receive_gradients_and_only_w_units_train():
    bb = tiny_backbone("bert", num_layers=L, hidden=HIDDEN, seed=0)
    cfg = fa_config()
    method = method_for(cfg, bb)
    initial = method.initial_state(bb)
    window = {n: narrow(n, t, 2).clone() for n, t in initial.items()}        # width 2 of 4
    method.load_state(bb, window)
    backward = []
    for i, layer in enumerate(bb.layers):
        layer.register_full_backward_hook(lambda *args, i=i: backward.append(i))
    plan = method.depth_plan(2)
    res = method.client_update(bb, tiny_dataset(20), plan, seed=1)
    assert set(backward) == {2, 3}                       # no backprop below the top d = 2 layers
    sent = [n for n in res.state if n != SCORE]
    assert sorted({n.split(".")[1] for n in sent if n.startswith("adapters.")}) == ["2", "3"]
    assert res.state["adapters.3.down.weight"].shape == (2, HIDDEN) and 0 <= float(res.state[SCORE]) <= 1
    after = get_state(bb, initial)
    for i in (0, 1):                                      # frozen: as sent
        assert all(torch.equal(after[n], window[n] if window[n].shape == after[n].shape else widen(
            n, torch.zeros_like(after[n]), window[n])) for n in after if n.startswith(f"adapters.{i}."))
    for i in (2, 3):                                      # the first two units train, the others stay zero
        up, down = after[f"adapters.{i}.up.weight"], after[f"adapters.{i}.down.weight"]
        assert up[:, :2].any() and not up[:, 2:].any() and not down[2:].any()
        assert torch.equal(res.state[f"adapters.{i}.up.weight"], up[:, :2])


# ---------------------------------------------------------------------- the server's search
def search_round(method, round_index, scores):
    """Plan the round's clients (0, 1, 2: shallow, deep, wide), send each its window, and
    aggregate made-up updates (their window shifted by 1) with the given scores."""
    updates = []
    for c in range(3):
        plan = method.client_plan(round_index, c, method.plan(round_index, 0, 1), 1e12)
        window = method.client_window(round_index, c, plan, {})
        role = method._round_roles[1][c]
        trained = [n for n in window if n.startswith("head.") or int(n.split(".")[1]) in plan.training]
        state = {n: window[n] + 1 for n in trained}
        updates.append(({**state, SCORE: torch.tensor([scores[role]])}, 10))
    return method.aggregate(updates, round_index=round_index, clients=[0, 1, 2])


@pytest.mark.parametrize("winner,config", [("deep", (2, 2)), ("wide", (1, 4)), ("shallow", (1, 2))])
def test_the_search_moves_to_the_group_with_the_best_score(winner, config):
    bb = tiny_backbone("bert", num_layers=L, hidden=HIDDEN, seed=0)
    method = method_for(fa_config(), bb)
    method.global_state = dict(method.initial_state(bb))
    scores = {"shallow": 0.5, "deep": 0.4, "wide": 0.45, winner: 0.9}
    new = search_round(method, 0, scores)            # 0.9 s of simulated time: the 0.5 s window ends
    s = method.state
    assert (s["depth"], s["width"]) == config and s["windows"][0]["winner"] == winner
    assert s["windows"][0]["scores"] == pytest.approx(scores) and s["elapsed_s"] == 0 and s["window_start"] == 1
    g = method.global_state
    d, w = {"shallow": (1, 2), "deep": (2, 2), "wide": (1, 4)}[winner]
    for n in g:                                      # the winner's trained tensors, the rest as they were
        layer = None if n.startswith("head.") else int(n.split(".")[1])
        if layer is None or layer >= L - d:
            assert torch.equal(narrow(n, new[n], w), narrow(n, g[n], w) + 1)
            assert torch.equal(new[n], widen(n, g[n], narrow(n, g[n], w) + 1))
        else:
            assert n not in new
    merged = {**g, **new}
    assert set(s["groups"]) == set(trial_configs(*config, L, 4, 2)) - {"shallow"}
    assert all(torch.equal(t[n], merged[n]) for t in s["groups"].values() for n in merged)


def test_a_window_lasts_its_simulated_seconds():
    bb = tiny_backbone("bert", num_layers=L, hidden=HIDDEN, seed=0)
    method = method_for(fa_config(time_threshold=1.5), bb)
    method.global_state = dict(method.initial_state(bb))
    new = search_round(method, 0, {"shallow": 0.1, "deep": 0.2, "wide": 0.3})
    payload = 4 * (2 * HIDDEN * 2 + HIDDEN + 2) + 4 * HEAD           # depth 1, width 2
    assert method.state["elapsed_s"] == round_seconds(1, 2, 0.3, payload, 1.0) < 1.5    # 10 examples: 2 steps
    assert sorted({n.split(".")[1] for n in new if n.startswith("adapters.")}) == ["3"]   # the shallow group
    assert set(method.state["groups"]["deep"]) == set(new) | set(method.global_state)
    method.global_state = {**method.global_state, **new}
    for r in (1, 2):
        search_round(method, r, {"shallow": 0.1, "deep": 0.2, "wide": 0.3})
    assert [w["end_round"] for w in method.state["windows"]] == [2] and method.state["width"] == 4


# ---------------------------------------------------------------------- runtimes
def roles_by_round(history, windows):
    """Each round's groups (configs by role) from the checkpoint's window log."""
    configs, out = {"shallow": (1, 2), "deep": (2, 2), "wide": (1, 4)}, []
    for m in history:
        out.append(configs)
        ended = [w for w in windows if w["end_round"] == m["round"]]
        if ended:
            d, w = ended[0]["configs"][ended[0]["winner"]]
            configs = trial_configs(d, w, L, 4, 2)
    return out


def test_runs_in_the_simulator_and_the_bytes_are_each_groups_own(tmp_path):
    record = run(fa_config(rounds=3), tmp_path, progress=False)
    windows = read_checkpoint(tmp_path / CHECKPOINT_FILE)["method"]["windows"]
    assert windows[0]["end_round"] == 0
    for m, configs in zip(record["history"], roles_by_round(record["history"], windows)):
        roles = [list(configs)[k % len(configs)] for k in range(len(m["clients"]))]
        deepest = max(d for d, _ in configs.values())
        up = sum(configs[r][0] * adapter_bytes(configs[r][1]) + 4 * HEAD + 4 for r in roles)
        down = sum(deepest * adapter_bytes(configs[r][1]) + 4 * HEAD for r in roles)
        assert (m["bytes_up"], m["bytes_down"], m["bytes_down_context"]) == (up, down, 0)
        assert m["window"] == [L - configs["shallow"][0], L]
    final = load_final_state(tmp_path)
    assert all(torch.isfinite(t).all() for t in final.values()) and record["history"][-1]["test_accuracy"] >= 0


def test_runs_on_the_flower_apps_like_the_simulator_bitwise(tmp_path):
    cfg = fa_config(rounds=3)
    assert_flower_equals_simulator(cfg, tmp_path)


def test_kill_9_and_restart_is_bitwise_identical(tmp_path):
    """Killed inside a depth-2 window (rounds 1-3): the restart resumes the groups and the
    simulated time from the checkpoint."""
    cfg = fa_config(rounds=4, clients_per_round=3)
    out, _ = assert_kill_9_resumes_bitwise(cfg, tmp_path)
    mine, theirs = (read_checkpoint(d / CHECKPOINT_FILE)["method"] for d in (out, tmp_path / "ref"))
    assert mine["windows"] == theirs["windows"] and mine["elapsed_s"] == theirs["elapsed_s"]


# ---------------------------------------------------------------------- memory
@pytest.mark.parametrize("family,depth,bottleneck,batch", [("bert", 1, 8, 8), ("bert", 3, 8, 4),
                                                           ("distilbert", 2, 16, 8), ("roberta", 4, 8, 8)])
def test_memory_estimate_matches_the_meter(family, depth, bottleneck, batch):
    hidden, T = 64, 16
    bb = tiny_backbone(family, hidden=hidden, seed=0)
    cfg = RunConfig.from_dict({"method": "fedadapter", "adapter": {"bottleneck": bottleneck},
                               "method_options": {"width": bottleneck // 2, "unit": bottleneck // 2},
                               "train": {"batch_size": batch}})
    method = method_for(cfg, bb)
    method.load_state(bb, {n: narrow(n, t, bottleneck // 2) for n, t in method.initial_state(bb).items()})
    data = tiny_dataset(2 * batch, seq_len=T).map(lambda r: {"attention_mask": [1] * T})
    with MemoryMeter(bb) as meter:
        method.client_update(bb, data, method.depth_plan(depth), seed=1)
    measured = meter.report().peak_bytes
    estimate = get_method("fedadapter").peak_bytes(tiny_config(family, hidden=hidden), depth, batch_size=batch,
                                                   seq_len=T, bottleneck=bottleneck, optimizer="sgd",
                                                   dtype="float32").total
    print(f"{family} d={depth} r={bottleneck} B={batch}: estimate / meter = {estimate / measured:.3f}")
    assert abs(estimate / measured - 1) < 0.10
