"""Local training of one client: the window's adapters (and the head), one explicit loop.

A :class:`TrainPlan` says which layers are frozen (forward only, under ``no_grad``),
which train, and which are idle (never run). Each method (``chainfed_core.methods``) says
what its plan is at round r, so every method that trains by backpropagation runs through
the same loop, :func:`train_local`; e.g. ChainFed trains [p, p+W) after a frozen [0, p)
with GPO weight lambda, Full Adapters every adapter end to end, linear probing the head.

Only the tensors a plan trains are exchanged, as a plain ``dict[str, Tensor]`` with keys
``adapters.<i>.<param>``, ``head.<module>.<param>``, (FFT) ``layers.<i>.<param>`` and
``modules.<key>.<param>`` (a module a method adds, ``Backbone.add_method_module``: C2A's
hypernetwork, which trains whenever the plan trains adapters) and ``stage_head.<module>.<param>``
(GPO's head of the stage's own, ``chain.local_head="stage"``: ``gpo``).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

import torch
from torch import nn

from .aggregation import pack
from .backbone import IGNORE_INDEX, Backbone, LayerContext
from .config import TrainConfig
from .gpo import STAGE_HEAD, gpo_loss, stage_head_names, stage_head_parameters
from .lora import lora_names
from .schedule import TrainPlan


# ---------------------------------------------------------------------- exchanged tensors
def named_tensors(backbone: Backbone) -> dict[str, nn.Parameter]:
    """Every tensor a plan may train or exchange, under its exchange name."""
    named = {}
    adapters = getattr(backbone.model, "chainfed_adapters", None)
    if adapters is not None:
        named.update({f"adapters.{k}.{n}": p for k, a in adapters.items() for n, p in a.named_parameters()})
    named.update(module_parameters(backbone))
    named.update(backbone.head_parameters())
    named.update(stage_head_parameters(backbone))
    named.update({f"layers.{i}.{n}": p for i, layer in enumerate(backbone.layers)
                  for n, p in layer.named_parameters()})
    return named


def tensors_by_name(backbone: Backbone, names: Iterable[str]) -> dict[str, nn.Parameter]:
    """The tensors of ``names`` (exchange names, see :func:`named_tensors`), found by path
    rather than by walking every module: a client's per-round lookups stay cheap at any depth."""
    found, unknown, owners = {}, [], {}
    for name in names:
        kind, _, rest = name.partition(".")
        index, _, param = rest.partition(".")
        key = kind if kind in ("head", STAGE_HEAD) else (kind, index)
        try:
            if key not in owners:       # each adapter, layer and the head is looked up once
                if kind == "adapters":
                    owners[key] = dict(backbone.adapters[index].named_parameters())
                elif kind == "layers":
                    owners[key] = dict(backbone.layers[int(index)].named_parameters())
                elif kind == "head":
                    owners[key] = backbone.head_parameters()
                elif kind == "modules":
                    owners[key] = dict(backbone.method_modules[index].named_parameters())
                elif kind == STAGE_HEAD:
                    owners[key] = stage_head_parameters(backbone)
                else:
                    raise KeyError(kind)
            found[name] = owners[key][name if kind in ("head", STAGE_HEAD) else param]
        except (AttributeError, KeyError, IndexError, ValueError):
            unknown.append(name)
    if unknown:
        raise KeyError(f"unknown tensors in state: {sorted(unknown)[:5]}")
    return found


def adapter_names(backbone: Backbone, indices: Iterable[int]) -> list[str]:
    """Exchange names of the adapters of layers ``indices`` (layers without one are skipped)."""
    return [f"adapters.{i}.{n}" for i in indices if backbone.adapter(i) is not None
            for n, _ in backbone.adapter(i).named_parameters()]


def module_parameters(backbone: Backbone) -> dict[str, nn.Parameter]:
    """The parameters of the modules a method added (``Backbone.add_method_module``), by exchange name."""
    return {f"modules.{k}.{n}": p for k, m in backbone.method_modules.items() for n, p in m.named_parameters()}


def layer_of(name: str) -> int | None:
    """The layer an exchange name belongs to (``layers.<i>.``, ``adapters.<i>.``); None for the head."""
    kind, _, rest = name.partition(".")
    return int(rest.partition(".")[0]) if kind in ("layers", "adapters") else None


def trainable_names(backbone: Backbone, plan: TrainPlan) -> list[str]:
    if plan.train_base:
        names = [f"layers.{i}.{n}" for i in plan.training for n, _ in backbone.layers[i].named_parameters()]
    elif plan.lora_rank:
        names = lora_names(backbone, plan.training)
    else:
        names = adapter_names(backbone, plan.training)
        if len(plan.training):          # a method's own modules (a hypernetwork) train with the adapters
            names += list(module_parameters(backbone))
    if plan.train_head:
        names += list(backbone.head_parameters())
    return names + stage_head_names(backbone, plan)


def get_state(backbone: Backbone, names: Iterable[str]) -> dict[str, torch.Tensor]:
    """Copies of the named tensors on the CPU, packed in one buffer where they share a dtype (:func:`pack`)."""
    return cpu_state(pack(tensors_by_name(backbone, names)))


def cpu_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` with its tensors on the CPU, where states travel and the server aggregates them:
    ``state`` itself when they are there already (nothing copied), else one packed copy."""
    if all(t.device.type == "cpu" for t in state.values()):
        return state
    return pack({n: t.detach().cpu() for n, t in state.items()})


def set_state(backbone: Backbone, state: dict[str, torch.Tensor],
              tensors: dict[str, torch.Tensor] | None = None) -> None:
    """Copy ``state`` into the backbone (``tensors``: its :func:`tensors_by_name`, if known)."""
    if not state:                    # No-FT exchanges nothing
        return
    tensors = tensors if tensors is not None else tensors_by_name(backbone, state)
    with torch.no_grad():
        torch._foreach_copy_([tensors[name] for name in state], list(state.values()))


# ---------------------------------------------------------------------- batches
def batches(dataset, batch_size: int, *, shuffle: bool, seed: int = 0, pad_id: int = 0,
            device: torch.device | str | None = None) -> Iterator[dict]:
    """Mini-batches of a tokenized dataset (columns input_ids, attention_mask, label),
    right-padded and trimmed to the longest real sequence in the batch, on ``device`` (the
    model's, ``Backbone.device``; None: where collation made them, the CPU). The order is drawn
    on the CPU whatever the device, so every device sees the same batches."""
    n = len(dataset)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)) if shuffle else torch.arange(n)
    for start in range(0, n, batch_size):
        rows = dataset[order[start:start + batch_size].tolist()]
        batch = collate(rows, pad_id)
        yield batch if device is None else {k: v.to(device) for k, v in batch.items()}


def collate(rows: dict, pad_id: int = 0) -> dict[str, torch.Tensor]:
    ids, masks = rows["input_ids"], rows["attention_mask"]
    if torch.is_tensor(ids) and ids.ndim == 2:          # already padded to a fixed length
        longest = int(masks.sum(dim=1).max())
        input_ids, attention = ids[:, :longest].long(), masks[:, :longest].long()   # (B, T)
    else:                                                # ragged lists: pad here
        longest = max(int(sum(m)) for m in masks)
        input_ids = torch.full((len(ids), longest), pad_id, dtype=torch.long)      # (B, T)
        attention = torch.zeros((len(ids), longest), dtype=torch.long)            # (B, T)
        for row, (x, m) in enumerate(zip(ids, masks)):
            x, m = torch.as_tensor(x)[:longest], torch.as_tensor(m)[:longest]
            input_ids[row, :len(x)] = x
            attention[row, :len(m)] = m
    batch = {"input_ids": input_ids.masked_fill(attention == 0, pad_id), "attention_mask": attention}
    if "lm_labels" in rows:                              # instruction rows: the loss on the response only
        batch["lm_labels"] = _lm_labels(rows["lm_labels"], longest).masked_fill(attention == 0, IGNORE_INDEX)
    if "label" in rows:
        batch["labels"] = torch.as_tensor(rows["label"], dtype=torch.long)
    return batch


def _lm_labels(labels, longest: int) -> torch.Tensor:
    """(B, T) response-token labels (:mod:`chainfed_core.instruct`) cut or padded with -100 to ``longest``."""
    if torch.is_tensor(labels) and labels.ndim == 2:
        return labels[:, :longest].long()
    out = torch.full((len(labels), longest), IGNORE_INDEX, dtype=torch.long)     # (B, T)
    for row, lab in enumerate(labels):
        lab = torch.as_tensor(lab, dtype=torch.long)[:longest]
        out[row, :len(lab)] = lab
    return out


# ---------------------------------------------------------------------- training
@dataclass
class LocalResult:
    state: dict[str, torch.Tensor]
    num_examples: int
    steps: int
    loss: float
    accuracy: float
    seconds: float
    history: list[float] = field(default_factory=list)


Prefix = Callable[[dict], tuple[torch.Tensor, LayerContext]]


def frozen_prefix(backbone: Backbone, plan: TrainPlan) -> Prefix:
    """Embeddings and frozen layers, forward only: activations are freed layer by layer."""
    def run(batch: dict) -> tuple[torch.Tensor, LayerContext]:
        with torch.no_grad():
            hidden, ctx = backbone.embed(batch)
            hidden = backbone.run_layers(plan.frozen, hidden, ctx)
        return hidden, ctx
    return run


def _set_trainable(backbone: Backbone, names: list[str]) -> list[nn.Parameter]:
    tensors = tensors_by_name(backbone, names)
    for p in backbone.model.parameters():
        p.requires_grad_(False)
    params = [tensors[n] for n in names]
    for p in params:
        p.requires_grad_(True)
    return params


def _optimizer(params: list[nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def train_local(backbone: Backbone, dataset, plan: TrainPlan, cfg: TrainConfig, *, seed: int = 0,
                prefix: Prefix | None = None, pad_id: int = 0) -> LocalResult:
    """Train the plan's tensors on one client's data; return them and the metrics.

    ``prefix`` computes the window's input for a batch; the default runs the embeddings and
    the frozen layers under ``no_grad``. The activation cache passes its own.
    """
    started = time.perf_counter()
    names = trainable_names(backbone, plan)
    if not names:
        return LocalResult({}, len(dataset), 0, math.nan, math.nan, 0.0)
    params = _set_trainable(backbone, names)
    optimizer = _optimizer(params, cfg)
    prefix = prefix or frozen_prefix(backbone, plan)
    subsequent, device = list(plan.idle), backbone.device
    losses, hits, seen, steps = [], [], 0, 0        # tensors, read once after the loop (no sync per step)
    try:
        for epoch in range(cfg.local_epochs):
            for batch in batches(dataset, cfg.batch_size, shuffle=True, seed=seed * 1000 + epoch, pad_id=pad_id,
                                 device=device):
                hidden, ctx = prefix(batch)
                hidden = backbone.run_layers(plan.training, hidden, ctx)
                out = gpo_loss(backbone, hidden, batch, ctx, subsequent, plan.lam)
                optimizer.zero_grad(set_to_none=True)
                out.total.backward()
                if cfg.max_grad_norm > 0:
                    torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
                optimizer.step()
                losses.append(out.total.detach())
                if not backbone.is_causal_lm:
                    hits.append((out.logits.argmax(-1) == batch["labels"]).sum())
                    seen += len(batch["labels"])
                steps += 1
                if cfg.local_steps is not None and steps >= cfg.local_steps:
                    break
            if cfg.local_steps is not None and steps >= cfg.local_steps:
                break
    finally:
        for p in params:
            p.requires_grad_(False)
            p.grad = None
    losses = torch.stack(losses).tolist() if losses else []
    correct = int(torch.stack(hits).sum()) if hits else 0
    return LocalResult(state=get_state(backbone, names), num_examples=len(dataset), steps=steps,
                       loss=sum(losses) / len(losses), accuracy=correct / seen if seen else math.nan,
                       seconds=time.perf_counter() - started, history=losses)


@torch.no_grad()
def evaluate(backbone: Backbone, dataset, batch_size: int = 64, pad_id: int = 0) -> dict[str, float]:
    """End-to-end loss and accuracy (classification) or loss and perplexity (LM: batches of at
    most 8, the (B, T, V) logits of a real vocabulary are large)."""
    if backbone.is_causal_lm:
        batch_size = min(batch_size, 8)
    losses, sizes, hits = [], [], []         # tensors, read once after the loop (no sync per batch)
    for batch in batches(dataset, batch_size, shuffle=False, pad_id=pad_id, device=backbone.device):
        hidden, ctx = backbone.embed(batch)
        hidden = backbone.run_layers(range(backbone.num_layers), hidden, ctx)
        loss, logits = backbone.head_loss(hidden, batch, ctx)
        losses.append(loss)
        sizes.append(len(batch["input_ids"]))
        if not backbone.is_causal_lm:
            hits.append((logits.argmax(-1) == batch["labels"]).sum())
    total_loss, count = 0.0, sum(sizes)
    for loss, n in zip(torch.stack(losses).tolist(), sizes):     # summed in batch order, as it always was
        total_loss += loss * n
    correct = int(torch.stack(hits).sum()) if hits else 0
    metrics = {"loss": total_loss / count}
    if backbone.is_causal_lm:
        metrics["perplexity"] = math.exp(metrics["loss"])
    else:
        metrics["accuracy"] = correct / count
    return metrics
