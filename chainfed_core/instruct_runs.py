"""Federated instruction tuning (the paper's Table 3): Alpaca records -> a causal-LM Task and the
benchmarks scored after the last round (the profiles and configs of Table 3's notebook:
:mod:`chainfed_core.instruct_table`).

``data.dataset = "alpaca"`` (or ``"alpaca-en-demo"``, the asset's name) makes
:func:`chainfed_core.task.build_task` call :func:`build_instruct_task`:

- **data**: the 999 records of ``alpaca_en_demo.json``, shuffled by ``seed``; the last
  ``data.max_test_examples`` (else ``data.test_fraction`` of them) are held out, the rest
  (capped at ``data.max_train_examples``) trains. Each record is the Alpaca prompt and its
  response (:mod:`chainfed_core.instruct`), cut at ``model.max_length`` tokens, the loss on the
  response tokens only (``lm_labels``). Training rows are padded to ``max_length`` for the
  population's shared columns and split IID over ``data.num_clients`` clients.
- **model**: a decoder asset (``smollm2-135m``) with its own tokenizer, or ``tiny-llama[-L..][-H..]``:
  a random tiny LLaMA over a byte-level tokenizer (:func:`chainfed_core.instruct.byte_tokenizer`),
  so the quick profile downloads no model.
- **evaluation**: every ``fed.eval_every`` rounds the response-token loss (and perplexity) on
  the held-out records; after the last round :func:`final_evaluation`, into the record's
  ``final_eval``: MMLU (lm-eval's zero-shot prompt, the choice letters' log-likelihoods),
  BBH (its BIG-bench source tasks, multiple choice: :mod:`chainfed_core.bbh`), CRASS (BIG-bench's
  format) and token F1 of greedy answers on SQuAD-shifts (the DROP role),
  each on as many questions as the task's ``evals`` asks (:data:`DEFAULT_EVALS`: all MMLU).

ChainFed trains its window's adapters with GPO's global branch through the later adapters and
the frozen final norm + LM head (:mod:`chainfed_core.gpo`); FOAT scores CKA on the token
states of real (unpadded) tokens (:func:`chainfed_core.foat.token_matrix`).
"""

from __future__ import annotations

import functools
import random
import time
from typing import Any

import torch

from . import instruct
from .bbh import score_bbh
from .config import RunConfig

ALPACA = {"alpaca": "alpaca-en-demo", "alpaca-en-demo": "alpaca-en-demo"}     # data.dataset -> asset
SUITES = ("mmlu", "bbh", "crass", "drop")
DEFAULT_EVALS: dict[str, int | None] = {"mmlu": None}       # questions per suite; None: all of them
DROP_FILE = "new_wiki_v1.0.json"       # the squad-shifts set scored in DROP's role (Wikipedia, like DROP)
TINY_POSITIONS = 4096                  # the tiny decoders' rotary range: MMLU prompts fit


def is_instruct(dataset: str) -> bool:
    """Whether ``data.dataset`` names the Alpaca instruction data."""
    return str(dataset) in ALPACA


# ---------------------------------------------------------------------- the task
def tokenizer_of(cfg: RunConfig):
    """The model's tokenizer; the byte-level one for a ``tiny-*`` model."""
    if cfg.model.name.startswith("tiny"):
        return instruct.byte_tokenizer()
    from transformers import AutoTokenizer

    from .assets import model_path
    return AutoTokenizer.from_pretrained(model_path(cfg.model.name))


def tiny_decoder(name: str, vocab_size: int, seed: int):
    """A random tiny decoder (``tiny-llama-L4-H32``) over ``vocab_size`` token ids."""
    from .backbone import from_model
    from .model_parts import build_model
    from .task import tiny_spec
    from .tiny import tiny_config

    spec = tiny_spec(name)
    config = tiny_config(spec["family"], spec["num_layers"], spec["hidden"])
    config.vocab_size, config.max_position_embeddings = vocab_size, TINY_POSITIONS
    config.pad_token_id, config.bos_token_id, config.eos_token_id = vocab_size - 3, vocab_size - 2, vocab_size - 1
    torch.manual_seed(seed)
    return from_model(build_model(config, spec["family"]), spec["family"])


def split_records(records: list[dict], cfg: RunConfig) -> tuple[list[int], list[int]]:
    """(train, held-out) record indices: shuffled by ``seed``, the held-out ones at the end."""
    order = list(range(len(records)))
    random.Random(cfg.seed).shuffle(order)
    n_test = cfg.data.max_test_examples or max(1, round(cfg.data.test_fraction * len(records)))
    if n_test >= len(records):
        raise ValueError(f"DataConfig.max_test_examples: {n_test} held-out records leave none of "
                         f"{len(records)} to train on")
    train, test = order[:-n_test], order[-n_test:]
    train = train[:cfg.data.max_train_examples] if cfg.data.max_train_examples else train
    return train, test


def _tokenized(records: list[dict], indices: list[int], tokenizer, max_length: int):
    """:func:`chainfed_core.instruct.tokenize_records` of ``records[indices]``, its ``record``
    column (and skipped, truncated) naming each row's index in ``records``."""
    out = instruct.tokenize_records([records[i] for i in indices], tokenizer, max_length)
    original = [indices[j] for j in out.dataset["record"]]
    dataset = out.dataset.remove_columns("record").add_column("record", original)
    return instruct.Tokenized(dataset, [indices[j] for j in out.skipped], [indices[j] for j in out.truncated])


def alpaca_records(asset: str) -> list[dict]:
    """The checked records of an Alpaca asset (fetched on first use)."""
    from .assets import fetch
    return instruct.load_alpaca(fetch(asset))


def instruct_splits(cfg: RunConfig, tokenizer) -> tuple[Any, Any, dict]:
    """(train rows padded to max_length, held-out rows, provenance) of the Alpaca records."""
    from .assets import get_asset

    asset = ALPACA[cfg.data.dataset]
    records = alpaca_records(asset)
    train_records, test_records = split_records(records, cfg)
    pad_id = pad_id_of(tokenizer)
    train = _tokenized(records, train_records, tokenizer, cfg.model.max_length)
    test = _tokenized(records, test_records, tokenizer, cfg.model.max_length)
    if not len(train.dataset) or not len(test.dataset):
        raise ValueError(f"ModelConfig.max_length: {cfg.model.max_length} tokens leave no Alpaca prompt room "
                         f"for a response ({train.report()}); raise it")
    tokens = [sum(1 for x in row if x != instruct.IGNORE_INDEX) for row in train.dataset["lm_labels"]]
    provenance = {"dataset": cfg.data.dataset, "asset": asset,
                  "archives": [{"requirement": a.requirement, "sha256": a.sha256} for a in get_asset(asset).archives],
                  "records": len(records), "template": "alpaca", "tokenizer": type(tokenizer).__name__,
                  "train": {"records": len(train_records), "rows": len(train.dataset), "skipped": len(train.skipped),
                            "truncated": len(train.truncated), "response_tokens": sum(tokens)},
                  "test": {"records": len(test_records), "rows": len(test.dataset), "skipped": len(test.skipped),
                           "truncated": len(test.truncated)}}
    return instruct.padded_rows(train.dataset, cfg.model.max_length, pad_id), test.dataset, provenance


def pad_id_of(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def build_instruct_task(cfg: RunConfig, evals: dict[str, int | None] | None = None):
    """The :class:`~chainfed_core.task.Task` of an instruction-tuning config; ``evals``: the
    questions per benchmark suite :func:`final_evaluation` scores (default :data:`DEFAULT_EVALS`)."""
    from .methods import get_method
    from .task import Task

    method = get_method(cfg.method)
    tokenizer = tokenizer_of(cfg)
    train, test, provenance = instruct_splits(cfg, tokenizer)

    def make_backbone():
        torch.manual_seed(cfg.seed)
        if cfg.model.name.startswith("tiny"):
            bb = tiny_decoder(cfg.model.name, len(tokenizer), cfg.seed)
        else:
            from .backbone import load_backbone
            bb = untie_head(load_backbone(cfg.model))
        if not bb.is_causal_lm:
            raise ValueError(f"ModelConfig.name: instruction tuning needs a decoder, {cfg.model.name!r} is a "
                             f"{bb.family} encoder")
        method(cfg, bb.num_layers, bb.family).prepare(bb)
        return bb

    evals = dict(DEFAULT_EVALS if evals is None else evals)
    final = functools.partial(final_evaluation, tokenizer=tokenizer, evals=evals)
    return Task(make_backbone, train, test, num_labels=1, pad_id=pad_id_of(tokenizer), data=provenance,
                final_eval=final)


def untie_head(bb):
    """A decoder whose LM head shares the token embeddings' tensor (SmolLM2) gets a frozen copy
    of its own: the memory model and the layer store keep embeddings and head as separate parts
    (and a streamed client holds them apart). The numbers are unchanged; the copy costs
    vocab x hidden elements (113 MB for SmolLM2-135M in float32)."""
    from torch import nn

    head, embed = bb.model.get_output_embeddings(), bb.model.get_input_embeddings()
    if head is not None and head.weight is embed.weight:
        head.weight = nn.Parameter(embed.weight.detach().clone(), requires_grad=False)
        bb.model.config.tie_word_embeddings = False
    return bb


def untied(config):
    """A copy of a HF config with ``tie_word_embeddings`` off (what :func:`untie_head` makes of the model)."""
    import copy
    config = copy.deepcopy(config)
    config.tie_word_embeddings = False
    return config


# ---------------------------------------------------------------------- the benchmarks
def spread(items: list, limit: int | None) -> list:
    """``limit`` items spread evenly over ``items`` (every subject of MMLU's sorted list gets
    its share); all of them for None."""
    if limit is None or limit >= len(items):
        return list(items)
    return [items[i * len(items) // limit] for i in range(limit)]


def _multiple_choice(backbone, tokenizer, data, prompt, limit) -> dict:
    from .eval_data import EvalSet
    from .llm_eval import score_multiple_choice

    data = EvalSet(spread(data.items, limit), data.skipped)
    result = score_multiple_choice(backbone, tokenizer, data, prompt)
    summary = result.summary()
    summary.pop("per_subject")
    return {**summary, "predictions": [[r["qid"], r["pred"], r["answer"]] for r in result.rows]}


def score_mmlu(backbone, tokenizer, limit: int | None) -> dict:
    """MMLU (the 282 answered questions of ``mmlu-flan-cot``): subject-average and micro accuracy."""
    from .assets import fetch
    from .eval_data import load_mmlu_flan_cot, mmlu_prompt
    return _multiple_choice(backbone, tokenizer, load_mmlu_flan_cot(fetch("mmlu-flan-cot")), mmlu_prompt, limit)


def score_crass(backbone, tokenizer, limit: int | None) -> dict:
    """CRASS (BIG-bench ``crass_ai``, 44 questions): accuracy."""
    from .assets import fetch
    from .eval_data import bigbench_prompt, load_bigbench_mc
    return _multiple_choice(backbone, tokenizer, load_bigbench_mc(fetch("crass")), bigbench_prompt, limit)


def score_drop(backbone, tokenizer, limit: int | None, max_new_tokens: int = 24) -> dict:
    """DROP's role: token F1 of greedy answers on SQuAD-shifts' New Wiki set (the first ``limit`` questions)."""
    from pathlib import Path

    from .assets import fetch
    from .eval_data import load_squad, squad_prompt
    from .llm_eval import f1_summary, generate_answer

    folder = Path(fetch("squad-shifts"))
    data = load_squad((folder if folder.is_dir() else folder.parent) / DROP_FILE, limit)
    answers = [generate_answer(backbone, tokenizer, squad_prompt(q), max_new_tokens) for q in data.items]
    return {**f1_summary(answers, [q["answers"] for q in data.items]), "file": DROP_FILE,
            "predictions": [[q["id"], a] for q, a in zip(data.items, answers)]}


SCORERS = {"mmlu": score_mmlu, "bbh": score_bbh, "crass": score_crass, "drop": score_drop}


@torch.no_grad()
def final_evaluation(backbone, *, tokenizer, evals: dict[str, int | None]) -> dict:
    """Each suite of ``evals`` (name -> questions, None: all) scored on the model as it is; a
    suite whose data cannot be had is recorded ``not run`` with the reason."""
    from .assets import AssetError

    unknown = sorted(set(evals) - set(SCORERS))
    if unknown:
        raise ValueError(f"evals: unknown suite(s) {unknown}; known: {list(SCORERS)}")
    out: dict[str, Any] = {"evals": dict(evals)}
    for name, limit in evals.items():
        started = time.perf_counter()
        try:
            out[name] = SCORERS[name](backbone, tokenizer, limit)
        except (AssetError, FileNotFoundError) as err:
            out[name] = {"status": "not run", "reason": f"{type(err).__name__}: {err}"}
        out[name]["seconds"] = time.perf_counter() - started
    return out
