"""Linear probing: every layer frozen, only the classification head trains.

Every layer runs forward only; the head (and, for BERT, its pooler) is trained and exchanged.
"""

from __future__ import annotations

from .base import Method, everything, nothing, register
from ..train import TrainPlan


@register
class LinearProbe(Method):
    name = "linear_probe"
    label = "Linear Probing"
    memory_shape = "linear_probe"
    variants = {"LP": {}}

    @classmethod
    def plan_at(cls, num_layers, stage=None, lam=0.0, train_head=True) -> TrainPlan:
        return TrainPlan(everything(num_layers), nothing(num_layers), nothing(num_layers), train_head=train_head)
