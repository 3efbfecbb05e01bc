"""No fine-tuning: the pretrained encoder and its untrained head, evaluated as they are.

The lower bound of the paper's tables. Nothing trains and nothing is exchanged.
"""

from __future__ import annotations

from .base import Method, register


@register
class NoFT(Method):
    """Every layer runs forward only and the head keeps its random initialisation."""
    name, label, memory_shape = "no_ft", "No-FT", "no_ft"
    trains, trains_head = "nothing", False
    variants = {"No-FT": {}}
