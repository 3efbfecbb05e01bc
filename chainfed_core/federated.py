"""The in-process simulator: N memory-heterogeneous clients in one process (the default runtime).

One run, top to bottom (:func:`run`):

1. Population (:mod:`.population`): N clients, each a partition of the training set and a
   device memory capacity.
2. Server (:mod:`.server`): the method's peak memory on a device decides who is eligible;
   the method sets the chain window.
3. Rounds (:func:`chainfed_core.rounds.run_rounds`): FOAT if the method asks for it, then
   sample, downlink, client updates (here, one after another on one shared model), the
   method's aggregation, evaluation, metrics and a checkpoint after every round.

Every random choice is a pure function of (seed, round, client id) and the server state is
checkpointed atomically after every round, so a killed run restarted with the same command
ends bitwise identical to an uninterrupted one. ``python -m chainfed_core.federated --help``
runs it from the shell (:mod:`chainfed_core.cli`).
"""

from __future__ import annotations

import gc
import json
import sys
import time
from pathlib import Path

import filelock

from .backbone import Backbone, describe_device, resolve_device
from .checkpoint import CHECKPOINT_FILE, METRICS_FILE, Checkpointer, read_metrics, rewrite_metrics
from .config import RunConfig
from .population import Population
from .records import RECORD_FILE, atomic_write_json, make_record
from .rounds import AllClientsFailed, Job, client_profile, client_update, evaluator, run_rounds
from .server import Server
from .task import Task, build_task, seq_len
from .train import set_state, tensors_by_name

LOCK_FILE = ".lock"


class RunFolderLocked(RuntimeError):
    """Another run is writing the output folder."""


class LocalClients:
    """The simulator's transport: every client trains in this process, on one shared model.

    Clients share the model: it starts each round at the global state, and since a client
    trains only its window, resetting that window gives the next client that state (and
    where two clients train different windows, the first's is reset too).
    """

    def __init__(self, config: RunConfig, backbone: Backbone, population: Population, server: Server,
                 pad_id: int = 0):
        self.config, self.backbone, self.population, self.pad_id = config, backbone, population, pad_id
        self.method = server.method
        self.server = server
        # the model tensors among the global state, looked up once (a method whose global state
        # is not the model's tensors has none: its load_state rebuilds the model)
        self.everything = tensors_by_name(backbone, server.window_names(server.method.widest_plan()))

    def profile(self, clients: list[int], state: dict) -> list[tuple[list[float], int]]:
        set_state(self.backbone, state)
        pop = self.population
        return [(client_profile(self.backbone, self.config, pop.data(c), self.pad_id), pop.num_examples(c))
                for c in clients]

    def train(self, round_index: int, jobs: list[Job], state: dict):
        self.method.load_state(self.backbone, state, self.everything)
        targets, previous = {}, None                       # per distinct plan: its window's tensors
        for job in jobs:
            if job.plan not in targets:
                targets[job.plan] = {n: self.everything[n] for n in self.server.window_names(job.plan)}
            if previous is not None and previous != job.plan:     # undo the last client's training
                set_state(self.backbone, {n: state[n] for n in targets[previous]}, targets[previous])
            previous = job.plan
            rows = self.population.data(job.client)        # the simulator's stand-in for the device's data
            try:
                yield job.client, client_update(self.backbone, self.config, self.method, rows, job.plan, job.window,
                                                round_index, job.client, self.pad_id, seed=job.seed,
                                                targets=targets[job.plan])
            except Exception as err:     # a failing client is dropped from the round, not the run
                yield job.client, err


def _open(out: Path, server: Server) -> None:
    """Resume from ``out``'s checkpoint if there is one; else start a fresh metrics record."""
    if (out / CHECKPOINT_FILE).exists():
        server.restore(out / CHECKPOINT_FILE, read_metrics(out))
        rewrite_metrics(out, server.state["history"])
    elif (out / METRICS_FILE).exists():
        (out / METRICS_FILE).unlink()


def run_record(config: RunConfig, server: Server, started: float, **extra) -> dict:
    """The record of a run (every runtime writes these keys)."""
    history = server.state["history"]
    return make_record(config.to_dict(), seed=config.seed, wall_s=time.perf_counter() - started, history=history,
                       failures=[f for m in history for f in m["failures"]],
                       start_layer=server.state["start_layer"], window=server.window, held_window=server.held_window,
                       foat_scores=server.state["foat_scores"], eligible_clients=int(len(server.eligible)),
                       num_clients=config.data.num_clients, need_gb=server.need_bytes / server.bytes_per_gb,
                       final=history[-1] if history else {},
                       stopped="converged" if server.finished() and server.state["round"] < config.fed.rounds
                       else "rounds", **extra)


def run(config: RunConfig, out_dir, *, progress: bool = True, task: Task | None = None,
        max_failed_rounds: int = 1, deadline: float | None = None) -> dict:
    """Run (or resume) a federated experiment; return its record, also written to out_dir.

    ``out_dir`` receives ``metrics.jsonl`` (one line per round, with its failures),
    ``checkpoint.pkl`` (server state after every round; it stands for the metrics lines before
    it) and ``record.json`` (at the end). Rerunning the same command on the same ``out_dir``
    continues from the last checkpoint. The folder is locked while the run writes it: a
    second run on it fails at once. After ``max_failed_rounds`` consecutive rounds in which
    every selected client failed, the record is written (``status: "failed"``) and
    :class:`~chainfed_core.rounds.AllClientsFailed` raised. ``secagg.enabled`` is refused (the
    simulator does not mask: SecAgg+ runs as the Flower app ``flower_app/secagg``).

    Clients train and the global model is evaluated on ``train.device`` (the model moves there
    once it is built and seeded on the CPU, so its initial values are the same bits on every
    device); the server's state stays on the CPU. ``deadline`` (a ``time.time()``): no round
    starts after it; the run is left checkpointed and ``{"status": "stopped", "round": r}``
    returned (no record written), and the same call later continues it.
    """
    if config.secagg.enabled:
        raise ValueError("SecAggConfig.enabled: the simulator does not mask the updates; run SecAgg+ with the "
                         "Flower app flower_app/secagg (flwr run flower_app/secagg <federation>)")
    started = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lock = filelock.FileLock(out / LOCK_FILE)
    try:
        lock.acquire(timeout=0)
    except filelock.Timeout:
        raise RunFolderLocked(f"{out} is being written by another run (lock {out / LOCK_FILE}); "
                           "wait for it or use another --out") from None
    try:
        return _run_locked(config, out, progress, task, max_failed_rounds, started, deadline)
    finally:
        lock.release()


def _run_locked(cfg: RunConfig, out: Path, progress: bool, task: Task | None, max_failed_rounds: int,
                started: float, deadline: float | None) -> dict:
    device = resolve_device(cfg.train.device)       # before any work: 'cuda' without one fails here
    task = task or build_task(cfg)
    backbone = task.make_backbone().to(device)
    pop = Population(cfg, task.train)
    server = Server(cfg, backbone, pop.capacity_gb, seq_len(task.train))
    _open(out, server)
    if server.finished() and (out / RECORD_FILE).exists():
        return json.loads((out / RECORD_FILE).read_text())     # finished already: its record stands as written
    clients = LocalClients(cfg, backbone, pop, server, task.pad_id)
    checkpoints = Checkpointer(out)
    status = "complete"
    gc.freeze()      # the model, data and libraries live all run: keep them out of every full collection
    try:
        run_rounds(server, clients, evaluator(backbone, task.test, task.pad_id, server.method),
                   checkpoints=checkpoints, progress=progress, started=started,
                   max_failed_rounds=max_failed_rounds, deadline=deadline)
    except AllClientsFailed:
        status = "failed"
        raise
    finally:
        gc.unfreeze()
        checkpoints.close()
        if status == "failed" or server.finished():
            extra = {"status": status} if status != "complete" else {}
            if status == "complete" and task.final_eval is not None:     # instruction tuning: MMLU, ...
                server.method.load_state(backbone, server.state["global"])
                extra["final_eval"] = task.final_eval(backbone)
            if device.type != "cpu":      # CPU records keep their keys as before
                extra["device"] = describe_device(device)
            record = run_record(cfg, server, started, data=task.data, **extra)
            atomic_write_json(out / RECORD_FILE, record)
        else:
            record = {"status": "stopped", "round": server.state["round"]}     # the deadline came first
    return record


if __name__ == "__main__":
    from .cli import main
    sys.exit(main())
