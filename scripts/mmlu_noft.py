"""No-FT MMLU accuracy of a packaged decoder on the 282 answered MMLU questions (issue 15's quick path).

    .venv/bin/python scripts/mmlu_noft.py [--harness] [--model smollm2-135m] [--limit N]

Reads the ``smollm2-135m`` and ``mmlu-flan-cot`` assets (fetched on first use), prints one
question's full prompt, scores every question zero-shot with lm-eval's MMLU prompt by the
log-likelihood of each choice letter (:mod:`chainfed_core.llm_eval`), and writes the
record ``results/instruct/mmlu_noft_<model>.json``: accuracy averaged over the 57 subjects
(the paper's number) and over questions, against chance, with wall time and provenance.
``--harness`` scores the same questions through lm-eval's harness too
(:mod:`chainfed_core.llm_harness`) and records how far the two agree.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _timed(label: str, fn):
    start = time.perf_counter()
    result = fn()
    seconds = time.perf_counter() - start
    summary = result.summary()
    print(f"[mmlu] {label}: subject-average {summary['subject_average']:.4f}, micro {summary['micro_accuracy']:.4f} "
          f"(n={summary['n']}, skipped {summary['skipped']}) in {seconds:.0f} s", flush=True)
    return result, summary, seconds


def _agreement(ours, theirs) -> dict:
    """How far our scorer and the harness agree, question by question."""
    pairs = list(zip(ours.rows, theirs.rows))
    assert all(a["qid"] == b["qid"] for a, b in pairs)
    gaps = [abs(x - y) for a, b in pairs for x, y in zip(a["logliks"], b["logliks"])]
    return {"same_prediction": sum(a["pred"] == b["pred"] for a, b in pairs), "questions": len(pairs),
            "max_abs_loglik_difference": max(gaps) if gaps else None}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m", help="a model asset or a local HF model folder")
    parser.add_argument("--harness", action="store_true", help="also score through lm-eval's harness")
    parser.add_argument("--limit", type=int, default=None, help="only the first N questions (a smoke run)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--out", type=Path, default=None, help="record path (default results/instruct/...)")
    args = parser.parse_args(argv)

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from tqdm import tqdm

    from chainfed_core.assets import AssetError, fetch, model_path
    from chainfed_core.eval_data import EvalSet, load_mmlu_flan_cot, mmlu_prompt
    from chainfed_core.llm_eval import score_multiple_choice
    from chainfed_core.records import atomic_write_json, make_record

    torch.set_num_threads(args.threads)
    try:
        folder, data_dir = model_path(args.model), fetch("mmlu-flan-cot")
    except AssetError as err:
        print(f"[mmlu] cannot start: {err}", file=sys.stderr)
        return 1
    data = load_mmlu_flan_cot(data_dir)
    if args.limit is not None:
        data = EvalSet(data.items[:args.limit], data.skipped)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    context, continuations = mmlu_prompt(data.items[0])
    print(f"[mmlu] {len(data.items)} questions, {len({q.subject for q in data.items})} subjects; "
          f"the prompt of {data.items[0].qid} (answer {continuations[data.items[0].answer]!r}), "
          f"continuations {continuations}:\n{context}\n", flush=True)

    start = time.perf_counter()
    ours, summary, seconds = _timed("our scorer", lambda: score_multiple_choice(
        model, tokenizer, data, mmlu_prompt, progress=lambda xs: tqdm(xs, desc="mmlu", file=sys.stderr)))
    harness = None
    if args.harness:
        from chainfed_core.llm_harness import harness_multiple_choice
        with tempfile.TemporaryDirectory() as tmp:
            theirs, h_summary, h_seconds = _timed("lm-eval harness", lambda: harness_multiple_choice(
                model, tokenizer, data, mmlu_prompt, tmp, batch_size=8))
        harness = {"summary": h_summary, "seconds": h_seconds, "agreement": _agreement(ours, theirs)}
        print(f"[mmlu] agreement: {harness['agreement']}", flush=True)

    name = args.model if not Path(args.model).is_dir() else Path(args.model).name
    chance = sum(1 / len(q.choices) for q in data.items) / len(data.items)
    config = {"model": name, "data": "mmlu-flan-cot", "prompt": "lm-eval default MMLU, zero-shot",
              "scored": "log-likelihood of each choice letter (' A', ' B', ...)", "dtype": "float32",
              "threads": args.threads, "limit": args.limit}
    record = make_record(config, seed=0, wall_s=time.perf_counter() - start, history=[],
                         summary=summary, scorer_seconds=seconds, chance={"nominal": 0.25, "expected": chance},
                         example_prompt={"qid": data.items[0].qid, "context": context, "continuations": continuations},
                         predictions=[{k: r[k] for k in ("qid", "answer", "pred")} for r in ours.rows],
                         skipped=ours.skipped, harness=harness)
    out = args.out or ROOT / "results" / "instruct" / f"mmlu_noft_{name.split('-')[0]}.json"
    atomic_write_json(out, record)
    print(f"[mmlu] chance {chance:.4f}; record: {out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
