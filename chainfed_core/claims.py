"""The paper's claims, one row each: the paper's number, ours with its uncertainty and record, a verdict.

Ours come only from committed records: the summaries the result notebooks write
(``results/<artefact>/<profile>/summary.json``, whose ``runs`` name every run's record) and
the benchmark records (``results/benchmarks/*.json``). A claim whose records are not there
reads "not run"; nothing is computed here that a record does not hold.

Uncertainty. Where a claim compares two methods over seeds, the difference is taken per seed
(averaged over the cells the profile runs: data sets x partitions) and reported as mean ± the
standard error over seeds. Where only one seed ran, the standard error is that of the test
set: two accuracies p1, p2 on n test examples differ by sqrt(p1(1-p1)/n + p2(1-p2)/n) from
test-set sampling alone (a lower bound on the run-to-run spread, which seeds would add).

Verdicts, for a claim that A beats B (difference d, standard error s):
"reproduced" when d > 2s; "not reproduced" when d < -2s; else "not distinguishable at this
scale". Claims about a measured ratio (memory, streaming time) are "reproduced" when ours is on
the paper's side of 1 (or of the paper's stated bound), with the measured figure shown; the
convergence ratios, one per paired run, when their range at ± 2 SE lies above 1.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

from . import paper
from .tables import could_not_run, paired_difference, paired_ratio

REPO = Path(__file__).resolve().parent.parent
REPRODUCED, NOT_REPRODUCED, UNCLEAR, NOT_RUN = ("reproduced", "not reproduced", "not distinguishable at this scale",
                                                "not run")
DISTILBERT_AVG = {m: paper.TABLE1_AVERAGE[("DistilBERT", m)].value for m in paper.TABLE1_METHODS[1:-1]}


@dataclass
class Claim:
    claim: str
    paper: str
    ours: str
    record: str
    verdict: str


def summary(artefact: str, profile: str, repo: Path = REPO) -> Optional[dict]:
    path = repo / "results" / artefact / profile / "summary.json"
    return json.loads(path.read_text()) if path.exists() else None


def _all_runs(artefact: str, profile: str, repo: Path):
    """Every run of the artefact's summary, whatever its status (None without one), and where it is."""
    import pandas as pd

    s = summary(artefact, profile, repo)
    where = f"results/{artefact}/{profile}/summary.json"
    return (pd.DataFrame(s["runs"]) if s and s.get("runs") else None), where


def _complete(df):
    return None if df is None else df[df["status"].fillna("complete") == "complete"]


def _runs(artefact: str, profile: str, repo: Path):
    df, where = _all_runs(artefact, profile, repo)
    return _complete(df), where


def verdict(diff: float, se: float) -> str:
    if diff != diff:
        return NOT_RUN
    if se != se:
        return UNCLEAR
    return REPRODUCED if diff > 2 * se else NOT_REPRODUCED if diff < -2 * se else UNCLEAR


def _gain_claim(df, where: str, a: str, b: str, paper_gain: float, label: str) -> Claim:
    if df is None:
        return Claim(label, f"+{paper_gain:.2f}", NOT_RUN, where, NOT_RUN)
    d, se, n = paired_difference(df, a, b)
    ours = NOT_RUN if d != d else f"{d:+.2f} ± {se:.2f} ({n} seed{'s' if n != 1 else ''})"
    return Claim(label, f"{paper_gain:+.2f}", ours, where, verdict(d, se))


def table1_claims(profile: str, repo: Path = REPO) -> list[Claim]:
    every, where = _all_runs("table1_main_results", profile, repo)
    df = _complete(every)
    blocked = set() if every is None else set(could_not_run(every, ["variant"]))   # no device holds them
    rows = [_gain_claim(df, where, "ChainFed", "Full Adapters", paper.TEXT["avg_gain_over_full_adapters_distilbert"].value,
                        "Table 1: ChainFed beats Full Adapters (average points, DistilBERT role)")]
    for b in (*paper.TABLE1_METHODS[2:8], "LP"):
        row = _gain_claim(df, where, "ChainFed", b, DISTILBERT_AVG["ChainFed"] - DISTILBERT_AVG[b],
                          f"Table 1: ChainFed beats {b}")
        if row.verdict == NOT_RUN and b in blocked:     # recorded, and no device of the tiers holds it
            row.ours = f"— (no device holds {b}: its records say could not run)"
        rows.append(row)
    return rows


def ablation_claims(profile: str, repo: Path = REPO) -> list[Claim]:
    df, where = _runs("table4_ablation", profile, repo)
    avg = {v: paper.TABLE4_AVERAGE[("DistilBERT", v)].value for v in paper.TABLE4_VARIANTS}
    rows = [_gain_claim(df, where, "ChainFed", v, avg["ChainFed"] - avg[v], f"Table 4: {v[4:]} helps (ChainFed - {v})")
            for v in ("w/o GPO", "w/o DLCT", "w/o FOAT")]
    paper_order = " < ".join(sorted(avg, key=avg.get))
    if df is None:
        return rows + [Claim("Table 4: ablation order", paper_order, NOT_RUN, where, NOT_RUN)]
    ours_avg = df.groupby("variant")["accuracy"].mean()
    ours_avg = ours_avg[[v for v in paper.TABLE4_VARIANTS if v in ours_avg]]
    order = " < ".join(sorted(ours_avg.index, key=ours_avg.get))
    same = order == paper_order
    distinct = all(r.verdict == REPRODUCED for r in rows)
    return rows + [Claim("Table 4: ablation order", paper_order, order, where,
                         REPRODUCED if same and distinct else UNCLEAR if not all(
                             r.verdict == NOT_REPRODUCED for r in rows) else NOT_REPRODUCED)]


def best_setting_claims(profile: str, repo: Path = REPO) -> list[Claim]:
    rows = []
    df, where = _runs("table2_threshold", profile, repo)
    rows.append(_best(df, where, "tau=", 0.8, "Table 2: the best FOAT threshold τ"))
    df9, where9 = _runs("fig9_global_weight", profile, repo)
    for head in ("shared", "stage"):
        sub = None if df9 is None or "local head" not in df9 else df9[df9["local head"] == head].copy()
        if sub is not None:
            sub["variant"] = ["lambda=" + str(x) for x in sub["lambda"]]
        rows.append(_best(sub, where9, "lambda=", paper.TEXT["fig9_best_lambda"].value,
                          f"Figure 9: the best GPO weight λ (local loss: {head} head)"))
        if sub is not None and len(sub):
            best = sub.groupby("variant")["accuracy"].mean().idxmax()
            rows.append(_gain_claim(sub, where9, best, "lambda=0.0", paper.TEXT["fig9_global_signal_gain"].value,
                                    f"Figure 9: the global signal helps (best λ - λ=0, {head} head)"))
    return rows


def _best(df, where: str, prefix: str, paper_best: float, label: str) -> Claim:
    if df is None or df.empty:
        return Claim(label, f"{paper_best:g}", NOT_RUN, where, NOT_RUN)
    means = df[df["variant"].str.startswith(prefix)].groupby("variant")["accuracy"].mean().sort_values()
    best, runner_up = means.index[-1], means.index[-2]
    d, se, _ = paired_difference(df, best, runner_up)
    ours = f"{best[len(prefix):]} ({100 * means.iloc[-1]:.1f}%; {d:+.2f} ± {se:.2f} over {runner_up[len(prefix):]})"
    if float(best[len(prefix):]) != paper_best:
        return Claim(label, f"{paper_best:g}", ours, where, UNCLEAR if verdict(d, se) == UNCLEAR else NOT_REPRODUCED)
    return Claim(label, f"{paper_best:g}", ours, where, verdict(d, se))


def window_claims(profile: str, repo: Path = REPO) -> list[Claim]:
    df, where = _runs("fig8_window_size", profile, repo)
    label = "Figure 8: accuracy rises with W (W=max - W=2)"
    if df is None:
        return [Claim(label, "rises", NOT_RUN, where, NOT_RUN)]
    ws = sorted(int(v[2:]) for v in df["variant"].unique() if v.startswith("W="))
    claim = _gain_claim(df, where, f"W={ws[-1]}", "W=2", math.nan, label)
    claim.paper = "rises (no number printed)"
    return [claim]


BENCHMARK = "results/benchmarks/memory_streaming.json"


def _benchmark(repo: Path) -> Optional[dict]:
    path = repo / BENCHMARK
    return json.loads(path.read_text()) if path.exists() else None


def memory_claims(repo: Path = REPO) -> list[Claim]:
    record, where = _benchmark(repo), BENCHMARK
    if record is None:
        return [Claim("Peak memory reduction", "16.87x", NOT_RUN, where, NOT_RUN)]
    bench = record["memory"]
    rob = {int(w): v["ratio_full_over_chainfed"] for w, v in bench["roberta-large"]["chainfed"].items()}
    llama = {int(w): v["ratio_full_over_chainfed"] for w, v in bench["llama2-7b"]["chainfed_modelled"].items()}
    p_rob, p_llama = paper.TEXT["peak_memory_reduction_roberta_large"].value, paper.TABLE3[("LLaMA2-7B", "ChainFed W=2")]["memory_reduction"].value
    full = bench["llama2-7b"]["full_adapters_modelled"]
    frozen = 100 * full["frozen_weights"] / full["total"]
    return [
        Claim("Peak memory: Full Adapters / ChainFed, RoBERTa-large (measured)", f"up to {p_rob}x",
              f"{rob[1]:.1f}x (W=1), {rob[2]:.1f}x (W=2)", where, REPRODUCED if max(rob.values()) >= p_rob else NOT_REPRODUCED),
        Claim("Peak memory: Full Adapters / ChainFed W=2, LLaMA2-7B (modelled)", f"{p_llama}x", f"{llama[2]:.1f}x", where,
              REPRODUCED if llama[2] >= p_llama else NOT_REPRODUCED),
        Claim("Figure 3: parameters dominate adapter tuning's memory, LLaMA2-7B (modelled)",
              f"{paper.TEXT['fig3_llama2_7b_parameters_pct'].value}%", f"{frozen:.1f}% (bf16, batch 4, sequence 64)",
              where, REPRODUCED if frozen > 50 else NOT_REPRODUCED),
    ]


def convergence_claims(profile: str, repo: Path = REPO) -> list[Claim]:
    """ChainFed's convergence speed-up and communication reduction against Full Adapters, one
    ratio per paired run (same cell and seed, :func:`chainfed_core.tables.versus`): from Table
    1's runs (ChainFed at its default τ = 0.8, every cell and seed), else Table 2's τ = 0.8 runs.
    Geometric mean with its range at ± 2 SE of the log ratio (:func:`~chainfed_core.tables.paired_ratio`);
    "reproduced" when the whole range lies above 1, "not reproduced" when below."""
    sources = [(*_runs(artefact, profile, repo), variant)          # each summary read once
               for artefact, variant in [("table1_main_results", "ChainFed"), ("table2_threshold", "tau=0.8")]]
    rows = []
    for col, key, label in [("speedup", "appH2_speedup_agnews", "Table 2 / App. H: ChainFed (τ=0.8) converges faster"),
                            ("comm_reduction", "appH2_comm_reduction_max", "Table 2 / App. H: ChainFed (τ=0.8) communicates less")]:
        p = paper.TEXT[key].value
        measured = [(*paired_ratio(df, variant, col), where) for df, where, variant in sources if df is not None]
        found = next((m for m in measured if m[3]), None)           # the first source with a paired run
        if found is None:
            rows.append(Claim(label, f"{p}x", NOT_RUN, sources[0][1], NOT_RUN))
            continue
        ratio, se, seeds, n, where = found
        runs = f"{seeds} seed{'s' if seeds > 1 else ''}, {n} run{'s' if n > 1 else ''}"
        if se != se:
            rows.append(Claim(label, f"{p}x", f"{ratio:.2f}x ({runs})", where, UNCLEAR))
            continue
        lo, hi = ratio * math.exp(-2 * se), ratio * math.exp(2 * se)
        rows.append(Claim(label, f"{p}x", f"{ratio:.2f}x [{lo:.2f}, {hi:.2f} at ± 2 SE] ({runs})", where,
                          REPRODUCED if lo > 1 else NOT_REPRODUCED if hi < 1 else UNCLEAR))
    return rows


def streaming_claims(repo: Path = REPO) -> list[Claim]:
    record, where = _benchmark(repo), f"{BENCHMARK}; results/appG_io_overhead/full/summary.json"
    if record is None:
        return [Claim("App. G: streaming adds almost no latency", "≈ 1", NOT_RUN, where, NOT_RUN)]
    times = record["step_times"]
    appg = summary("appG_io_overhead", "full", repo)
    notebook = appg["metrics"].get("streamed + prefetch/min / in memory") if appg else None
    ours = f"{times['prefetch_over_in_memory']:.2f} (benchmark)" + (f", {notebook:.2f} (notebook)" if notebook else "")
    worst = max(times["prefetch_over_in_memory"], notebook or 0)
    return [Claim("App. G: streamed step time / in memory (with prefetch)", "≈ 1 (\"almost zero\" added latency)",
                  ours, where, REPRODUCED if worst <= 1.10 else UNCLEAR)]


def observation1_claims(profile: str, repo: Path = REPO) -> list[Claim]:
    df, where = _runs("obs1_memory_constrained", profile, repo)
    rows = []
    for part, key, label in [("iid", "fig2_participation_cost_iid", "IID"),
                             ("dirichlet", "fig2_participation_cost_noniid", "non-IID")]:
        sub = None if df is None else df[df["partition"] == part]
        rows.append(_gain_claim(sub if sub is not None and len(sub) else None, where, "Full Adapters",
                                "Full Adapters, memory-limited", paper.TEXT[key].value,
                                f"Observation 1: memory limits cost Full Adapters accuracy ({label}, points)"))
    return rows


def claims(profile: str, repo: Path = REPO) -> list[Claim]:
    return [*table1_claims(profile, repo), *ablation_claims(profile, repo), *best_setting_claims(profile, repo),
            *window_claims(profile, repo), *convergence_claims(profile, repo), *observation1_claims(profile, repo),
            *memory_claims(repo), *streaming_claims(repo)]


def claims_frame(profile: str, repo: Path = REPO):
    import pandas as pd

    return pd.DataFrame([asdict(c) for c in claims(profile, repo)])


def per_cell_gain(profile: str, a: str = "ChainFed", b: str = "Full Adapters", repo: Path = REPO):
    """Per Table 1 cell: the mean of (a - b) over seeds in points, its standard error and the seeds."""
    import pandas as pd

    df, _ = _runs("table1_main_results", profile, repo)
    if df is None:
        return pd.DataFrame()
    rows = []
    for (model, dataset, part), cell in df.groupby(["model", "dataset", "partition"]):
        d, se, n = paired_difference(cell, a, b)
        rows.append({"model": model, "dataset": dataset, "partition": part, "gain": d, "se": se, "seeds": n})
    return pd.DataFrame(rows)


def eligibility_frame(repo: Path = REPO):
    """Memory-aware selection per method and model, from ``results/benchmarks/eligibility.json``
    (``benchmarks/eligibility.py``): the estimate beside the meter, and the devices each admits."""
    import pandas as pd

    path = repo / "results" / "benchmarks" / "eligibility.json"
    if not path.exists():
        return pd.DataFrame()
    rows = json.loads(path.read_text())["rows"]
    frame = pd.DataFrame(rows)
    for col in ("estimate_bytes", "meter_bytes"):
        frame[col.replace("_bytes", " (MB)")] = frame[col] / 2 ** 20 if col in frame else math.nan
    keep = ["model", "method", "estimate (MB)", "meter (MB)", "estimate_over_meter", "eligible", "eligible_by_meter",
            "sampled_from", "num_devices", "note"]
    return frame[[c for c in keep if c in frame]]
