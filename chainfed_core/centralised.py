"""Centralised sanity run: one client holding all the data, every method, same budget.

Before federating anything, the chain must learn at all. Each method gets the same number
of rounds (one local epoch over the data each); ChainFed spends them sliding its window
(FOAT start layer, DLCT, GPO) exactly as a federated run would with a single client. It is
the federated round (:func:`chainfed_core.rounds.run_rounds`) with one memory-unconstrained
client that trains on the whole training set, evaluated after the last round.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from .backbone import Backbone
from .config import RunConfig
from .rounds import Job, client_profile, run_rounds
from .server import Server
from .task import seq_len
from .train import evaluate, set_state


class OneClient:
    """The transport of a centralised run: the one client trains the model in place, with
    the seed ``config.seed * 10_000 + round``."""

    def __init__(self, backbone: Backbone, config: RunConfig, server: Server, train, pad_id: int):
        self.backbone, self.config, self.server, self.train_set, self.pad_id = backbone, config, server, train, pad_id

    def profile(self, clients: list[int], state: dict) -> list[tuple[list[float], int]]:
        return [(client_profile(self.backbone, self.config, self.train_set, self.pad_id), len(self.train_set))]

    def train(self, round_index: int, jobs: list[Job], state: dict):
        set_state(self.backbone, jobs[0].window)
        yield jobs[0].client, self.server.method.client_update(
            self.backbone, self.train_set, jobs[0].plan, seed=self.config.seed * 10_000 + round_index, pad_id=self.pad_id)


def run_centralised(backbone: Backbone, config: RunConfig, train, test, pad_id: int = 0,
                    progress: bool = True) -> dict:
    """Train ``config.method`` for ``config.fed.rounds`` rounds on ``train``; evaluate on ``test``.

    ``backbone`` carries what the method trains (adapters for the adapter methods). Returns a
    record: the method, the chain start layer and FOAT scores, the per-round metrics (the
    federated schema) and the final test metrics.
    """
    rounds = config.fed.rounds
    one = config.replace(data=config.data.replace(num_clients=1),
                         fed=config.fed.replace(clients_per_round=1, memory_aware=False, memory_scale=1e12,
                                                eval_every=rounds))
    torch.manual_seed(config.seed)
    started = time.perf_counter()
    server = Server(one, backbone, np.ones(1), seq_len(train))
    history = run_rounds(server, OneClient(backbone, one, server, train, pad_id), progress=progress)
    set_state(backbone, server.state["global"])
    return {"method": config.method, "start_layer": server.state["start_layer"],
            "foat_scores": server.state["foat_scores"] or [], "window": server.window,
            "gpo_lambda": config.chain.resolved_lambda(backbone.family) if server.method.uses_chain else None,
            "history": history, "test": evaluate(backbone, test, pad_id=pad_id),
            "seconds": time.perf_counter() - started}
