"""A Flower strategy that runs ChainFed's schedule and FedAvg of the window.

The strategy is a thin adapter around :class:`chainfed_core.federated.Server`: node
discovery and FOAT go out as QUERY messages, each round's window (and any tensor a node has
not yet seen) goes out as a TRAIN message, and the replies are averaged by the same
``fedavg`` the in-process simulator uses, in client-id order, so both runtimes give the
same global adapters for the same seed.
"""

from __future__ import annotations

import time
from logging import INFO, WARNING
from typing import Iterable

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from ..aggregation import state_bytes
from ..config import RunConfig
from ..federated import Server, Task, _seq_len, build_task


def to_record(state: dict[str, torch.Tensor]) -> ArrayRecord:
    return ArrayRecord({k: v.detach().cpu() for k, v in state.items()})


def from_record(record: ArrayRecord) -> dict[str, torch.Tensor]:
    return dict(record.to_torch_state_dict())


class ChainFedStrategy(Strategy):
    """ChainFed rounds on a Flower grid. Call :meth:`prepare` once, then ``start``."""

    def __init__(self, config: RunConfig, task: Task | None = None):
        self.config = config
        self.config_json = __import__("json").dumps(config.to_dict())
        self.task = task or build_task(config)
        self.backbone = self.task.make_backbone()
        self.server: Server | None = None
        self.node_of: dict[int, int] = {}      # client id (partition-id) -> Flower node id
        self.history: list[dict] = []
        self.failures: list[dict] = []
        self._sent: dict[int, list[int]] = {}

    # ------------------------------------------------------------------ setup
    def _query(self, grid: Grid, node_ids: Iterable[int], task: str, state: dict | None = None,
               timeout: float | None = None) -> list[Message]:
        messages = []
        for nid in node_ids:
            content = RecordDict({"config": ConfigRecord({"task": task, "run-config": self.config_json})})
            if state is not None:
                content["arrays"] = to_record(state)
            messages.append(Message(content=content, dst_node_id=nid, message_type=MessageType.QUERY))
        replies = list(grid.send_and_receive(messages, timeout=timeout))
        errors = [m.error.reason for m in replies if m.has_error()]
        if errors:
            raise RuntimeError(f"{task} query failed on {len(errors)} node(s): {errors[0]}")
        return replies

    def prepare(self, grid: Grid, wait_s: float = 120.0) -> None:
        """Find the N nodes, read their partition ids and capacities, build the Server, run FOAT."""
        n = self.config.data.num_clients
        deadline = time.time() + wait_s
        while len(list(grid.get_node_ids())) < n:
            if time.time() > deadline:
                raise RuntimeError(f"DataConfig.num_clients: expected {n} SuperNodes, "
                                   f"{len(list(grid.get_node_ids()))} connected")
            time.sleep(0.5)
        replies = self._query(grid, grid.get_node_ids(), "info")
        capacity = np.zeros(n)
        for m in replies:
            info = m.content["info"]
            cid = int(info["partition-id"])
            self.node_of[cid] = m.metadata.src_node_id
            capacity[cid] = float(info["capacity-gb"])
        if sorted(self.node_of) != list(range(n)):
            raise RuntimeError(f"SuperNodes must have partition-id 0..{n - 1}, got {sorted(self.node_of)}")
        self.server = Server(self.config, self.backbone, capacity, _seq_len(self.task.train))
        if self.server.needs_foat:
            clients = self.server.foat_clients()
            replies = self._query(grid, [self.node_of[c] for c in clients], "foat", self.server.state["global"])
            by_client = {int(m.content["foat"]["partition-id"]): m.content["foat"] for m in replies}
            self.server.set_start([list(by_client[c]["scores"]) for c in clients],
                                  [float(by_client[c]["num-examples"]) for c in clients])
        log(INFO, "ChainFed: start layer %s, window %s, %s eligible clients", self.server.state["start_layer"],
            self.server.window, len(self.server.eligible))

    def initial_arrays(self) -> ArrayRecord:
        return to_record(self.server.state["global"])

    # ------------------------------------------------------------------ rounds
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        r, server = server_round - 1, self.server
        plan = server.plan(r)
        clients = server.round_clients(r)
        self._sent[r] = clients
        self._round = {"round": r, "window": [plan.training.start, plan.training.stop], "clients": clients,
                       "bytes_down": 0, "bytes_down_context": 0, "started": time.perf_counter()}
        messages = []
        for c in clients:
            window, context = server.downlink(r, c, plan)
            self._round["bytes_down"] += state_bytes(window)
            self._round["bytes_down_context"] += state_bytes(context)
            content = RecordDict({
                "window": to_record(window), "context": to_record(context),
                "config": ConfigRecord({"run-config": self.config_json, "round": r, "client-id": c,
                                        "start-layer": int(server.state["start_layer"]),
                                        "window": int(server.window)}),
            })
            messages.append(Message(content=content, dst_node_id=self.node_of[c],
                                    message_type=MessageType.TRAIN, group_id=str(server_round)))
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        r, info = server_round - 1, self._round
        by_client, failures = {}, []
        for m in replies:
            cid = next(c for c, nid in self.node_of.items() if nid == m.metadata.src_node_id)
            if m.has_error():
                failures.append({"round": r, "client": cid, "kind": "error", "message": m.error.reason})
            else:
                by_client[cid] = m
        for c in info["clients"]:
            if c not in by_client and all(f["client"] != c for f in failures):
                failures.append({"round": r, "client": c, "kind": "timeout", "message": "no reply in time"})
        trained = [c for c in info["clients"] if c in by_client]
        updates = [(from_record(by_client[c].content["arrays"]), int(by_client[c].content["metrics"]["num-examples"]))
                   for c in trained]
        self.server.aggregate(r, updates)
        n = sum(k for _, k in updates)
        loss = sum(float(by_client[c].content["metrics"]["loss"]) * k for c, (_, k) in zip(trained, updates))
        metrics = {**{k: v for k, v in info.items() if k != "started"}, "trained": trained,
                   "failed": [f["client"] for f in failures], "num_examples": n,
                   "train_loss": loss / n if n else float("nan"),
                   "bytes_up": sum(state_bytes(u) for u, _ in updates), "skipped": not updates,
                   "seconds_round": time.perf_counter() - info["started"]}
        if not updates:
            log(WARNING, "round %s: every client failed; round skipped", r)
        self.history.append(metrics)
        self.failures.extend(failures)
        return to_record(self.server.state["global"]), MetricRecord({"train-loss": metrics["train_loss"],
                                                                     "num-examples": n})

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        return []   # evaluation is centralised on the server's held-out test split

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return None

    def summary(self) -> None:
        log(INFO, "\t├── ChainFed method=%s K=%s rounds=%s", self.config.method,
            self.config.fed.clients_per_round, self.config.fed.rounds)
