"""Instruction tuning data: Alpaca records -> prompt + response -> token batches with the loss on the response only.

The paper fine-tunes its decoders on Alpaca-GPT4; here ``alpaca_en_demo.json`` (asset
``alpaca-en-demo``, 999 records) plays that role. Each record becomes

- a **prompt**: the Stanford Alpaca template (:data:`ALPACA_PROMPT`, or
  :data:`ALPACA_PROMPT_NO_INPUT` when ``input`` is empty), or with ``template="chat"``
  the model's own chat template (one user turn holding instruction and input, then the
  assistant header); SmolLM2-135M-Instruct ships one, so both work for it;
- a **response**: ``output`` followed by the tokenizer's end-of-sequence token.

Prompt and response are tokenised separately and concatenated, so the boundary is exact:
``lm_labels`` is -100 on every prompt token and every padding token, and the token id
elsewhere (:data:`~chainfed_core.backbone.IGNORE_INDEX`; the shift happens in
:meth:`~chainfed_core.backbone.Backbone.head_loss`, as in Hugging Face models). Padding is
masked by ``attention_mask``, not by token id: SmolLM2 pads with its end token, whose
label on the real end of a response is kept.

Truncation policy (``max_length`` counts prompt + response tokens): a record whose prompt
leaves no room for one response token is **skipped and counted** (``skipped``); a
response that does not fit is cut on the right, losing its end token, and **counted**
(``truncated``). A record without a non-empty ``instruction`` or ``output`` is an error
naming its index.

Batches are the dict of tensors :mod:`chainfed_core.train` feeds a backbone
(``input_ids``, ``attention_mask``, both (B, T)), plus ``lm_labels`` (B, T): the key a
causal-LM backbone's ``head_loss`` reads (``labels`` holds class labels there).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import datasets as hfds
import numpy as np
import torch

from .backbone import IGNORE_INDEX
from .partition import client_indices
from .train import collate as collate_ids

ALPACA_PROMPT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
TEMPLATES = ("alpaca", "chat")


class InstructDataError(ValueError):
    """An instruction record is malformed (the message names the record's index)."""


def check_records(records: Sequence[dict], source: str = "records") -> list[dict]:
    """The records as ``{"instruction", "input", "output"}`` dicts of strings; raise on a bad one.

    ``instruction`` and ``output`` must be non-empty strings, ``input`` a string or absent.
    """
    if not isinstance(records, (list, tuple)):
        raise InstructDataError(f"{source}: expected a JSON list of Alpaca records, got {type(records).__name__}")
    checked = []
    for i, rec in enumerate(records):
        if not isinstance(rec, dict):
            raise InstructDataError(f"{source}: record {i} is a {type(rec).__name__}, not an object")
        for key in ("instruction", "output"):
            if not isinstance(rec.get(key), str) or not rec[key].strip():
                raise InstructDataError(f"{source}: record {i} has no {key!r} (missing or empty); "
                                        f"an Alpaca record needs 'instruction' and 'output'")
        extra = rec.get("input", "")
        if not isinstance(extra, str):
            raise InstructDataError(f"{source}: record {i}: 'input' must be a string, got {type(extra).__name__}")
        checked.append({"instruction": rec["instruction"], "input": extra, "output": rec["output"]})
    return checked


def load_alpaca(path: str | Path) -> list[dict]:
    """Alpaca records from a JSON file (a list of objects with instruction / input / output), checked."""
    path = Path(path)
    with open(path, encoding="utf-8") as f:
        return check_records(json.load(f), source=str(path))


def alpaca_prompt(record: dict) -> str:
    """The Stanford Alpaca prompt of a record (the no-input form when ``input`` is empty)."""
    if record.get("input", "").strip():
        return ALPACA_PROMPT.format(instruction=record["instruction"], input=record["input"])
    return ALPACA_PROMPT_NO_INPUT.format(instruction=record["instruction"])


def chat_prompt(record: dict, tokenizer) -> str:
    """The model's chat template: one user turn (instruction, then input), then the assistant header."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("template='chat': the tokenizer has no chat template; use template='alpaca'")
    user = record["instruction"] + (f"\n\n{record['input']}" if record.get("input", "").strip() else "")
    return tokenizer.apply_chat_template([{"role": "user", "content": user}], tokenize=False,
                                         add_generation_prompt=True)


@dataclass
class Tokenized:
    """Token rows of the records that fit, and what the truncation policy did to the others."""

    dataset: hfds.Dataset            # columns input_ids, attention_mask, lm_labels (lists); record (index)
    skipped: list[int] = field(default_factory=list)      # records whose prompt leaves no response token
    truncated: list[int] = field(default_factory=list)    # records whose response was cut at max_length

    def report(self) -> str:
        n = len(self.dataset) + len(self.skipped)
        return (f"{len(self.dataset)} of {n} records tokenised; {len(self.skipped)} skipped (prompt fills "
                f"max_length); {len(self.truncated)} responses truncated")


def tokenize_records(records: Sequence[dict], tokenizer, max_length: int, template: str = "alpaca") -> Tokenized:
    """Prompt + response token rows with labels on the response only (see the module docstring).

    An Alpaca prompt is encoded with the tokenizer's own special tokens (a BOS where it
    adds one), a chat prompt as its template wrote it; the response without special
    tokens, followed by ``eos_token_id``.
    """
    if template not in TEMPLATES:
        raise ValueError(f"template: {template!r} is not one of {list(TEMPLATES)}")
    if max_length < 2:
        raise ValueError(f"max_length: must be >= 2 (a prompt and one response token), got {max_length}")
    if tokenizer.eos_token_id is None:
        raise ValueError("tokenizer: has no eos_token_id to end a response with")
    records = check_records(records)
    rows, skipped, truncated = [], [], []
    for i, rec in enumerate(records):
        if template == "alpaca":
            prompt_ids = tokenizer(alpaca_prompt(rec))["input_ids"]
        else:                                         # the chat template writes its own special tokens
            prompt_ids = tokenizer(chat_prompt(rec, tokenizer), add_special_tokens=False)["input_ids"]
        response_ids = tokenizer(rec["output"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        room = max_length - len(prompt_ids)
        if room < 1:
            skipped.append(i)
            continue
        if len(response_ids) > room:
            truncated.append(i)
            response_ids = response_ids[:room]
        ids = prompt_ids + response_ids
        rows.append({"input_ids": ids, "attention_mask": [1] * len(ids),
                     "lm_labels": [IGNORE_INDEX] * len(prompt_ids) + response_ids, "record": i})
    columns = {k: [r[k] for r in rows] for k in ("input_ids", "attention_mask", "lm_labels", "record")}
    return Tokenized(hfds.Dataset.from_dict(columns), skipped, truncated)


def collate(rows: dict, pad_id: int = 0) -> dict[str, torch.Tensor]:
    """Right-pad a batch of token rows: :func:`chainfed_core.train.collate` for ids and mask,
    ``lm_labels`` padded with -100 to the same length."""
    batch = collate_ids({"input_ids": rows["input_ids"], "attention_mask": rows["attention_mask"]}, pad_id)
    length = batch["input_ids"].shape[1]
    labels = torch.full((len(rows["lm_labels"]), length), IGNORE_INDEX, dtype=torch.long)    # (B, T)
    for row, lab in enumerate(rows["lm_labels"]):
        lab = torch.as_tensor(lab, dtype=torch.long)[:length]
        labels[row, :len(lab)] = lab
    batch["lm_labels"] = labels.masked_fill(batch["attention_mask"] == 0, IGNORE_INDEX)
    return batch


def batches(dataset: hfds.Dataset, batch_size: int, *, shuffle: bool, seed: int = 0,
            pad_id: int = 0) -> Iterator[dict[str, torch.Tensor]]:
    """Mini-batches of a :func:`tokenize_records` dataset, in the order of :func:`chainfed_core.train.batches`."""
    n = len(dataset)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)) if shuffle else torch.arange(n)
    for start in range(0, n, batch_size):
        yield collate(dataset[order[start:start + batch_size].tolist()], pad_id)


def split_clients(dataset: hfds.Dataset, num_clients: int, *, seed: int = 0,
                  min_partition_size: int = 1) -> list[hfds.Dataset]:
    """An IID split of instruction rows over ``num_clients`` clients (:func:`chainfed_core.partition.client_indices`).

    Instruction data has no class label, so only the IID scheme applies; the partitioner
    is given a constant label column.
    """
    if not len(dataset):
        raise ValueError("dataset: no rows to split")
    labels = hfds.Dataset.from_dict({"label": np.zeros(len(dataset), dtype=np.int64)})
    split = client_indices(labels, num_clients, scheme="iid", min_partition_size=min_partition_size, seed=seed)
    return [dataset.select(split.indices(k)) for k in range(num_clients)]


def padded_rows(dataset: hfds.Dataset, length: int, pad_id: int = 0) -> hfds.Dataset:
    """Rows right-padded to ``length`` (ids with ``pad_id``, labels with -100), plus a constant
    ``label`` column: the fixed-width layout the simulator's population gathers batches from
    (:class:`chainfed_core.population.Population`; each batch is trimmed back to its longest row)."""
    def pad(values: list, fill: int) -> list:
        return list(values) + [fill] * (length - len(values))
    return hfds.Dataset.from_dict({
        "input_ids": [pad(x, pad_id) for x in dataset["input_ids"]],
        "attention_mask": [pad(x, 0) for x in dataset["attention_mask"]],
        "lm_labels": [pad(x, IGNORE_INDEX) for x in dataset["lm_labels"]],
        "label": [0] * len(dataset), "record": list(dataset["record"])})


def byte_tokenizer():
    """A byte-level tokenizer with no download: 256 byte tokens, then ``<pad>``, ``<s>``, ``</s>``
    (ids 256-258), no merges, so a text of n bytes is n tokens. The tiny decoders of the quick
    profile read text through it (:mod:`chainfed_core.instruct_runs`)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    specials = ["<pad>", "<s>", "</s>"]
    vocab = {ch: i for i, ch in enumerate(bytes_to_unicode().values())}
    vocab.update({tok: 256 + i for i, tok in enumerate(specials)})
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
