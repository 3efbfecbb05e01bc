"""Full Adapters: a bottleneck adapter in every layer, trained end to end with the head.

The memory-unconstrained upper bound of the paper's tables: every device is assumed to hold
the whole model, so the accuracy tables run it without memory-aware selection.
"""

from __future__ import annotations

from .base import Method, everything, nothing, register
from ..train import TrainPlan


@register
class FullAdapters(Method):
    name = "full_adapters"
    label = "Full Adapters"
    adapters = True
    memory_shape = "full_adapters"
    variants = {"Full Adapters": {}}

    @classmethod
    def plan_at(cls, num_layers, stage=None, lam=0.0, train_head=True) -> TrainPlan:
        return TrainPlan(range(0, 0), everything(num_layers), nothing(num_layers), train_head=train_head)
