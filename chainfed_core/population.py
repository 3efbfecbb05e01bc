"""The simulated population: N clients, each a partition of the training set and a device.

A client is an index range of one array (memory does not grow with N) and a device memory
capacity drawn from a profile as a pure function of (seed, client id).
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from .config import RunConfig
from .partition import client_indices
from .seeding import CAPACITY, unit

# Device memory profiles in GB. "paper": phone/Jetson-class tiers of about 4-12 GB.
DEVICE_PROFILES = {"paper": (np.array([4.0, 6.0, 8.0, 12.0]), np.array([0.3, 0.3, 0.25, 0.15])),
                   "uniform": (np.array([4.0, 12.0]), None)}
LARGEST_DEVICE_GB = 12.0


def device_capacity_gb(seed: int, client_ids, profile: str) -> np.ndarray:
    """Device memory (GB) of each client id, drawn from ``profile`` by (seed, id) alone."""
    u = unit(seed, CAPACITY, np.asarray(client_ids))
    tiers, probs = DEVICE_PROFILES[profile]
    if probs is None:
        return tiers[0] + u * (tiers[1] - tiers[0])
    return tiers[np.searchsorted(np.cumsum(probs), u, side="right").clip(max=len(tiers) - 1)]


class Population:
    """N clients, built lazily: a partition (one index array) and a capacity per id."""

    def __init__(self, config: RunConfig, train):
        d = config.data
        self.config = config
        self.train = train
        self.partition = client_indices(train, d.num_clients, scheme=d.partition, alpha=d.alpha,
                                        min_partition_size=d.min_partition_size, seed=config.seed)
        self.capacity_gb = device_capacity_gb(config.seed, np.arange(d.num_clients), config.fed.memory_profile)

    @functools.cached_property
    def _columns(self) -> dict[str, torch.Tensor]:
        """The training set's columns as tensors, gathered once and shared by every client."""
        columns = [c for c in ("input_ids", "attention_mask", "label", "lm_labels") if c in self.train.column_names]
        return {k: torch.as_tensor(v) for k, v in self.train.with_format("torch", columns=columns)[:].items()}

    @functools.cached_property
    def _order(self) -> torch.Tensor:
        return torch.as_tensor(self.partition.order, dtype=torch.long)

    def data(self, client_id: int) -> "ClientRows":
        begin, end = self.partition.offsets[client_id:client_id + 2].tolist()
        return ClientRows(self._columns, self._order[begin:end])     # a view: nothing copied per client

    def num_examples(self, client_id: int) -> int:
        return int(self.partition.sizes()[client_id])


class ClientRows:
    """One client's examples as an index into the shared columns: rows are gathered per
    batch, so building a client costs nothing however large N is (``Dataset.select`` cost
    milliseconds per client). Reads like a tokenized ``datasets.Dataset``: ``len``, a column
    by name, or a dict of columns for a slice or a list of row positions."""

    def __init__(self, columns: dict[str, torch.Tensor], indices):
        self.columns = columns
        self.indices = (indices if isinstance(indices, torch.Tensor)
                        else torch.as_tensor(np.asarray(indices), dtype=torch.long))

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, key):
        if isinstance(key, str):
            return self.columns[key][self.indices]
        rows = self.indices[key] if isinstance(key, slice) else self.indices[torch.as_tensor(key, dtype=torch.long)]
        return {name: column[rows] for name, column in self.columns.items()}
