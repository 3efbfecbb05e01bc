"""Globally Perceptive Optimization (GPO, paper Eq. 2).

Training a window with only the loss at its own output makes early adapters greedy:
they learn features that are good for a head placed right after them, not for the
layers that follow. GPO adds a global loss from an auxiliary branch that passes the
window's output through the *subsequent adapters only* (not their transformer layers,
which are never loaded) and then the output head:

    local  = loss(head(h_w))
    global = loss(head(A_L(... A_{w+1}(h_w))))
    L_GPO  = (1 - lambda) * local + lambda * global

This workbook uses the convex mix above (lambda = 0 is the "w/o GPO" ablation, lambda = 1
trains on the global branch alone). When the window covers the last layer there are no
subsequent adapters and the end-to-end loss is used alone.

The subsequent adapters are not trained here (their parameters receive no update), but
gradients flow through them into the window.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from .backbone import Backbone, LayerContext


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
    """The mixed objective of Eq. 2; the end-to-end loss alone when nothing follows the window."""
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"ChainConfig.gpo_lambda must lie in [0, 1], got {lam}")
    local, logits = backbone.head_loss(window_out, batch, ctx)
    if not subsequent:
        return GPOLoss(total=local, local=local, global_=None, logits=logits)
    global_, _ = backbone.head_loss(global_branch(backbone, window_out, subsequent), batch, ctx)
    total = (1.0 - lam) * local + lam * global_
    return GPOLoss(total=total, local=local, global_=global_, logits=logits)
