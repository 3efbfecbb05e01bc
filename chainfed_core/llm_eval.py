"""Scoring decoders on MMLU, CRASS and a reading-comprehension F1 set: our own small scorer.

- **Multiple choice** (MMLU, CRASS): the log-likelihood of each choice's continuation
  after the prompt, the choice with the highest one is the prediction (lm-eval's ``acc``
  for ``output_type: multiple_choice``). Tokenisation follows lm-eval's causal-LM
  ``_encode_pair``: trailing spaces of the context move into the continuation, the pair
  is encoded whole and the context's tokens cut off its front, so the numbers equal the
  harness's (tested against it in ``tests/test_llm_eval.py``).
  :func:`accuracy_summary` reports the paper's average over subjects and the plain
  (micro) accuracy. A prompt + continuation longer than ``max_length`` is skipped and
  counted (lm-eval would cut the prompt's start silently).
- **Token F1** (SQuAD v1.1's official normalisation and F1, max over the gold answers) for
  the DROP role, on greedily generated answers.

Why our own: lm-eval's harness (:mod:`chainfed_core.llm_harness`) runs offline on the
MMLU and CRASS files and gives the same per-question log-likelihoods, but it runs each
choice in its own forward pass where one pass of the prompt scores all four MMLU letters
(a quarter of the work), and it cannot score a
:class:`~chainfed_core.backbone.Backbone` with adapters inserted; its SQuAD metric loads
``evaluate.load("squad_v2")`` from the hub, so the F1 is written here (ten lines, tested
on hand-computed cases).
"""

from __future__ import annotations

import re
import string
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from .backbone import Backbone
from .eval_data import EvalSet, MCQuestion

Prompt = Callable[[MCQuestion], tuple[str, list[str]]]


def _logits(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T, V) next-token logits of a Hugging Face causal LM or a causal-LM Backbone, on the
    model's device (``.device`` of either: the inputs are made there)."""
    if isinstance(model, Backbone):
        return model.forward({"input_ids": input_ids, "attention_mask": attention_mask})
    return model(input_ids=input_ids, attention_mask=attention_mask).logits


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's causal ``_encode_pair``: (context tokens, continuation tokens)."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer(context + continuation)["input_ids"]
    ctx = tokenizer(context)["input_ids"]
    return ctx, whole[len(ctx):]


@torch.no_grad()
def choice_loglikelihoods(model, tokenizer, context: str, continuations: Sequence[str]) -> list[float]:
    """Sum of log p(continuation token | everything before it), per continuation.

    Where every continuation is one token after the same context tokens (MMLU's letters),
    one forward pass of the context gives them all; otherwise the pairs run as one batch.
    """
    pairs = [encode_pair(tokenizer, context, c) for c in continuations]
    if all(len(cont) == 1 and ctx == pairs[0][0] for ctx, cont in pairs):
        ids = torch.as_tensor([pairs[0][0]], device=model.device)           # (1, T)
        logprobs = F.log_softmax(_logits(model, ids, torch.ones_like(ids))[0, -1].float(), dim=-1)   # (V,)
        return [float(logprobs[cont[0]]) for _, cont in pairs]
    inputs = [(ctx + cont)[:-1] for ctx, cont in pairs]              # the last token is predicted, not read
    longest = max(len(x) for x in inputs)
    ids = torch.zeros((len(inputs), longest), dtype=torch.long, device=model.device)   # (C, T), right-padded
    mask = torch.zeros_like(ids)
    for row, x in enumerate(inputs):
        ids[row, :len(x)], mask[row, :len(x)] = torch.as_tensor(x, device=model.device), 1
    logprobs = F.log_softmax(_logits(model, ids, mask).float(), dim=-1)   # (C, T, V)
    scores = []
    for row, (ctx, cont) in enumerate(pairs):
        start = len(ctx) - 1                                          # position predicting cont[0]
        targets = torch.as_tensor(cont, device=logprobs.device).unsqueeze(1)   # (n, 1)
        scores.append(float(logprobs[row, start:start + len(cont)].gather(1, targets).sum()))
    return scores


@dataclass
class MCResult:
    """Per-question outcomes of a multiple-choice evaluation, and what could not be scored."""

    rows: list[dict] = field(default_factory=list)     # qid, subject, answer, pred, correct, logliks
    skipped: list[str] = field(default_factory=list)

    def summary(self) -> dict:
        out = accuracy_summary([r["subject"] for r in self.rows], [r["correct"] for r in self.rows])
        return {**out, "skipped": len(self.skipped)}


def score_multiple_choice(model, tokenizer, data: EvalSet, prompt: Prompt, *, max_length: int | None = None,
                          progress: Callable | None = None) -> MCResult:
    """Predict each question's choice by log-likelihood (see the module docstring); the set's own skips carry over."""
    if max_length is None:
        max_length = getattr(model.config, "max_position_embeddings", None) or 2048
    result = MCResult(skipped=list(data.skipped))
    questions = progress(data.items) if progress else data.items
    for q in questions:
        context, continuations = prompt(q)
        length = max(sum(map(len, encode_pair(tokenizer, context, c))) - 1 for c in continuations)
        if length > max_length:
            result.skipped.append(f"{q.qid}: prompt and choice are {length} tokens, above max_length={max_length}")
            continue
        lls = choice_loglikelihoods(model, tokenizer, context, continuations)
        pred = max(range(len(lls)), key=lls.__getitem__)
        result.rows.append({"qid": q.qid, "subject": q.subject, "answer": q.answer, "pred": pred,
                            "correct": pred == q.answer, "logliks": lls})
    return result


def accuracy_summary(subjects: Sequence[str], correct: Sequence[bool]) -> dict:
    """Micro accuracy (over questions), the average of per-subject accuracies (the paper's MMLU
    number), the per-subject accuracies and the count."""
    if len(subjects) != len(correct):
        raise ValueError(f"subjects ({len(subjects)}) and correct ({len(correct)}) differ in length")
    if not correct:
        return {"n": 0, "micro_accuracy": float("nan"), "subject_average": float("nan"), "per_subject": {}}
    by_subject = defaultdict(list)
    for s, c in zip(subjects, correct):
        by_subject[s].append(bool(c))
    per_subject = {s: sum(v) / len(v) for s, v in sorted(by_subject.items())}
    return {"n": len(correct), "micro_accuracy": sum(map(bool, correct)) / len(correct),
            "subject_average": sum(per_subject.values()) / len(per_subject), "per_subject": per_subject}


# ------------------------------------------------------------------------------------ token F1


def normalize_answer(text: str) -> str:
    """SQuAD v1.1's normalisation: lower case, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def token_f1(prediction: str, gold: str) -> float:
    """SQuAD's token F1 of one prediction against one gold answer (0 when no token is shared)."""
    pred, ref = normalize_answer(prediction).split(), normalize_answer(gold).split()
    same = sum((Counter(pred) & Counter(ref)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(ref)
    return 2 * precision * recall / (precision + recall)


def f1_summary(predictions: Sequence[str], golds: Sequence[Sequence[str]]) -> dict:
    """Mean over questions of the best F1 and exact match against any gold answer (fractions)."""
    if len(predictions) != len(golds):
        raise ValueError(f"predictions ({len(predictions)}) and golds ({len(golds)}) differ in length")
    if any(not g for g in golds):
        raise ValueError("golds: every question needs at least one gold answer")
    f1 = [max(token_f1(p, g) for g in gs) for p, gs in zip(predictions, golds)]
    em = [max(float(normalize_answer(p) == normalize_answer(g)) for g in gs) for p, gs in zip(predictions, golds)]
    n = len(f1)
    return {"n": n, "f1": sum(f1) / n if n else float("nan"), "exact_match": sum(em) / n if n else float("nan")}


@torch.no_grad()
def generate_answer(model, tokenizer, prompt: str, max_new_tokens: int = 32, *, stop_at_newline: bool = True) -> str:
    """Greedy continuation of ``prompt`` up to the end token or ``max_new_tokens`` (and, with
    ``stop_at_newline``, the first newline: a short answer's end), stripped. Each step runs the
    whole sequence again (a Backbone with adapters has no key-value cache)."""
    ids = torch.as_tensor([tokenizer(prompt)["input_ids"]], device=model.device)   # (1, T)
    new: list[int] = []
    for _ in range(max_new_tokens):
        token = int(_logits(model, ids, torch.ones_like(ids))[0, -1].argmax())
        if token == tokenizer.eos_token_id:
            break
        new.append(token)
        if stop_at_newline and "\n" in tokenizer.decode(new):
            break
        ids = torch.cat([ids, torch.tensor([[token]], device=ids.device)], dim=1)   # (1, T + 1)
    text = tokenizer.decode(new)
    return (text.split("\n")[0] if stop_at_newline else text).strip()
