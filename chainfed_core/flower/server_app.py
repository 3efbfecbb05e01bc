"""ServerApp: read the RunConfig from the Flower run config, run ChainFed rounds, write a record.

Run-config keys (``[tool.flwr.app.config]`` or ``flwr run --run-config``):
``config-file`` (a RunConfig JSON, optional), ``overrides`` (space-separated
``section.field=value``), ``out-dir`` (where ``record.json`` and ``final_state.pt`` go).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from flwr.app import ArrayRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from ..federated import config_from_args
from ..records import RECORD_FILE, atomic_write_json, make_record
from ..train import evaluate, set_state
from .strategy import ChainFedStrategy, from_record

app = ServerApp()
FINAL_STATE_FILE = "final_state.pt"


@app.main()
def main(grid: Grid, context: Context) -> None:
    started = time.perf_counter()
    rc = context.run_config
    config = config_from_args(str(rc["config-file"]) or None, str(rc.get("overrides", "")).split())
    strategy = ChainFedStrategy(config)
    strategy.prepare(grid)
    rounds, every = config.fed.rounds, config.fed.eval_every
    evaluations: dict[int, dict] = {}

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        if server_round == 0 or not (server_round % every == 0 or server_round == rounds):
            return None
        set_state(strategy.backbone, from_record(arrays))
        metrics = evaluate(strategy.backbone, strategy.task.test, pad_id=strategy.task.pad_id)
        evaluations[server_round - 1] = metrics
        return MetricRecord(metrics)

    strategy.start(grid, strategy.initial_arrays(), num_rounds=rounds,
                   timeout=config.fed.client_timeout_s or 3600, evaluate_fn=evaluate_fn)
    for m in strategy.history:
        m.update({f"test_{k}": v for k, v in evaluations.get(m["round"], {}).items()})
    out = str(rc.get("out-dir", ""))
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        torch.save(strategy.server.state["global"], Path(out) / FINAL_STATE_FILE)
        atomic_write_json(Path(out) / RECORD_FILE, make_record(
            config.to_dict(), seed=config.seed, wall_s=time.perf_counter() - started, history=strategy.history,
            failures=strategy.failures, runtime="flower", start_layer=strategy.server.state["start_layer"],
            window=strategy.server.window))
