"""BBH's multiple-choice form from its BIG-bench source tasks (issue 15): the task list, the files
read with their task_prefix, bad examples counted as skips, the metric (mean over tasks of
accuracy, and micro) on hand-made predictions, and the suite in the final evaluation."""

import json

import pytest

from chainfed_core import bbh, instruct_runs, llm_eval
from chainfed_core.asset_catalogue import ASSETS, BBH_SOURCES

pytestmark = pytest.mark.usefixtures("one_thread")


def test_the_27_bbh_tasks_are_scored_or_left_out_with_a_reason():
    assert len(bbh.BBH_TASKS) == 21 and len(bbh.LEFT_OUT) == 6
    assert not set(bbh.BBH_TASKS) & set(bbh.LEFT_OUT)
    assert {t.partition("/")[0] for t in bbh.BBH_TASKS.values()} == set(BBH_SOURCES)
    assert all(f"bbh-{folder}" in ASSETS and ASSETS[f"bbh-{folder}"].heavy for folder in BBH_SOURCES)
    with pytest.raises(ValueError, match="'word_sorting' is not scored here: generative"):
        bbh.source_file("word_sorting", lambda name: "unused")


def _write(folder, task: dict):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "task.json").write_text(json.dumps(task))


@pytest.fixture
def toy_assets(tmp_path):
    """Two BBH tasks in BIG-bench's format: snarks (with a bad example of each kind) and
    logical_deduction's three_objects (a subtask folder with a task_prefix)."""
    _write(tmp_path / "bbh-snarks", {"name": "snarks", "examples": [
        {"input": "Which is sarcastic? (a) x (b) y", "target_scores": {"(a)": 1, "(b)": 0}},
        {"input": "Which? (a) u (b) v", "target_scores": {"(a)": 0, "(b)": 1}},
        {"input": "Two right?", "target_scores": {"(a)": 1, "(b)": 1}},
        {"input": "Outside?", "target": "(c)", "target_scores": {"(a)": 1, "(b)": 0}},
        {"input": "Which? (a) p (b) q", "target_scores": {"(a)": 1, "(b)": 0}}]})
    _write(tmp_path / "bbh-logical_deduction" / "three_objects", {
        "name": "logical_deduction:three_objects", "task_prefix": "Three books.\n\n", "examples": [
            {"input": "A is left of B.", "target_scores": {"A first.": 1, "B first.": 0, "C first.": 0}}]})
    return lambda name: tmp_path / name


def test_files_are_read_with_their_prefix_and_bad_examples_are_counted_skips(toy_assets):
    data = bbh.load_bbh(None, toy_assets, tasks=["snarks", "logical_deduction_three_objects"])
    assert [(q.qid, q.subject, q.answer) for q in data.items] == [
        ("snarks/0", "snarks", 0), ("snarks/1", "snarks", 1), ("snarks/4", "snarks", 0),
        ("logical_deduction_three_objects/0", "logical_deduction_three_objects", 0)]
    assert data.items[-1].question == "Three books.\n\nA is left of B."
    assert data.skipped == ["snarks/2: 2 choices scored 1 in target_scores, expected exactly one",
                            "snarks/3: answer '(c)' is outside its choices ['(a)', '(b)']"]
    two = bbh.load_bbh(2, toy_assets, tasks=["snarks", "logical_deduction_three_objects"])
    assert [q.qid for q in two.items] == ["snarks/0", "snarks/1", "logical_deduction_three_objects/0"]


def test_task_average_and_micro_accuracy_on_hand_made_predictions(toy_assets, monkeypatch):
    # hand-made predictions: snarks 0 right, 1 wrong, 4 right (2/3); three_objects wrong (0/1)
    chosen = {"Which is sarcastic?": 0, "Which? (a) u": 0, "Which? (a) p": 0, "Three books.": 2}

    def fake_logliks(model, tokenizer, context, continuations):
        (pick,) = [i for key, i in chosen.items() if key in context]
        return [0.0 if i == pick else -1.0 for i in range(len(continuations))]

    monkeypatch.setattr(llm_eval, "choice_loglikelihoods", fake_logliks)
    monkeypatch.setattr(bbh, "BBH_TASKS", {k: bbh.BBH_TASKS[k] for k in ("snarks", "logical_deduction_three_objects")})

    class Tok:                                   # one token a character: no prompt is too long
        def __call__(self, text):
            return {"input_ids": list(range(len(text)))}

    class Model:
        config = type("Config", (), {"max_position_embeddings": 4096})()

    out = bbh.score_bbh(Model(), Tok(), None, toy_assets)
    assert out["task_average"] == pytest.approx((2 / 3 + 0) / 2)               # 1/3
    assert out["micro_accuracy"] == 0.5 and out["n"] == 4 and out["skipped"] == 2 and out["tasks"] == 2
    assert out["per_task"] == {"logical_deduction_three_objects": 0.0, "snarks": pytest.approx(2 / 3)}
    assert out["predictions"] == [["logical_deduction_three_objects/0", 2, 0], ["snarks/0", 0, 0],
                                  ["snarks/1", 0, 1], ["snarks/4", 0, 0]]


def test_bbh_is_a_suite_of_the_final_evaluation(monkeypatch):
    seen = []
    monkeypatch.setitem(instruct_runs.SCORERS, "bbh", lambda bb, tok, limit: seen.append(limit) or {"n": limit})
    out = instruct_runs.final_evaluation(None, tokenizer=None, evals={"bbh": 3})
    assert seen == [3] and out["evals"] == {"bbh": 3} and out["bbh"]["n"] == 3
    assert "bbh" in instruct_runs.SUITES


@pytest.mark.slow
def test_real_bigbench_sources_hold_bbhs_multiple_choice_tasks():
    data = bbh.load_bbh(None)
    counts = {t: sum(q.subject == t for q in data.items) for t in bbh.BBH_TASKS}
    assert min(counts.values()) == counts["penguins_in_a_table"] == 149 and counts["geometric_shapes"] == 288
    assert sum(s.startswith("geometric_shapes/") for s in data.skipped) == 72
    assert max(len(q.choices) for q in data.items) == 18
    causal = [q for q in data.items if q.subject == "causal_judgement"]           # 190 questions
    assert bbh.load_bbh(3).items[:3] == [causal[0], causal[63], causal[126]]       # spread: i * 190 // 3
