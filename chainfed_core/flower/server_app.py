"""ServerApp: read the RunConfig from the Flower run config, run the rounds, write a record.

Run-config keys (``[tool.flwr.app.config]`` or ``flwr run --run-config``):
``config-file`` (a RunConfig JSON, optional), ``overrides`` (space-separated
``section.field=value``), ``out-dir`` (where ``record.json``, ``metrics.jsonl``, the
checkpoint and ``final_state.pt`` go).

A ServerApp killed part-way and started again with the same command (a new Flower run on the
same ``out-dir``) resumes from the checkpoint, as the simulator does: the nodes' copies of the
global tensors belonged to the old run, so every node is sent the whole global state the next
time it trains (:attr:`FlowerClients.lost`), and the run ends bitwise equal to an uninterrupted one.

:func:`serve` is the whole ServerApp, and the SecAgg+ ServerApp's (:mod:`.secagg_app`) with its
transport. This app refuses ``secagg.enabled`` (it does not mask): SecAgg+ runs as ``flower_app/secagg``.
"""

from __future__ import annotations

import time
from logging import INFO
from pathlib import Path
from typing import Callable

import torch
from flwr.app import Context
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from ..checkpoint import CHECKPOINT_FILE, METRICS_FILE, Checkpointer, read_metrics, rewrite_metrics
from ..cli import config_from_args
from ..config import RunConfig
from ..federated import run_record
from ..records import RECORD_FILE, atomic_write_json
from ..rounds import evaluator, run_rounds
from ..server import Server
from ..task import build_task, seq_len
from .transport import FlowerClients

app = ServerApp()
FINAL_STATE_FILE = "final_state.pt"


def resume_or_start(out: Path, server: Server, clients: FlowerClients) -> None:
    """Continue from ``out``'s checkpoint, with every node's copy counted as lost; else start afresh."""
    out.mkdir(parents=True, exist_ok=True)
    if (out / CHECKPOINT_FILE).exists():
        server.restore(out / CHECKPOINT_FILE, read_metrics(out))
        rewrite_metrics(out, server.state["history"])
        clients.lost.update(clients.node_of)          # the old run's node state is gone
        log(INFO, "ChainFed: resuming %s at round %s", out, server.state["round"])
    else:
        (out / METRICS_FILE).unlink(missing_ok=True)


def check_masking(config: RunConfig, secagg: bool) -> None:
    """A one-line ``ValueError`` unless ``secagg.enabled`` is what this ServerApp does (``secagg``: masks)."""
    if config.secagg.enabled and not secagg:
        raise ValueError("SecAggConfig.enabled: this ServerApp does not mask the updates; run SecAgg+ with the "
                         "Flower app flower_app/secagg (flwr run flower_app/secagg <federation>)")
    if secagg and not config.secagg.enabled:
        raise ValueError("SecAggConfig.enabled: the SecAgg+ ServerApp runs with secagg.enabled=true only")


def serve(grid: Grid, context: Context, *, transport: type[FlowerClients] = FlowerClients, secagg: bool = False,
          check: Callable[[Server], None] | None = None, extra: Callable[[FlowerClients], dict] | None = None) -> None:
    """A ServerApp's run: the RunConfig from the run config, the task, the nodes (``transport``),
    the server, a resume from ``out-dir``'s checkpoint, the rounds, ``final_state.pt`` and the
    record (``runtime`` 'flower', or 'flower-secagg' with ``secagg``). ``check(server)`` runs
    before training; ``extra(clients)``: keys added to the record."""
    started = time.perf_counter()
    rc = context.run_config
    config = config_from_args(str(rc["config-file"]) or None, str(rc.get("overrides", "")).split())
    check_masking(config, secagg)
    task = build_task(config)
    backbone = task.make_backbone()
    clients = transport(grid, config, task.data.get("classes"))
    server = Server(config, backbone, clients.discover(), seq_len(task.train))
    if check is not None:
        check(server)
    out = Path(str(rc.get("out-dir", ""))) if str(rc.get("out-dir", "")) else None
    if out is not None:
        resume_or_start(out, server, clients)
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
        record = run_record(config, server, started, data=task.data, runtime="flower-secagg" if secagg else "flower",
                            client_peak_rss=clients.peak_rss)
        atomic_write_json(out / RECORD_FILE, {**record, **(extra(clients) if extra is not None else {})})


@app.main()
def main(grid: Grid, context: Context) -> None:
    serve(grid, context)
