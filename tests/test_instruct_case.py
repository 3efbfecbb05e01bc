"""Figure 11's case study (issue 15): held-out instructions of the runs' own split, greedy answers
of each run's final model, recorded with the run hashes, read back, refused when stale."""

import json

import pytest

from chainfed_core import instruct_case as ic
from chainfed_core import instruct_runs, instruct_table
from chainfed_core.experiments import config_hash
from chainfed_core.instruct import alpaca_prompt
from chainfed_core.instruct_state import final_backbone
from chainfed_core.llm_eval import generate_answer

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def two_variants(monkeypatch):
    monkeypatch.setitem(instruct_table.PROFILES, "quick", {**instruct_table.PROFILES["quick"], "evals": {}})
    monkeypatch.setattr(instruct_table, "VARIANTS", {v: instruct_table.VARIANTS[v] for v in ("No-FT", "ChainFed W=2")})


def test_cases_are_held_out_records_of_the_runs_split():
    cfg = instruct_table.run_config("quick", "ChainFed W=2")
    records = instruct_runs.alpaca_records("alpaca-en-demo")
    train, held_out = instruct_runs.split_records(records, cfg)
    cases = ic.held_out_cases(cfg, 3)
    assert [c["record"] for c in cases] == instruct_runs.spread(held_out, 3)
    assert not {c["record"] for c in cases} & set(train)
    assert cases[0]["output"] == records[cases[0]["record"]]["output"]


def test_answers_are_recorded_with_their_runs_and_read_back(tmp_path, two_variants, monkeypatch):
    path = tmp_path / "case.json"
    empty = ic.case_study("quick", tmp_path / "runs", path, run_missing=False, n_cases=2, max_new_tokens=5)
    assert set(empty["not_run"]) == {"No-FT", "ChainFed W=2"} and empty["answers"] == {} and not path.exists()
    study = ic.case_study("quick", tmp_path / "runs", path, n_cases=2, max_new_tokens=5)
    assert json.loads(path.read_text()) == {k: v for k, v in study.items() if k != "not_run"}
    cfg = instruct_table.run_config("quick", "ChainFed W=2")
    folder = tmp_path / "runs" / config_hash(cfg)
    assert study["runs"]["ChainFed W=2"]["run_id"] == folder.name and study["max_new_tokens"] == 5
    model = final_backbone(cfg, folder, instruct_runs.build_instruct_task(cfg, {}))
    tok = instruct_runs.tokenizer_of(cfg)
    by_hand = [generate_answer(model, tok, alpaca_prompt(c), 5, stop_at_newline=False) for c in study["cases"]]
    assert study["answers"]["ChainFed W=2"] == by_hand != study["answers"]["No-FT"]
    assert ic.case_frame(study).shape == (2, 4)                     # instruction, reference, two variants
    assert "white-space: pre-wrap" in ic.case_table(study).to_html()

    monkeypatch.setattr(ic, "answers_of", lambda *a: pytest.fail("the record holds every answer: none regenerated"))
    assert ic.case_study("quick", tmp_path / "runs", path, n_cases=2, max_new_tokens=5)["answers"] == study["answers"]
    with pytest.raises(ValueError, match=r"other \['max_new_tokens'\] than asked; delete it to regenerate"):
        ic.case_study("quick", tmp_path / "runs", path, n_cases=2, max_new_tokens=6)
    stale = {**study, "runs": {**study["runs"], "No-FT": {"run_id": "0123456789ab", "seconds": 1.0}}}
    path.write_text(json.dumps({k: v for k, v in stale.items() if k != "not_run"}))
    with pytest.raises(ValueError, match="No-FT's answers come from run 0123456789ab"):
        ic.case_study("quick", tmp_path / "runs", path, n_cases=2, max_new_tokens=5)


def test_record_paths_keep_the_quick_profile_ignored():
    assert ic.record_path("cpu", "repo").as_posix() == "repo/results/instruct/fig11_case_study_cpu.json"
    assert ic.record_path("quick", "repo").as_posix() == "repo/results/instruct/quick/fig11_case_study_quick.json"
