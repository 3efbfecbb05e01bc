"""Run a profile's grid ahead of its notebooks, in an order that is useful when stopped early.

The notebooks run what their tables need and read back what is recorded
(``results/runs/<profile>/<config hash>/``), so a long batch can be run here first, stopped
at any point (Ctrl-C, kill, end of a session) and continued by the same command: finished
runs are skipped, an interrupted one resumes from its checkpoint. Runs go seed by seed
(every variant and cell of seed 0, then seed 1, ...), so a batch stopped halfway has whole
seeds, and variants in the order given: the comparison that matters first goes first.

    .venv/bin/python scripts/run_profile.py --profile cpu --variants ChainFed "Full Adapters"
    .venv/bin/python scripts/run_profile.py --profile cpu --variants LP --dry-run     # what is left
    .venv/bin/python scripts/run_profile.py --profile cpu --artefacts table2_threshold fig8_window_size

``--artefacts`` takes the runs the named notebooks ask for (``profile_plan.ARTEFACTS``), each once,
in the plan's order; ``--datasets``/``--partitions``/``--seeds`` narrow either selection.

``--workers N`` runs N runs at once in separate processes (``--threads`` each), for machines
with the cores for it; the records are the same as one at a time (each run is a pure function
of its config). Prints the wall time of the batch and of each run. ``scripts/gpu_profile.py``
runs the gpu profile through the same :func:`run_all`, with a deadline.
"""

from __future__ import annotations

import argparse
import functools
import multiprocessing
import os
import signal
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from chainfed_core import experiments as ex  # noqa: E402
from chainfed_core.profile_plan import ARTEFACTS, INSTRUCT, plan  # noqa: E402
from chainfed_core.records import RECORD_FILE  # noqa: E402


def ordered_runs(args) -> list[ex.Run]:
    """The grid, seed-major, variants in the order given; or the artefacts' runs in the plan's order."""
    p = ex.profile(args.profile)
    if args.artefacts:
        keep = {"dataset": args.datasets, "partition": args.partitions, "seed": args.seeds}
        return [r for r in plan(args.profile, args.artefacts)[0]
                if all(values is None or getattr(r, key) in values for key, values in keep.items())]
    runs = []
    for seed in args.seeds if args.seeds is not None else p["seeds"]:
        runs += ex.grid(args.profile, args.variants, datasets=args.datasets, partitions=args.partitions, seeds=[seed])
    return runs


class OutOfTime(BaseException):
    """A run still in a round at the hard deadline: stopped there, its last checkpoint stands. A
    BaseException, as KeyboardInterrupt is: the round's handler of a failing client must not take it."""


def _out_of_time(signum, frame):
    raise OutOfTime("the batch's hard deadline passed mid-round")


def _one(run: ex.Run, root: str, threads: int, deadline: float | None = None,
         hard_deadline: float | None = None) -> tuple[str, float, str]:
    """One run in a worker process: its record's status, or "stopped" / "not started" at ``deadline``
    (no round starts after it), or "interrupted" at ``hard_deadline`` (the round in progress is
    abandoned; the run resumes from its last checkpoint)."""
    import torch

    from chainfed_core.federated import run as federated_run

    if deadline is not None and time.time() >= deadline:
        return run.run_id, 0.0, "not started"
    torch.set_num_threads(threads)
    started = time.perf_counter()
    runner = functools.partial(federated_run, deadline=deadline)
    if hard_deadline is not None:
        previous = signal.signal(signal.SIGALRM, _out_of_time)
        signal.setitimer(signal.ITIMER_REAL, max(0.1, hard_deadline - time.time()))
    try:
        if run.evals is None:
            record = ex.ensure_run(run.config, root, runner=runner, progress=False)
        else:                                       # instruction tuning: its task and final evaluation
            from chainfed_core.instruct_table import ensure_instruct
            record = ensure_instruct(run.config, root, run.evals, progress=False, deadline=deadline)
    except OutOfTime:
        return run.run_id, time.perf_counter() - started, "interrupted"
    except Exception:
        if hard_deadline is not None and time.time() >= hard_deadline:    # the alarm, turned into another error
            return run.run_id, time.perf_counter() - started, "interrupted"    # (an import it broke into)
        raise
    finally:
        if hard_deadline is not None:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
    return run.run_id, time.perf_counter() - started, record.get("status", "complete")


def run_all(runs: list[ex.Run], root: Path, *, workers: int, threads: int, deadline: float | None = None,
            hard_deadline: float | None = None, spawn: bool = False) -> dict[str, int]:
    """Run ``runs`` (those without a record) in ``workers`` processes of ``threads`` torch threads
    each; a line per finished run. At ``deadline`` (a ``time.time()``) no new round starts: runs
    in flight stop checkpointed, the others do not start; at ``hard_deadline`` a round still going
    is abandoned (:func:`_one`). ``spawn``: fresh worker processes (not forked), as CUDA needs.
    Returns the count of each outcome."""
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))      # the workers' OpenMP pools: no oversubscription
    context = multiprocessing.get_context("spawn") if spawn else None
    started, outcomes = time.perf_counter(), {}
    with ProcessPoolExecutor(workers, mp_context=context) as pool:
        futures = {pool.submit(_one, r, str(root), threads, deadline, hard_deadline): r for r in runs}
        for done, future in enumerate(as_completed(futures), 1):
            r = futures[future]
            try:
                run_id, seconds, status = future.result()
            except Exception as err:            # one run's failure (recorded where it is) stops no other
                run_id, seconds, status = r.run_id, 0.0, f"error: {type(err).__name__}: {str(err)[:200]}"
            outcomes[status.split(":")[0]] = outcomes.get(status.split(":")[0], 0) + 1
            if status != "not started":
                print(f"[{done}/{len(runs)} {time.perf_counter() - started:7.0f} s] {r.variant} | {r.model} {r.dataset} "
                      f"{r.partition} s{r.seed}: {seconds:.0f} s ({status}) -> {run_id}", flush=True)
    print(f"batch done in {time.perf_counter() - started:.0f} s: "
          + ", ".join(f"{n} {k}" for k, n in outcomes.items()), flush=True)
    return outcomes


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", required=True, choices=list(ex.PROFILES))
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--variants", nargs="+", help="variant names (experiments.VARIANTS)")
    which.add_argument("--artefacts", nargs="+", help="notebook names (profile_plan.ARTEFACTS): the runs they ask for")
    parser.add_argument("--datasets", nargs="+")
    parser.add_argument("--partitions", nargs="+")
    parser.add_argument("--seeds", nargs="+", type=int)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None, help="torch threads per run (default: the profile's)")
    parser.add_argument("--dry-run", action="store_true", help="list what is left, run nothing")
    args = parser.parse_args(argv)
    try:
        for v in args.variants or []:
            ex.variant(v)                             # an unknown name fails here, before any run
    except ValueError as error:
        parser.error(str(error))
    unknown = [a for a in args.artefacts or [] if a not in {**ARTEFACTS, **INSTRUCT}]
    if unknown:
        parser.error(f"--artefacts: {unknown} not among {[*ARTEFACTS, *INSTRUCT]}")
    root = REPO / "results" / "runs" / args.profile
    runs = ordered_runs(args)
    todo = [r for r in runs if not (root / r.run_id / RECORD_FILE).exists()]
    print(f"{args.profile}: {len(runs)} runs, {len(runs) - len(todo)} recorded, {len(todo)} to run", flush=True)
    if args.dry_run:
        try:
            for r in todo:
                print(f"  {r.run_id}  {r.variant} | {r.model} {r.dataset} {r.partition} s{r.seed}", flush=True)
        except BrokenPipeError:                       # `| head`: the reader has seen enough
            sys.stdout = open(os.devnull, "w")
        return 0
    run_all(todo, root, workers=args.workers, threads=args.threads or ex.profile(args.profile)["threads"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
