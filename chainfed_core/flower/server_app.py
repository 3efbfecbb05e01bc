"""ServerApp: read the RunConfig from the Flower run config, run the rounds, write a record.

Run-config keys (``[tool.flwr.app.config]`` or ``flwr run --run-config``):
``config-file`` (a RunConfig JSON, optional), ``overrides`` (space-separated
``section.field=value``), ``out-dir`` (where ``record.json``, ``metrics.jsonl``, the
checkpoint and ``final_state.pt`` go).

A ServerApp killed part-way and started again with the same command (a new Flower run on the
same ``out-dir``) resumes from the checkpoint, as the simulator does: the nodes' copies of the
global tensors belonged to the old run, so every node is sent the whole global state the next
time it trains (:attr:`FlowerClients.lost`), and the run ends bitwise equal to an uninterrupted one.
"""

from __future__ import annotations

import time
from logging import INFO
from pathlib import Path

import torch
from flwr.app import Context
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from ..checkpoint import CHECKPOINT_FILE, METRICS_FILE, Checkpointer, read_metrics, rewrite_metrics
from ..cli import config_from_args
from ..federated import run_record
from ..records import RECORD_FILE, atomic_write_json
from ..rounds import evaluator, run_rounds
from ..server import Server
from ..task import build_task, seq_len
from .transport import FlowerClients

app = ServerApp()
FINAL_STATE_FILE = "final_state.pt"


def _resume_or_start(out: Path, server: Server, clients: FlowerClients) -> None:
    """Continue from ``out``'s checkpoint, with every node's copy counted as lost; else start afresh."""
    out.mkdir(parents=True, exist_ok=True)
    if (out / CHECKPOINT_FILE).exists():
        server.restore(out / CHECKPOINT_FILE, read_metrics(out))
        rewrite_metrics(out, server.state["history"])
        clients.lost.update(clients.node_of)          # the old run's node state is gone
        log(INFO, "ChainFed: resuming %s at round %s", out, server.state["round"])
    else:
        (out / METRICS_FILE).unlink(missing_ok=True)


@app.main()
def main(grid: Grid, context: Context) -> None:
    started = time.perf_counter()
    rc = context.run_config
    config = config_from_args(str(rc["config-file"]) or None, str(rc.get("overrides", "")).split())
    task = build_task(config)
    backbone = task.make_backbone()
    clients = FlowerClients(grid, config, task.data.get("classes"))
    server = Server(config, backbone, clients.discover(), seq_len(task.train))
    out = Path(str(rc.get("out-dir", ""))) if str(rc.get("out-dir", "")) else None
    if out is not None:
        _resume_or_start(out, server, clients)
    checkpoints = Checkpointer(out) if out is not None else None
    try:
        run_rounds(server, clients, evaluator(backbone, task.test, task.pad_id, server.method), checkpoints=checkpoints,
                   started=started)
    finally:
        if checkpoints is not None:
            checkpoints.close()
    log(INFO, "ChainFed: start layer %s, window %s, %s eligible clients", server.state["start_layer"],
        server.window, len(server.eligible))
    if out is not None:
        torch.save(server.state["global"], out / FINAL_STATE_FILE)
        atomic_write_json(out / RECORD_FILE, run_record(config, server, started, data=task.data, runtime="flower",
                                                            client_peak_rss=clients.peak_rss))
