"""The gpu profile in one command: every run of Tables 1, 2, 4 and Figures 2, 8, 9, and of the
instruction-tuning notebooks (Table 3, Figures 10, 11, Appendix F.2), on one GPU by parallel
worker processes, within a wall-time budget, then the notebooks rendered on the records.

    .venv/bin/python scripts/gpu_profile.py --dry-run            # the plan, what is recorded, the time estimate
    .venv/bin/python scripts/gpu_profile.py                      # make gpu: 12 workers, 600 s in all
    .venv/bin/python scripts/gpu_profile.py --tiny --workers 2   # the same pipeline on the quick profile (CPU)
    .venv/bin/python scripts/gpu_profile.py --out "$OUT"         # also pack what it wrote into $OUT

1. Plan (``chainfed_core.profile_plan``): the runs each artefact's notebook asks for with its default
   parameters (``ARTEFACTS`` follows their grids, ``INSTRUCT`` the instruction-tuning notebooks'; after rendering the
   script checks that the notebooks trained nothing the plan missed), each run once, seed by seed and MiniLM before MPNet within a seed, ChainFed
   and Full Adapters first: a batch stopped early holds whole seeds of the comparison that matters.
2. Runs: ``--workers`` processes (spawned where they use CUDA, which a fork cannot) share the one GPU, ``--threads`` torch
   threads each (12 x 1 of the H200 machine's 16 cores: the rest for the parent and the driver),
   through ``run_profile.run_all``. Recorded runs are skipped, interrupted ones resume from their
   checkpoint (``results/runs/<profile>/<hash>/``): the same command continues a stopped batch.
3. Budget: ``--budget-s`` is the whole command's wall time. No round starts after the budget less
   ``--render-s`` (kept for rendering) and a grace minute; a round still going at the end of the
   grace is abandoned (its run resumes from the round before). What is not done is left resumable.
4. Render (``run_batch``): each notebook whose runs are all recorded, Table 1 always (without
   training: ``run_missing=False``, missing cells read "not run"), then the claims page and the
   index ``reports/report_<profile>.html``.
5. ``--out DIR``: records (without checkpoints), summaries, figures and reports packed into
   ``DIR/<profile>.tar.gz`` (in parts of at most 15 MiB), to bring back from a device machine.

The estimate (``--dry-run``) reads ``results/benchmarks/gpu_step_cost.json``
(``benchmarks/gpu_step_cost.py``, kernels and FLOPs counted on the CPU): see :func:`estimate`;
where ``results/benchmarks/gpu_throughput.json`` holds a CUDA measurement
(``benchmarks/gpu_throughput.py``), its seconds per kernel replace the stated GPU constants.
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

from chainfed_core import experiments as ex  # noqa: E402
from chainfed_core.profile_plan import ARTEFACTS, INSTRUCT, plan, recorded  # noqa: E402
from chainfed_core.records import RECORD_FILE  # noqa: E402

import run_profile  # noqa: E402

TINY = "quick"                   # --tiny: the quick profile (tiny model, synthetic data, CPU)
COST_RECORD = REPO / "results" / "benchmarks" / "gpu_step_cost.json"
THROUGHPUT_RECORD = REPO / "results" / "benchmarks" / "gpu_throughput.json"     # measured on a GPU, when it is
PART_BYTES = 15 * 2 ** 20        # the device machine returns files of at most 16 MiB
GRACE_S = 60
CLAIMS = "claims"


# ---------------------------------------------------------------------- the estimate
def _cost_key(run: ex.Run, measured: dict) -> str:
    """The measured client round that stands for ``run``: its variant's, a window's (W=k), or ChainFed's."""
    if run.variant in measured:
        return run.variant
    w = run.config.chain.window
    return f"W={w}" if run.config.method == "chainfed" and f"W={w}" in measured else "ChainFed"


def run_cost(run: ex.Run, cost: dict) -> dict:
    """Kernels, FLOPs and CPU seconds of one run, at the fewest rounds its stopping rule allows
    (``low``) and at its cap (``high``): K clients a round, each client's round scaled from the
    measured one by its steps (a method with a fixed step count, FedKSeed, not scaled), an
    evaluation of the test set every ``eval_every`` rounds."""
    from chainfed_core.methods import get_method

    cfg, model = run.config, cost["models"][run.model]
    data = cost["datasets"][run.dataset]
    measured = model["client_round"][_cost_key(run, model["client_round"])]
    if "could_not_run" in measured:           # no device holds it: recorded at once, costs nothing
        return {}
    steps = math.ceil(data["train"] / cfg.data.num_clients / cfg.train.batch_size)
    scale = steps / measured["steps"] if measured["steps"] == math.ceil(measured["examples"] / 8) else 1.0
    ev = model["evaluation"]
    per_round = {k: cfg.fed.clients_per_round * measured[k] * scale + ev[k] * data["test"] / ev["examples"]
                 / cfg.fed.eval_every for k in ("kernels", "flops", "cpu_s")}
    layers = ex.num_layers(run.model)
    method = get_method(cfg.method)(cfg, layers, "bert")
    low = max(method.min_rounds(0, min(cfg.chain.window, layers)), cfg.fed.eval_every * (cfg.fed.stop_patience or 0), 1)
    return {f"{k}_{end}": v * r for k, v in per_round.items()
            for end, r in (("low", min(low, cfg.fed.rounds)), ("high", cfg.fed.rounds))}


# The GPU side of the model, stated, not measured here (no GPU on the machine that wrote the
# cost record): a kernel of a batch-8 step runs a few microseconds, and kernels of different
# processes take turns on the GPU (no MPS); host seconds per kernel launched from eager PyTorch,
# on a fast server core; the FP32 rate reached on matrices this small.
GPU_S_PER_KERNEL = 3e-6
HOST_S_PER_KERNEL_FAST = 10e-6
FLOPS_PER_S = 15e12


def estimate(runs: list[ex.Run], cost: dict, workers: int, cores: int = 16) -> dict:
    """Wall seconds of ``runs`` on one H200 with ``workers`` processes, at the low and high round
    counts: the largest of the GPU's serial kernel time, the host's launch time spread over the
    workers (per kernel: a fast core's, and this CPU's measured overhead, the slow end) and the
    FP32 arithmetic. Also this CPU's seconds for the same work, one run at a time."""
    totals: dict[str, float] = {}
    for r in runs:
        for k, v in run_cost(r, cost).items():
            totals[k] = totals.get(k, 0.0) + v
    host_slow = cost["overhead"]["seconds_per_operator"]
    out = {}
    for end in ("low", "high"):
        kernels, flops = totals.get(f"kernels_{end}", 0.0), totals.get(f"flops_{end}", 0.0)
        parallel = min(workers, cores)
        for label, host in (("fast_host", HOST_S_PER_KERNEL_FAST), ("this_cpu_host", host_slow)):
            out[f"{end}/{label}"] = max(kernels * GPU_S_PER_KERNEL, kernels * host / parallel, flops / FLOPS_PER_S)
        out[f"{end}/cpu_here"] = totals.get(f"cpu_s_{end}", 0.0)
        out[f"{end}/kernels"] = kernels
    return out


def cpu_full_check(cost: dict) -> dict[str, tuple[float, float]]:
    """Per method (Full Adapters, ChainFed): the cost record's CPU seconds per training example of
    a MiniLM-L6 client, beside the median over the cpu-full records (``seconds_train`` per example
    of each round; sequences cut at 32 tokens there, one thread of a loaded 2-core machine)."""
    import json
    import statistics

    rounds = cost["models"].get("minilm-l6", {}).get("client_round", {})
    out = {}
    for label, method in (("Full Adapters", "full_adapters"), ("ChainFed", "chainfed")):
        per_example = []
        for path in (REPO / "results" / "runs" / "cpu-full").glob(f"*/{RECORD_FILE}"):
            record = json.loads(path.read_text())
            if record["config"]["method"] == method and record.get("history"):
                per_example += [m["seconds_train"] / m["num_examples"] for m in record["history"] if m["num_examples"]]
        if per_example and label in rounds:
            out[label] = (rounds[label]["cpu_s"] / rounds[label]["examples"], statistics.median(per_example))
    return out


def measured_s_per_kernel(workers: int) -> tuple[float, str] | None:
    """Seconds per kernel, all workers together, from a CUDA record of ``benchmarks/gpu_throughput.py``
    (MiniLM-L6's shape, at the largest worker count it ran up to ``workers``); None without one."""
    import json

    if not THROUGHPUT_RECORD.exists():
        return None
    record = json.loads(THROUGHPUT_RECORD.read_text())
    rows = [r for r in record["shapes"].get("minilm-l6", {}).get("runs", []) if r["workers"] <= workers]
    if not record["device"].startswith("cuda") or not rows:
        return None
    row = max(rows, key=lambda r: r["workers"])
    return row["s_per_kernel"], f"{record['device']}, {row['workers']} workers, {THROUGHPUT_RECORD.name}"


def print_estimate(runs: list[ex.Run], workers: int, budget_s: float) -> None:
    import json

    if not COST_RECORD.exists():
        print(f"estimate: no {COST_RECORD.relative_to(REPO)} (run benchmarks/gpu_step_cost.py)")
        return
    cost = json.loads(COST_RECORD.read_text())
    if instruct := [r for r in runs if r.evals is not None]:
        print(f"estimate: {len(instruct)} instruction-tuning runs not estimated (the cost record measures encoders)")
        runs = [r for r in runs if r.evals is None]
    missing = sorted({r.model for r in runs} - set(cost["models"])) + sorted({r.dataset for r in runs} - set(cost["datasets"]))
    if missing:
        print(f"estimate: the cost record has no {missing}")
        return
    e = estimate(runs, cost, workers)
    hours = lambda s: f"{s / 3600:.1f} h" if s >= 3600 else f"{s / 60:.0f} min"  # noqa: E731
    print(f"estimate for {len(runs)} runs, {workers} workers on one H200 ({budget_s:.0f} s for the runs):")
    for end, what in (("low", "fewest rounds the stopping rule allows"), ("high", "every run to its round cap")):
        print(f"  {what}: {hours(e[f'{end}/fast_host'])} (fast host) to {hours(e[f'{end}/this_cpu_host'])} "
              f"(this CPU's per-kernel overhead); this 2-core CPU: {e[f'{end}/cpu_here'] / 86400:.1f} days")
    measured = measured_s_per_kernel(workers)
    if measured is not None:
        s_per_kernel, where = measured
        e["low/fast_host"] = e["low/measured"] = e["low/kernels"] * s_per_kernel
        e["high/measured"] = e["high/kernels"] * s_per_kernel
        print(f"  measured ({where}): {hours(e['low/measured'])} to {hours(e['high/kernels'] * s_per_kernel)}")
    print("  basis check, MiniLM-L6 client CPU seconds per example: " + ", ".join(
        f"{m} {ours * 1e3:.0f} ms here vs {theirs * 1e3:.0f} ms in the cpu-full records"
        for m, (ours, theirs) in cpu_full_check(cost).items()))
    best, worst = e["low/fast_host"], e.get("high/measured", e["high/this_cpu_host"])
    verdict = ("yes, even at the round caps" if worst <= budget_s else
               f"only if the runs converge at the fewest rounds (worst case {worst / budget_s:.0f}x over)"
               if best <= budget_s else f"no, {best / budget_s:.0f}x over at best")
    print(f"  fits the budget: {verdict}" + ("" if worst <= budget_s else
          "; at the budget the batch stops, its runs resumable by the same command"))


# ---------------------------------------------------------------------- before, and after
def preflight(profile: str, runs: list[ex.Run]) -> str | None:
    """Why the batch cannot start (one line), checked before any work; None if it can."""
    import torch

    from chainfed_core.assets import AssetError, fetch

    devices = {r.config.train.device for r in runs}
    if "cuda" in devices and not torch.cuda.is_available():
        return (f"profile {profile}: train.device 'cuda', but torch {torch.__version__} sees no CUDA device here; "
                "--tiny runs the same pipeline on the CPU")
    for name in sorted({r.model for r in runs if not r.model.startswith("tiny")}
                       | {r.dataset for r in runs if r.dataset != "synthetic" and r.evals is None}
                       | ({"alpaca-en-demo"} if any(r.evals is not None for r in runs) else set())):
        try:
            fetch(name)
        except AssetError as err:
            return f"asset {name!r} is not here and cannot be fetched ({str(err).splitlines()[0]}); run `make assets`"
    return None


def render(profile: str, artefacts: list[str], by_artefact: dict, root: Path) -> list[dict]:
    """Each notebook whose runs are all recorded (Table 1 always, training nothing), then the
    claims page and the index; what is skipped is said."""
    import run_batch

    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    os.environ.pop("MPLBACKEND", None)
    out_dir, results = run_batch.REPORTS / profile, []
    for name in artefacts:
        params = {"profile": profile}
        missing = len(by_artefact[name]) - len(recorded(root, by_artefact[name]))
        if name == "table1_main_results":
            params["run_missing"] = False
        elif missing:
            print(f"{name}: not rendered, {missing} of {len(by_artefact[name])} runs not recorded yet "
                  "(the same command continues them)", flush=True)
            continue
        results.append(run_batch.execute(REPO / "notebooks" / f"{name}.ipynb", out_dir / f"{name}.ipynb", params))
    claims = run_batch.execute(REPO / "notebooks" / f"{CLAIMS}.ipynb", out_dir / f"{CLAIMS}.ipynb",
                               {"profile": profile})
    index = run_batch.write_index([claims, *results], profile, out_dir)
    print(f"report: {index.relative_to(REPO)}", flush=True)
    return [claims, *results]


def outputs(profile: str) -> list[Path]:
    """What a batch of ``profile`` wrote, relative to the repo: records (no checkpoints, no locks),
    summaries, figures, reports."""
    figures = REPO / "figures" / ("quick" if profile == "quick" else "")
    found = [p for p in (REPO / "results" / "runs" / profile).rglob("*")
             if p.is_file() and p.name not in ("checkpoint.pkl", "checkpoint.pt", ".lock")]
    found += [p for p in (REPO / "results").glob(f"*/{profile}/*") if p.is_file() and p.parent.parent.name != "runs"]
    found += sorted(figures.glob(f"*_{profile}.png"))
    found += [p for p in (REPO / "reports" / profile).glob("*") if p.is_file()]
    found += [p for p in [REPO / "reports" / f"report_{profile}.html"] if p.exists()]
    return [p.relative_to(REPO) for p in found]


def pack(profile: str, out: Path) -> list[Path]:
    """``outputs(profile)`` as ``out/<profile>.tar.gz`` (``.partNN`` pieces of at most 15 MiB:
    ``cat`` them back in order)."""
    out.mkdir(parents=True, exist_ok=True)
    archive = out / f"{profile}.tar.gz"
    listing = "\n".join(map(str, outputs(profile))) + "\n"
    subprocess.run(["tar", "-czf", str(archive), "-C", str(REPO), "-T", "-"], input=listing.encode(), check=True)
    if archive.stat().st_size <= PART_BYTES:
        return [archive]
    data, parts = archive.read_bytes(), []
    for i in range(0, len(data), PART_BYTES):
        parts.append(out / f"{archive.name}.part{i // PART_BYTES:02d}")
        parts[-1].write_bytes(data[i:i + PART_BYTES])
    archive.unlink()
    return parts


# ---------------------------------------------------------------------- the command
def parse(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help=f"the {TINY} profile instead: tiny model, synthetic data, CPU")
    parser.add_argument("--profile", default="gpu-full", choices=list(ex.PROFILES))
    parser.add_argument("--notebooks", nargs="+", default=[*ARTEFACTS, *INSTRUCT], choices=[*ARTEFACTS, *INSTRUCT],
                        help="the artefacts to run and render (default: all ten)")
    parser.add_argument("--models", nargs="+", help="run only these models' runs (rendering still needs every run)")
    parser.add_argument("--datasets", nargs="+", help="run only these data sets' runs")
    parser.add_argument("--seeds", nargs="+", type=int, help="run only these seeds' runs")
    parser.add_argument("--workers", type=int, default=12, help="worker processes sharing the GPU")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per worker (default: the profile's)")
    parser.add_argument("--budget-s", type=float, default=600.0, help="wall seconds for the whole command")
    parser.add_argument("--render-s", type=float, default=120.0, help="seconds of the budget kept for rendering")
    parser.add_argument("--dry-run", action="store_true", help="print the plan and the estimate; run nothing")
    parser.add_argument("--no-render", action="store_true", help="run only, render nothing")
    parser.add_argument("--out", type=Path, help="pack records, summaries, figures and reports into this folder")
    args = parser.parse_args(argv)
    if args.tiny:
        args.profile = TINY
    for name, value in (("--workers", args.workers), ("--budget-s", args.budget_s)):
        if value <= 0:
            parser.error(f"{name}: must be > 0, got {value}")
    if not 0 <= args.render_s < args.budget_s:
        parser.error(f"--render-s: must lie in [0, --budget-s), got {args.render_s}")
    return args


def main(argv=None) -> int:
    started = time.time()
    args = parse(argv)
    root = REPO / "results" / "runs" / args.profile
    runs, by_artefact = plan(args.profile, args.notebooks)
    runs = [r for r in runs if (args.models is None or r.model in args.models)
            and (args.datasets is None or r.dataset in args.datasets) and (args.seeds is None or r.seed in args.seeds)]
    done = {r.run_id for r in recorded(root, runs)}
    todo = [r for r in runs if r.run_id not in done]
    print(f"{args.profile}: {len(runs)} runs for {', '.join(args.notebooks)}; {len(runs) - len(todo)} recorded, "
          f"{len(todo)} to run", flush=True)
    for name, rs in by_artefact.items():
        print(f"  {name}: {len(rs)} runs, {len(recorded(root, rs))} recorded", flush=True)
    if args.dry_run:
        print_estimate(todo, args.workers, args.budget_s - args.render_s)
        return 0
    problem = preflight(args.profile, todo)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    before = {p.name for p in root.glob("*") if p.is_dir()}
    hard = started + args.budget_s - args.render_s
    if todo:
        run_profile.run_all(todo, root, workers=args.workers, threads=args.threads or ex.profile(args.profile)["threads"],
                            deadline=hard - min(GRACE_S, (hard - started) / 4), hard_deadline=hard,
                            spawn=any(r.config.train.device != "cpu" for r in todo))    # CUDA needs fresh processes
    left = len(runs) - len(recorded(root, runs))
    print(f"runs: {len(runs) - left} of {len(runs)} recorded, {left} left (the same command continues them)", flush=True)
    failed = 0
    if not args.no_render:
        planned = before | {r.run_id for r in runs}
        failed = sum(r["error"] is not None for r in render(args.profile, args.notebooks, by_artefact, root))
        extra = sorted({p.name for p in root.glob("*") if p.is_dir()} - planned)
        print(f"the notebooks trained {len(extra)} runs the plan did not hold" + (f": {extra[:5]}" if extra else ""),
              flush=True)
        failed += bool(extra)
    if args.out is not None:
        for part in pack(args.profile, args.out):
            print(f"packed: {part} ({part.stat().st_size / 2 ** 20:.1f} MiB)", flush=True)
    print(f"done in {time.time() - started:.0f} s", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
