"""A finished instruction-tuning run's final model, rebuilt from its folder, and the benchmark
suites its record lacks scored on it.

:func:`chainfed_core.federated.run` scores the record's ``final_eval`` on the backbone after the
last round with the server's global state loaded into it (``server.method.load_state``). The
global state after every round is the run's ``checkpoint.pkl`` (:mod:`chainfed_core.checkpoint`,
restored by :meth:`chainfed_core.server.Server.restore`), so :func:`final_backbone` builds the
task's backbone afresh (seeded as the run seeded it), restores the server from the checkpoint
and loads its global state the same way: the model the run's final evaluation saw, the same
bits (``tests/test_instruct_state.py`` rescores a run's own suites and compares). No-FT trains
nothing: its final model is the fresh backbone, no checkpoint needed.

:func:`add_missing_suites` scores the suites a profile asks for and a record lacks (BBH, added
after the cpu runs) and writes them into the record's ``final_eval`` (its ``evals`` too), each
marked with what it was scored on; everything else in the record stays as it was.
"""

from __future__ import annotations

from pathlib import Path

import filelock
import torch

from .config import RunConfig

UNTRAINED = ("no_ft",)          # methods whose final model is the backbone as built


def final_backbone(cfg: RunConfig, folder, task):
    """The model of a finished run under ``folder`` as its final evaluation saw it (see the module docstring)."""
    from .checkpoint import CHECKPOINT_FILE, read_metrics
    from .population import Population
    from .server import Server
    from .task import seq_len

    backbone = task.make_backbone()
    if cfg.method in UNTRAINED:
        return backbone
    path = Path(folder) / CHECKPOINT_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path}: no checkpoint to rebuild the trained {cfg.method} model from; remove "
                                f"{Path(folder)} to rerun it")
    server = Server(cfg, backbone, Population(cfg, task.train).capacity_gb, seq_len(task.train))
    server.restore(path, read_metrics(Path(folder)))
    if not server.finished():
        raise ValueError(f"{path} is at round {server.state['round']} of {cfg.fed.rounds}: the run is not "
                         "finished; finish it first")
    server.method.load_state(backbone, server.state["global"])
    return backbone


def score_final_state(cfg: RunConfig, folder, evals: dict[str, int | None]) -> dict:
    """:func:`chainfed_core.instruct_runs.final_evaluation` of ``evals`` on the run's rebuilt final
    model, on the run's device (``train.device``), as the run's own final evaluation is."""
    from .backbone import resolve_device
    from .instruct_runs import build_instruct_task

    task = build_instruct_task(cfg, evals)
    backbone = final_backbone(cfg, folder, task).to(resolve_device(cfg.train.device))
    return task.final_eval(backbone)


def add_missing_suites(cfg: RunConfig, folder, record: dict, evals: dict[str, int | None]) -> dict:
    """``record`` with the suites of ``evals`` it lacks scored on the run's final model, written
    back to ``folder``'s record.json; a suite it has with another question count raises (remove
    the folder to rerun)."""
    from .federated import LOCK_FILE, RunFolderLocked
    from .records import RECORD_FILE, atomic_write_json, code_version

    if record.get("status", "complete") != "complete":
        return record                          # failed, or no device could hold it: nothing to score
    final = record.get("final_eval") or {}
    have = final.get("evals") or {}
    differ = {k: (have[k], v) for k, v in evals.items() if k in have and have[k] != v}
    if differ:
        raise ValueError(f"{folder}: the record scored (questions, asked) {differ}; remove its folder to rerun it")
    missing = {k: v for k, v in evals.items() if k not in have}
    if not missing:
        return record
    lock = filelock.FileLock(Path(folder) / LOCK_FILE)
    try:
        lock.acquire(timeout=0)
    except filelock.Timeout:
        raise RunFolderLocked(f"{folder} is being written by a run (lock {LOCK_FILE}); wait for it") from None
    try:
        scored = score_final_state(cfg, folder, missing)
        on = "the untrained backbone" if cfg.method in UNTRAINED else "checkpoint.pkl"
        added = {k: {**scored[k], "scored_on": on, "scored_by": code_version()} for k in missing}
        record = {**record, "final_eval": {**final, "evals": {**have, **missing}, **added}}
        atomic_write_json(Path(folder) / RECORD_FILE, record)
    finally:
        lock.release()
    return record


@torch.no_grad()
def layer_losses(backbone, dataset, pad_id: int = 0, batch_size: int = 8) -> list[float]:
    """The response loss of ``dataset`` read after every layer through the model's frozen final
    norm and LM head (what ChainFed's local loss minimises at a window ending there, and, while
    the later adapters are the identity, its global branch too); the last entry is the model's
    held-out loss, weighted over batches as :func:`chainfed_core.train.evaluate` weights it."""
    from .train import batches

    totals, count = [0.0] * backbone.num_layers, 0
    for batch in batches(dataset, batch_size, shuffle=False, pad_id=pad_id, device=backbone.device):
        hidden, ctx = backbone.embed(batch)
        n = len(batch["input_ids"])
        for i in range(backbone.num_layers):
            hidden = backbone.run_layers([i], hidden, ctx)
            totals[i] += float(backbone.head_loss(hidden, batch, ctx)[0]) * n
        count += n
    return [t / count for t in totals]
