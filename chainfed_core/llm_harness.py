"""The same multiple-choice questions through lm-eval's harness (lm-eval 0.4.13), offline.

The field reports MMLU and BIG-bench numbers from EleutherAI's lm-evaluation-harness. Its
own task configs read the Hugging Face hub (``cais/mmlu``, ``hails/bigbench``), so
:func:`harness_multiple_choice` writes the questions to a local JSON-lines file and a task
config that points at it (``dataset_path: json`` + ``data_files``) with each question's
prompt and continuations precomputed by the same prompt function our scorer uses; the
harness then tokenises, runs and scores them itself (``output_type: multiple_choice``,
metric ``acc``). ``HF_HUB_OFFLINE`` and ``HF_DATASETS_OFFLINE`` are set, so nothing
reaches a hub. :mod:`chainfed_core.llm_eval` is our own scorer of the same metric.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from .eval_data import EvalSet
from .llm_eval import MCResult, Prompt

TASK = "chainfed_local_mc"
TASK_YAML = f"""task: {TASK}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {{data}}
test_split: test
output_type: multiple_choice
doc_to_text: context
doc_to_choice: continuations
doc_to_target: answer
target_delimiter: ""
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


def write_task(data: EvalSet, prompt: Prompt, folder: Path) -> Path:
    """Write ``questions.jsonl`` and ``<TASK>.yaml`` into ``folder``; return the data file."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "questions.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for q in data.items:
            context, continuations = prompt(q)
            f.write(json.dumps({"qid": q.qid, "subject": q.subject, "context": context,
                                "continuations": continuations, "answer": q.answer}) + "\n")
    (folder / f"{TASK}.yaml").write_text(TASK_YAML.format(data=json.dumps(str(path.resolve()))))
    return path


def harness_multiple_choice(model, tokenizer, data: EvalSet, prompt: Prompt, folder: str | Path, *,
                            batch_size: int = 8, max_length: int | None = None) -> MCResult:
    """Score ``data`` with lm-eval's ``simple_evaluate`` on an in-memory HF model and tokenizer.

    Returns the same :class:`~chainfed_core.llm_eval.MCResult` rows as our scorer (the
    log-likelihoods are the harness's). Raises ImportError naming the package if lm-eval is
    not installed.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as err:
        raise ImportError("the harness path needs lm-eval==0.4.13 (requirements.lock)") from err
    logging.getLogger("lm_eval").setLevel(logging.WARNING)
    folder = Path(folder)
    write_task(data, prompt, folder)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length)
    tasks = TaskManager(include_path=str(folder), include_defaults=False)    # lm-eval's own 10k tasks unindexed
    out = lm_eval.simple_evaluate(model=lm, tasks=[TASK], task_manager=tasks, log_samples=True, bootstrap_iters=0,
                                  verbosity="WARNING")
    result = MCResult(skipped=list(data.skipped))
    by_id = {q.qid: q for q in data.items}
    for sample in sorted(out["samples"][TASK], key=lambda s: s["doc_id"]):
        q = by_id[sample["doc"]["qid"]]
        lls = [float(r[0][0]) for r in sample["resps"]]
        pred = max(range(len(lls)), key=lls.__getitem__)
        result.rows.append({"qid": q.qid, "subject": q.subject, "answer": q.answer, "pred": pred,
                            "correct": bool(sample["acc"]), "logliks": lls})
    return result
