"""BBH (BIG-Bench Hard) in its multiple-choice form, read from the BIG-bench source tasks it is built from.

BBH (Suzgun et al., 2022) is 23 BIG-bench tasks, 27 with logical_deduction and
tracking_shuffled_objects in three sizes each. :data:`BBH_TASKS` maps each BBH task we score
to its BIG-bench ``task.json`` (one ``bbh-<folder>`` asset per BIG-bench folder, from the pinned
``bigbench==1.0.0`` source archive: ``asset_catalogue.BBH_SOURCES``); :data:`LEFT_OUT` says why
the other six are not scored (no ``task.json`` in the archive, or no multiple-choice form).

**Scoring differs from the paper's.** The paper's BBH (lm-eval's ``bbh`` task) asks for a
generated answer after a 3-shot chain-of-thought prompt and scores its exact match, over
BBH's own 250-question subsets (``lukaemon/bbh``, in no registry package). Ours is the
multiple-choice form, scored the way our CRASS is: each BIG-bench example (its task's
``task_prefix`` first) in BIG-bench's zero-shot ``Q: .. choice: .. A:`` format
(:func:`chainfed_core.eval_data.bigbench_prompt`), the choice with the highest log-likelihood
is the prediction (:func:`chainfed_core.llm_eval.score_multiple_choice`). The source tasks hold
more examples than BBH's subsets; ``limit`` questions per task are spread evenly over each
file (:func:`chainfed_core.instruct_runs.spread`, as MMLU's subjects). An example without
exactly one right choice, with a ``target`` outside its choices, or with more than 26 choices
is a counted skip (geometric_shapes has 72 examples with two right shapes;
reasoning_about_colored_objects 816 with several right answers, and 34-choice ones).

Metric: ``task_average`` (the mean over tasks of each task's accuracy, BBH's headline number,
as lm-eval averages its subtasks) and ``micro_accuracy`` (over questions).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Callable

from .eval_data import EvalSet, bigbench_prompt, load_bigbench_mc

_SAME = ("date_understanding", "disambiguation_qa", "geometric_shapes", "hyperbaton", "movie_recommendation",
         "navigate", "penguins_in_a_table", "reasoning_about_colored_objects", "ruin_names",
         "salient_translation_error_detection", "snarks", "sports_understanding", "temporal_sequences")
BBH_TASKS: dict[str, str] = {          # BBH task -> BIG-bench task folder (and subtask) holding its task.json
    "causal_judgement": "causal_judgment",
    "formal_fallacies": "formal_fallacies_syllogisms_negation",
    **{name: name for name in _SAME},
    **{f"logical_deduction_{n}_objects": f"logical_deduction/{n}_objects" for n in ("three", "five", "seven")},
    **{f"tracking_shuffled_objects_{n}_objects": f"tracking_shuffled_objects/{n}_objects"
       for n in ("three", "five", "seven")},
}
_PROGRAMMATIC = "a programmatic BIG-bench task (task.py): the archive holds no task.json of its examples"
LEFT_OUT: dict[str, str] = {
    "boolean_expressions": _PROGRAMMATIC,
    "multistep_arithmetic_two": _PROGRAMMATIC,
    "web_of_lies": _PROGRAMMATIC,
    "object_counting": "generative: its task.json has targets (a number), no target_scores to choose from",
    "word_sorting": "generative: its task.json has targets (the sorted list), no target_scores to choose from",
    "dyck_languages": "its task.json scores 84 candidate closing sequences per example (over 26 choices; BBH "
                      "asks for the generated closing)",
}


def source_file(task: str, asset_folder: Callable[[str], Path]) -> Path:
    """The ``task.json`` of a BBH task; ``asset_folder`` maps an asset name to its folder (``fetch``)."""
    if task not in BBH_TASKS:
        reason = f": {LEFT_OUT[task]}" if task in LEFT_OUT else ""
        raise ValueError(f"bbh task {task!r} is not scored here{reason}; scored: {sorted(BBH_TASKS)}")
    folder, _, sub = BBH_TASKS[task].partition("/")
    return Path(asset_folder(f"bbh-{folder}")) / sub / "task.json"


def load_bbh(limit: int | None, asset_folder: Callable[[str], Path] | None = None,
             tasks: list[str] | None = None) -> EvalSet:
    """``limit`` questions per BBH task (None: all), spread over each source file; each question's
    ``subject`` is its BBH task, its ``qid`` ``<bbh task>/<example index>``. The skips are every
    unscorable example of the files, named the same way."""
    from .instruct_runs import spread

    if asset_folder is None:
        from .assets import fetch as asset_folder
    out = EvalSet()
    for task in tasks or sorted(BBH_TASKS):
        data = load_bigbench_mc(source_file(task, asset_folder))
        rename = lambda qid: f"{task}/{qid.rpartition('/')[2]}"       # noqa: E731
        out.items += [replace(q, qid=rename(q.qid), subject=task) for q in spread(data.items, limit)]
        out.skipped += [f"{task}/{s.partition('/')[2]}" for s in data.skipped]
    return out


def score_bbh(backbone, tokenizer, limit: int | None, asset_folder: Callable[[str], Path] | None = None) -> dict:
    """BBH's multiple-choice form (see the module docstring): the mean over tasks of accuracy
    (``task_average``), the micro accuracy, each task's accuracy, the predictions."""
    from .llm_eval import score_multiple_choice

    result = score_multiple_choice(backbone, tokenizer, load_bbh(limit, asset_folder), bigbench_prompt)
    summary = result.summary()
    per_task = summary.pop("per_subject")
    return {"task_average": summary.pop("subject_average"), **summary, "per_task": per_task,
            "tasks": len(per_task), "left_out": sorted(LEFT_OUT), "per_task_limit": limit,
            "form": "multiple choice, zero-shot log-likelihood (the paper's BBH: 3-shot CoT exact match)",
            "predictions": [[r["qid"], r["pred"], r["answer"]] for r in result.rows]}
