"""ClientApp: a SuperNode holding one partition (``partition-id`` in its node config).

QUERY messages return the node's partition id and device capacity (``info``) or its FOAT
layer scores (``foat``); TRAIN messages carry the node's plan for the round, its window and
any tensors the node has not seen yet. The node keeps its copy of the global tensors in ``context.state`` and
trains with the same :func:`chainfed_core.rounds.client_update` as the simulator.
"""

from __future__ import annotations

import json

from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from ..config import RunConfig
from ..methods import get_method
from ..population import Population, device_capacity_gb
from ..rounds import client_profile, client_update
from ..task import build_task
from ..train import set_state
from .transport import from_record, plan_from, to_record

app = ClientApp()
_WORKERS: dict[str, tuple] = {}
_INITIAL: dict[str, dict] = {}      # per config: the seeded initial state of every exchanged tensor


def _worker(config_json: str, context: Context):
    """(config, task, backbone, method, population, client id), built once per process and config.

    Several nodes may share a process (Flower's simulation engine), and so the model: each
    node loads its whole state before it trains, and a node's first state is the seeded
    initial one, kept aside when the model is built (the shared model may have trained since)."""
    if config_json not in _WORKERS:
        cfg = RunConfig.from_dict(json.loads(config_json))
        task = build_task(cfg)
        backbone = task.make_backbone()
        method = get_method(cfg.method)(cfg, backbone.num_layers, backbone.family)
        _INITIAL[config_json] = method.initial_state(backbone)
        _WORKERS[config_json] = (cfg, task, backbone, method, Population(cfg, task.train))
    cfg, task, backbone, method, pop = _WORKERS[config_json]
    cid = int(context.node_config["partition-id"])
    num = int(context.node_config.get("num-partitions", cfg.data.num_clients))
    if num != cfg.data.num_clients or not 0 <= cid < num:
        raise ValueError(f"node config partition-id={cid} num-partitions={num} does not match "
                         f"DataConfig.num_clients={cfg.data.num_clients}")
    return cfg, task, backbone, method, pop, cid


def _local_state(context: Context, config_json: str) -> dict:
    """This node's copy of the global tensors (the initial state before its first round)."""
    if "global" in context.state:
        return from_record(context.state["global"])
    return dict(_INITIAL[config_json])


@app.query()
def query(msg: Message, context: Context) -> Message:
    config = msg.content["config"]
    cfg, task, backbone, method, pop, cid = _worker(config["run-config"], context)
    if config["task"] == "info":
        capacity = float(context.node_config.get("memory-gb",
                                                 device_capacity_gb(cfg.seed, [cid], cfg.fed.memory_profile)[0]))
        info = MetricRecord({"partition-id": cid, "capacity-gb": capacity, "num-examples": pop.num_examples(cid)})
        return Message(RecordDict({"info": info}), reply_to=msg)
    set_state(backbone, from_record(msg.content["arrays"]))
    scores = client_profile(backbone, cfg, pop.data(cid), task.pad_id)
    foat = MetricRecord({"partition-id": cid, "scores": scores, "num-examples": pop.num_examples(cid)})
    return Message(RecordDict({"foat": foat}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    config = msg.content["config"]
    cfg, task, backbone, method, pop, cid = _worker(config["run-config"], context)
    r = int(config["round"])
    state = {**_local_state(context, config["run-config"]), **from_record(msg.content["context"]),
             **from_record(msg.content["window"])}
    context.state["global"] = ArrayRecord(state)
    plan = plan_from(config)                  # the server's choice for this node and round
    res = client_update(backbone, cfg, method, pop.data(cid), plan, state, r, cid, task.pad_id)
    metrics = MetricRecord({"num-examples": res.num_examples, "loss": res.loss, "accuracy": res.accuracy,
                            "steps": res.steps, "seconds": res.seconds})
    return Message(RecordDict({"arrays": to_record(res.state), "metrics": metrics}), reply_to=msg)
