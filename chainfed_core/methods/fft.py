"""Full fine-tuning (FFT): every layer's own weights train, end to end, no adapters.

The reference of the paper's Figure 8; it exchanges every layer and the head.
"""

from __future__ import annotations

from .base import Method, everything, nothing, register
from ..train import TrainPlan


@register
class FFT(Method):
    name = "fft"
    label = "FFT"
    memory_shape = "fft"
    variants = {"FFT": {}}

    @classmethod
    def plan_at(cls, num_layers, stage=None, lam=0.0, train_head=True) -> TrainPlan:
        return TrainPlan(range(0, 0), everything(num_layers), nothing(num_layers), train_head=train_head,
                         train_base=True)
