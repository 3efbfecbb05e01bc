"""A finished instruction run's final model rebuilt from its checkpoint (issue 15): it scores the
record's own suites bitwise as the run's final evaluation did; the suites a record lacks are
added to it, the rest kept; No-FT needs no checkpoint, a trained run without one is refused."""

import json

import pytest

from chainfed_core import instruct_runs, instruct_state, instruct_table
from chainfed_core.checkpoint import CHECKPOINT_FILE
from chainfed_core.eval_data import MCQuestion
from chainfed_core.experiments import config_hash
from chainfed_core.federated import run
from chainfed_core.llm_eval import choice_loglikelihoods, generate_answer
from chainfed_core.records import RECORD_FILE

pytestmark = pytest.mark.usefixtures("one_thread")

QUESTIONS = [MCQuestion("toy/0", "toy", "What is 1 + 1?", ("1", "2", "3"), 1),
             MCQuestion("toy/1", "toy", "Sky colour?", ("blue", "green"), 0)]


def probe(backbone, tokenizer, limit):
    """A suite whose numbers move with every weight: the choices' log-likelihoods and a greedy answer."""
    from chainfed_core.eval_data import bigbench_prompt
    return {"n": limit, "logliks": [choice_loglikelihoods(backbone, tokenizer, *bigbench_prompt(q))
                                    for q in QUESTIONS[:limit]],
            "answer": generate_answer(backbone, tokenizer, "### Instruction:\nSay hi.\n\n### Response:\n", 6)}


@pytest.fixture
def probes(monkeypatch):
    calls = []

    def counted(*args):
        calls.append(args[2])
        return probe(*args)
    monkeypatch.setitem(instruct_runs.SCORERS, "mmlu", counted)
    monkeypatch.setitem(instruct_runs.SCORERS, "crass", counted)
    return calls


def _without_seconds(suite: dict) -> dict:
    return {k: v for k, v in suite.items() if k not in ("seconds", "scored_on", "scored_by")}


@pytest.mark.parametrize("variant", ["ChainFed W=2", "Full Adapters"])
def test_the_rebuilt_model_scores_the_records_suites_bitwise(tmp_path, probes, variant):
    cfg = instruct_table.run_config("quick", variant)
    folder = tmp_path / config_hash(cfg)
    run(cfg, folder, progress=False, task=instruct_runs.build_instruct_task(cfg, {"mmlu": 2}))
    record = json.loads((folder / RECORD_FILE).read_text())          # as written, floats through JSON
    again = instruct_state.score_final_state(cfg, folder, {"mmlu": 2})
    assert json.dumps(_without_seconds(again["mmlu"])) == json.dumps(_without_seconds(record["final_eval"]["mmlu"]))
    untrained = probe(instruct_runs.build_instruct_task(cfg, {}).make_backbone(), instruct_runs.tokenizer_of(cfg), 2)
    assert untrained["logliks"] != record["final_eval"]["mmlu"]["logliks"]       # training moved them


def test_missing_suites_are_added_and_everything_else_kept(tmp_path, probes, monkeypatch):
    monkeypatch.setitem(instruct_table.PROFILES, "quick", {**instruct_table.PROFILES["quick"], "evals": {"mmlu": 2}})
    first = instruct_table.run_variant("quick", "ChainFed W=2", tmp_path, progress=False)
    folder = tmp_path / config_hash(instruct_table.run_config("quick", "ChainFed W=2"))
    before = json.loads((folder / RECORD_FILE).read_text())
    monkeypatch.setitem(instruct_table.PROFILES, "quick", {**instruct_table.PROFILES["quick"],
                                                            "evals": {"mmlu": 2, "crass": 1}})
    probes.clear()
    record = instruct_table.run_variant("quick", "ChainFed W=2", tmp_path, progress=False)
    assert probes == [1]                                                     # only the missing suite scored
    after = json.loads((folder / RECORD_FILE).read_text())
    assert after == json.loads(json.dumps(record))
    assert after["final_eval"]["evals"] == {"mmlu": 2, "crass": 1}
    added = after["final_eval"]["crass"]
    assert added["scored_on"] == "checkpoint.pkl" and added["n"] == 1
    assert after["final_eval"]["mmlu"] == before["final_eval"]["mmlu"] == json.loads(json.dumps(first))["final_eval"]["mmlu"]
    rest = lambda r: {k: v for k, v in r.items() if k != "final_eval"}       # noqa: E731
    assert rest(after) == rest(before)
    assert after["final_eval"]["crass"]["logliks"] == before["final_eval"]["mmlu"]["logliks"][:1]   # same model
    probes.clear()
    instruct_table.run_variant("quick", "ChainFed W=2", tmp_path, progress=False)
    assert probes == []                                                      # nothing missing: nothing scored
    monkeypatch.setitem(instruct_table.PROFILES, "quick", {**instruct_table.PROFILES["quick"], "evals": {"mmlu": 1}})
    with pytest.raises(ValueError, match="remove its folder to rerun it"):
        instruct_table.run_variant("quick", "ChainFed W=2", tmp_path, progress=False)


def test_no_ft_needs_no_checkpoint_and_a_trained_run_does(tmp_path, probes):
    for variant in ("No-FT", "Full Adapters"):
        cfg = instruct_table.run_config("quick", variant)
        folder = tmp_path / config_hash(cfg)
        record = run(cfg, folder, progress=False, task=instruct_runs.build_instruct_task(cfg, {"mmlu": 1}))
        (folder / CHECKPOINT_FILE).unlink()
        if variant == "No-FT":
            out = instruct_state.add_missing_suites(cfg, folder, record, {"mmlu": 1, "crass": 2})
            assert out["final_eval"]["crass"]["scored_on"] == "the untrained backbone"
            own = json.loads(json.dumps(record))["final_eval"]["mmlu"]["logliks"]
            assert out["final_eval"]["crass"]["logliks"][:1] == own
        else:
            with pytest.raises(FileNotFoundError, match=f"no checkpoint .* remove {folder} to rerun it"):
                instruct_state.add_missing_suites(cfg, folder, record, {"mmlu": 1, "crass": 2})


def test_the_loss_read_after_each_layer_ends_at_the_runs_held_out_loss(tmp_path):
    """The early-exit diagnostic on a quick ChainFed run: one loss per layer, the last the record's
    held-out loss (the same weighting as the run's evaluation); the notebook's reader says when
    there is no record."""
    cfg = instruct_table.run_config("quick", "ChainFed W=2")
    record = run(cfg, tmp_path / config_hash(cfg), progress=False, task=instruct_runs.build_instruct_task(cfg, {}))
    task = instruct_runs.build_instruct_task(cfg, {})
    model = instruct_state.final_backbone(cfg, tmp_path / config_hash(cfg), task)
    losses = instruct_state.layer_losses(model, task.test, task.pad_id)
    assert len(losses) == model.num_layers
    assert losses[-1] == pytest.approx(record["history"][-1]["test_loss"], rel=1e-6)
    assert instruct_table.early_exit("quick", tmp_path) is None
