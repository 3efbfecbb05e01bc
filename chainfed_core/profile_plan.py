"""A profile's whole plan: the runs each result notebook asks for, and what they cost in time.

:data:`ARTEFACTS` follows the classification notebooks' grids with their default parameters
(Table 1, 2, 4, Figures 2, 8, 9), :data:`INSTRUCT` the instruction-tuning notebooks'
(:func:`chainfed_core.instruct_table.notebook_runs`). :func:`plan` lists every run once, seed
by seed, the way ``scripts/gpu_profile.py`` runs them; :func:`wall_time` adds up the time the
recorded runs took and projects the rest, for the claims page ("the profile's total wall time").

Time of a run (:func:`run_seconds`): the sum of its rounds' ``seconds_round`` (training and the
round's evaluation) and of its final evaluation's ``seconds``, which survives resumes (a record's
``wall_s`` is the last process's alone). Runs not recorded yet are projected from the recorded
runs of the same variant and model at the profile (else of the same method; else ChainFed's runs
there times the method's cost over ChainFed's at another profile, :func:`relative_cost`; else of
the same artefact, else of any run of the model): each at their mean, so the projection is as good as those
runs are typical; with no recorded run of a model, its runs' hours are unknown (NaN), and so the total.
"""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path

from . import experiments as ex
from .instruct_table import NOTEBOOK_RUNS, notebook_runs
from .records import RECORD_FILE

REPO = Path(__file__).resolve().parent.parent


def _ablation(p: dict) -> dict:
    """The grid arguments the sensitivity notebooks give: the profile's ablation settings."""
    return {"datasets": p["ablation_datasets"], "partitions": p.get("ablation_partitions"),
            "seeds": p.get("ablation_seeds")}


def _windows(p: dict) -> list:
    smallest = min(ex.num_layers(m) for m in p["models"])
    return [ex.chainfed(f"W={w}", window=w) for w in [2, 3, 4, 5, 6] if w <= smallest] + ["FFT"]


# Each artefact's variants and grid arguments, as its notebook builds them with its defaults
# (Table 1: the profile's datasets without the heavy one, ChainFed and Full Adapters first).
ARTEFACTS = {
    "table1_main_results": lambda p: (["ChainFed", "Full Adapters", *ex.PAPER_BASELINES, "No-FT", "LP", "FFT"], {}),
    "obs1_memory_constrained": lambda p: (["Full Adapters", "Full Adapters, memory-limited"],
                                          {"datasets": p["ablation_datasets"]}),
    "table2_threshold": lambda p: ([ex.chainfed(f"tau={t}", foat_tau=t) for t in [1.0, 0.9, 0.8]] + ["Full Adapters"],
                                   _ablation(p)),
    "table4_ablation": lambda p: (["ChainFed", "w/o DLCT", "w/o GPO", "w/o FOAT", "ChainFed (stage head)",
                                   "w/o GPO (stage head)"], _ablation(p)),
    "fig8_window_size": lambda p: (_windows(p), _ablation(p)),
    "fig9_global_weight": lambda p: ([ex.chainfed(f"lambda={lam}" + ("" if head == "shared" else ", stage head"),
                                                  gpo_lambda=lam, local_head=head)
                                      for head in ["shared", "stage"] for lam in [0.0, 0.1, 0.2, 0.5, 1.0]],
                                     _ablation(p)),
}

# the instruction-tuning notebooks' runs (their profiles have the classification profiles' names)
INSTRUCT = {name: functools.partial(notebook_runs, name) for name in NOTEBOOK_RUNS}


def plan(profile: str, artefacts: list[str]) -> tuple[list[ex.Run], dict[str, list[ex.Run]]]:
    """The runs of ``artefacts`` in the order they are run (each once), and each artefact's own."""
    p = ex.profile(profile)
    by_artefact = {}
    for name in artefacts:
        if name in INSTRUCT:
            by_artefact[name] = INSTRUCT[name](profile)
            continue
        variants, kwargs = ARTEFACTS[name](p)
        by_artefact[name] = ex.grid(profile, variants, **kwargs)
    models = {m: i for i, m in enumerate(p["models"])}         # the decoders after the encoders
    ordered, seen = [], set()
    for position, (a, r) in enumerate((a, r) for a, runs in enumerate(by_artefact.values()) for r in runs):
        if r.run_id not in seen:
            seen.add(r.run_id)
            ordered.append(((r.seed, models.get(r.model, len(models)), a, position), r))
    return [r for _, r in sorted(ordered, key=lambda item: item[0])], by_artefact


def recorded(root: Path, runs: list[ex.Run]) -> list[ex.Run]:
    return [r for r in runs if (root / r.run_id / RECORD_FILE).exists()]


def run_seconds(record: dict) -> float:
    """A run's time over all the processes that made it: its rounds (training and evaluation)
    and its final evaluation."""
    rounds = sum(m.get("seconds_round", 0.0) for m in record.get("history", []))
    final = record.get("final_eval") or {}
    return rounds + sum(s.get("seconds", 0.0) for s in final.values() if isinstance(s, dict))


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def relative_cost(profile: str, repo: Path = REPO) -> dict[tuple[str, str], float]:
    """(model, method) -> the method's mean run time over ChainFed's, from the records of the other
    profiles (the first that has both, in :data:`experiments.PROFILES` order): what a method not yet
    run at ``profile`` costs beside a ChainFed run there."""
    out: dict[tuple[str, str], float] = {}
    for other in ex.PROFILES:
        if other == profile or not (repo / "results" / "runs" / other).is_dir():
            continue
        times: dict[tuple[str, str], list[float]] = {}
        for path in (repo / "results" / "runs" / other).glob(f"*/{RECORD_FILE}"):
            record = json.loads(path.read_text())
            times.setdefault((record["config"]["model"]["name"], record["config"]["method"]), []).append(
                run_seconds(record))
        for (model, method), values in times.items():
            chain = _mean(times.get((model, "chainfed"), []))
            if chain == chain and chain > 0:
                out.setdefault((model, method), _mean(values) / chain)
    return out


def wall_time(profile: str, repo: Path = REPO, artefacts: list[str] | None = None):
    """Per artefact of ``profile`` (each run counted in the first artefact that asks for it): its
    runs, how many are recorded, the hours they took and the hours projected for the rest
    (one run at a time; :func:`run_seconds`), and a total row. A DataFrame."""
    import pandas as pd

    runs, by_artefact = plan(profile, artefacts or [*ARTEFACTS, *INSTRUCT])
    root = repo / "results" / "runs" / profile
    seconds = {r.run_id: run_seconds(json.loads((root / r.run_id / RECORD_FILE).read_text()))
               for r in recorded(root, runs)}
    by_key: dict[tuple, list[float]] = {}
    for r in runs:
        if r.run_id in seconds:
            for key in (("variant", r.variant, r.model), ("method", r.config.method, r.model), ("model", r.model)):
                by_key.setdefault(key, []).append(seconds[r.run_id])
    ratio = relative_cost(profile, repo)
    rows, counted = [], set()
    for name, own in by_artefact.items():
        new = [r for r in own if r.run_id not in counted]
        counted |= {r.run_id for r in new}
        done = [seconds[r.run_id] for r in new if r.run_id in seconds]
        left = 0.0
        for r in (r for r in new if r.run_id not in seconds):
            guess = next((m for m in (_mean(by_key.get(("variant", r.variant, r.model), [])),
                                      _mean(by_key.get(("method", r.config.method, r.model), [])),
                                      ratio.get((r.model, r.config.method), math.nan)
                                      * _mean(by_key.get(("method", "chainfed", r.model), [])), _mean(done),
                                      _mean(by_key.get(("model", r.model), [])))
                          if m == m), math.nan)
            left += guess
        rows.append({"artefact": name, "runs": len(new), "recorded": len(done), "hours recorded": sum(done) / 3600,
                     "hours left (projected)": left / 3600})
    table = pd.DataFrame(rows)
    total = table[["runs", "recorded", "hours recorded"]].sum().to_dict()
    total["hours left (projected)"] = table["hours left (projected)"].sum(min_count=len(table))
    table.loc[len(table)] = {"artefact": "total", **total}
    table["hours in all"] = table["hours recorded"] + table["hours left (projected)"]
    return table
