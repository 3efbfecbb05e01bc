"""Figure 11's case study: a few held-out Alpaca instructions and the greedy answers of the base
model (No-FT), Full Adapters and ChainFed (each W with a run) side by side.

The instructions are :data:`CASES` records spread over the runs' own held-out split
(:func:`chainfed_core.instruct_runs.split_records`: the same for every Table 3 variant of a
profile, none of them trained on). Each answer is the greedy continuation of the record's Alpaca
prompt (the template the runs trained with) up to the end token or :data:`MAX_NEW_TOKENS` tokens
(:func:`chainfed_core.llm_eval.generate_answer`), by the run's final model rebuilt from its
checkpoint (:func:`chainfed_core.instruct_state.final_backbone`).

The answers live in a record (:func:`record_path`: ``results/instruct/fig11_case_study_<profile>.json``,
under ``quick/`` for the quick profile) with the run hash of each variant; :func:`case_study`
reads it back, adds the variants it lacks whose runs exist (or are run, ``run_missing``), and
refuses a record made with other settings or from other runs (delete it to regenerate).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from . import instruct_table as it

CASES = 5
MAX_NEW_TOKENS = 96
QUICK_NEW_TOKENS = 24         # the quick profile's tiny random model answers noise: a short one keeps CI fast
DECODING = "greedy, until the end token or max_new_tokens"


def record_path(profile_name: str, repo: str | Path = "..") -> Path:
    """Where the case study of a profile is recorded (the quick one git-ignored)."""
    folder = Path(repo) / "results" / "instruct" / ("quick" if profile_name == "quick" else "")
    return folder / f"fig11_case_study_{profile_name}.json"


def held_out_cases(cfg, n: int = CASES) -> list[dict]:
    """``n`` records spread over the held-out split of ``cfg``'s Alpaca records (index, instruction, input, output)."""
    from .instruct_runs import ALPACA, alpaca_records, split_records, spread

    records = alpaca_records(ALPACA[cfg.data.dataset])
    _, held_out = split_records(records, cfg)
    fields = ("instruction", "input", "output")
    return [{"record": i, **{k: records[i][k] for k in fields}} for i in spread(held_out, n)]


def answers_of(cfg, folder, cases: list[dict], max_new_tokens: int) -> list[str]:
    """The greedy answers of a finished run's final model to each case's Alpaca prompt."""
    from .instruct import alpaca_prompt
    from .instruct_runs import build_instruct_task, tokenizer_of
    from .instruct_state import final_backbone
    from .llm_eval import generate_answer

    backbone = final_backbone(cfg, folder, build_instruct_task(cfg, {}))
    backbone.model.eval()
    tokenizer = tokenizer_of(cfg)
    return [generate_answer(backbone, tokenizer, alpaca_prompt(c), max_new_tokens, stop_at_newline=False)
            for c in cases]


def case_study(profile_name: str, root, path, *, run_missing: bool = True, n_cases: int = CASES,
               max_new_tokens: int | None = None, progress: bool = False) -> dict:
    """The case-study record at ``path`` with an answer list per variant whose run is under ``root``
    (see the module docstring); ``not_run`` (not saved) names the variants left out and why.
    ``max_new_tokens``: None is :data:`MAX_NEW_TOKENS` (:data:`QUICK_NEW_TOKENS` at the quick profile)."""
    from .experiments import config_hash
    from .records import RECORD_FILE, atomic_write_json, code_version

    path, root = Path(path), Path(root)
    if max_new_tokens is None:
        max_new_tokens = QUICK_NEW_TOKENS if profile_name == "quick" else MAX_NEW_TOKENS
    cfgs = {v: it.run_config(profile_name, v) for v in it.VARIANTS}
    settings = {"profile": profile_name, "model": cfgs["No-FT"].model.name, "template": "alpaca",
                "decoding": DECODING, "max_new_tokens": max_new_tokens,
                "cases": held_out_cases(cfgs["No-FT"], n_cases)}
    saved = json.loads(path.read_text()) if path.exists() else {**settings, "runs": {}, "answers": {}}
    differ = [k for k in settings if saved.get(k) != settings[k]]
    if differ:
        raise ValueError(f"{path}: made with other {differ} than asked; delete it to regenerate")
    not_run = {}
    for variant, cfg in cfgs.items():
        run_id = config_hash(cfg)
        if variant in saved["answers"]:
            if saved["runs"][variant]["run_id"] != run_id:
                raise ValueError(f"{path}: {variant}'s answers come from run {saved['runs'][variant]['run_id']}, "
                                 f"the profile's run is {run_id}; delete it to regenerate")
            continue
        if not (root / run_id / RECORD_FILE).exists():
            if not run_missing:
                not_run[variant] = f"no record {run_id} (run_missing=False)"
                continue
            it.run_variant(profile_name, variant, root, progress=progress)
        started = time.perf_counter()
        saved["answers"][variant] = answers_of(cfg, root / run_id, settings["cases"], max_new_tokens)
        saved["runs"][variant] = {"run_id": run_id, "seconds": time.perf_counter() - started}
        saved["code_version"] = code_version()
        atomic_write_json(path, saved)            # after each variant: an interrupted study keeps what it has
    return {**saved, "not_run": not_run}


def case_frame(study: dict):
    """One row per case: the instruction (and its input), the reference answer, each variant's answer."""
    import pandas as pd

    rows = []
    for j, case in enumerate(study["cases"]):
        prompt = case["instruction"] + (f"\n\nInput: {case['input']}" if case["input"].strip() else "")
        rows.append({"instruction": prompt, "reference (Alpaca)": case["output"],
                     **{v: answers[j] for v, answers in study["answers"].items()}})
    return pd.DataFrame(rows, index=pd.Index([c["record"] for c in study["cases"]], name="record"))


def case_table(study: dict, caption: str | None = None):
    """:func:`case_frame` as a readable HTML table: text wrapped, cells aligned at the top, HTML escaped."""
    style = case_frame(study).style.set_uuid("fig11").format(escape="html").set_table_styles([   # same HTML each render
        {"selector": "td, th", "props": "white-space: pre-wrap; vertical-align: top; text-align: left; "
                                         "max-width: 22em; min-width: 12em; border: 1px solid #ccc; padding: 4px"},
        {"selector": "", "props": "border-collapse: collapse; font-size: 0.85em"}])
    return style.set_caption(caption) if caption else style
