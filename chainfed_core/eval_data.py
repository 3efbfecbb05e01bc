"""The instruction-tuning evaluation sets, read from local files, and the prompt each is scored with.

- **MMLU** (asset ``mmlu-flan-cot``): the 282 answered questions of lm-eval's
  ``flan_cot_fewshot`` prompt files, all 57 subjects (:func:`load_mmlu_flan_cot`), or a
  user's own MMLU file in the ``cais/mmlu`` columns (:func:`load_mmlu_records`). Prompt:
  lm-eval's default zero-shot MMLU prompt (:func:`mmlu_prompt`), choices scored as `` A``,
  `` B``, ...
- **CRASS** (asset ``crass``, BIG-bench ``crass_ai``) and **BBH**'s BIG-bench source tasks
  (:mod:`chainfed_core.bbh`): :func:`load_bigbench_mc` (a task's ``task_prefix`` opens each
  question), prompt in BIG-bench's format with the choices appended (:func:`bigbench_prompt`),
  each choice's text scored.
- **Reading comprehension F1** (asset ``squad-shifts``, in DROP's role): SQuAD-format
  JSON (:func:`load_squad`), generation prompt :func:`squad_prompt`.

An item whose answer lies outside its choices (or that has none) is never scored: the
loaders skip it and return the reason in ``skipped``; a :class:`MCQuestion` built by hand
with such an answer raises.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"      # at most 26 choices (BBH's colored objects have 18)


@dataclass(frozen=True)
class MCQuestion:
    """One multiple-choice question; ``answer`` indexes ``choices``."""

    qid: str
    subject: str
    question: str
    choices: tuple[str, ...]
    answer: int

    def __post_init__(self):
        if not 2 <= len(self.choices) <= len(LETTERS):
            raise ValueError(f"{self.qid}: choices: needs 2 to {len(LETTERS)} choices, got {len(self.choices)}")
        if not (isinstance(self.answer, int) and 0 <= self.answer < len(self.choices)):
            raise ValueError(f"{self.qid}: answer {self.answer!r} is outside its {len(self.choices)} choices")


@dataclass
class EvalSet:
    """The items of an evaluation file that can be scored, and why the others cannot."""

    items: list = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)      # "<item id>: <reason>"


# ---------------------------------------------------------------------------------------- MMLU


def parse_flan_cot_sample(qid: str, subject: str, sample: dict) -> MCQuestion:
    """One ``fewshot_config.samples`` entry: ``question`` ends with a ``(A) .. (B) ..`` line,
    ``target`` ends with ``The answer is (X).``; raises ValueError naming what is wrong."""
    stem, sep, line = str(sample.get("question", "")).rpartition("\n(A) ")
    if not sep:
        raise ValueError("no '(A) ...' choice line")
    parts = re.split(r"\s*\(([A-J])\)\s*", "(A) " + line)        # ['', 'A', text, 'B', text, ...]
    letters, choices = parts[1::2], tuple(c.strip() for c in parts[2::2])
    if "".join(letters) != LETTERS[:len(letters)]:
        raise ValueError(f"choice letters {''.join(letters)} are not A, B, C, ... in order")
    found = re.findall(r"answer is \(([A-J])\)", str(sample.get("target", "")))
    if not found:
        raise ValueError("no 'The answer is (X)' in its target")
    if found[-1] not in letters:
        raise ValueError(f"answer ({found[-1]}) is outside its choices {letters[0]}-{letters[-1]}")
    return MCQuestion(qid, subject, stem.strip(), choices, letters.index(found[-1]))


def load_mmlu_flan_cot(folder: str | Path) -> EvalSet:
    """The answered questions of lm-eval's ``mmlu/flan_cot_fewshot/mmlu_<subject>.yaml`` files."""
    files = sorted(Path(folder).glob("mmlu_*.yaml"))
    if not files:
        raise FileNotFoundError(f"{folder}: no mmlu_<subject>.yaml files (fetch the 'mmlu-flan-cot' asset)")
    out = EvalSet()
    for path in files:
        task = yaml.safe_load(path.read_text(encoding="utf-8"))
        subject = task.get("dataset_name") or path.stem.removeprefix("mmlu_")
        for j, sample in enumerate(task.get("fewshot_config", {}).get("samples", [])):
            qid = f"{subject}/{j}"
            try:
                out.items.append(parse_flan_cot_sample(qid, subject, sample))
            except ValueError as err:
                out.skipped.append(f"{qid}: {err}")
    return out


def load_mmlu_records(path: str | Path) -> EvalSet:
    """MMLU in the ``cais/mmlu`` columns (``question``, ``subject``, ``choices``, ``answer`` index or
    letter), one JSON object a line: the test set where a user has it."""
    out = EvalSet()
    for j, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines()):
        if not line.strip():
            continue
        rec = json.loads(line)
        qid = f"{Path(path).name}:{j + 1}"
        answer = rec.get("answer")
        choices = tuple(rec.get("choices") or ())
        if isinstance(answer, str) and answer in LETTERS[:len(choices)]:
            answer = LETTERS.index(answer)
        if "question" not in rec:
            out.skipped.append(f"{qid}: no 'question'")
            continue
        try:
            out.items.append(MCQuestion(qid, rec.get("subject", ""), rec["question"], choices, answer))
        except ValueError as err:                   # the message names the question
            out.skipped.append(str(err))
    return out


def mmlu_prompt(q: MCQuestion) -> tuple[str, list[str]]:
    """lm-eval's default zero-shot MMLU prompt and the continuations scored (`` A``, `` B``, ...)."""
    subject = q.subject.replace("_", " ")
    options = "".join(f"{LETTERS[i]}. {c}\n" for i, c in enumerate(q.choices))
    context = (f"The following are multiple choice questions (with answers) about {subject}.\n\n"
               f"{q.question.strip()}\n{options}Answer:")
    return context, [f" {LETTERS[i]}" for i in range(len(q.choices))]


# --------------------------------------------------------------------------------- BIG-bench MC


def load_bigbench_mc(path: str | Path) -> EvalSet:
    """A BIG-bench multiple-choice ``task.json`` (``examples``: ``input``, ``target_scores``);
    the answer is the one choice scored 1 (an example whose ``target`` is not among its choices
    is skipped). The task's ``task_prefix`` (e.g. penguins_in_a_table's table) opens each question."""
    task = json.loads(Path(path).read_text(encoding="utf-8"))
    name, prefix = task.get("name", Path(path).parent.name), task.get("task_prefix", "")
    out = EvalSet()
    for j, ex in enumerate(task.get("examples", [])):
        qid = f"{name}/{j}"
        scores = ex.get("target_scores") or {}
        best = [i for i, s in enumerate(scores.values()) if s == 1]
        if len(best) != 1:
            out.skipped.append(f"{qid}: {len(best)} choices scored 1 in target_scores, expected exactly one")
            continue
        if "input" not in ex:
            out.skipped.append(f"{qid}: no 'input'")
            continue
        targets = [ex["target"]] if isinstance(ex.get("target"), str) else list(ex.get("target") or [])
        if targets and targets[0] not in scores:
            out.skipped.append(f"{qid}: answer {targets[0]!r} is outside its choices {list(scores)}")
            continue
        try:
            out.items.append(MCQuestion(qid, name, prefix + ex["input"], tuple(scores), best[0]))
        except ValueError as err:
            out.skipped.append(str(err))
    return out


def bigbench_prompt(q: MCQuestion) -> tuple[str, list[str]]:
    """BIG-bench's zero-shot format with the choices appended; each choice's text is scored."""
    options = "".join(f"\n  choice: {c}" for c in q.choices)
    return f"Q: {q.question.strip()}{options}\nA:", [f" {c}" for c in q.choices]


# -------------------------------------------------------------------------------------- SQuAD


def load_squad(path: str | Path, limit: int | None = None) -> EvalSet:
    """SQuAD v1.1-format questions as dicts (``id``, ``title``, ``context``, ``question``, ``answers``)."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))["data"]
    out = EvalSet()
    for article in data:
        for para in article["paragraphs"]:
            for qa in para["qas"]:
                answers = [a["text"] for a in qa.get("answers", []) if a.get("text", "").strip()]
                if not answers:
                    out.skipped.append(f"{qa.get('id')}: no gold answer")
                    continue
                out.items.append({"id": qa["id"], "title": article.get("title", ""), "context": para["context"],
                                  "question": qa["question"], "answers": answers})
                if limit is not None and len(out.items) >= limit:
                    return out
    return out


def squad_prompt(item: dict) -> str:
    """lm-eval's SQuAD prompt (title, background, question), answered by greedy generation."""
    return (f"Title: {item['title']}\n\nBackground: {item['context']}\n\n"
            f"Question: {item['question']}\n\nAnswer:")
