"""The server: eligibility, the chain's start layer and window, sampling, downlink, FedAvg.

:class:`Server` holds what a federation keeps between rounds (the global tensors, which
round each was last updated, when each client last synced) and is checkpointable. The
in-process simulator, the centralised run and the Flower strategy all drive it through
:func:`chainfed_core.rounds.run_rounds`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import foat
from .aggregation import merge, stale_names
from .backbone import Backbone
from .checkpoint import read_checkpoint
from .config import RunConfig
from .methods import get_method
from .population import LARGEST_DEVICE_GB
from .seeding import FOAT, sample_clients
from .convergence import finished
from .train import layer_of, trainable_names


class NoEligibleClient(ValueError):
    """No device of the population can hold the method (the paper's "—" in Table 1)."""


class Server:
    """Schedule, client selection, downlink and aggregation of one run.

    ``capacity_gb[k]`` is client k's device memory. The method's peak memory on a client
    (:meth:`chainfed_core.methods.Method.peak_bytes`) decides who is eligible; unless
    ``fed.memory_scale`` is set, capacities are scaled so the largest device (12 GB) just
    holds end-to-end adapter tuning of this model.
    """

    def __init__(self, config: RunConfig, backbone: Backbone, capacity_gb: np.ndarray, seq_len: int):
        self.config = cfg = config
        self.num_layers = L = backbone.num_layers
        self.method = get_method(cfg.method)(cfg, L, backbone.family)
        dtype = str(next(backbone.layers.parameters()).dtype).removeprefix("torch.")

        def peak(name: str, w: int) -> int:
            return get_method(name).peak_bytes(backbone.config, w, batch_size=cfg.train.batch_size, seq_len=seq_len,
                                               bottleneck=cfg.adapter.bottleneck, optimizer=cfg.train.optimizer,
                                               dtype=dtype).total
        self._peak = peak
        self.bytes_per_gb = cfg.fed.memory_scale or peak("full_adapters", L) / LARGEST_DEVICE_GB
        capacity = np.asarray(capacity_gb, dtype=np.float64) * self.bytes_per_gb
        self.window = self.method.choose_window(capacity, lambda w: peak(cfg.method, w))
        cfg.chain.replace(window=self.window).validate_for(L)
        self.capacity_bytes = capacity
        self.held_window: int | None = None
        start = self.method.initial_start_layer()
        self._fit_to_start(start)                  # need_bytes, eligible: before any model state is built
        self.state: dict[str, Any] = {
            "round": 0, "start_layer": start, "foat_scores": None,
            "global": self.method.initial_state(backbone),
            "versions": {}, "last_sync": np.full(len(capacity), -1, dtype=np.int64), "history": [],
            "method": self.method.state,
        }
        self._backbone = backbone
        self._names: dict = {}

    def _fit_to_start(self, start: int | None) -> None:
        """Once the start layer is known, eligibility follows the window a client really holds:
        a window wider than the layers left after the start is clipped
        (:meth:`~chainfed_core.methods.Method.held_window`), so it needs fewer bytes and more
        devices hold it. Before FOAT has chosen the start, the estimate counts the whole window."""
        held = self.window if start is None else self.method.held_window(start, self.window)
        if held != self.held_window:
            self.held_window = held
            self.need_bytes = self._peak(self.config.method, held)
            self.eligible = self._eligible(self.need_bytes)

    def _eligible(self, need: int) -> np.ndarray:
        """The clients whose device holds ``need`` bytes (every client without ``fed.memory_aware``)."""
        cfg, capacity, per_gb = self.config, self.capacity_bytes, self.bytes_per_gb
        fits = capacity >= need
        if not fits.any():
            raise NoEligibleClient(f"RunConfig.method: no client can fit {cfg.method!r}: it needs {need / per_gb:.2f} "
                                   f"GB-equivalent, the largest device has {capacity.max() / per_gb:.2f} GB")
        eligible = np.flatnonzero(fits) if cfg.fed.memory_aware else np.arange(len(capacity))
        if cfg.fed.clients_per_round > len(eligible) and not cfg.fed.fewer_eligible:
            raise ValueError(f"FedConfig.clients_per_round: K={cfg.fed.clients_per_round} exceeds the "
                             f"{len(eligible)} eligible clients (of {len(capacity)}; method {cfg.method!r} "
                             f"needs {need / per_gb:.2f} GB-equivalent)")
        return eligible

    def finished(self) -> bool:
        """Whether the run is over (:func:`chainfed_core.convergence.finished`, with the method's
        minimum rounds at the chain's start layer and window)."""
        st = self.state
        return finished(self.config, st, self.method.min_rounds(st["start_layer"] or 0, self.window))

    @property
    def clients_per_round(self) -> int:
        """K, or every eligible client where fewer are eligible (``fed.fewer_eligible``)."""
        return min(self.config.fed.clients_per_round, len(self.eligible))

    # -- FOAT
    @property
    def needs_foat(self) -> bool:
        return self.state["start_layer"] is None

    def foat_clients(self) -> list[int]:
        """FOAT's profiling sample: K clients drawn from those whose device holds the chain's
        narrowest window (W = 1). The profile is a forward pass of the frozen, streamed model,
        which such a device can run, so who profiles, and so the start layer, does not depend
        on the window W the run trains."""
        pool = self._eligible(self._peak(self.config.method, 1))
        k = min(self.config.fed.clients_per_round, len(pool))
        return sample_clients(self.config.seed, 0, pool, k, tag=FOAT)

    def set_start(self, client_scores: list[list[float]], weights: list[float]) -> int:
        scores = foat.aggregate_scores(client_scores, weights)
        tau = self.config.chain.resolved_tau(self._backbone.family)
        self.state["foat_scores"] = scores.tolist()
        self.state["start_layer"] = foat.start_layer(scores, tau)
        self._fit_to_start(self.state["start_layer"])
        return self.state["start_layer"]

    # -- rounds
    def plan(self, round_index: int):
        return self.method.plan(round_index, self.state["start_layer"], self.window)

    def client_plan(self, round_index: int, client: int, plan):
        """The plan ``client`` trains this round (the method's choice; by default the round's)."""
        return self.method.client_plan(round_index, client, plan, float(self.capacity_bytes[client]))

    def round_clients(self, round_index: int) -> list[int]:
        return sample_clients(self.config.seed, round_index, self.eligible, self.clients_per_round)

    def window_names(self, plan) -> list[str]:
        """Global tensors the plan trains (computed once per plan: every client of a round asks)."""
        return self._split(plan)[0]

    def _split(self, plan) -> tuple[list[str], list[str]]:
        """(the plan's window, the other global tensors of layers the plan runs or of no layer),
        computed once per distinct plan (methods that draw a plan per client and round, as FedRA
        does, would grow the cache without end: it keeps the recent plans only)."""
        if plan not in self._names:
            if len(self._names) >= 256:
                self._names.clear()
            names = [n for n in trainable_names(self._backbone, plan) if n in self.state["global"]]
            chosen, absent = set(names), plan.absent(self.num_layers)    # absent layers: not the client's
            self._names[plan] = (names, [n for n in self.state["global"]
                                         if n not in chosen and layer_of(n) not in absent])
        return self._names[plan]

    def window_state(self, plan) -> dict[str, torch.Tensor]:
        g = self.state["global"]
        return {n: g[n] for n in self.window_names(plan)}

    def downlink(self, round_index: int, client_id: int, plan) -> tuple[dict, dict]:
        """(window tensors, context tensors the client has not seen since its last round); the
        window is the method's choice (:meth:`~chainfed_core.methods.Method.client_window`)."""
        g = self.state["global"]
        self.method.global_state = g
        window = self.method.client_window(round_index, client_id, plan, self.window_state(plan))
        last_sync = self.state["last_sync"]
        context = stale_names(self._split(plan)[1], self.state["versions"], int(last_sync[client_id]))
        last_sync[client_id] = round_index
        return window, {n: g[n] for n in context}

    def aggregate(self, round_index: int, updates: list[tuple[dict, int]], clients: list[int] | None = None) -> dict:
        """The method's aggregation of the updates (in client order), merged into the global state."""
        if not updates or not any(state for state, _ in updates):
            return {}
        self.method.global_state = self.state["global"]      # what FedSGD-style methods step from
        avg = self.method.aggregate(updates, round_index=round_index, clients=clients)
        self.state["global"] = merge(self.state["global"], avg)
        for n in avg:
            self.state["versions"][n] = round_index
        return avg

    # -- checkpoint
    def snapshot(self) -> dict:
        """The checkpoint's content, safe to serialise later: the containers the next rounds
        change are copied (the tensors are not: the server replaces them, never writes them).
        The metrics history is left out: it is the append-only ``metrics.jsonl``, whose first
        ``round`` lines the checkpoint stands for, so a checkpoint costs the same at every round."""
        st = self.state
        return {**{k: v for k, v in st.items() if k != "history"}, "global": dict(st["global"]),
                "versions": dict(st["versions"]), "last_sync": st["last_sync"].copy(),
                "config": self.config.to_dict(), "window": self.window, "torch_rng": torch.get_rng_state()}

    def restore(self, path: Path, history: list[dict]) -> None:
        """Continue from the checkpoint at ``path``; ``history``: the metrics of the rounds so
        far (at least the checkpoint's ``round`` of them; later ones are dropped)."""
        saved = read_checkpoint(path)
        if saved.pop("config") != self.config.to_dict():
            raise ValueError(f"{path} holds a run with a different config; use a fresh out_dir")
        if len(history) < saved["round"]:
            raise ValueError(f"{path} is at round {saved['round']} but the metrics record has {len(history)} "
                             "rounds: it was truncated or edited; use a fresh out_dir")
        torch.set_rng_state(saved.pop("torch_rng"))
        saved.pop("window")
        self.state = {**saved, "history": history[:saved["round"]]}
        self.method.state = self.state.setdefault("method", {})
        self._fit_to_start(self.state["start_layer"])
