"""Run a profile's grid ahead of its notebooks, in an order that is useful when stopped early.

The notebooks run what their tables need and read back what is recorded
(``results/runs/<profile>/<config hash>/``), so a long batch can be run here first, stopped
at any point (Ctrl-C, kill, end of a session) and continued by the same command: finished
runs are skipped, an interrupted one resumes from its checkpoint. Runs go seed by seed
(every variant and cell of seed 0, then seed 1, ...), so a batch stopped halfway has whole
seeds, and variants in the order given: the comparison that matters first goes first.

    .venv/bin/python scripts/run_profile.py --profile cpu --variants ChainFed "Full Adapters"
    .venv/bin/python scripts/run_profile.py --profile cpu --variants LP --dry-run     # what is left

``--workers N`` runs N runs at once in separate processes (``--threads`` each), for machines
with the cores for it; the records are the same as one at a time (each run is a pure function
of its config). Prints the wall time of the batch and of each run.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from chainfed_core import experiments as ex  # noqa: E402
from chainfed_core.records import RECORD_FILE  # noqa: E402


def ordered_runs(args) -> list[ex.Run]:
    """The grid, seed-major, variants in the order given."""
    p = ex.profile(args.profile)
    runs = []
    for seed in args.seeds if args.seeds is not None else p["seeds"]:
        runs += ex.grid(args.profile, args.variants, datasets=args.datasets, partitions=args.partitions, seeds=[seed])
    return runs


def _one(run: ex.Run, root: str, threads: int) -> tuple[str, float, str]:
    import torch

    torch.set_num_threads(threads)
    started = time.perf_counter()
    record = ex.ensure_run(run.config, root, progress=False)
    return run.run_id, time.perf_counter() - started, record.get("status", "complete")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", required=True, choices=list(ex.PROFILES))
    parser.add_argument("--variants", nargs="+", required=True, help="variant names (experiments.VARIANTS)")
    parser.add_argument("--datasets", nargs="+")
    parser.add_argument("--partitions", nargs="+")
    parser.add_argument("--seeds", nargs="+", type=int)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None, help="torch threads per run (default: the profile's)")
    parser.add_argument("--dry-run", action="store_true", help="list what is left, run nothing")
    args = parser.parse_args(argv)
    try:
        for v in args.variants:
            ex.variant(v)                             # an unknown name fails here, before any run
    except ValueError as error:
        parser.error(str(error))
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
    threads = args.threads or ex.profile(args.profile)["threads"]
    started = time.perf_counter()
    with ProcessPoolExecutor(args.workers) as pool:
        futures = {pool.submit(_one, r, str(root), threads): r for r in todo}
        for done, future in enumerate(as_completed(futures), 1):
            r = futures[future]
            run_id, seconds, status = future.result()
            print(f"[{done}/{len(todo)} {time.perf_counter() - started:7.0f} s] {r.variant} | {r.dataset} "
                  f"{r.partition} s{r.seed}: {seconds:.0f} s ({status}) -> {run_id}", flush=True)
    print(f"batch done in {time.perf_counter() - started:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
