"""The task every client and the server build the same way from a config: model and data.

``model.name = "tiny-<family>[-L4][-H32]"`` and ``data.dataset = "synthetic"`` give the
CPU-sized toy task used by tests and quick runs; ``data.dataset = "alpaca"`` the instruction
tuning of a decoder (:mod:`chainfed_core.instruct_runs`); anything else goes through
``chainfed_core.data`` and ``chainfed_core.backbone.load_backbone``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch

from . import data
from .backbone import Backbone
from .config import RunConfig
from .methods import get_method


@dataclass
class Task:
    """Model factory and tokenized splits."""
    make_backbone: Callable[[], Backbone]   # fresh model with what the method trains, seeded
    train: Any                              # tokenized datasets.Dataset
    test: Any
    num_labels: int
    pad_id: int = 0
    data: dict = field(default_factory=dict)   # provenance for the record (``data.fingerprint``)
    # the evaluation after the last round, into the record's ``final_eval`` (instruction tuning:
    # MMLU and the other benchmarks, :mod:`chainfed_core.instruct_runs`); None: none
    final_eval: Callable[[Backbone], dict] | None = None


def synthetic_dataset(n: int, num_labels: int = 3, seq_len: int = 12, seed: int = 0):
    """A learnable tokenized toy task: the label is the vocabulary third most tokens fall in."""
    from datasets import Dataset
    from .tiny import VOCAB

    rng = np.random.default_rng([seed, n])
    labels = rng.integers(0, num_labels, n)
    band = (VOCAB - 5) // num_labels
    lo = 5 + labels[:, None] * band
    ids = np.where(rng.random((n, seq_len)) < 0.6, rng.integers(0, band, (n, seq_len)) + lo,
                   rng.integers(5, VOCAB, (n, seq_len)))
    return Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": np.ones_like(ids).tolist(),
                              "label": labels.tolist()})


def tiny_spec(name: str) -> dict:
    """``tiny-<family>[-L<layers>][-H<hidden>]`` -> tiny_backbone kwargs."""
    parts = name.split("-")
    spec = {"family": parts[1] if len(parts) > 1 else "bert", "num_layers": 4, "hidden": 32}
    for p in parts[2:]:
        key = {"L": "num_layers", "H": "hidden"}.get(p[:1])
        if key is None or not p[1:].isdigit():
            raise ValueError(f"ModelConfig.name: {name!r} is not tiny-<family>[-L<layers>][-H<hidden>]")
        spec[key] = int(p[1:])
    return spec


def seq_len(dataset) -> int:
    """The longest real sequence among the first 256 rows (the memory model's sequence length)."""
    return int(max(sum(m) for m in dataset[: min(len(dataset), 256)]["attention_mask"]))


def _splits(cfg: RunConfig):
    """(train, test, num_labels, pad_id, provenance) of the config's data set, tokenized."""
    if cfg.data.dataset == data.SYNTHETIC:
        num_labels = 3
        train = synthetic_dataset(cfg.data.max_train_examples or 512, num_labels, seed=cfg.seed)
        test = synthetic_dataset(cfg.data.max_test_examples or 128, num_labels, seed=cfg.seed + 10 ** 6)
        counts = {split: dict(zip(map(str, range(num_labels)),
                                  np.bincount(ds["label"], minlength=num_labels).tolist()))
                  for split, ds in (("train", train), ("test", test))}
        provenance = {"dataset": data.SYNTHETIC, "generator": "chainfed_core.task.synthetic_dataset",
                      "classes": [str(k) for k in range(num_labels)], "counts": counts}
        return train, test, num_labels, 0, provenance
    from transformers import AutoTokenizer

    from .assets import model_path

    splits = data.load_dataset(cfg.data.dataset, seed=cfg.seed, test_fraction=cfg.data.test_fraction,
                               max_train=cfg.data.max_train_examples, max_test=cfg.data.max_test_examples)
    tokenizer = AutoTokenizer.from_pretrained(model_path(cfg.model.name))
    provenance = data.fingerprint(splits, cfg.data.dataset)
    splits = data.tokenize(splits, tokenizer, cfg.model.max_length)
    return (splits["train"], splits["test"], len(data.label_names(splits)), tokenizer.pad_token_id or 0,
            provenance)


def build_task(config: RunConfig) -> Task:
    """Model factory and tokenized train/test splits for ``config``."""
    cfg = config
    from .instruct_runs import build_instruct_task, is_instruct

    if is_instruct(cfg.data.dataset):       # Alpaca records: causal-LM instruction tuning
        return build_instruct_task(cfg)
    method = get_method(cfg.method)
    train, test, num_labels, pad_id, provenance = _splits(cfg)

    def make_backbone() -> Backbone:
        torch.manual_seed(cfg.seed)
        if cfg.model.name.startswith("tiny"):
            from .tiny import tiny_backbone
            bb = tiny_backbone(num_labels=num_labels, seed=cfg.seed, **tiny_spec(cfg.model.name))
        else:
            from .backbone import load_backbone
            bb = load_backbone(cfg.model, num_labels)
        method(cfg, bb.num_layers, bb.family).prepare(bb)
        return bb

    return Task(make_backbone, train, test, num_labels, pad_id, provenance)
