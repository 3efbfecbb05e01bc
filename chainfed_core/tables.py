"""Tables of results across seeds: mean ± standard error, and ours beside the paper's.

Every notebook table that reports runs over seeds goes through :func:`mean_se`: the mean, the
standard error of the mean (sample standard deviation over √n; undefined for one seed) and
the number of seeds, in percent for accuracies. :func:`beside_paper` lays one artefact's
cells out the paper's way (a row per method, a column per data set and split) with our
``mean ± SE`` beside the paper's number for the cell our run stands in for.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

CELL = ["model", "dataset", "partition"]


def mean_se(df, by: Sequence[str], metric: str = "accuracy", scale: float = 100.0):
    """One row per ``by`` group: ``mean``, ``se`` (NaN with one seed) and ``n`` of ``metric`` x ``scale``."""
    grouped = df.groupby(list(by), sort=False)[metric]
    out = grouped.agg(["mean", "std", "count"]).rename(columns={"count": "n"})
    out["mean"] = out["mean"] * scale
    out["se"] = [s * scale / math.sqrt(n) if n > 1 else math.nan for s, n in zip(out["std"], out["n"])]
    return out.drop(columns="std")


def error_bars(df, by: Sequence[str]):
    """:func:`mean_se` of accuracy (%) for a figure's error bars: where a group has one seed its
    SE is the test set's, sqrt(p(1 - p) / n_test), so a one-seed ablation still shows how far a
    difference is from sampling noise."""
    out = mean_se(df, by)
    if "test_examples" in df:
        n_test = df.groupby(list(by), sort=False)["test_examples"].max()
        p = out["mean"] / 100
        one = out["se"].isna() & (out["n"] == 1)
        out.loc[one, "se"] = (100 * (p * (1 - p) / n_test).pow(0.5))[one]
    return out


def text(mean: float, se: float, digits: int = 1) -> str:
    """``"70.3 ± 1.2"``; the mean alone where the SE is undefined (one seed), "not run" for NaN."""
    if mean != mean:
        return "not run"
    return f"{mean:.{digits}f}" if se != se else f"{mean:.{digits}f} ± {se:.{digits}f}"


def beside_paper(df, variants: Sequence[str], paper_cell: Callable, *, cells: Sequence[str] = CELL):
    """Rows: ``variants``; columns: (dataset partition, "ours" | "paper") for every cell in
    ``df``. "ours" is ``mean ± SE`` over seeds (%); "paper" is ``paper_cell(model, dataset,
    partition, variant)`` (a number, "—" or "not reported"). A variant without runs reads "not
    run"; one that no device could hold in any seed (status "could not run") reads "—", as in the paper."""
    import pandas as pd

    stats = mean_se(df, [*cells, "variant"])
    blocked = set(could_not_run(df, [*cells, "variant"]))
    rows = {v: {} for v in variants}
    for key in dict.fromkeys(tuple(k[:-1]) for k in stats.index):
        label = " ".join(str(k) for k in key[1:]) if len({k[0] for k in stats.index}) == 1 else " ".join(map(str, key))
        for v in variants:
            row = stats.loc[(*key, v)] if (*key, v) in stats.index else None
            ours = text(row["mean"], row["se"]) if row is not None and row["n"] else "not run"
            rows[v][(label, "ours")] = "—" if (*key, v) in blocked else ours
            rows[v][(label, "paper")] = paper_cell(*key, v)
    frame = pd.DataFrame.from_dict(rows, orient="index")
    frame.columns = pd.MultiIndex.from_tuples(frame.columns)
    return frame.rename_axis("method")


def could_not_run(df, by: Sequence[str]) -> list[tuple]:
    """The ``by`` groups in which every run's record says no device could hold the method."""
    if "status" not in df:
        return []
    flags = df.assign(blocked=df["status"] == "could not run").groupby(list(by), sort=False)["blocked"].all()
    return [k for k, v in flags.items() if v]


GROUP = ["model", "dataset", "partition", "seed"]    # runs that share data, model and seed


def versus(df, baseline: str = "Full Adapters"):
    """Table 2's and Appendix H's columns against ``baseline``, per run (same model, data set,
    partition and seed), from the grid's rows (:func:`chainfed_core.experiments.summarise`).

    Until each run's own convergence (:mod:`chainfed_core.convergence`): ``speedup`` (the
    baseline's rounds over the run's), ``compute_ratio`` (the baseline's client training
    seconds over the run's, measured) and ``comm_reduction`` (bytes, the baseline's over the
    run's). Until the baseline's final accuracy, where the run reaches it (NaN where not):
    ``*_to_baseline`` the run's own rounds / bytes / seconds, and the same three ratios with
    the baseline's cost of reaching its own final accuracy in the numerator.
    """
    out = df.copy()
    cols = ["speedup", "compute_ratio", "comm_reduction", "rounds_to_baseline", "bytes_to_baseline",
            "client_s_to_baseline", "speedup_to_baseline", "compute_ratio_to_baseline", "comm_reduction_to_baseline"]
    for col in cols:
        out[col] = math.nan
    for _, idx in out.groupby(GROUP).groups.items():
        group = out.loc[idx]
        base = group[group["variant"] == baseline]
        if base.empty:
            continue
        b = base.iloc[0]
        b_reach = _reaching(b["costs"], b["accuracy"])
        for i in idx:
            r = out.loc[i]
            out.loc[i, ["speedup", "compute_ratio", "comm_reduction"]] = [
                _ratio(b["rounds_to_converge"], r["rounds_to_converge"]),
                _ratio(b["client_s_to_converge"], r["client_s_to_converge"]),
                _ratio(b["bytes_to_converge"], r["bytes_to_converge"])]
            reach = _reaching(r["costs"], b["accuracy"])
            out.loc[i, cols[3:6]] = reach
            out.loc[i, cols[6:]] = [_ratio(b_reach[k], reach[k]) for k in (0, 2, 1)]   # rounds, seconds, bytes
    return out


def _reaching(costs, target: float) -> list[float]:
    """(rounds, bytes, client seconds) at the first evaluation reaching ``target``; NaN if none."""
    from .convergence import first_at

    point = first_at(costs, target)
    return [math.nan] * 3 if point is None else [float(point[0]), float(point[2]), float(point[3])]


def _ratio(a: float, b: float) -> float:
    return a / b if b and b == b and a == a else math.nan


def paired_difference(df, a: str, b: str) -> tuple[float, float, int]:
    """Mean over seeds of (a - b) in points, each seed's difference averaged over its cells;
    its standard error over seeds, else (one seed) the test-set standard error; seeds used."""
    cells = GROUP
    pivot = df[df["variant"].isin([a, b])].pivot_table(index=cells, columns="variant", values="accuracy")
    if a not in pivot or b not in pivot:
        return math.nan, math.nan, 0
    pivot = pivot.dropna()
    mean, se, n = _mean_se((pivot[a] - pivot[b]).groupby(level="seed").mean() * 100)
    if n != 1 or "test_examples" not in df:
        return mean, se, n
    tests = df.set_index(cells)["test_examples"]
    var = [(pa * (1 - pa) + pb * (1 - pb)) / tests.loc[k].max() for k, pa, pb in zip(pivot.index, pivot[a], pivot[b])]
    return mean, 100 * math.sqrt(sum(var)) / len(var), 1


def paired_ratio(df, variant: str, col: str) -> tuple[float, float, int, int]:
    """Geometric mean of ``variant``'s ratio column ``col`` (a :func:`versus` column: the
    baseline's cost over the run's, one per cell and seed), with the standard error of its log:
    each seed's log-ratios averaged over its cells, then mean ± SE over seeds; with one seed,
    the SE over its cells. Returns (ratio, SE of log ratio, seeds, runs); NaN where none has it."""
    import numpy as np

    rows = df.loc[df["variant"] == variant, ["seed", col]].dropna() if col in df else df.iloc[:0]
    if rows.empty:
        return math.nan, math.nan, 0, 0
    logs = np.log(rows[col].astype(float))
    mean, se, n = _mean_se(logs.groupby(rows["seed"]).mean())
    if n == 1:
        se = _mean_se(logs)[1]
    return float(np.exp(mean)), se, n, len(logs)


def _mean_se(values) -> tuple[float, float, int]:
    """Mean of a series, its standard error (NaN below two values) and its length."""
    n = len(values)
    if n == 0:
        return math.nan, math.nan, 0
    return float(values.mean()), float(values.std(ddof=1) / math.sqrt(n)) if n > 1 else math.nan, n


def seed_curves(df, by: Sequence[str] = ("variant", "dataset", "partition")):
    """Long frame of every run's test curve (``seed``, ``round``, ``accuracy``, ``held``) for
    averaging over seeds: a run the stopping rule ended early holds its last accuracy (``held``)
    at the later evaluated rounds of the longest run in its ``by`` group, since its model no
    longer changes; each round's mean is then over the same seeds, not over the runs still going."""
    import pandas as pd

    rows = []
    for _, group in df.groupby(list(by), sort=False):
        rounds = sorted({point[0] for curve in group["curve"] for point in curve})
        for r in group[group["curve"].map(len) > 0].itertuples():
            own = {rnd: acc for rnd, acc, *_ in r.curve}
            stop, final = r.curve[-1][0], r.curve[-1][1]
            for rnd in rounds:
                if rnd in own or rnd > stop:
                    rows.append({**{k: getattr(r, k) for k in by}, "seed": r.seed, "round": rnd,
                                 "accuracy": own.get(rnd, final), "held": rnd not in own})
    return pd.DataFrame(rows)
