"""The stopping rule every method trains under: hand-made histories, and runs that stop, resume and keep their hash."""

import json
import math

import pytest

from chainfed_core import convergence as cv
from chainfed_core.config import RunConfig
from chainfed_core.experiments import config_hash
from chainfed_core.federated import run
from chainfed_core.records import RECORD_FILE

from runtime_checks import assert_kill_9_resumes_bitwise
from test_federated import tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")


def history(accs, every=1, nbytes=10, seconds=0.5):
    out = []
    for r in range(len(accs) * every):
        m = {"round": r, "bytes_up": nbytes, "bytes_down": nbytes, "bytes_down_context": 1, "seconds_train": seconds}
        if (r + 1) % every == 0:
            m["test_accuracy"] = accs[r // every]
        out.append(m)
    return out


def test_the_rule_on_hand_made_curves():
    rising = history([0.50, 0.60, 0.70, 0.80])
    assert not cv.converged(rising, 2, 0.005) and cv.converged(rising, 2, 0.10)   # steps of 10 points
    plateau = history([0.50, 0.70, 0.702, 0.699, 0.701])
    assert not cv.converged(plateau[:3], 3, 0.005)                   # only 3 evaluations, the first far below
    assert cv.converged(plateau[:4], 3, 0.005) and cv.converged(plateau, 3, 0.005)
    assert not cv.converged(plateau, None, 0.005)                     # no patience: never
    dip = history([0.70, 0.60, 0.69, 0.70])
    assert not cv.converged(dip, 3, 0.005) and cv.converged(dip, 2, 0.015)
    assert not cv.converged(dip, 2, 0.015, min_gain=0.01)            # never rose above its first evaluation
    flat = history([0.5235, 0.5240, 0.5235, 0.5235, 0.5240])           # one class predicted while the loss falls
    assert cv.converged(flat, 5, 0.005) and not cv.converged(flat, 5, 0.005, min_gain=0.01)
    assert cv.converged(plateau, 3, 0.005, min_gain=0.01)             # rose 20 points, then flat
    assert cv.convergence_round(plateau, 0.005) == 2.0                 # 0.70 is within 0.5 points of 0.702
    assert cv.convergence_round(history([0.5, 0.6], every=3), 0.0) == 6.0
    assert math.isnan(cv.convergence_round([{"round": 0}], 0.005))
    assert cv.first_reaching(plateau, 0.699) == 2.0 and math.isnan(cv.first_reaching(plateau, 0.8))


def test_costs_are_counted_up_to_a_round():
    h = history([0.5, 0.6, 0.7], every=2)
    assert cv.cost_until(h, 4) == {"rounds": 4.0, "bytes": 4 * 21.0, "client_seconds": 2.0}
    assert all(math.isnan(v) for v in cv.cost_until(h, math.nan).values())


def test_a_run_stops_when_converged_and_a_rerun_does_not_train_again(tmp_path):
    # tolerance 0.99, no gain asked: every evaluation is "at the best", so patience 2 with eval_every 1 stops
    # after round 2 of 6
    cfg = RunConfig.from_dict(tiny_config(rounds=6, eval_every=1, stop_patience=2, stop_tolerance=0.99, stop_min_gain=0.0))
    record = run(cfg, tmp_path, progress=False)
    assert [m["round"] for m in record["history"]] == [0, 1] and record["stopped"] == "converged"
    again = run(cfg, tmp_path, progress=False)
    assert again["history"] == record["history"]
    capped = run(RunConfig.from_dict(tiny_config(rounds=3, eval_every=1)), tmp_path / "capped", progress=False)
    assert len(capped["history"]) == 3 and capped["stopped"] == "rounds"


def test_the_rule_leaves_older_configs_alone():
    plain = RunConfig.from_dict(tiny_config())
    assert "stop_patience" not in plain.to_dict()["fed"] and "stop_tolerance" not in plain.to_dict()["fed"]
    stopping = RunConfig.from_dict(tiny_config(stop_patience=5))
    assert stopping.to_dict()["fed"]["stop_patience"] == 5 and config_hash(stopping) != config_hash(plain)
    with pytest.raises(ValueError, match="FedConfig.stop_patience: must be >= 1"):
        RunConfig.from_dict(tiny_config(stop_patience=0))
    with pytest.raises(ValueError, match="FedConfig.stop_tolerance"):
        RunConfig.from_dict(tiny_config(stop_tolerance=-0.1))
    assert "stop_min_gain" not in stopping.to_dict()["fed"]
    with pytest.raises(ValueError, match="FedConfig.stop_min_gain"):
        RunConfig.from_dict(tiny_config(stop_min_gain=1.5))


def test_a_run_flat_at_its_start_is_not_stopped(tmp_path):
    # the same run as above, but asking a gain no tiny run reaches: the plateau does not count, it runs to its cap
    cfg = RunConfig.from_dict(tiny_config(rounds=4, eval_every=1, stop_patience=2, stop_tolerance=0.99,
                                          stop_min_gain=0.99))
    record = run(cfg, tmp_path, progress=False)
    assert len(record["history"]) == 4 and record["stopped"] == "rounds"


def test_a_stopping_run_killed_midway_resumes_bitwise(tmp_path):
    cfg = RunConfig.from_dict(tiny_config(rounds=8, eval_every=1, stop_patience=3, stop_tolerance=0.99, stop_min_gain=0.0))
    killed, reference = assert_kill_9_resumes_bitwise(cfg, tmp_path, after_rounds=1)
    record = json.loads((killed / RECORD_FILE).read_text())
    assert len(record["history"]) == 3 and record["stopped"] == "converged"


def test_fewer_eligible_samples_every_eligible_client(tmp_path):
    strict = tiny_config(clients_per_round=19, memory_aware=True)
    with pytest.raises(ValueError, match="FedConfig.clients_per_round: K=19 exceeds the"):
        run(RunConfig.from_dict(strict), tmp_path / "strict", progress=False)
    record = run(RunConfig.from_dict(tiny_config(clients_per_round=19, memory_aware=True, fewer_eligible=True)),
                 tmp_path / "loose", progress=False)
    eligible = record["eligible_clients"]
    assert 0 < eligible < 19 and all(len(m["clients"]) == eligible for m in record["history"])


def test_a_method_no_device_holds_is_recorded_as_the_papers_dash(tmp_path):
    from chainfed_core import experiments as ex, paper, tables

    runs = ex.grid("quick", ["FFT", "LP"], partitions=["iid"], overrides={"fed": {"rounds": 1, "memory_aware": True,
                                                                                  "memory_scale": None}})
    df = ex.run_grid(runs, tmp_path, progress=False)          # FFT needs more than the largest device (12 GB = FA)
    fft = df[df["variant"] == "FFT"].iloc[0]
    assert fft["status"] == ex.COULD_NOT_RUN and math.isnan(fft["accuracy"])
    record = json.loads((tmp_path / fft["run_id"] / RECORD_FILE).read_text())
    assert "no client can fit 'fft'" in record["reason"] and record["config"] == runs[0].config.to_dict()
    assert ex.run_grid(runs, tmp_path, progress=False)["status"].tolist() == [ex.COULD_NOT_RUN, "complete"]
    frame = tables.beside_paper(df, ["FFT", "LP"], paper.table1_cell)
    assert frame.iloc[0, 0] == "—" and frame.iloc[1, 0] != "—"


def test_chainfed_may_stop_only_after_its_chain_is_covered(tmp_path):
    data = tiny_config(rounds=8, eval_every=1, stop_patience=2, stop_tolerance=0.99, stop_min_gain=0.0)
    data["chain"] = {**data["chain"], "passes": 2}
    chain = run(RunConfig.from_dict(data), tmp_path / "chain", progress=False)
    layers = 4                                           # tiny-bert; the window [1, 3) slides over 2 positions
    assert len(chain["history"]) == 2 * (layers - 1 - 2 + 1) == 4 and chain["stopped"] == "converged"
    full = run(RunConfig.from_dict({**data, "method": "full_adapters"}), tmp_path / "full", progress=False)
    assert len(full["history"]) == 2                     # no schedule to cover: the rule alone


def test_a_cycling_chain_starts_new_passes_after_its_own(tmp_path):
    data = tiny_config(rounds=6, eval_every=3)
    data["chain"] = {**data["chain"], "passes": 1}
    windows = {}
    for cycle in (False, True):
        data["chain"]["cycle"] = cycle
        windows[cycle] = [tuple(m["window"]) for m in run(RunConfig.from_dict(data), tmp_path / str(cycle),
                                                             progress=False)["history"]]
    assert windows[False] == [(1, 3), (2, 4), (2, 4), (2, 4), (2, 4), (2, 4)]      # tiny-bert, start layer 1
    assert windows[True] == [(1, 3), (2, 4)] * 3


def test_speedup_and_communication_against_the_baseline_by_hand():
    import pandas as pd

    from chainfed_core import tables

    cell = {"model": "m", "dataset": "d", "partition": "iid", "seed": 0}
    rows = [  # costs: (round, accuracy, cumulative bytes, cumulative client seconds)
        {**cell, "variant": "Full Adapters", "accuracy": 0.80, "rounds_to_converge": 8.0, "bytes_to_converge": 800.0,
         "client_s_to_converge": 40.0, "costs": [(4, 0.70, 400, 20), (8, 0.80, 800, 40)]},
        {**cell, "variant": "ChainFed", "accuracy": 0.82, "rounds_to_converge": 4.0, "bytes_to_converge": 100.0,
         "client_s_to_converge": 10.0, "costs": [(2, 0.75, 50, 5), (4, 0.82, 100, 10)]},
        {**cell, "variant": "LP", "accuracy": 0.60, "rounds_to_converge": 2.0, "bytes_to_converge": 10.0,
         "client_s_to_converge": 1.0, "costs": [(2, 0.60, 10, 1)]},
    ]
    out = tables.versus(pd.DataFrame(rows)).set_index("variant")
    assert out.loc["ChainFed", ["speedup", "compute_ratio", "comm_reduction"]].tolist() == [2.0, 4.0, 8.0]
    assert out.loc["ChainFed", ["rounds_to_baseline", "bytes_to_baseline"]].tolist() == [4.0, 100.0]
    assert out.loc["ChainFed", ["speedup_to_baseline", "comm_reduction_to_baseline"]].tolist() == [2.0, 8.0]
    assert out.loc["Full Adapters", "speedup"] == 1.0
    assert math.isnan(out.loc["LP", "speedup_to_baseline"]) and out.loc["LP", "speedup"] == 4.0   # never reaches 80%


def test_seed_curves_hold_a_stopped_runs_last_accuracy():
    import pandas as pd

    from chainfed_core import tables

    cell = {"variant": "Full Adapters", "dataset": "d", "partition": "iid"}
    df = pd.DataFrame([{**cell, "seed": 0, "curve": [(2, 0.5, 1), (4, 0.7, 2), (6, 0.8, 3)]},
                       {**cell, "seed": 1, "curve": [(2, 0.6, 1), (4, 0.9, 2)]},          # stopped at round 4
                       {**cell, "seed": 2, "curve": []}])                                    # no evaluation: left out
    curves = tables.seed_curves(df)
    at6 = curves[curves["round"] == 6].set_index("seed")
    assert at6["accuracy"].to_dict() == {0: 0.8, 1: 0.9} and at6["held"].to_dict() == {0: False, 1: True}
    assert len(curves) == 6 and not curves[curves["round"] < 6]["held"].any()
    assert curves.groupby("round")["accuracy"].count().tolist() == [2, 2, 2]   # every round over both seeds


def test_error_bars_fall_back_to_the_test_sets_se_for_one_seed():
    import pandas as pd

    from chainfed_core import tables

    df = pd.DataFrame({"variant": ["a", "b", "b"], "seed": [0, 0, 1], "accuracy": [0.8, 0.7, 0.9],
                       "test_examples": [2000, 2000, 2000]})
    bars = tables.error_bars(df, ["variant"])
    assert bars.loc["a", "se"] == pytest.approx(100 * (0.8 * 0.2 / 2000) ** 0.5)
    assert bars.loc["b", "se"] == pytest.approx(10.0)          # two seeds: the SE over seeds
    assert bars.loc["b", "mean"] == pytest.approx(80.0)
