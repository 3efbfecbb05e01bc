"""Pure randomness: every random choice of a run is a function of (seed, purpose, round, client).

A run killed and restarted replays the same choices, and a client's seed does not depend
on which other clients were sampled, so results never depend on process history.
"""

from __future__ import annotations

import numpy as np
import torch

# Stream tags keep the pure random functions of different purposes apart.
CAPACITY, FAILURE, TRAIN, SAMPLE, FOAT = range(5)


def mix(*keys) -> np.ndarray:
    """splitmix64 of a tuple of non-negative integers (broadcast over arrays): uint64."""
    with np.errstate(over="ignore"):
        h = np.uint64(0x9E3779B97F4A7C15)
        for k in keys:
            h = h ^ (np.asarray(k, dtype=np.uint64) + np.uint64(0x9E3779B97F4A7C15))
            h = (h ^ (h >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
            h = (h ^ (h >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
            h = h ^ (h >> np.uint64(31))
    return h


def unit(*keys) -> np.ndarray:
    """Uniform in [0, 1) as a pure function of ``keys``."""
    return (mix(*keys) >> np.uint64(11)).astype(np.float64) / float(2 ** 53)


def client_seed(seed: int, round_index: int, client_id) -> int | np.ndarray:
    """Local training seed of a client in a round (an array of them for an array of ids)."""
    out = mix(seed, TRAIN, round_index, client_id) % np.uint64(2 ** 31 - 1)
    return int(out) if np.ndim(out) == 0 else out.astype(np.int64)


def injected_failure(seed: int, round_index: int, client_id: int, rate: float) -> bool:
    return rate > 0 and float(unit(seed, FAILURE, round_index, client_id)) < rate


def sample_clients(seed: int, round_index: int, eligible: np.ndarray, k: int, tag: int = SAMPLE) -> list[int]:
    """K distinct client ids from ``eligible``, a pure function of (seed, round)."""
    rng = np.random.default_rng([seed, tag, round_index])
    return sorted(int(c) for c in rng.choice(eligible, size=k, replace=False))


def seed_generators(seed: int) -> None:
    """``torch.manual_seed`` for the generators a client uses. (``torch.manual_seed`` itself
    queues a CUDA seeding call with a stack trace whenever CUDA is not initialised: 0.2 ms
    and a little memory on every call, 15 times a round.)"""
    torch.default_generator.manual_seed(seed)
    if torch.cuda.is_initialized():
        torch.cuda.manual_seed_all(seed)
