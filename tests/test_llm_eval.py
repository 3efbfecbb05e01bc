"""Evaluation: each metric on hand-made predictions equals its hand-computed value; MMLU / CRASS
files parsed, bad items counted as skips; our log-likelihood scorer equals a hand computation
and lm-eval's harness on a tiny random LLaMA."""

import json

import pytest
import torch
import torch.nn.functional as F

from chainfed_core import eval_data, llm_eval
from chainfed_core.eval_data import EvalSet, MCQuestion
from tiny_text import tiny_llama, tiny_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

Q = MCQuestion("algebra/0", "abstract_algebra", "What is 1 + 1?", ("1", "2", "3", "4"), 1)


# ----------------------------------------------------------------------------- metrics by hand


def test_accuracy_summary_subject_average_and_micro():
    out = llm_eval.accuracy_summary(["a", "a", "a", "b"], [True, False, True, False])
    assert out["n"] == 4 and out["micro_accuracy"] == 0.5
    assert out["per_subject"] == {"a": pytest.approx(2 / 3), "b": 0.0}
    assert out["subject_average"] == pytest.approx(1 / 3)          # (2/3 + 0) / 2


@pytest.mark.parametrize("pred, gold, f1", [
    ("the Denver Broncos", "Denver Broncos", 1.0),                 # article and case dropped
    ("Denver, Broncos!", "denver broncos", 1.0),                   # punctuation dropped
    ("Broncos won", "Denver Broncos", 0.5),                         # P = R = 1/2
    ("a cat sat on the mat", "cat on mat", 6 / 7),                  # P = 3/4, R = 1: 2PR/(P+R) = 6/7
    ("Carolina Panthers", "Denver Broncos", 0.0),
    ("", "Denver Broncos", 0.0),
])
def test_token_f1_hand_computed(pred, gold, f1):
    assert llm_eval.token_f1(pred, gold) == pytest.approx(f1)


def test_f1_summary_takes_the_best_gold_and_averages():
    out = llm_eval.f1_summary(["Broncos won", "Paris"], [["Carolina", "Denver Broncos"], ["paris", "France"]])
    assert out == {"n": 2, "f1": pytest.approx((0.5 + 1.0) / 2), "exact_match": 0.5}
    with pytest.raises(ValueError, match="at least one gold"):
        llm_eval.f1_summary(["x"], [[]])


def test_mmlu_prompt_is_lm_evals_zero_shot_prompt():
    context, continuations = eval_data.mmlu_prompt(Q)
    assert context == ("The following are multiple choice questions (with answers) about abstract algebra.\n\n"
                       "What is 1 + 1?\nA. 1\nB. 2\nC. 3\nD. 4\nAnswer:")
    assert continuations == [" A", " B", " C", " D"]
    context, continuations = eval_data.bigbench_prompt(Q)
    assert context == "Q: What is 1 + 1?\n  choice: 1\n  choice: 2\n  choice: 3\n  choice: 4\nA:"
    assert continuations == [" 1", " 2", " 3", " 4"]


# ------------------------------------------------------------------------ files and bad items


def _flan_yaml(samples):
    import yaml
    return yaml.safe_dump({"dataset_name": "toy_subject", "fewshot_config": {"samples": samples}})


def test_flan_cot_files_parse_and_an_answer_outside_the_choices_is_a_counted_skip(tmp_path):
    good = {"question": "Pick two.\n(A) one (B) two (C) three (D) four",
            "target": "Let's think step by step. Two is (B)... The answer is (B)."}
    five = {"question": "Pick e.\n(A) a (B) b (C) c (D) d (E) e", "target": "The answer is (E)."}
    outside = {"question": "Pick.\n(A) a (B) b (C) c (D) d", "target": "The answer is (E)."}
    unanswered = {"question": "Pick.\n(A) a (B) b (C) c (D) d", "target": "Let's think."}
    (tmp_path / "mmlu_toy_subject.yaml").write_text(_flan_yaml([good, five, outside, unanswered]))
    data = eval_data.load_mmlu_flan_cot(tmp_path)
    assert data.items == [MCQuestion("toy_subject/0", "toy_subject", "Pick two.", ("one", "two", "three", "four"), 1),
                          MCQuestion("toy_subject/1", "toy_subject", "Pick e.", ("a", "b", "c", "d", "e"), 4)]
    assert data.skipped == ["toy_subject/2: answer (E) is outside its choices A-D",
                            "toy_subject/3: no 'The answer is (X)' in its target"]
    with pytest.raises(FileNotFoundError, match="mmlu-flan-cot"):
        eval_data.load_mmlu_flan_cot(tmp_path / "missing")


def test_a_question_built_with_an_answer_outside_its_choices_raises():
    with pytest.raises(ValueError, match="answer 4 is outside its 4 choices"):
        MCQuestion("q", "s", "?", ("a", "b", "c", "d"), 4)


def test_mmlu_records_file_skips_bad_answers(tmp_path):
    path = tmp_path / "mmlu_test.jsonl"
    rows = [{"question": "?", "subject": "s", "choices": ["a", "b", "c", "d"], "answer": 2},
            {"question": "?", "subject": "s", "choices": ["a", "b", "c", "d"], "answer": "E"},
            {"question": "?", "subject": "s", "choices": ["a", "b", "c", "d"], "answer": "B"}]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    data = eval_data.load_mmlu_records(path)
    assert [q.answer for q in data.items] == [2, 1]
    assert data.skipped == ["mmlu_test.jsonl:2: answer 'E' is outside its 4 choices"]


def test_bigbench_task_needs_exactly_one_right_choice(tmp_path):
    path = tmp_path / "task.json"
    path.write_text(json.dumps({"name": "crass_ai", "examples": [
        {"input": "If not?", "target_scores": {"x": 0, "y": 1, "z": 0}},
        {"input": "If not?", "target_scores": {"x": 0, "y": 0}}]}))
    data = eval_data.load_bigbench_mc(path)
    assert data.items == [MCQuestion("crass_ai/0", "crass_ai", "If not?", ("x", "y", "z"), 1)]
    assert data.skipped == ["crass_ai/1: 0 choices scored 1 in target_scores, expected exactly one"]


def test_squad_file_keeps_questions_with_gold_answers(tmp_path):
    path = tmp_path / "squad.json"
    path.write_text(json.dumps({"data": [{"title": "T", "paragraphs": [{"context": "C", "qas": [
        {"id": "1", "question": "Q1", "answers": [{"text": "A"}, {"text": "B"}]},
        {"id": "2", "question": "Q2", "answers": []}]}]}]}))
    data = eval_data.load_squad(path)
    assert data.items == [{"id": "1", "title": "T", "context": "C", "question": "Q1", "answers": ["A", "B"]}]
    assert data.skipped == ["2: no gold answer"]
    assert eval_data.squad_prompt(data.items[0]) == "Title: T\n\nBackground: C\n\nQuestion: Q1\n\nAnswer:"


# -------------------------------------------------------------------------- model scoring


@pytest.mark.parametrize("context, continuations", [
    ("Answer: ", ["A", "BC"]),       # trailing space moves into the continuation: 2 and 3 tokens, one batch
    ("Answer:", ["A", "B", "C"]),     # one token each after the same context: one forward pass
])
def test_choice_loglikelihood_equals_the_sum_over_continuation_tokens(context, continuations):
    tok, model = tiny_tokenizer(), tiny_llama()
    got = llm_eval.choice_loglikelihoods(model, tok, context, continuations)
    for cont, value in zip(continuations, got):
        ids = tok(context + cont)["input_ids"]                # one token per byte
        n = len(context + cont) - len(context.rstrip())
        with torch.no_grad():
            logprobs = F.log_softmax(model(torch.tensor([ids])).logits[0], -1)
        by_hand = sum(float(logprobs[t - 1, ids[t]]) for t in range(len(ids) - n, len(ids)))
        assert value == pytest.approx(by_hand, abs=1e-5)
    assert llm_eval.encode_pair(tok, "Answer: ", "A")[1] == tok(" A")["input_ids"]


def test_scorer_predicts_the_most_likely_choice_and_counts_long_prompts():
    tok, model = tiny_tokenizer(), tiny_llama()
    long_q = MCQuestion("algebra/1", "algebra", "x" * 300, ("1", "2"), 0)
    data = EvalSet([Q, long_q], skipped=["algebra/2: answer (E) is outside its choices A-D"])
    result = llm_eval.score_multiple_choice(model, tok, data, eval_data.mmlu_prompt, max_length=200)
    (row,) = result.rows
    lls = llm_eval.choice_loglikelihoods(model, tok, *eval_data.mmlu_prompt(Q))
    assert row["pred"] == max(range(4), key=lls.__getitem__) and row["correct"] == (row["pred"] == 1)
    assert len(result.skipped) == 2 and "above max_length=200" in result.skipped[1]
    assert result.summary()["n"] == 1 and result.summary()["skipped"] == 2


def test_greedy_answer_matches_generate_cut_at_the_newline():
    tok, model = tiny_tokenizer(), tiny_llama(seed=1)
    prompt = "Question: who?\nAnswer:"
    ids = tok(prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        ref = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
    expected = tok.decode(ref[0, ids.shape[1]:]).split("\n")[0].split(tok.eos_token)[0].strip()
    assert llm_eval.generate_answer(model, tok, prompt, max_new_tokens=8) == expected
    whole = tok.decode(ref[0, ids.shape[1]:]).split(tok.eos_token)[0].strip()     # every line of it
    assert llm_eval.generate_answer(model, tok, prompt, max_new_tokens=8, stop_at_newline=False) == whole


def test_our_scorer_equals_lm_evals_harness(tmp_path):
    pytest.importorskip("lm_eval")
    from chainfed_core.llm_harness import harness_multiple_choice

    tok, model = tiny_tokenizer(), tiny_llama()
    questions = [Q, MCQuestion("algebra/1", "algebra", "Pick e.", ("a", "b", "c", "d", "e"), 4),
                 MCQuestion("bio/0", "college_biology", "Cells?", ("yes", "no", "maybe", "never"), 0)]
    def one_token_letters(q):               # "...Answer:" + "A": the one-forward-pass path
        context, letters = eval_data.mmlu_prompt(q)
        return context, [x.strip() for x in letters]

    for i, prompt in enumerate((eval_data.mmlu_prompt, one_token_letters, eval_data.bigbench_prompt)):
        data = EvalSet(questions)
        ours = llm_eval.score_multiple_choice(model, tok, data, prompt)
        harness = harness_multiple_choice(model, tok, data, prompt, tmp_path / str(i), batch_size=2)
        assert [r["qid"] for r in harness.rows] == [q.qid for q in questions]
        for a, b in zip(ours.rows, harness.rows):
            assert a["logliks"] == pytest.approx(b["logliks"], abs=1e-4)
            assert (a["pred"], a["correct"]) == (b["pred"], b["correct"])


# ------------------------------------------------------------------------- the real files


@pytest.mark.slow
def test_real_mmlu_flan_cot_has_282_answered_questions_over_57_subjects():
    from chainfed_core.assets import fetch

    data = eval_data.load_mmlu_flan_cot(fetch("mmlu-flan-cot"))
    assert len(data.items) == 282 and data.skipped == []
    assert len({q.subject for q in data.items}) == 57
    assert [len(q.choices) for q in data.items].count(5) == 1          # one college-chemistry question has (E)
    assert sorted({q.answer for q in data.items}) == [0, 1, 2, 3, 4]


@pytest.mark.slow
def test_real_alpaca_demo_has_999_records():
    from chainfed_core import instruct
    from chainfed_core.assets import fetch

    records = instruct.load_alpaca(fetch("alpaca-en-demo"))
    assert len(records) == 999 and sum(bool(r["input"].strip()) for r in records) == 412
