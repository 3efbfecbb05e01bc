"""Federated instruction tuning on Alpaca records (issue 15): the task, ChainFed / Full Adapters /
No-FT end to end on a tiny LLaMA, the response-only loss, FOAT on token states, exact resume,
and the benchmarks scored after the last round."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from chainfed_core import instruct, instruct_runs
from chainfed_core.backbone import IGNORE_INDEX
from chainfed_core.checkpoint import load_final_state
from chainfed_core.config import RunConfig
from chainfed_core.federated import run
from chainfed_core.foat import profile_client
from chainfed_core.population import Population
from chainfed_core.rounds import client_profile
from chainfed_core.task import build_task
from chainfed_core.train import batches, get_state

from runtime_checks import assert_same_state, fork_and_kill, without_timing

pytestmark = pytest.mark.usefixtures("one_thread")

RECORDS = [{"instruction": f"Add {a} and {a + 3}.", "input": "" if a % 2 else f"{a} {a + 3}",
            "output": f"The sum is {2 * a + 3}."} for a in range(60)]
MAX_LENGTH = 256


@pytest.fixture(autouse=True)
def hand_made_records(monkeypatch):
    """The tests read 60 hand-made records, not the asset, and score no benchmark by default."""
    monkeypatch.setattr(instruct_runs, "alpaca_records", lambda asset: list(RECORDS))
    monkeypatch.setattr(instruct_runs, "DEFAULT_EVALS", {})


def config(method="chainfed", **over) -> RunConfig:
    data = {"method": method, "seed": 1, "model": {"name": "tiny-llama-L4-H16", "max_length": MAX_LENGTH},
            "adapter": {"bottleneck": 4}, "chain": {"window": 2, "gpo_lambda": 0.2, "foat_tau": 0.8},
            "train": {"optimizer": "adamw", "lr": 1e-2, "batch_size": 4, "local_steps": 3},
            "data": {"dataset": "alpaca", "num_clients": 5, "max_test_examples": 8},
            "fed": {"rounds": 2, "clients_per_round": 2, "eval_every": 1, "memory_aware": False,
                    "memory_scale": 1e12}}
    for section, values in over.items():
        data[section] = {**data.get(section, {}), **values}
    return RunConfig.from_dict(data)


def test_alpaca_task_holds_out_records_and_labels_only_responses():
    task = build_task(config())
    assert len(task.train) == 52 and len(task.test) == 8
    assert not set(task.train["record"]) & set(task.test["record"])
    assert task.data["records"] == 60 and task.data["train"]["rows"] == 52 and task.data["asset"] == "alpaca-en-demo"
    tok = instruct.byte_tokenizer()
    row = task.train[0]
    assert len(row["input_ids"]) == len(row["lm_labels"]) == MAX_LENGTH         # padded for the population
    n = sum(row["attention_mask"])
    labelled = [i for i, lab in enumerate(row["lm_labels"]) if lab != IGNORE_INDEX]
    assert labelled == list(range(labelled[0], n))                              # the response, to the end
    assert tok.decode(row["input_ids"][labelled[0]:n - 1]).startswith("The sum is ")
    assert row["lm_labels"][n - 1] == tok.eos_token_id
    assert tok.decode(row["input_ids"][:labelled[0]]).endswith("### Response:\n")


def test_only_response_tokens_carry_loss():
    cfg = config()
    task = build_task(cfg)
    bb = task.make_backbone()
    batch = next(batches(Population(cfg, task.train).data(0), 4, shuffle=False, pad_id=task.pad_id))
    assert set(batch) >= {"input_ids", "attention_mask", "lm_labels"}
    assert batch["input_ids"].shape[1] == int(batch["attention_mask"].sum(1).max())   # trimmed to the longest
    hidden, ctx = bb.embed(batch)
    loss, logits = bb.head_loss(bb.run_layers(range(bb.num_layers), hidden, ctx), batch, ctx)
    targets = batch["lm_labels"][:, 1:]
    keep = targets != IGNORE_INDEX
    manual = F.cross_entropy(logits[:, :-1][keep].float(), targets[keep])
    assert torch.allclose(loss, manual)
    prompt = (batch["lm_labels"] == IGNORE_INDEX) & (batch["attention_mask"] == 1)
    assert prompt.any() and keep.sum() < batch["attention_mask"].sum() - len(batch["input_ids"])


def test_chainfed_trains_only_its_window_with_foat_on_token_states(tmp_path):
    cfg = config(fed={"rounds": 2})
    record = run(cfg, tmp_path, progress=False)
    assert len(record["foat_scores"]) == 4 and record["start_layer"] is not None
    assert all(0 < s <= 1 + 1e-9 for s in record["foat_scores"])
    windows = [tuple(m["window"]) for m in record["history"]]
    start = record["start_layer"]
    assert windows[0] == (start, min(start + 2, 4))
    assert all(math.isfinite(m["train_loss"]) and math.isfinite(m["test_loss"]) for m in record["history"])
    assert "test_perplexity" in record["history"][-1] and "test_accuracy" not in record["history"][-1]
    trained = {i for begin, end in windows for i in range(begin, end)}
    final = load_final_state(tmp_path)
    initial = get_state(build_task(cfg).make_backbone(), final)
    for name in final:
        layer = int(name.split(".")[1])
        assert torch.equal(final[name], initial[name]) == (layer not in trained), name
    assert record["final_eval"] == {"evals": {}}


def test_foat_scores_ignore_padding():
    cfg = config()
    task = build_task(cfg)
    bb = task.make_backbone()
    rows = Population(cfg, task.train).data(0)
    scores = client_profile(bb, cfg, rows, task.pad_id)
    batch = next(batches(rows, min(cfg.chain.foat_batch_size, len(rows)), shuffle=True, seed=cfg.seed,
                         pad_id=task.pad_id))
    longer = {k: F.pad(v, (0, 7), value=task.pad_id if k == "input_ids" else 0) for k, v in batch.items()
              if k in ("input_ids", "attention_mask")}                  # seven more padding tokens a row
    assert scores == pytest.approx(profile_client(bb, longer), abs=1e-6)


def test_full_adapters_lowers_the_loss_and_no_ft_trains_nothing(tmp_path):
    full = run(config("full_adapters", fed={"rounds": 4}), tmp_path / "full", progress=False)
    losses = [m["test_loss"] for m in full["history"]]
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]
    assert all(m["window"] == [0, 4] for m in full["history"])
    none = run(config("no_ft"), tmp_path / "none", progress=False)
    assert all(m["bytes_up"] == 0 and math.isnan(m["train_loss"]) for m in none["history"])
    assert none["history"][0]["test_loss"] == none["history"][-1]["test_loss"]


def _quiet_run(cfg, out):
    run(cfg, out, progress=False)


def test_kill_9_resumes_an_instruction_run_bitwise(tmp_path):
    """As the simulator's resume test (``runtime_checks``); histories compared as JSON: a causal
    LM's train accuracy is NaN, which equals itself only as text."""
    cfg = config(fed={"rounds": 4})
    reference = run(cfg, tmp_path / "ref", progress=False)
    fork_and_kill(_quiet_run, (cfg, tmp_path / "killed"), tmp_path / "killed", after_rounds=2)
    resumed = run(cfg, tmp_path / "killed", progress=False)
    assert json.dumps(without_timing(resumed["history"])) == json.dumps(without_timing(reference["history"]))
    assert_same_state(load_final_state(tmp_path / "killed"), load_final_state(tmp_path / "ref"))


def test_the_benchmarks_after_the_last_round_go_into_the_record(tmp_path, monkeypatch):
    seen = []

    def fake_mmlu(backbone, tokenizer, limit):
        seen.append((backbone.is_causal_lm, limit))
        return {"n": limit, "subject_average": 0.5}

    monkeypatch.setitem(instruct_runs.SCORERS, "mmlu", fake_mmlu)
    cfg = config()
    record = run(cfg, tmp_path, progress=False, task=instruct_runs.build_instruct_task(cfg, {"mmlu": 3}))
    assert seen == [(True, 3)]
    assert record["final_eval"]["evals"] == {"mmlu": 3} and record["final_eval"]["mmlu"]["n"] == 3
    with pytest.raises(ValueError, match="unknown suite"):
        instruct_runs.final_evaluation(None, tokenizer=None, evals={"hellaswag": 1})


def test_spread_takes_every_part_of_a_list():
    assert instruct_runs.spread(list(range(10)), 5) == [0, 2, 4, 6, 8]
    assert instruct_runs.spread([1, 2], None) == [1, 2] and instruct_runs.spread([1, 2], 9) == [1, 2]


@pytest.mark.slow
def test_mmlu_on_a_tiny_model_scores_the_questions_asked():
    bb = instruct_runs.tiny_decoder("tiny-llama-L2-H16", 259, seed=0)
    out = instruct_runs.score_mmlu(bb, instruct.byte_tokenizer(), 5)
    assert out["n"] == 5 and len(out["predictions"]) == 5 and 0 <= out["micro_accuracy"] <= 1


def test_table3_configs_rows_memory_and_the_claim():
    import pandas as pd

    from chainfed_core import instruct_table as it

    cfgs = {v: it.run_config("cpu", v) for v in it.VARIANTS}
    assert cfgs["ChainFed W=3"].chain.window == 3 and cfgs["ChainFed W=3"].method == "chainfed"
    assert cfgs["No-FT"].fed.rounds == 1 and cfgs["Full Adapters"].fed.rounds == it.PROFILES["cpu"]["rounds"]
    c = cfgs["Full Adapters"]
    assert (c.data.num_clients, c.fed.clients_per_round, c.train.local_steps, c.train.optimizer) == (20, 2, 10, "adamw")
    assert it.run_config("cpu-full", "No-FT") == cfgs["No-FT"]
    assert it.canonical("cpu-full") == "cpu" and it.canonical("gpu-full") == "gpu-full"
    record = {"history": [{"test_loss": 2.0, "seconds_train": 3.0}], "start_layer": 2, "window": 2, "wall_s": 9.0,
              "final_eval": {"mmlu": {"subject_average": 0.3, "micro_accuracy": 0.25, "seconds": 4.0},
                             "crass": {"micro_accuracy": 0.5, "seconds": 1.0}}}
    rows = pd.DataFrame([it.row_of("Full Adapters", record),
                         it.row_of("ChainFed W=2", {**record, "final_eval": {
                             "mmlu": {"subject_average": 0.4, "micro_accuracy": 0.3}, "crass": {"micro_accuracy": 0.5}}})]
                        ).set_index("variant")
    assert rows.loc["Full Adapters", "average"] == pytest.approx(40.0) and rows.loc["Full Adapters", "eval_s"] == 5.0
    assert math.isnan(rows.loc["Full Adapters", "BBH"]) and math.isnan(rows.loc["Full Adapters", "DROP"])
    with_bbh = it.row_of("No-FT", {**record, "final_eval": {"bbh": {"task_average": 0.25, "micro_accuracy": 0.3}}})
    assert with_bbh["BBH"] == 25.0 and with_bbh["average"] == 25.0 and with_bbh["suites"] == 1
    assert set(it.not_run("quick")) == {"BBH", "DROP", "CRASS"} and it.not_run("cpu") == {}
    assert it.PROFILES["cpu"]["evals"]["bbh"] == it.BBH_CPU
    memory = it.memory_reductions("quick")            # a tiny model: the LLaMA shapes only
    assert set(memory["W"]) == {2, 3, 4} and not memory["model"].str.contains("ours").any()
    assert (memory["reduction (streamed)"] > memory["reduction (resident)"]).all()
    assert (memory["reduction (resident)"] > 1).all()
    table = it.table3(rows, memory)
    assert table.loc["ChainFed W=2", ("paper LLaMA2-7B", "MMLU")] == 45.17
    assert table.loc["Full Adapters", ("ours", "memory_reduction")] == 1.0
    sentence = it.claim(rows)
    assert sentence.startswith("ChainFed >= Full Adapters holds here for ChainFed W=2")
    assert "average over MMLU, CRASS" in sentence
