"""Globally Perceptive Optimization (GPO, paper Eq. 2).

Training a window with only the loss at its own output makes early adapters greedy:
they learn features that are good for a head placed right after them, not for the
layers that follow. GPO adds a global loss from an auxiliary branch that passes the
window's output through the *subsequent adapters only* (not their transformer layers,
which are never loaded) and then the output head:

    local  = loss(head_local(h_w))
    global = loss(head(A_L(... A_{w+1}(h_w))))
    L_GPO  = (1 - lambda) * local + lambda * global

This workbook uses the convex mix above (lambda = 0 is the "w/o GPO" ablation, lambda = 1
trains on the global branch alone). When the window covers the last layer there are no
subsequent adapters and the end-to-end loss is used alone.

The subsequent adapters are not trained here (their parameters receive no update), but
gradients flow through them into the window.

Which head the local loss reads with (``ChainConfig.local_head``) is the paper's open point:

- ``"shared"``: ``head_local`` is the model's head, the one the global branch ends in. While
  the later adapters are still the identity they start as (the whole first pass), the two
  branches compute the same loss and lambda cannot matter.
- ``"stage"``: ``head_local`` is a head of the stage's own, of the model head's architecture,
  that only the local loss trains (the global branch never reads it; evaluation uses the
  model's head). There is one per window position, the position's head reading the output
  of the window's last layer (:func:`stage_head_layer`); each starts as a copy of the model's
  head as built (round 0), so when the window slides the next stage starts from a fresh head.
  It travels with the window, as ``stage_head.<head path>.<param>``, in the rounds whose loss
  trains it (a later layer exists and lambda < 1), and is averaged like it (FedAvg); the
  server keeps each position's head between passes (``methods.chainfed``). A causal LM's
  head (final norm, LM head) is frozen, so a copy of it would read the same loss as "shared":
  its stage head is a *lens* instead, an adapter (zero-initialised, so the identity at first)
  applied to the window's output before the frozen head, trained by the local loss alone, in
  the manner of the tuned lens (Belrose et al. 2023, a trained translator per layer that makes
  an early exit decodable). The window's adapters then need not bend the residual stream
  towards the vocabulary to lower the local loss (``benchmarks/decoder_early_exit.py`` shows the
  shared head doing so); exchanged as ``stage_head.lens.<param>``.

A client holds one stage-head module (:func:`add_stage_head`), loaded with the position's
tensors before it trains; ``Backbone.logits`` reads the head modules by attribute, so the
local loss points them at the stage head's for its one call (:func:`_stage_head_in_place`).
"""

from __future__ import annotations

import copy
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
from torch import nn

from .adapter import Adapter
from .backbone import Backbone, LayerContext
from .config import AdapterConfig
from .schedule import TrainPlan

STAGE_HEAD_ATTR = "chainfed_stage_head"     # where a model keeps its stage head (a ModuleDict)
STAGE_HEAD = "stage_head"                   # the exchange names' kind: stage_head.<head path>.<param>
LENS = "lens"                               # a causal LM's stage head: an adapter before the frozen head


@dataclass
class GPOLoss:
    total: torch.Tensor
    local: torch.Tensor
    global_: torch.Tensor | None
    logits: torch.Tensor           # local-branch logits, for training accuracy


def global_branch(backbone: Backbone, hidden: torch.Tensor, subsequent: Sequence[int]) -> torch.Tensor:
    """Pass the window's output through the adapters of the later layers only."""
    for i in subsequent:
        adapter = backbone.adapter(i)
        if adapter is not None:
            hidden = adapter(hidden)   # (B, T, H) -> (B, T, H)
    return hidden


def gpo_loss(backbone: Backbone, window_out: torch.Tensor, batch: dict[str, torch.Tensor],
             ctx: LayerContext, subsequent: Sequence[int], lam: float) -> GPOLoss:
    """The mixed objective of Eq. 2; the end-to-end loss alone when nothing follows the window.
    The local loss reads with the model's stage head where it has one (``local_head="stage"``)
    and the local loss has weight (lambda < 1: at lambda = 1 both readings are the same)."""
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"ChainConfig.gpo_lambda must lie in [0, 1], got {lam}")
    if not subsequent:
        local, logits = backbone.head_loss(window_out, batch, ctx)
        return GPOLoss(total=local, local=local, global_=None, logits=logits)
    heads = getattr(backbone.model, STAGE_HEAD_ATTR, {})
    lens = heads[LENS] if lam < 1.0 and LENS in heads else None
    with _stage_head_in_place(backbone, lam < 1.0 and lens is None):
        local, logits = backbone.head_loss(window_out if lens is None else lens(window_out), batch, ctx)
    global_, _ = backbone.head_loss(global_branch(backbone, window_out, subsequent), batch, ctx)
    total = (1.0 - lam) * local + lam * global_
    return GPOLoss(total=total, local=local, global_=global_, logits=logits)


# ---------------------------------------------------------------------- the stage head
def _key(path: str) -> str:
    return path.replace(".", "/")           # a ModuleDict key may not hold a dot


def add_stage_head(backbone: Backbone, lens: AdapterConfig | None = None) -> nn.ModuleDict:
    """Give the model a stage head: a copy of each of its head modules as they are now; for a
    causal LM, a lens (an adapter of ``lens``'s size before the frozen head)."""
    if hasattr(backbone.model, STAGE_HEAD_ATTR):
        raise ValueError("model already has a stage head")
    if backbone.is_causal_lm:
        if lens is None:
            raise ValueError("add_stage_head: a causal LM's stage head is a lens: give its AdapterConfig")
        heads = nn.ModuleDict({LENS: Adapter(backbone.hidden_size, lens).to(backbone.device)})
        backbone.model.add_module(STAGE_HEAD_ATTR, heads)
        return heads
    heads = nn.ModuleDict({_key(path): copy.deepcopy(module) for path, module in _head_modules(backbone).items()})
    backbone.model.add_module(STAGE_HEAD_ATTR, heads)
    return heads


def _head_modules(backbone: Backbone) -> dict[str, nn.Module]:
    """The model's head modules by their path on the task model (absent ones left out)."""
    found = {}
    for path in backbone.head_paths:
        module = backbone.model
        for part in path.split("."):
            module = getattr(module, part, None)
        if module is not None:
            found[path] = module
    return found


def has_stage_head(backbone: Backbone) -> bool:
    return hasattr(backbone.model, STAGE_HEAD_ATTR)


def stage_head_parameters(backbone: Backbone) -> dict[str, nn.Parameter]:
    """The stage head's parameters by exchange name (the model head's, ``head.`` -> ``stage_head.``); {} if none."""
    heads = getattr(backbone.model, STAGE_HEAD_ATTR, {})
    return {f"{STAGE_HEAD}.{key.replace('/', '.')}.{name}": p for key, module in heads.items()
            for name, p in module.named_parameters()}


def stage_head_layer(plan: TrainPlan) -> int | None:
    """The layer whose stage head a plan's local loss trains (the window's last), or None where
    it trains none: nothing follows the window (the end-to-end loss alone), or lambda = 1."""
    if not len(plan.training) or not len(plan.idle) or plan.lam >= 1.0:
        return None
    return plan.training[-1]


def stage_head_names(backbone: Backbone, plan: TrainPlan) -> list[str]:
    """Exchange names of the stage-head tensors the plan trains (none without a stage head)."""
    return list(stage_head_parameters(backbone)) if stage_head_layer(plan) is not None else []


@contextmanager
def _stage_head_in_place(backbone: Backbone, wanted: bool) -> Iterator[None]:
    """Within the block the model's head modules are the stage head's (if it has one and it is ``wanted``)."""
    heads = getattr(backbone.model, STAGE_HEAD_ATTR, None)
    if heads is None or not wanted:
        yield
        return
    swapped = []
    for path in _head_modules(backbone):
        parent_path, _, leaf = path.rpartition(".")
        parent = backbone.model
        for part in filter(None, parent_path.split(".")):
            parent = getattr(parent, part)
        swapped.append((parent, leaf, getattr(parent, leaf)))
        setattr(parent, leaf, heads[_key(path)])
    try:
        yield
    finally:
        for parent, leaf, module in swapped:
            setattr(parent, leaf, module)
