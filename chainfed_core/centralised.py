"""Centralised sanity run: one client holding all the data, every method, same budget.

Before federating anything, the chain must learn at all. Each method gets the same number
of rounds (one local epoch over the data each); ChainFed spends them sliding its window
(FOAT start layer, DLCT, GPO) exactly as a federated run would with a single client.
"""

from __future__ import annotations

import time

import torch

from . import foat, schedule
from .backbone import Backbone
from .config import RunConfig
from .train import batches, evaluate, plan_for, train_local


def chain_start(backbone: Backbone, config: RunConfig, dataset, pad_id: int = 0) -> tuple[int, list[float]]:
    """FOAT start layer from one profiling batch (or the configured fixed start)."""
    batch = next(batches(dataset, config.chain.foat_batch_size, shuffle=True, seed=config.seed, pad_id=pad_id))
    scores = foat.profile_client(backbone, batch)
    if config.chain.start_layer is not None:
        return config.chain.start_layer, scores
    return foat.start_layer(scores, config.chain.resolved_tau(backbone.family)), scores


def run_centralised(backbone: Backbone, config: RunConfig, train, test, pad_id: int = 0,
                    progress: bool = True) -> dict:
    """Train ``config.method`` for ``config.fed.rounds`` rounds on ``train``; evaluate on ``test``.

    Returns a record: the method, the chain start layer and FOAT scores, per-round training
    loss and the final test metrics.
    """
    L = backbone.num_layers
    config.chain.validate_for(L)
    torch.manual_seed(config.seed)
    start, scores = (chain_start(backbone, config, train, pad_id) if config.method == "chainfed" else (0, []))
    lam = config.chain.resolved_lambda(backbone.family)
    window = min(config.chain.window, L - start)
    started = time.perf_counter()
    history = []
    rounds = range(config.fed.rounds)
    if progress:
        from tqdm.auto import tqdm
        rounds = tqdm(rounds, desc=config.method, leave=False)
    for r in rounds:
        stage = schedule.stage_at(r, L, start, window, config.chain.passes)
        plan = plan_for(config.method, L, stage, lam=lam)
        if not plan.trains_anything:
            break
        result = train_local(backbone, train, plan, config.train, seed=config.seed * 10_000 + r, pad_id=pad_id)
        history.append({"round": r, "training": list(plan.training), "loss": result.loss,
                        "train_accuracy": result.accuracy, "seconds": result.seconds})
    metrics = evaluate(backbone, test, pad_id=pad_id)
    return {"method": config.method, "start_layer": start, "foat_scores": scores, "window": window,
            "gpo_lambda": lam if config.method == "chainfed" else None, "history": history,
            "test": metrics, "seconds": time.perf_counter() - started}
