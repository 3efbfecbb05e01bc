"""Linear probing: every layer frozen, only the classification head trains.

Every layer runs forward only, under ``no_grad``; the head (for BERT, its pooler and the
classifier) is the one tensor set trained and exchanged.
"""

from __future__ import annotations

from .base import Method, register


@register
class LinearProbe(Method):
    name, label, memory_shape = "linear_probe", "Linear Probing", "linear_probe"
    trains = "nothing"
    variants = {"LP": {}}
