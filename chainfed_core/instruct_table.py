"""Table 3's runs (federated instruction tuning): the profiles, one RunConfig per variant, the
rows of the table from the records, the memory reductions per W, the paper's rows beside.

The notebook ``notebooks/table3_instruction_tuning.ipynb`` only calls these; the task and the
benchmarks are :mod:`chainfed_core.instruct_runs`.
"""

from __future__ import annotations

import math
from typing import Any

from .config import RunConfig
from .instruct_runs import build_instruct_task, untied

VARIANTS: dict[str, tuple[str, dict]] = {"No-FT": ("no_ft", {}), "Full Adapters": ("full_adapters", {}),
                                         **{f"ChainFed W={w}": ("chainfed", {"window": w}) for w in (2, 3, 4)},
                                         # GPO's second reading: the local loss reads through a lens of the
                                         # stage's own (chainfed_core.gpo), not the bare frozen head
                                         "ChainFed W=2 (stage head)": ("chainfed",
                                                                       {"window": 2, "local_head": "stage"})}
# The paper's LLaMA settings (Section 5.1): 20 clients, 10% a round, 10 local AdamW steps,
# batch 16, 512 tokens, lambda 0.2, tau 0.8; memory reductions modelled at these.
PAPER_STEP = {"batch_size": 16, "seq_len": 512}
# LLaMA3.1-8B's shape (chainfed_core.bench.SHAPES has LLaMA2's)
LLAMA31_8B = dict(model_type="llama", hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                  num_key_value_heads=8, intermediate_size=14336, vocab_size=128256, tie_word_embeddings=False)
# BBH's questions per task at the cpu profile, spread over each task's file: 3 x 21 tasks = 63 questions, about
# 3.3 s each for SmolLM2-135M on one core of the shared machine (21 questions took 76 s): under 4 min a model
BBH_CPU = 3
_COMMON = {"num_clients": 20, "clients_per_round": 2, "local_steps": 10, "lr": 3e-4}
PROFILES: dict[str, dict[str, Any]] = {
    "quick": {"help": "CI-sized: a random tiny LLaMA (4 layers, hidden 32, byte tokens) on 48 Alpaca records over "
                      "4 clients, 2 a round, 2 rounds of 2 local AdamW steps; MMLU on 8 questions.",
              "model": "tiny-llama-L4-H32", "threads": 1, "max_length": 384, "max_train": 48, "test": 8,
              "num_clients": 4, "clients_per_round": 2, "rounds": 2, "local_steps": 2, "batch_size": 4,
              "lr": 1e-3, "eval_every": 1, "evals": {"mmlu": 8}},
    # sized from one measured round (results/instruct/round_timing_smollm2.json, at 4 x 256 tokens a step):
    # 29 rounds, so that ChainFed W = 2's window visits every position of SmolLM2's 30 layers once
    "cpu": {"help": "SmolLM2-135M (LLaMA architecture, the paper's LLaMA role) on the 999 Alpaca records (32 held "
                    "out) over 20 clients, 2 (10%) a round, 10 local AdamW steps of 2 records cut at 192 tokens, "
                    "29 rounds (ChainFed W = 2's window visits every layer once), one thread; held-out response "
                    "loss every 10 rounds; MMLU on its 282 questions, BBH on 3 questions of each of its 21 "
                    "multiple-choice tasks, CRASS on its 44, token F1 on 10 SQuAD-shifts questions (DROP's role) "
                    "after the last round.",
            "model": "smollm2-135m", "threads": 1, "max_length": 192, "max_train": None, "test": 32, "rounds": 29,
            "batch_size": 2, "eval_every": 10, "evals": {"mmlu": None, "crass": None, "drop": 10, "bbh": BBH_CPU},
            **_COMMON},
    "gpu-full": {"help": "The paper's step on SmolLM2-135M on one GPU (train.device 'cuda'): batch 16 of 512 "
                         "tokens, 10 local AdamW steps, 20 clients, 2 a round, 30 rounds; every MMLU and CRASS "
                         "question, 250 a BBH task (BBH's own size), 200 SQuAD-shifts answers.",
                 "model": "smollm2-135m", "threads": 16, "max_length": 512, "max_train": None, "test": 64,
                 "rounds": 30, "batch_size": 16, "eval_every": 5,
                 "evals": {"mmlu": None, "crass": None, "drop": 200, "bbh": 250}, "device": "cuda",
                 **_COMMON},
}
PROFILES["cpu-full"] = PROFILES["cpu"]


def profile(name: str) -> dict[str, Any]:
    if name not in PROFILES:
        raise ValueError(f"profile: {name!r} is not one of {list(PROFILES)}")
    return dict(PROFILES[name])


def canonical(name: str) -> str:
    """The profile ``name`` stands for, whose records it shares: 'cpu-full' is 'cpu'."""
    profile(name)
    return next(k for k, v in PROFILES.items() if v is PROFILES[name])


def run_config(profile_name: str, variant: str, seed: int = 0) -> RunConfig:
    """The RunConfig of one Table 3 variant at a profile (every device holds every method: the
    clients sampled each round are the same for all of them)."""
    p, (method, chain) = profile(profile_name), VARIANTS[variant]
    rounds = 1 if method == "no_ft" else p["rounds"]          # nothing trains: one round's evaluation
    return RunConfig.from_dict({
        "method": method, "seed": seed, "model": {"name": p["model"], "max_length": p["max_length"]},
        "adapter": {"bottleneck": 64}, "chain": {"gpo_lambda": 0.2, "foat_tau": 0.8, "window": 2, **chain},
        "train": {"optimizer": "adamw", "lr": p["lr"], "batch_size": p["batch_size"], "local_steps": p["local_steps"],
                  **({"device": p["device"]} if "device" in p else {})},
        "data": {"dataset": "alpaca", "num_clients": p["num_clients"], "max_train_examples": p["max_train"],
                 "max_test_examples": p["test"]},
        "fed": {"rounds": rounds, "clients_per_round": p["clients_per_round"], "eval_every": min(p["eval_every"], rounds),
                "memory_aware": False, "memory_scale": 1e12}})


def ensure_instruct(cfg: RunConfig, root, evals: dict[str, int | None], *, progress: bool = True,
                    deadline: float | None = None) -> dict:
    """The record of an instruction-tuning config under ``root``: reused if there, else run (its
    final evaluation scoring ``evals``; no round starts after ``deadline``, a ``time.time()``, as in
    :func:`chainfed_core.federated.run`); a suite of ``evals`` a finished record lacks is scored on
    the run's final model, rebuilt from its checkpoint
    (:func:`chainfed_core.instruct_state.add_missing_suites`)."""
    from pathlib import Path

    from .experiments import config_hash, ensure_run
    from .federated import run
    from .instruct_state import add_missing_suites

    runner = lambda cfg, folder, progress: run(cfg, folder, progress=progress, deadline=deadline,  # noqa: E731
                                               task=build_instruct_task(cfg, evals))
    record = ensure_run(cfg, root, runner=runner, progress=progress)
    return add_missing_suites(cfg, Path(root) / config_hash(cfg), record, evals)


def run_variant(profile_name: str, variant: str, root, *, progress: bool = True) -> dict:
    """The record of one variant under ``root`` (``results/runs/<profile>``): :func:`ensure_instruct`
    of its config and the profile's suites."""
    return ensure_instruct(run_config(profile_name, variant), root, profile(profile_name)["evals"], progress=progress)


def _percent(suite: dict | None, key: str) -> float:
    value = (suite or {}).get(key)
    return math.nan if value is None else 100 * value


def row_of(variant: str, record: dict) -> dict:
    """One row of Table 3 from a record: MMLU (subject average), DROP-role F1, CRASS, in %."""
    fe, last = record.get("final_eval", {}), (record.get("history") or [{}])[-1]
    scores = {"MMLU": _percent(fe.get("mmlu"), "subject_average"), "BBH": _percent(fe.get("bbh"), "task_average"),
              "DROP": _percent(fe.get("drop"), "f1"), "CRASS": _percent(fe.get("crass"), "micro_accuracy")}
    ran = [v for v in scores.values() if not math.isnan(v)]
    return {"variant": variant, **scores, "average": sum(ran) / len(ran) if ran else math.nan,
            "suites": len(ran), "MMLU micro": _percent(fe.get("mmlu"), "micro_accuracy"),
            "held-out loss": last.get("test_loss", math.nan), "start_layer": record.get("start_layer"),
            "window": record.get("window"), "rounds": len(record.get("history", [])),
            "wall_s": record.get("wall_s"), "train_s": sum(m.get("seconds_train", 0.0) for m in record["history"]),
            "eval_s": sum(s.get("seconds", 0.0) for s in fe.values() if isinstance(s, dict) and "seconds" in s)}


def memory_reductions(profile_name: str) -> "Any":
    """Full Adapters' peak over ChainFed's, per W (:mod:`chainfed_core.memory_model`): our model at
    the profile's step, and the LLaMA2-7B / LLaMA3.1-8B shapes at the paper's (16 x 512, bf16 weights);
    ChainFed as deployed (layers streamed, prefix cached) and with the whole model resident."""
    import pandas as pd

    from .bench import SHAPES
    from .experiments import model_config
    from .memory_model import client_peak_bytes, peak_training_bytes

    p = profile(profile_name)
    models = {f"{p['model']} (ours, {p['batch_size']} x {p['max_length']}, fp32)":
              (untied(model_config(p["model"])) if not p["model"].startswith("tiny") else None,
               p["batch_size"], p["max_length"], "float32"),
              "LLaMA2-7B (16 x 512, bf16)": (SHAPES["llama2-7b"], 16, 512, "bfloat16"),
              "LLaMA3.1-8B (16 x 512, bf16)": (LLAMA31_8B, 16, 512, "bfloat16")}
    rows = []
    for label, (shape, batch, length, dtype) in models.items():
        if shape is None:
            continue                     # a tiny model's shape is not a device's memory question
        step = dict(batch_size=batch, seq_len=length, optimizer="adamw", dtype=dtype)
        full = client_peak_bytes(shape, "full_adapters", 1, **step).total
        for w in (2, 3, 4):
            streamed = client_peak_bytes(shape, "chainfed", w, **step).total
            resident = peak_training_bytes(shape, "chainfed", w, **step).total
            rows.append({"model": label, "W": w, "Full Adapters GB": full / 2 ** 30,
                         "ChainFed GB (streamed)": streamed / 2 ** 30, "reduction (streamed)": full / streamed,
                         "ChainFed GB (resident)": resident / 2 ** 30, "reduction (resident)": full / resident})
    return pd.DataFrame(rows)


def paper_row(model: str, variant: str) -> dict:
    """The paper's Table 3 row of ``variant`` for ``model`` (LLaMA2-7B, LLaMA3.1-8B); {} where it has none."""
    from . import paper
    return {c: r.value for c, r in paper.TABLE3.get((model, variant), {}).items()}


# ---------------------------------------------------------------------- the table
SCORES = ("MMLU", "BBH", "DROP", "CRASS", "average")
BBH_NOTE = ("BBH: the multiple-choice form of 21 of its 27 tasks, from their BIG-bench source tasks, zero-shot "
            "log-likelihood of each choice (the paper: 3-shot CoT, exact match of generated answers; "
            "chainfed_core/bbh.py)")
_SUITE_OF = {"MMLU": "mmlu", "BBH": "bbh", "DROP": "drop", "CRASS": "crass"}


def not_run(profile_name: str) -> dict[str, str]:
    """The Table 3 columns a profile does not score, and why (the quick profile: MMLU only)."""
    evals = profile(profile_name)["evals"]
    return {c: f"not run at profile {profile_name!r} (it scores {sorted(evals)})"
            for c, suite in _SUITE_OF.items() if suite not in evals}
PAPER_MODEL = "LLaMA2-7B"


def table3(rows, memory, paper_model: str = PAPER_MODEL):
    """Our scores (%) and memory reduction per variant, the paper's row of ``paper_model`` beside.

    ``rows``: a frame of :func:`row_of` rows indexed by variant; ``memory``: :func:`memory_reductions`
    (our model's rows give the reduction column, streamed as deployed; none for a tiny model)."""
    import pandas as pd

    ours = memory[memory["model"].str.contains("(ours", regex=False)] if len(memory) else memory
    reduction = {f"ChainFed W={w}": r for w, r in zip(ours.get("W", []), ours.get("reduction (streamed)", []))}
    out = pd.DataFrame(index=rows.index)
    for c in SCORES:
        out[("ours", c)] = rows[c]
    out[("ours", "memory_reduction")] = [1.0 if v == "Full Adapters" else reduction.get(v, math.nan)
                                         for v in rows.index]
    for c in (*SCORES, "memory_reduction"):
        out[(f"paper {paper_model}", c)] = [paper_row(paper_model, v).get(c, math.nan) for v in rows.index]
    out.columns = pd.MultiIndex.from_tuples(out.columns)
    return out


def claim(rows) -> str:
    """A plain sentence: does ChainFed (each W) reach Full Adapters' average here, and on MMLU?"""
    full = rows.loc["Full Adapters"]
    suites = ", ".join(c for c in ("MMLU", "BBH", "DROP", "CRASS") if not math.isnan(full[c]))
    parts = []
    for v in [v for v in rows.index if v.startswith("ChainFed")]:
        r = rows.loc[v]
        parts.append(f"{v}: average {r['average']:.2f} vs {full['average']:.2f} "
                     f"({'holds' if r['average'] >= full['average'] else 'does not hold'}), "
                     f"MMLU {r['MMLU']:.2f} vs {full['MMLU']:.2f}")
    held = [v for v in rows.index if v.startswith("ChainFed") and rows.loc[v, "average"] >= full["average"]]
    verdict = (f"ChainFed >= Full Adapters holds here for {', '.join(held)}" if held
               else "ChainFed >= Full Adapters does not hold here for any W")
    return f"{verdict} (average over {suites}, %). " + "; ".join(parts) + "."


EARLY_EXIT = "results/instruct/early_exit_{profile}.json"     # benchmarks/decoder_early_exit.py's record


def early_exit(profile_name: str, repo=".."):
    """The held-out response loss after every layer of each Table 3 run (layers x variants), from
    ``benchmarks/decoder_early_exit.py``'s record of the profile; None where there is none."""
    import json
    from pathlib import Path

    import pandas as pd

    path = Path(repo) / EARLY_EXIT.format(profile=canonical(profile_name))
    if not path.exists():
        return None
    variants = json.loads(path.read_text())["variants"]
    frame = pd.DataFrame({v: r["layer_loss"] for v, r in variants.items()})
    frame.index = pd.RangeIndex(1, len(frame) + 1, name="after layer")
    return frame


# The runs each instruction-tuning notebook asks for with its defaults (the GPU script plans them):
# Table 3's variants (Figure 11 answers with them), Figure 10's two sweeps, App. F.2's decoders.
NOTEBOOK_RUNS = ("table3_instruction_tuning", "fig11_case_study", "fig10_llm_sensitivity", "appF2_generalization")


def notebook_runs(artefact: str, profile_name: str) -> list:
    """The runs of one instruction-tuning notebook at a profile, as grid runs
    (:class:`chainfed_core.experiments.Run`) that carry the suites their final evaluation scores."""
    from . import instruct_sensitivity as sens
    from .experiments import Run

    if artefact in ("table3_instruction_tuning", "fig11_case_study"):
        pairs, evals = [(v, run_config(profile_name, v)) for v in VARIANTS], profile(profile_name)["evals"]
    elif artefact == "fig10_llm_sensitivity":
        pairs = [(f"ChainFed W=2, {k}={labels[k]}", cfg) for k in sens.SWEEPS
                 for labels, cfg in sens.sweep_runs(profile_name, k)]
        evals = sens.profile(profile_name)["evals"]
    elif artefact == "appF2_generalization":
        pairs = [(f"{labels['variant']} on {labels['decoder']}", cfg) for labels, cfg in sens.f2_runs(profile_name)]
        evals = sens.profile(profile_name)["evals"]
    else:
        raise ValueError(f"artefact: {artefact!r} is not one of {list(NOTEBOOK_RUNS)}")
    return [Run(label, cfg.model.name, cfg.data.dataset, "iid", cfg.seed, cfg, evals) for label, cfg in pairs]
