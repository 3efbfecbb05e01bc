"""ClientApp: a SuperNode, client ``partition-id`` of the run (its node config).

The node's data, model and memory budget come from its node config (:mod:`.device`): its own
files (``data-path``) or partition ``partition-id`` of the run's data set; ChainFed streamed
from a layer store (``layer-store``) under a budget (``memory-gb``), or any method in memory.
QUERY messages return the node's client id, capacity and example count (``info``) or its FOAT
layer scores (``foat``); TRAIN messages carry the node's plan for the round, its window and
any tensors the node has not seen yet. The node keeps its copy of the global tensors in
``context.state`` and trains with the same :func:`chainfed_core.rounds.client_update` as the simulator.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from ..actcache import ActivationCache
from ..config import RunConfig
from ..methods import get_method
from ..population import Population, device_capacity_gb
from ..rounds import client_profile, client_update
from ..rss import peak_rss
from ..task import build_task, seq_len
from ..train import set_state, train_local
from . import device
from .transport import from_record, plan_from, to_record

app = ClientApp()


@dataclass
class Node:
    """What one node holds for one run."""
    cfg: RunConfig
    method: object
    backbone: object
    data: object                 # the node's examples (ClientRows)
    cid: int
    pad_id: int
    initial: dict                # the seeded initial state of every exchanged tensor
    cache: ActivationCache | None = None     # streamed ChainFed: the frozen prefix's outputs
    store: object = None                     # streamed ChainFed: the device's layer store


_NODES: dict[tuple[str, int], Node] = {}
_SHARED: dict[str, tuple] = {}     # partition mode: (task, backbone, method, initial state) per config


def _client_id(cfg: RunConfig, node_config) -> int:
    cid = int(node_config["partition-id"])
    num = int(node_config.get("num-partitions", cfg.data.num_clients))
    if num != cfg.data.num_clients or not 0 <= cid < num:
        raise ValueError(f"node config partition-id={cid} num-partitions={num} does not match "
                         f"DataConfig.num_clients={cfg.data.num_clients}")
    return cid


def _partition_node(config_json: str, cfg: RunConfig, cid: int) -> Node:
    """A node holding partition ``cid`` of the run's data set, in memory. Several nodes may
    share a process (Flower's simulation engine), and so the model: each node loads its whole
    state before it trains, and a node's first state is the seeded initial one, kept aside
    when the model is built (the shared model may have trained since)."""
    if config_json not in _SHARED:
        task = build_task(cfg)
        backbone = task.make_backbone()
        method = get_method(cfg.method)(cfg, backbone.num_layers, backbone.family)
        _SHARED[config_json] = (task, Population(cfg, task.train), backbone, method, method.initial_state(backbone))
    task, pop, backbone, method, initial = _SHARED[config_json]
    return Node(cfg, method, backbone, pop.data(cid), cid, task.pad_id, initial)


def _device_node(cfg: RunConfig, node_config, cid: int, classes: list[str]) -> Node:
    """A node with data of its own (``data-path``) and, for ChainFed with a ``layer-store``,
    the model streamed under its ``memory-gb`` (checked here, before anything streams)."""
    if "data-path" in node_config:
        data, pad_id = device.read_device_data(str(node_config["data-path"]), classes, cfg)
        num_labels = len(classes)
    else:
        task = build_task(cfg)
        data, pad_id, num_labels = Population(cfg, task.train).data(cid), task.pad_id, task.num_labels
    Method = get_method(cfg.method)
    store, cache = None, None
    if "layer-store" in node_config and Method.memory_shape == "chainfed":
        store = device.open_store(cfg, num_labels, str(node_config["layer-store"]))
        backbone = device.streamed_model(cfg, store)
        if "memory-gb" in node_config:
            window = 1 if cfg.fed.window_from_memory else cfg.chain.window
            device.check_budget(cfg, store, window, seq_len(data), float(node_config["memory-gb"]),
                                backbone.streamer.resident)
        cache = ActivationCache(backbone, max_memory_bytes=0, folder=node_config.get("cache-dir") or None,
                                batch_size=cfg.train.batch_size, pad_id=pad_id)
    else:
        backbone = device.base_backbone(cfg, num_labels)
        Method(cfg, backbone.num_layers, backbone.family).prepare(backbone)
    method = Method(cfg, backbone.num_layers, backbone.family)
    return Node(cfg, method, backbone, data, cid, pad_id, method.initial_state(backbone), cache, store)


def _node(config_json: str, classes: list[str], context: Context) -> Node:
    """This node of this run, built once per process."""
    key = (config_json, context.node_id)
    if key not in _NODES:
        cfg = RunConfig.from_dict(json.loads(config_json))
        nc = context.node_config
        cid = _client_id(cfg, nc)
        own = "data-path" in nc or "layer-store" in nc
        _NODES[key] = _device_node(cfg, nc, cid, classes) if own else _partition_node(config_json, cfg, cid)
    return _NODES[key]


def _local_state(context: Context, node: Node) -> dict:
    """This node's copy of the global tensors (the initial state before its first round)."""
    if "global" in context.state:
        return from_record(context.state["global"])
    return dict(node.initial)


class _Cached:
    """The run's method with its client update training the window from the activation cache."""

    def __init__(self, node: Node):
        self.node = node

    def load_state(self, backbone, state, tensors=None) -> None:
        self.node.method.load_state(backbone, state, tensors)

    def client_update(self, backbone, dataset, plan, *, seed: int, pad_id: int = 0):
        backbone.follow(plan, cached=True)
        prefix = self.node.cache.prefix(str(self.node.cid), dataset, plan)    # streams the frozen prefix once
        return train_local(backbone, dataset, plan, self.node.cfg.train, seed=seed, prefix=prefix, pad_id=pad_id)


def _classes(config) -> list[str]:
    return list(config["classes"]) if "classes" in config else []


@app.query()
def query(msg: Message, context: Context) -> Message:
    config = msg.content["config"]
    node = _node(config["run-config"], _classes(config), context)
    cfg, cid = node.cfg, node.cid
    if config["task"] == "info":
        capacity = float(context.node_config.get("memory-gb",
                                                 device_capacity_gb(cfg.seed, [cid], cfg.fed.memory_profile)[0]))
        info = MetricRecord({"partition-id": cid, "capacity-gb": capacity, "num-examples": len(node.data)})
        return Message(RecordDict({"info": info}), reply_to=msg)
    set_state(node.backbone, from_record(msg.content["arrays"]))
    scores = client_profile(node.backbone, cfg, node.data, node.pad_id)
    foat = MetricRecord({"partition-id": cid, "scores": scores, "num-examples": len(node.data)})
    return Message(RecordDict({"foat": foat}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    config = msg.content["config"]
    node = _node(config["run-config"], _classes(config), context)
    r = int(config["round"])
    state = {**_local_state(context, node), **from_record(msg.content["context"]),
             **from_record(msg.content["window"])}
    context.state["global"] = ArrayRecord(state)
    plan = plan_from(config)                  # the server's choice for this node and round
    if node.cache is not None and node.store is not None and "memory-gb" in context.node_config:
        device.check_budget(node.cfg, node.store, len(plan.training), seq_len(node.data),
                            float(context.node_config["memory-gb"]), node.backbone.streamer.resident)
    method = _Cached(node) if node.cache is not None else node.method
    res = client_update(node.backbone, node.cfg, method, node.data, plan, state, r, node.cid, node.pad_id)
    if node.store is not None:
        # free the streamed window (resident while it trained) before Flower serialises the reply
        # and the node's state: a LLaMA2-7B-shaped node's peak came there (0.4 GiB over training's);
        # next round maps it again from the store
        node.backbone.streamer.follow((), (), cached=True)
    metrics = MetricRecord({"num-examples": res.num_examples, "loss": res.loss, "accuracy": res.accuracy,
                            "steps": res.steps, "seconds": res.seconds, "peak-rss": peak_rss()})
    return Message(RecordDict({"arrays": to_record(res.state), "metrics": metrics}), reply_to=msg)
