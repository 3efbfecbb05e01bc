"""Full fine-tuning (FFT): every layer's own weights train, end to end, no adapters.

The reference of the paper's Figure 8. It exchanges every layer and the head, so it is the
costliest method in both memory and communication.
"""

from __future__ import annotations

from .base import Method, register


@register
class FFT(Method):
    name, label, memory_shape = "fft", "FFT", "fft"
    trains = "weights"
    variants = {"FFT": {}}
