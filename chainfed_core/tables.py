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
    blocked = set(_could_not_run(df, [*cells, "variant"]))
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


def _could_not_run(df, by: Sequence[str]) -> list[tuple]:
    """The ``by`` groups in which every run's record says no device could hold the method."""
    if "status" not in df:
        return []
    flags = df.assign(blocked=df["status"] == "could not run").groupby(list(by), sort=False)["blocked"].all()
    return [k for k, v in flags.items() if v]
