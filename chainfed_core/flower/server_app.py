"""ServerApp: read the RunConfig from the Flower run config, run the rounds, write a record.

Run-config keys (``[tool.flwr.app.config]`` or ``flwr run --run-config``):
``config-file`` (a RunConfig JSON, optional), ``overrides`` (space-separated
``section.field=value``), ``out-dir`` (where ``record.json``, ``metrics.jsonl``, the
checkpoint and ``final_state.pt`` go).
"""

from __future__ import annotations

import time
from logging import INFO
from pathlib import Path

import torch
from flwr.app import Context
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from ..checkpoint import METRICS_FILE, Checkpointer
from ..cli import config_from_args
from ..federated import run_record
from ..records import RECORD_FILE, atomic_write_json
from ..rounds import evaluator, run_rounds
from ..server import Server
from ..task import build_task, seq_len
from .transport import FlowerClients

app = ServerApp()
FINAL_STATE_FILE = "final_state.pt"


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
    checkpoints = Checkpointer(out) if out is not None else None
    if out is not None:      # a Flower run starts afresh (its nodes' copies do not survive a restart)
        out.mkdir(parents=True, exist_ok=True)
        (out / METRICS_FILE).unlink(missing_ok=True)
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
