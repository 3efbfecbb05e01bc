"""Simulator overhead and peak memory at N=100 and N=10,000 clients, 15 per round.

Overhead is round time (the spacing of round starts: sampling, downlink, aggregation,
checkpoint, metrics, everything) minus the clients' work (``client_update``: load the
window into the model, seed, train; on a real federation the devices do it), over the
rounds between the first and the last; the share beyond ``train_local``'s own clock alone
is printed too. Peak memory is the process's VmHWM measured in a fresh subprocess
per N, so the two N share nothing; each N runs --repeats times, interleaved, and the run of
median overhead is shown with the range over all. Run from the repo root:

    python benchmarks/simulator_overhead.py [--rounds 24] [--local-steps 1]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def config(num_clients: int, rounds: int, local_steps: int = 1) -> dict:
    # The same 40,000-example training set for every N; each client runs ``local_steps`` steps of 4.
    return {"method": "chainfed", "seed": 0, "model": {"name": "tiny-bert-L4-H128"},
            "adapter": {"bottleneck": 16}, "chain": {"window": 2, "start_layer": 0},
            "train": {"batch_size": 4, "local_steps": local_steps},
            "data": {"dataset": "synthetic", "num_clients": num_clients, "max_train_examples": 40_000,
                     "max_test_examples": 64},
            "fed": {"rounds": rounds, "clients_per_round": 15, "eval_every": 10 ** 6, "memory_aware": True}}


def measure(num_clients: int, rounds: int, local_steps: int = 1) -> dict:
    """One run in this process; print its numbers as JSON."""
    from chainfed_core.config import RunConfig
    from chainfed_core.federated import run

    with tempfile.TemporaryDirectory() as out:
        record = run(RunConfig.from_dict(config(num_clients, rounds, local_steps)), out, progress=False)
    # A round's time is the spacing of round starts, so it includes everything the simulator
    # does (checkpoint, metrics record); the first (warm-up) round and the last (which
    # evaluates) are left out.
    starts = [m["seconds_since_start"] for m in record["history"]]
    timed = range(1, len(starts) - 1)
    round_s = starts[-1] - starts[1]
    train_s = sum(record["history"][r]["seconds_train"] for r in timed)
    clients_s = sum(record["history"][r]["seconds_clients"] for r in timed)
    return {"N": num_clients, "local_steps": local_steps, "rounds_timed": len(timed),
            "round_s": round_s / len(timed), "train_s": train_s / len(timed), "clients_s": clients_s / len(timed),
            "overhead_pct": 100 * (round_s - clients_s) / round_s,
            "overhead_ms": 1000 * (round_s - clients_s) / len(timed),
            "beyond_train_pct": 100 * (round_s - train_s) / round_s,
            "peak_rss_mib": record["peak_rss_bytes"] / 2 ** 20, "eligible": record["eligible_clients"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=24)
    parser.add_argument("--local-steps", type=int, default=1,
                        help="Steps of batch 4 each client trains (1: the smallest workload, the worst case for overhead).")
    parser.add_argument("--repeats", type=int, default=3, help="Runs per N; the run of median overhead is shown.")
    parser.add_argument("--out", default="results/benchmarks/simulator_overhead.json",
                        help="JSON record of the run (default: %(default)s).")
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)   # child mode: measure a single N
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one, args.rounds, args.local_steps)))
        return
    runs = {n: [] for n in (100, 10_000)}
    for _ in range(args.repeats):            # interleaved, so a busy spell of the machine hits both N
        for n in runs:
            out = subprocess.run([sys.executable, __file__, "--one", str(n), "--rounds", str(args.rounds),
                                  "--local-steps", str(args.local_steps)],
                                 capture_output=True, text=True, check=True, cwd=ROOT,
                                 env={**os.environ, "PYTHONPATH": str(ROOT)})
            runs[n].append(json.loads(out.stdout.strip().splitlines()[-1]))
    # each figure: its median over the repeats (the run of median overhead for the others)
    results = [sorted(rs, key=lambda r: r["overhead_pct"])[len(rs) // 2] for rs in runs.values()]
    for r, rs in zip(results, runs.values()):
        r["overhead_pct_runs"] = [x["overhead_pct"] for x in rs]
    print(f"{'':24}" + "".join(f"{'N=' + format(r['N'], ','):>14}" for r in results))
    for key, label in [("eligible", "eligible clients"), ("round_s", "round time (s)"),
                       ("clients_s", "clients' work (s)"), ("train_s", "  of which train_local (s)"),
                       ("overhead_ms", "overhead (ms per round)"), ("overhead_pct", "overhead (% of round)"),
                       ("beyond_train_pct", "round - train_local (%)"),
                       ("peak_rss_mib", "peak RSS (MiB)")]:
        print(f"{label:24}" + "".join(f"{r[key]:>14.3f}" if isinstance(r[key], float) else f"{r[key]:>14}"
                                     for r in results))
    print(f"{'overhead % of each run':24}" + "".join(
        f"{min(r['overhead_pct_runs']):>8.2f}-{max(r['overhead_pct_runs']):<5.2f}" for r in results))
    out = ROOT / args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    out.write_text(json.dumps({"args": {k: v for k, v in vars(args).items() if k != "one"}, "commit": commit,
                               "platform": platform.platform(), "results": results, "runs": {str(n): rs for n, rs in runs.items()}}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
