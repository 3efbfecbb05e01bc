"""One federated round, and the loop of rounds: the one home of both.

The in-process simulator (:mod:`chainfed_core.federated`), the centralised run
(:mod:`chainfed_core.centralised`) and the Flower ServerApp (:mod:`chainfed_core.flower`) all
call :func:`run_rounds`; they differ only in the :class:`Transport` that carries a round's
jobs to its clients (in this process, or as Flower messages). A round:

1. the method's plan for the round; K clients sampled from the eligible ones;
2. downlink: each client gets the window and any tensor it has not seen since its last round;
3. the transport runs the client updates; a client that raises, or trains past
   ``fed.client_timeout_s``, or replies with an update that may not be averaged (wrong
   tensor names, shapes or dtypes, non-finite values: :mod:`chainfed_core.validation`) is
   dropped from the round and recorded as a failure (with its node's id where the
   transport has one);
4. the method aggregates the updates into the global state;
5. every ``fed.eval_every`` rounds (and after the last) the global model is evaluated;
6. the metrics line (one schema in every runtime, :func:`round_metrics`) and the checkpoint.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Protocol

import numpy as np
import torch

from . import foat, privacy
from .aggregation import state_bytes
from .backbone import Backbone
from .config import RunConfig
from .methods import Method
from .seeding import client_seed, injected_failure, seed_generators
from .server import Server
from .schedule import TrainPlan
from .train import LocalResult, batches, cpu_state, set_state, tensors_by_name
from .train import evaluate as evaluate_model
from .validation import RejectedUpdate, update_problem


class InjectedFailure(RuntimeError):
    """A failure injected by ``fed.failure_rate``."""


class ClientTimeout(RuntimeError):
    """A client that did not answer in time."""


class AllClientsFailed(RuntimeError):
    """Every selected client failed in ``max_failed_rounds`` consecutive rounds."""


@dataclass
class Job:
    """What the server sends one client in one round."""
    client: int
    plan: TrainPlan                      # what it trains (the method's choice for this client)
    window: dict[str, torch.Tensor]      # the tensors it trains
    context: dict[str, torch.Tensor]     # tensors it has not seen since its last round
    seed: int                            # its local training seed (:func:`client_seed`)


class Transport(Protocol):
    """How a round reaches its clients."""

    def profile(self, clients: list[int], state: dict[str, torch.Tensor]) -> list[tuple[list[float], int]]:
        """FOAT: each client's layer scores and example count."""

    def train(self, round_index: int, jobs: list[Job],
              state: dict[str, torch.Tensor]) -> Iterable[tuple[int, LocalResult | BaseException]]:
        """Each job's outcome, in job order: its LocalResult, or the exception it failed with."""


# ---------------------------------------------------------------------- one client
def client_update(backbone: Backbone, config: RunConfig, method, dataset, plan: TrainPlan,
                  state: dict[str, torch.Tensor], round_index: int, client_id: int, pad_id: int = 0, *,
                  seed: int | None = None, targets: dict[str, torch.Tensor] | None = None) -> LocalResult:
    """One client's round: load ``state``, seed, run the method's client update; the update's
    state comes back on the CPU whatever device the client trained on.

    ``targets`` (``tensors_by_name`` of ``state``'s names) may be passed when the caller
    looked them up for the whole round. Raises :class:`InjectedFailure` when the failure
    injection picks this (round, client).
    """
    if injected_failure(config.seed, round_index, client_id, config.fed.failure_rate):
        raise InjectedFailure(f"injected failure (rate {config.fed.failure_rate})")
    method.load_state(backbone, state, targets)
    seed = client_seed(config.seed, round_index, client_id) if seed is None else seed
    seed_generators(seed)
    result = method.client_update(backbone, dataset, plan, seed=seed, pad_id=pad_id)
    result.state = cpu_state(result.state)
    return result


def client_profile(backbone: Backbone, config: RunConfig, dataset, pad_id: int = 0) -> list[float]:
    """FOAT on a client: CKA scores of every layer on its first local batch."""
    batch = next(batches(dataset, min(config.chain.foat_batch_size, len(dataset)), shuffle=True,
                         seed=config.seed, pad_id=pad_id, device=backbone.device))
    return foat.profile_client(backbone, batch)


def evaluator(backbone: Backbone, test, pad_id: int = 0, method=None) -> Callable[[dict], dict]:
    """``evaluate(global_state) -> metrics`` of the global model on the held-out ``test`` split.
    ``method``: the run's method, which puts a global state into the model (``Method.load_state``);
    without it the state's tensors are copied in."""
    tensors: dict = {}

    def evaluate(state: dict) -> dict:
        if method is not None:
            method.load_state(backbone, state)
        else:
            if not tensors:
                tensors.update(tensors_by_name(backbone, state))      # looked up once
            set_state(backbone, state, tensors)
        return evaluate_model(backbone, test, pad_id=pad_id)
    return evaluate


# ---------------------------------------------------------------------- one round
def _failure(round_index: int, client: int, err: BaseException, transport=None) -> dict:
    kind = {InjectedFailure: "injected", ClientTimeout: "timeout", RejectedUpdate: "rejected"}.get(type(err), "error")
    message = str(err) if kind in ("timeout", "rejected") else f"{type(err).__name__}: {err}"
    failure = {"round": round_index, "client": client, "kind": kind, "message": message}
    node = getattr(transport, "node_of", {}).get(client)      # a Flower SuperNode's id
    return failure if node is None else {**failure, "node": node}


def _outcome(job: Job, out, timeout: float | None, method):
    """The outcome of a job as the round takes it: the LocalResult, or why it is dropped. A
    method with the shared client update replies with the names it was sent, exactly."""
    if isinstance(out, BaseException):
        return out
    if timeout is not None and out.seconds > timeout:
        return ClientTimeout(f"local training took {out.seconds:.2f} s > {timeout} s")
    shared = type(method).client_update is Method.client_update
    problem = update_problem(out.state, job.window, out.num_examples, same_names=shared)
    return out if problem is None else RejectedUpdate(problem)


def round_metrics(round_index: int, plan: TrainPlan, clients: list[int], results: list, failures: list,
                  bytes_up: int, bytes_down: int, bytes_ctx: int) -> dict:
    """The metrics line of a round (every runtime writes these keys)."""
    n = sum(r.num_examples for _, r in results)
    mean = lambda key: (sum(getattr(r, key) * r.num_examples for _, r in results) / n  # noqa: E731
                        if n and results[0][1].steps else math.nan)
    return {"round": round_index, "window": [plan.training.start, plan.training.stop],
            "clients": clients, "trained": [c for c, _ in results], "failed": [f["client"] for f in failures],
            "num_examples": n, "train_loss": mean("loss"), "train_accuracy": mean("accuracy"),
            "bytes_up": bytes_up, "bytes_down": bytes_down, "bytes_down_context": bytes_ctx,
            "seconds_train": sum(r.seconds for _, r in results), "skipped": not results, "failures": failures}


def run_round(server: Server, transport: Transport, round_index: int,
              evaluate: Callable[[dict], dict] | None = None) -> dict:
    """Plan, sample, downlink, client updates, failures, aggregation, evaluation: one round's metrics."""
    r, cfg = round_index, server.config
    plan = server.plan(r)
    clients = server.round_clients(r)
    seeds = client_seed(cfg.seed, r, np.asarray(clients)).tolist()
    jobs, bytes_down, bytes_ctx = [], 0, 0
    for c, seed in zip(clients, seeds):
        own = server.client_plan(r, c, plan)
        window, context = server.downlink(r, c, own)
        bytes_down += state_bytes(window)        # the method's choice, client by client
        bytes_ctx += state_bytes(context)
        jobs.append(Job(c, own, window, context, seed))
    clients_started = time.perf_counter()
    outcomes = list(transport.train(r, jobs, server.state["global"]))
    clients_s = time.perf_counter() - clients_started
    results, failures, job_of = [], [], {j.client: j for j in jobs}
    for c, out in outcomes:
        out = _outcome(job_of[c], out, cfg.fed.client_timeout_s, server.method)
        if isinstance(out, BaseException):
            failures.append(_failure(r, c, out, transport))
        else:
            results.append((c, out))
    updates, dp_metrics = privacy.privatize(cfg, r, [(res.state, res.num_examples) for _, res in results],
                                            [job_of[c].window for c, _ in results])    # DP-FedAvg, if asked
    server.aggregate(r, updates, [c for c, _ in results])
    metrics = round_metrics(r, plan, clients, results, failures, sum(state_bytes(res.state) for _, res in results),
                            bytes_down, bytes_ctx)
    metrics["seconds_clients"] = clients_s       # what the clients do: load the window, seed, train
    metrics.update(dp_metrics)
    if evaluate is not None and ((r + 1) % cfg.fed.eval_every == 0 or r == cfg.fed.rounds - 1):
        metrics.update({f"test_{k}": v for k, v in evaluate(server.state["global"]).items()})
    return metrics


# ---------------------------------------------------------------------- the loop
def run_rounds(server: Server, transport: Transport, evaluate: Callable[[dict], dict] | None = None, *,
               checkpoints=None, progress: bool = False, started: float | None = None,
               max_failed_rounds: int = 1, deadline: float | None = None) -> list[dict]:
    """FOAT (if the start layer is not set yet), then the rounds from the server's current
    one to ``fed.rounds``, or until the run converges (:mod:`chainfed_core.convergence`,
    ``fed.stop_patience``); returns the metrics history.

    ``checkpoints`` (a :class:`chainfed_core.checkpoint.Checkpointer`) gets the metrics line
    and the server state after every round. After ``max_failed_rounds`` consecutive rounds
    in which every selected client failed, raises :class:`AllClientsFailed` (the rounds'
    records are written first). ``deadline`` (a ``time.time()``): no round starts after it; the
    run stops there, checkpointed, to be resumed by the same call.
    """
    from tqdm.auto import tqdm

    cfg, st = server.config, server.state
    started = time.perf_counter() if started is None else started
    if server.needs_foat:
        profiles = transport.profile(server.foat_clients(), st["global"])
        server.set_start([s for s, _ in profiles], [n for _, n in profiles])
        if checkpoints is not None:
            checkpoints.save(server.snapshot(), "FOAT")
    rounds, failed_in_a_row = cfg.fed.rounds, 0
    bar = tqdm(range(st["round"], rounds), total=rounds, initial=st["round"], disable=not progress, leave=False,
               desc=f"{cfg.method} N={cfg.data.num_clients} K={cfg.fed.clients_per_round}")
    for r in bar:
        if server.finished():
            break                         # checked first: a resumed run that had converged stops there
        if deadline is not None and time.time() >= deadline:
            break                         # out of time: the checkpoint of round r - 1 stands
        round_started = time.perf_counter()
        metrics = run_round(server, transport, r, evaluate)
        metrics["seconds_round"] = time.perf_counter() - round_started     # without the checkpoint below
        metrics["seconds_since_start"] = round_started - started           # round spacing: everything
        st = server.state
        st["history"].append(metrics)
        st["round"] = r + 1
        if checkpoints is not None:
            checkpoints.save(server.snapshot(), f"round {r}", json.dumps(metrics) + "\n")
        bar.set_postfix(loss=f"{metrics['train_loss']:.3f}", acc=f"{metrics.get('test_accuracy', math.nan):.3f}")
        failed_in_a_row = failed_in_a_row + 1 if metrics["skipped"] else 0
        if metrics["skipped"]:
            bar.write(f"round {r}: every client failed; round skipped")
        if failed_in_a_row >= max_failed_rounds:
            if checkpoints is not None:
                checkpoints.wait()
            first = metrics["failures"][0]["message"] if metrics["failures"] else "no client"
            raise AllClientsFailed(f"round {r}: every selected client failed ({len(metrics['failures'])} "
                                   f"failures, first: {first}) in {failed_in_a_row} consecutive round(s); "
                                   "the rounds so far are recorded")
    bar.close()
    return st["history"]
