"""No fine-tuning: the pretrained encoder and its untrained head, evaluated as they are.

The lower bound of the paper's tables. Nothing trains and nothing is exchanged.
"""

from __future__ import annotations

from .base import Method, everything, nothing, register
from ..train import TrainPlan


@register
class NoFT(Method):
    name = "no_ft"
    label = "No-FT"
    memory_shape = "no_ft"
    variants = {"No-FT": {}}

    @classmethod
    def plan_at(cls, num_layers, stage=None, lam=0.0, train_head=True) -> TrainPlan:
        return TrainPlan(everything(num_layers), nothing(num_layers), nothing(num_layers), train_head=False)
