"""ChainFed: chain federated fine-tuning of adapters, layer by layer.

Where each idea of the paper lives:

- ``adapter``   bottleneck adapter (Eq. 1) and its injection by layer index
- ``backbone``  a model split into embeddings / layers / head, per family
- ``schedule``  the chain with Dynamic Layer Co-Tuning (which layers freeze, train, idle)
- ``gpo``       Globally Perceptive Optimization loss (Eq. 2)
- ``foat``      linear CKA and the start layer (Eq. 3-4)
- ``train``     the local training loop of one client
- ``assets``, ``data``, ``partition``  offline models, datasets and client splits
"""

from .config import RunConfig

__all__ = ["RunConfig"]
__version__ = "0.1.0"
