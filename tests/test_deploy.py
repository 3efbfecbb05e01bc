"""ChainFed as deployed, in this process: a node's own data files, ChainFed streamed from a
layer store under a memory budget, and both equal to the simulator (the real SuperLink and
SuperNode processes are in test_deploy_processes.py)."""

import json
import os
import sys

import pytest
import torch
from flwr.app import Context, RecordDict

from chainfed_core.checkpoint import load_final_state
from chainfed_core.config import RunConfig
from chainfed_core.data_files import DataError
from chainfed_core.federated import run
from chainfed_core.flower import client_app, device
from chainfed_core.layer_store import LayerStoreError
from chainfed_core.population import Population
from chainfed_core.task import build_task

from runtime_checks import InProcessGrid, assert_same_state, fork_and_kill, run_flower_in_process, without_timing

pytestmark = pytest.mark.usefixtures("one_thread")
NODES = 3


def config(**chain) -> RunConfig:
    return RunConfig.from_dict({
        "method": "chainfed", "seed": 5, "model": {"name": "tiny-bert-L6"}, "adapter": {"bottleneck": 4},
        "chain": {"window": 2, "start_layer": 2, **chain},
        "data": {"dataset": "synthetic", "num_clients": NODES, "max_train_examples": 60, "max_test_examples": 16},
        "fed": {"rounds": 2, "clients_per_round": 2, "eval_every": 1, "memory_aware": False}})


def write_partitions(cfg: RunConfig, folder) -> list:
    """Each client's partition of the run's data as a JSONL file of token ids (a device's own data)."""
    pop = Population(cfg, build_task(cfg).train)
    paths = []
    for c in range(cfg.data.num_clients):
        rows = pop.data(c)[:]
        path = folder / f"device{c}" / "train.jsonl"
        path.parent.mkdir(parents=True)
        path.write_text("".join(json.dumps({"input_ids": x.tolist(), "attention_mask": m.tolist(), "label": int(y)})
                                + "\n" for x, m, y in zip(rows["input_ids"], rows["attention_mask"], rows["label"])))
        paths.append(path.parent)
    return paths


class DeviceGrid(InProcessGrid):
    """In-process nodes with the given node configs (client k: ``partition-id`` k and ``configs[k]``)."""

    def __init__(self, configs: list[dict]):
        super().__init__(len(configs))
        for k, extra in enumerate(configs):
            self.contexts[100 + k] = Context(run_id=1, node_id=100 + k, state=RecordDict(), run_config={},
                                             node_config={"partition-id": k, "num-partitions": len(configs), **extra})


def run_on_devices(cfg: RunConfig, out, configs: list[dict], monkeypatch) -> dict:
    monkeypatch.setattr("runtime_checks.InProcessGrid", lambda n: DeviceGrid(configs))
    client_app._NODES.clear()
    return run_flower_in_process(cfg, out)


def test_device_files_are_read_with_the_run_classes(tmp_path):
    cfg = config()
    (tmp_path / "ids.jsonl").write_text('{"input_ids": [5, 6, 7], "label": 2}\n{"input_ids": [8, 9], "label": "1"}\n')
    rows, pad = device.read_device_data(tmp_path / "ids.jsonl", ["0", "1", "2"], cfg)
    assert rows["label"].tolist() == [2, 1] and pad == 0
    assert rows["input_ids"].tolist() == [[5, 6, 7], [8, 9, 0]] and rows["attention_mask"].tolist() == [[1, 1, 1],
                                                                                                        [1, 1, 0]]
    (tmp_path / "bad.jsonl").write_text('{"input_ids": [5], "label": "cat"}\n')
    with pytest.raises(DataError, match=r"label 'cat' is not one of the run's classes \['0', '1', '2'\]"):
        device.read_device_data(tmp_path / "bad.jsonl", ["0", "1", "2"], cfg)
    (tmp_path / "text.csv").write_text("text,label\nthe film was fine,positive\nawful,negative\n")
    text_cfg = RunConfig.from_dict({**cfg.to_dict(), "model": {"name": "minilm-l6", "max_length": 8}})
    rows, _ = device.read_device_data(tmp_path / "text.csv", ["negative", "positive"], text_cfg)
    assert rows["label"].tolist() == [1, 0] and rows["input_ids"].shape == (2, 8)
    with pytest.raises(DataError, match="no such file"):
        device.read_device_data(tmp_path / "missing.csv", ["0"], cfg)


def test_nodes_with_their_own_files_equal_the_simulator(tmp_path, monkeypatch):
    cfg = config()
    paths = write_partitions(cfg, tmp_path)
    flower = run_on_devices(cfg, tmp_path / "flower", [{"data-path": str(p)} for p in paths], monkeypatch)
    sim = run(cfg, tmp_path / "sim", progress=False)
    assert_same_state(torch.load(tmp_path / "flower" / "final_state.pt", weights_only=False),
                      load_final_state(tmp_path / "sim"))
    assert [m["num_examples"] for m in flower["history"]] == [m["num_examples"] for m in sim["history"]]


def test_streamed_nodes_equal_the_simulator_and_refuse_a_window_over_budget(tmp_path, monkeypatch):
    cfg = config()
    paths = write_partitions(cfg, tmp_path)
    store = tmp_path / "store"
    device.build_store(cfg, 3, store)
    nodes = [{"data-path": str(p), "layer-store": str(store), "memory-gb": 64.0, "cache-dir": str(tmp_path / f"c{k}")}
             for k, p in enumerate(paths)]
    flower = run_on_devices(cfg, tmp_path / "flower", nodes, monkeypatch)
    run(cfg, tmp_path / "sim", progress=False)
    a, b = torch.load(tmp_path / "flower" / "final_state.pt", weights_only=False), load_final_state(tmp_path / "sim")
    assert a.keys() == b.keys() and max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-6
    assert set(flower["client_peak_rss"]) and not flower["failures"]
    assert all(n.cache is not None and n.cache.stats.disk_entries for n in client_app._NODES.values())
    # a budget below what the window needs is refused at the node's first message, before it streams
    tight = [{**n, "memory-gb": 0.01} for n in nodes]
    with pytest.raises(device.MemoryBudgetError, match=r"memory-gb=0.01: a ChainFed step of window W=2 needs"):
        run_on_devices(cfg, tmp_path / "tight", tight, monkeypatch)
    # a store of another run is refused
    other = RunConfig.from_dict({**cfg.to_dict(), "seed": 6})
    with pytest.raises(LayerStoreError, match="holds .*'seed': 5.*the run needs .*'seed': 6"):
        device.open_store(other, 3, store)


def _flower_quietly(cfg: RunConfig, out) -> None:
    sys.stdout = sys.stderr = open(os.devnull, "w")
    torch.set_num_threads(1)           # the parent's OpenMP pool does not survive the fork
    run_flower_in_process(cfg, out)


def test_a_killed_serverapp_restarted_resumes_bitwise(tmp_path):
    """kill -9 of the ServerApp after two rounds; the same command again resumes from the
    checkpoint (fresh nodes: their copies are gone and are sent whole) and ends bitwise equal
    to the simulator's uninterrupted run, metrics and all."""
    cfg = RunConfig.from_dict({**config().to_dict(), "fed": {**config().to_dict()["fed"], "rounds": 4}})
    out = tmp_path / "flower"
    fork_and_kill(_flower_quietly, (cfg, out), out, after_rounds=2, timeout_s=120)
    resumed = run_flower_in_process(cfg, out)
    sim = run(cfg, tmp_path / "sim", progress=False)
    assert_same_state(torch.load(out / "final_state.pt", weights_only=False), load_final_state(tmp_path / "sim"))
    assert without_timing(resumed["history"]) == without_timing(sim["history"])


class GoneNodeGrid(InProcessGrid):
    """Node 102's round-1 train message is answered by the SuperLink, as Flower does for a node
    that went away mid-round: an error reply whose sender is the SuperLink (node id 1)."""

    def send_and_receive(self, messages, timeout=None):
        from flwr.app import Error, Message
        messages = list(messages)
        gone = [m for m in messages if m.metadata.dst_node_id == 102 and m.metadata.message_type == "train"
                and m.content["config"]["round"] == 1]
        replies = super().send_and_receive([m for m in messages if m not in gone], timeout)
        for m in gone:
            m.metadata.__dict__["_message_id"] = m.object_id
            reply = Message(Error(code=0, reason="node went offline"), reply_to=m)
            reply.metadata.__dict__["_src_node_id"] = 1
            replies.append(reply)
        return replies


def test_an_error_reply_from_the_superlink_is_the_nodes_failure(tmp_path, monkeypatch):
    cfg = RunConfig.from_dict({**config().to_dict(), "fed": {**config().to_dict()["fed"], "clients_per_round": NODES}})
    monkeypatch.setattr("runtime_checks.InProcessGrid", GoneNodeGrid)
    record = run_flower_in_process(cfg, tmp_path / "flower")
    assert [m["failed"] for m in record["history"]] == [[], [2]]
    assert record["failures"][0]["kind"] == "error" and "node went offline" in record["failures"][0]["message"]
    assert record["failures"][0]["node"] == 102
