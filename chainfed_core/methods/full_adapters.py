"""Full Adapters: a bottleneck adapter in every layer, trained end to end with the head.

The memory-unconstrained upper bound of the paper's tables: every device is assumed to hold
the whole model, so the accuracy tables run it without memory-aware selection. Observation 1
(Figure 2) runs it both ways: "Full Adapters, memory-limited" draws its clients among the
devices that hold it, as every method but the bounds does.
"""

from __future__ import annotations

from ..profiles import MEMORY_AWARE
from .base import Method, register


@register
class FullAdapters(Method):
    name, label, memory_shape = "full_adapters", "Full Adapters", "full_adapters"
    adapters, trains = True, "adapters"
    variants = {"Full Adapters": {}, "Full Adapters, memory-limited": {"fed": MEMORY_AWARE}}
