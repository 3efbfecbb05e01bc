"""Flower as the transport of :func:`chainfed_core.rounds.run_rounds`.

Node discovery and FOAT go out as QUERY messages, each round's jobs (the window and any
tensor a node has not seen since its last round) as TRAIN messages; the replies come back as
the same ``LocalResult`` the in-process simulator produces, so the round, its aggregation,
its failures and its metrics are the core's, in client-id order: both runtimes give the
same global adapters for the same seed.
"""

from __future__ import annotations

import json
import time
from typing import Iterable

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from ..config import RunConfig
from ..rounds import ClientTimeout, Job
from ..schedule import TrainPlan
from ..train import LocalResult


def to_record(state: dict[str, torch.Tensor]) -> ArrayRecord:
    return ArrayRecord({k: v.detach().cpu() for k, v in state.items()})


def from_record(record: ArrayRecord) -> dict[str, torch.Tensor]:
    return dict(record.to_torch_state_dict())


def plan_record(plan: TrainPlan) -> dict:
    """A plan as ConfigRecord values (ranges as [start, stop]; a sub-model's layers as their list)."""
    span = lambda r: [r.start, r.stop]  # noqa: E731
    sub_model = not isinstance(plan.training, range)
    return {"frozen": span(plan.frozen), "training": list(plan.training) if sub_model else span(plan.training),
            "sub-model": sub_model, "idle": span(plan.idle), "lam": float(plan.lam), "train-head": plan.train_head,
            "train-base": plan.train_base, "lora-rank": plan.lora_rank}


def plan_from(config) -> TrainPlan:
    """The plan a TRAIN message carries (:func:`plan_record`)."""
    span = lambda key: range(*[int(x) for x in config[key]])  # noqa: E731
    training = tuple(int(i) for i in config["training"]) if config["sub-model"] else span("training")
    return TrainPlan(span("frozen"), training, span("idle"), lam=float(config["lam"]),
                     train_head=bool(config["train-head"]), train_base=bool(config["train-base"]),
                     lora_rank=int(config["lora-rank"]))


class RemoteError(RuntimeError):
    """A SuperNode replied with an error."""


class FlowerClients:
    """The clients of a run as Flower SuperNodes on ``grid``. Call :meth:`discover` first.

    Every message carries the run config and the run's class names (``classes``: a node with
    data of its own matches its labels to them). ``peak_rss`` keeps the highest resident set
    (VmHWM, bytes) each client's ClientApp process reported after training. ``lost``: clients
    whose node may have lost its copy of the global tensors (it failed or did not answer, so it
    may have been restarted; or the ServerApp was): their next job carries the whole global
    state as its context (counted in no metric: the core's downlink is what a healthy node needs)."""

    def __init__(self, grid: Grid, config: RunConfig, classes: list[str] | None = None):
        self.grid, self.config = grid, config
        self.config_json = json.dumps(config.to_dict())
        self.classes = [str(c) for c in classes or []]
        self.node_of: dict[int, int] = {}      # client id (partition-id) -> Flower node id
        self.peak_rss: dict[int, int] = {}
        self.lost: set[int] = set()

    def _config(self, **values) -> ConfigRecord:
        return ConfigRecord({"run-config": self.config_json, "classes": self.classes, **values})

    def _send(self, node_ids: Iterable[int], content: list[RecordDict], kind: str,
              timeout: float | None = None) -> list[Message]:
        return [r for r in self._exchange(node_ids, content, kind, timeout) if r is not None]

    def _exchange(self, node_ids: Iterable[int], content: list[RecordDict], kind: str,
                  timeout: float | None = None) -> list[Message | None]:
        """One message per node; the reply to each, in the same order (None: none in time).
        Replies are matched by the message they answer, not by their sender: an error reply
        for a node that went away comes from the SuperLink (its ``src_node_id`` is not the node's)."""
        messages = [Message(content=c, dst_node_id=nid, message_type=kind) for nid, c in zip(node_ids, content)]
        replies = list(self.grid.send_and_receive(messages, timeout=timeout))   # sets each message's id
        by_message = {m.metadata.reply_to_message_id: m for m in replies}
        return [by_message.get(m.metadata.message_id) for m in messages]

    def _query(self, node_ids: list[int], task: str, state: dict | None = None) -> list[Message]:
        content = []
        for _ in node_ids:
            c = RecordDict({"config": self._config(task=task)})
            if state is not None:
                c["arrays"] = to_record(state)
            content.append(c)
        replies = self._send(node_ids, content, MessageType.QUERY)
        errors = [m.error.reason for m in replies if m.has_error()]
        if errors:
            raise RuntimeError(f"{task} query failed on {len(errors)} node(s): {errors[0]}")
        return replies

    def discover(self, wait_s: float = 120.0) -> np.ndarray:
        """Wait for the N nodes; read their partition ids; return their capacities (GB) by client id."""
        n, deadline = self.config.data.num_clients, time.time() + wait_s
        while len(list(self.grid.get_node_ids())) < n:
            if time.time() > deadline:
                raise RuntimeError(f"DataConfig.num_clients: expected {n} SuperNodes, "
                                   f"{len(list(self.grid.get_node_ids()))} connected")
            time.sleep(0.5)
        capacity = np.zeros(n)
        for m in self._query(list(self.grid.get_node_ids()), "info"):
            info = m.content["info"]
            cid = int(info["partition-id"])
            self.node_of[cid] = m.metadata.src_node_id
            capacity[cid] = float(info["capacity-gb"])
        if sorted(self.node_of) != list(range(n)):
            raise RuntimeError(f"SuperNodes must have partition-id 0..{n - 1}, got {sorted(self.node_of)}")
        return capacity

    def profile(self, clients: list[int], state: dict) -> list[tuple[list[float], int]]:
        replies = self._query([self.node_of[c] for c in clients], "foat", state)
        by_client = {int(m.content["foat"]["partition-id"]): m.content["foat"] for m in replies}
        return [(list(by_client[c]["scores"]), int(by_client[c]["num-examples"])) for c in clients]

    def _context(self, job: Job, state: dict) -> dict:
        if job.client not in self.lost:
            return job.context
        return {n: t for n, t in state.items() if n not in job.window}

    def train_content(self, round_index: int, job: Job, state: dict, **config) -> RecordDict:
        """A TRAIN message's content: the job's window, its context and plan (and ``config``)."""
        return RecordDict({"window": to_record(job.window), "context": to_record(self._context(job, state)),
                           "config": self._config(**{"round": round_index, "client-id": job.client,
                                                     **plan_record(job.plan), **config})})

    def result(self, client: int, tensors: dict[str, torch.Tensor], metrics) -> LocalResult:
        """A node's TRAIN reply as the round takes it (its ClientApp's peak RSS kept; no longer lost)."""
        self.lost.discard(client)
        if "peak-rss" in metrics:
            self.peak_rss[client] = max(self.peak_rss.get(client, 0), int(metrics["peak-rss"]))
        return LocalResult(tensors, int(metrics["num-examples"]), int(metrics["steps"]), float(metrics["loss"]),
                           float(metrics["accuracy"]), float(metrics["seconds"]))

    def train(self, round_index: int, jobs: list[Job], state: dict):
        content = [self.train_content(round_index, j, state) for j in jobs]
        replies = self._exchange([self.node_of[j.client] for j in jobs], content, MessageType.TRAIN,
                                 timeout=self.config.fed.client_timeout_s or 3600)
        for j, m in zip(jobs, replies):
            if m is None or m.has_error():
                self.lost.add(j.client)
                yield j.client, ClientTimeout("no reply in time") if m is None else RemoteError(m.error.reason)
            else:
                yield j.client, self.result(j.client, from_record(m.content["arrays"]), m.content["metrics"])
