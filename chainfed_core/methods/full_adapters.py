"""Full Adapters: a bottleneck adapter in every layer, trained end to end with the head.

The memory-unconstrained upper bound of the paper's tables: every device is assumed to hold
the whole model, so the accuracy tables run it without memory-aware selection.
"""

from __future__ import annotations

from .base import Method, register


@register
class FullAdapters(Method):
    name, label, memory_shape = "full_adapters", "Full Adapters", "full_adapters"
    adapters, trains = True, "adapters"
    variants = {"Full Adapters": {}}
