"""The profile's plan and its wall time: recorded hours added up over processes, the rest projected."""

import json

import pytest

from chainfed_core import profile_plan as pp
from chainfed_core.records import RECORD_FILE


def _record(root, run, rounds, final_s=None):
    folder = root / run.run_id
    folder.mkdir(parents=True)
    record = {"wall_s": 1.0, "history": [{"round": i, "seconds_round": s} for i, s in enumerate(rounds)]}
    if final_s is not None:
        record["final_eval"] = {"evals": {"mmlu": 3}, "mmlu": {"seconds": final_s, "n": 3}}
    (folder / RECORD_FILE).write_text(json.dumps(record))


def test_run_seconds_adds_rounds_and_the_final_evaluation_not_the_last_process_alone():
    assert pp.run_seconds({"wall_s": 5.0, "history": [{"seconds_round": 2.0}, {"seconds_round": 3.5}]}) == 5.5
    assert pp.run_seconds({"wall_s": 1.0, "history": [{"seconds_round": 2.0}],
                           "final_eval": {"evals": {"mmlu": 1}, "mmlu": {"seconds": 4.0}}}) == 6.0


def test_wall_time_sums_recorded_runs_and_projects_the_rest_by_variant_then_method_then_artefact(tmp_path):
    runs, by_artefact = pp.plan("quick", ["table2_threshold"])
    label = {(r.variant, r.partition): r for r in runs}
    root = tmp_path / "results" / "runs" / "quick"
    _record(root, label[("tau=1.0", "iid")], [100.0, 50.0])               # 150 s
    _record(root, label[("tau=0.9", "iid")], [70.0], final_s=30.0)        # 100 s
    table = pp.wall_time("quick", tmp_path, ["table2_threshold"])
    row, total = table.iloc[0], table.iloc[-1]
    assert (row["artefact"], row["runs"], row["recorded"]) == ("table2_threshold", 8, 2)
    assert row["hours recorded"] * 3600 == pytest.approx(250.0)
    # tau=1.0 dirichlet: its variant's 150; tau=0.9 dirichlet: 100; tau=0.8 x 2: ChainFed's mean 125;
    # Full Adapters x 2 (no run of its method): the artefact's mean, 125
    assert row["hours left (projected)"] * 3600 == pytest.approx(150 + 100 + 4 * 125)
    assert total["artefact"] == "total" and total["hours in all"] * 3600 == pytest.approx(1000.0)


def test_wall_time_is_unknown_where_no_run_of_a_model_is_recorded(tmp_path):
    table = pp.wall_time("quick", tmp_path, ["table2_threshold"])
    assert table.iloc[0]["recorded"] == 0 and table.iloc[0]["hours left (projected)"] != table.iloc[0]["hours left (projected)"]
    assert table.iloc[-1]["hours in all"] != table.iloc[-1]["hours in all"]         # NaN: not a made-up zero


def test_each_run_is_counted_once_in_the_first_artefact_that_asks_for_it(tmp_path):
    table = pp.wall_time("quick", tmp_path, ["table1_main_results", "obs1_memory_constrained"])
    runs, by_artefact = pp.plan("quick", ["table1_main_results", "obs1_memory_constrained"])
    assert table.iloc[-1]["runs"] == len(runs) == len({r.run_id for rs in by_artefact.values() for r in rs})
    assert table.iloc[1]["runs"] == len({r.run_id for r in by_artefact["obs1_memory_constrained"]}
                                        - {r.run_id for r in by_artefact["table1_main_results"]})


def test_a_method_not_run_here_is_projected_from_its_cost_beside_chainfed_at_another_profile(tmp_path):
    runs, _ = pp.plan("quick", ["table2_threshold"])
    label = {(r.variant, r.partition): r for r in runs}
    root = tmp_path / "results" / "runs" / "quick"
    _record(root, label[("tau=1.0", "iid")], [100.0, 50.0])
    _record(root, label[("tau=0.9", "iid")], [70.0], final_s=30.0)
    model = label[("tau=1.0", "iid")].model
    other = tmp_path / "results" / "runs" / "cpu-full"
    for name, method, s in (("a", "chainfed", 10.0), ("b", "full_adapters", 30.0), ("c", "full_adapters", 30.0)):
        (other / name).mkdir(parents=True)
        (other / name / RECORD_FILE).write_text(json.dumps(
            {"config": {"method": method, "model": {"name": model}}, "history": [{"seconds_round": s}]}))
    assert pp.relative_cost("quick", tmp_path)[(model, "full_adapters")] == pytest.approx(3.0)
    row = pp.wall_time("quick", tmp_path, ["table2_threshold"]).iloc[0]
    # as before, but Full Adapters x 2 at 3x ChainFed's mean here (125 s)
    assert row["hours left (projected)"] * 3600 == pytest.approx(150 + 100 + 2 * 125 + 2 * 375)
