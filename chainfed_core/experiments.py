"""Experiment grids for the paper's tables and figures: build, run what is missing, tabulate.

A notebook names a profile (``quick``, ``cpu-full``, ``gpu-full``: :data:`PROFILES`, the one
place run sizes live) and a list of method variants (:data:`VARIANTS`), and gets back one
tidy row per run:

    runs = grid("quick", ["ChainFed", "Full Adapters"])      # list[Run]
    df = run_grid(runs, "../results/runs/quick")              # runs only what is missing
    tables.versus(df, "Full Adapters")                        # speed-up, communication reduction

Each run lives in ``<root>/<config_hash(config)>/`` (checkpoint, metrics.jsonl, record.json).
A folder whose ``record.json`` holds the same config is reused as is; a folder with only a
checkpoint is resumed by :func:`chainfed_core.federated.run`. Notebooks share one root per
profile, so a configuration that appears in two artefacts (Full Adapters in Tables 1 and 2,
tau = 1.0 and "w/o FOAT") runs once.

The paper's baselines the registry does not hold yet (:func:`missing_baselines`) appear in
tables as "not yet run", never as numbers.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

from .config import RunConfig
from .records import RECORD_FILE, atomic_write_json, code_version

NOT_YET_RUN = "not yet run"
COULD_NOT_RUN = "could not run"     # a record's status where no device could hold the method
PAPER_BASELINES = ("FedAdapter", "C2A", "FwdLLM", "FedKSeed", "FLoRA", "FedRA")   # Table 1's, by variant name

from .profiles import BOUNDS, MEMORY_AWARE, PROFILES, UNCONSTRAINED, profile  # noqa: F401 (the grid's names)


# ---------------------------------------------------------------------- variants
@dataclass(frozen=True)
class Variant:
    """A named method setting: the RunConfig method plus partial-config overrides."""
    name: str
    method: str
    overrides: dict = field(default_factory=dict)


def chainfed(name: str, **chain: Any) -> Variant:
    """A ChainFed variant that changes ChainConfig fields, e.g. ``chainfed("tau=0.8", foat_tau=0.8)``."""
    return Variant(name, "chainfed", {"chain": chain})


def _registered_variants() -> dict[str, Variant]:
    """Every registered method's named settings (``Method.variants``), in registry order."""
    from .methods import get_method, method_names
    return {name: Variant(name, m, overrides) for m in method_names()
            for name, overrides in get_method(m).variants.items()}


VARIANTS: dict[str, Variant] = _registered_variants()


def missing_baselines() -> list[str]:
    """The paper's baselines that no registered method provides yet (by variant name)."""
    variants = _registered_variants()
    return [name for name in PAPER_BASELINES if name not in variants]


def variant(v: str | Variant) -> Variant:
    """A variant by name, looked up in the registry as it is now (methods registered after
    import count too), or a :class:`Variant` as it is."""
    if isinstance(v, Variant):
        return v
    variants = _registered_variants()
    if v not in variants:
        raise ValueError(f"variant: {v!r} is not one of {list(variants)} (or pass a Variant)")
    return variants[v]


# ---------------------------------------------------------------------- the grid
@dataclass
class Run:
    """One cell of a grid: its labels and its full config; ``evals``: the suites (name -> questions)
    an instruction-tuning run's final evaluation scores (:func:`chainfed_core.instruct_table.ensure_instruct`),
    None for a classification run."""
    variant: str
    model: str
    dataset: str
    partition: str
    seed: int
    config: RunConfig
    evals: dict | None = None

    @property
    def run_id(self) -> str:
        return config_hash(self.config)


def config_hash(config: RunConfig | dict) -> str:
    """Short stable id of a config: sha256 of its canonical JSON (sorted keys), 12 hex digits."""
    data = config.to_dict() if isinstance(config, RunConfig) else config
    blob = json.dumps(data, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def deep_merge(base: dict, *updates: dict) -> dict:
    """``base`` updated by each of ``updates`` in turn, nested dicts merged key by key (copies)."""
    out = copy.deepcopy(base)
    for update in updates:
        for key, value in (update or {}).items():
            if isinstance(value, dict) and isinstance(out.get(key), dict):
                out[key] = deep_merge(out[key], value)
            else:
                out[key] = copy.deepcopy(value)
    return out


@functools.lru_cache(maxsize=None)
def num_layers(model_name: str) -> int:
    """Transformer layers of a model asset (``tiny-*`` names read from the name)."""
    if model_name.startswith("tiny"):
        from .task import tiny_spec
        return tiny_spec(model_name)["num_layers"]
    return int(model_config(model_name).num_hidden_layers)


def grid(profile_name: str, variants: Iterable[str | Variant], *, models: Optional[list[str]] = None,
         datasets: Optional[list[str]] = None, partitions: Optional[list[str]] = None,
         seeds: Optional[list[int]] = None, overrides: Optional[dict] = None) -> list[Run]:
    """Every (variant, model, dataset, partition, seed) of a profile as a :class:`Run`.

    ``models``/``datasets``/``partitions``/``seeds`` default to the profile's; ``overrides``
    is a partial RunConfig dict applied last (to every run).
    """
    p = profile(profile_name)
    runs = []
    for v in map(variant, variants):
        for model in models or p["models"]:
            for dataset in datasets or p["datasets"]:
                for part in partitions or p["partitions"]:
                    for seed in seeds if seeds is not None else p["seeds"]:
                        cell = {"method": v.method, "seed": seed, "model": {"name": model},
                                "data": {"dataset": dataset, "partition": part}}
                        bound = {"fed": UNCONSTRAINED} if p["memory_aware"] and v.name in BOUNDS else {}
                        data = deep_merge(p["base"], cell, bound, v.overrides, overrides or {})
                        fed = data.setdefault("fed", {})
                        if "rounds" not in fed:
                            fed["rounds"] = data.get("chain", {}).get("passes", 1) * num_layers(model)
                        runs.append(Run(v.name, model, dataset, part, seed, RunConfig.from_dict(data)))
    return runs


# ---------------------------------------------------------------------- running
def ensure_run(config: RunConfig, root: str | Path, *, runner: Callable | None = None,
               progress: bool = False) -> dict:
    """The record of ``config`` under ``root``: reused if complete, else run (or resumed)."""
    folder = Path(root) / config_hash(config)
    path = folder / RECORD_FILE
    if path.exists():
        record = json.loads(path.read_text())
        if record.get("status") == "failed":
            raise ValueError(f"{path} records a failed run ({record['failures'][-1]['message'] if record.get('failures') else 'every client failed'}); "
                             "remove the folder to rerun it")
        if record.get("config") == config.to_dict():
            return record
        raise ValueError(f"{path} holds a different config than its hash names; remove the folder to rerun it")
    if runner is None:
        from .federated import run as runner
    from .server import NoEligibleClient

    try:
        return runner(config, folder, progress=progress)
    except NoEligibleClient as error:             # the paper's "—": recorded, so the grid need not ask again
        record = {"config": config.to_dict(), "status": COULD_NOT_RUN, "reason": str(error), "history": [],
                  "code_version": code_version()}
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, record)
        return record


def run_grid(runs: list[Run], root: str | Path, *, progress: bool = True, runner: Callable | None = None,
             run_missing: bool = True):
    """Run what is missing of ``runs`` under ``root``; one tidy DataFrame row per run (:func:`summarise`).

    ``run_missing=False`` trains nothing: the runs without a record are left out of the frame
    and counted per variant in one printed line (tables then read "not run" there).
    """
    import pandas as pd
    from tqdm.auto import tqdm

    done = {rid for rid in {r.run_id for r in runs} if (Path(root) / rid / RECORD_FILE).exists()}
    if not run_missing:
        skipped = [r.variant for r in runs if r.run_id not in done]
        if skipped:
            counts = {v: skipped.count(v) for v in dict.fromkeys(skipped)}
            print("not run yet (run_missing=False): " + ", ".join(f"{v} x {n}" for v, n in counts.items()))
        runs = [r for r in runs if r.run_id in done]
    bar = tqdm(runs, desc=f"grid ({len(done)} of {len(runs)} cached)", disable=not progress)
    rows = []
    for run in bar:
        bar.set_postfix_str(f"{run.variant} | {run.model} {run.dataset} {run.partition} s{run.seed}")
        rows.append(summarise(run, ensure_run(run.config, root, runner=runner, progress=progress)))
    return pd.DataFrame(rows)


# ---------------------------------------------------------------------- metrics
def summarise(run: Run, record: dict) -> dict[str, Any]:
    """Final metrics of a run: accuracy, communication, analytic peak memory and the test curve.

    ``curve`` holds (round, test accuracy, cumulative bytes up + down) at every evaluated
    round; bytes count the window sent down, any context tensors, and the updates sent up;
    ``costs`` the same with the cumulative client training seconds as a fourth item. The
    ``*_to_converge`` columns count rounds, bytes and client seconds up to the run's
    convergence round (:func:`chainfed_core.convergence.convergence_round`).
    """
    from .convergence import convergence_round, cost_until

    history = record.get("history", [])
    total, seconds, curve, costs = 0, 0.0, [], []
    for m in history:
        total += m.get("bytes_up", 0) + m.get("bytes_down", 0) + m.get("bytes_down_context", 0)
        seconds += m.get("seconds_train", 0.0)
        if "test_accuracy" in m:
            curve.append((m["round"] + 1, m["test_accuracy"], total))
            costs.append((m["round"] + 1, m["test_accuracy"], total, seconds))
    converged = cost_until(history, convergence_round(history, run.config.fed.stop_tolerance))
    cfg = run.config
    return {"variant": run.variant, "method": cfg.method, "model": run.model, "dataset": run.dataset,
            "partition": run.partition, "seed": run.seed, "run_id": run.run_id,
            "status": record.get("status", "complete"), "eligible_clients": record.get("eligible_clients"),
            "accuracy": curve[-1][1] if curve else math.nan, "rounds": len(history), "bytes_total": total,
            "peak_memory_bytes": peak_memory_bytes(cfg, record.get("held_window") or record.get("window") or cfg.chain.window),
            "stopped": record.get("stopped"), "rounds_to_converge": converged["rounds"],
            "test_examples": _test_examples(record, cfg),
            "bytes_to_converge": converged["bytes"], "client_s_to_converge": converged["client_seconds"],
            "costs": costs,
            "start_layer": record.get("start_layer"), "window": record.get("window"),
            "wall_s": record.get("wall_s"), "curve": curve}


@functools.lru_cache(maxsize=None)
def model_config(model_name: str, num_labels: int = 2):
    """The HF config of a model by its name (an asset, or a ``tiny-...`` model built from a config), cached."""
    if model_name.startswith("tiny"):
        from .task import tiny_spec
        from .tiny import tiny_config
        spec = tiny_spec(model_name)
        return tiny_config(spec["family"], spec["num_layers"], spec["hidden"], num_labels)
    from transformers import AutoConfig

    from .assets import model_path
    return AutoConfig.from_pretrained(model_path(model_name), num_labels=num_labels)


def peak_memory_bytes(config: RunConfig, window: int | None = None) -> int:
    """Peak memory of one client (:meth:`chainfed_core.methods.Method.peak_bytes`), the
    estimate the simulator selects clients with (ChainFed streamed; every other method holds
    the whole model). The sequence length is the tokenizer's ``max_length``, an upper bound
    on the padded batches.
    """
    from .methods import get_method

    w = min(window or config.chain.window, num_layers(config.model.name))
    return get_method(config.method).peak_bytes(
        model_config(config.model.name), w, batch_size=config.train.batch_size, seq_len=config.model.max_length,
        bottleneck=config.adapter.bottleneck, optimizer=config.train.optimizer, dtype=config.model.dtype).total


# ---------------------------------------------------------------------- tables
def accuracy_table(df, variants: list[str], index: list[str] | None = None,
                   not_implemented: Iterable[str] | None = None):
    """Mean test accuracy (%) over seeds: one row per ``index`` cell, one column per variant,
    then a "not yet run" column for each baseline the project has not implemented."""
    index = index or ["model", "dataset", "partition"]
    table = (df.groupby(index + ["variant"])["accuracy"].mean().mul(100).round(2)
             .unstack("variant").reindex(columns=variants))
    table = table.astype(object)
    for name in (missing_baselines() if not_implemented is None else not_implemented):
        table[name] = NOT_YET_RUN
    return table


def mean_over_seeds(df, metrics: list[str], by: list[str]):
    """Mean of ``metrics`` over seeds (and any label not in ``by``), in ``by``'s order."""
    return df.groupby(by, sort=False)[metrics].mean().reset_index()


SUMMARY_RUN_COLUMNS = ("run_id", "variant", "model", "dataset", "partition", "seed", "status", "accuracy", "test_examples",
                       "eligible_clients", "window", "start_layer", "peak_memory_bytes", "rounds", "stopped",
                       "speedup", "compute_ratio", "comm_reduction", "speedup_to_baseline",
                       "comm_reduction_to_baseline", "lambda", "local head")


def write_summary(path: str | Path, table, *, profile_name: str, artefact: str, runs=None, **extra: Any) -> dict:
    """The machine-readable summary of a notebook's final table, recommenders-style: a flat
    ``{"<row>/<column>": value}`` dict of numbers (cells that are not numbers are left out),
    with the profile, the artefact and the code version; ``runs`` (the grid's DataFrame) adds
    one row per run with :data:`SUMMARY_RUN_COLUMNS`, each naming its record (``run_id``), for
    the claims page's per-seed statistics. Written atomically; returned."""
    if runs is not None:
        cols = [c for c in SUMMARY_RUN_COLUMNS if c in runs]
        extra["runs"] = [{c: _plain(row[c]) for c in cols} for _, row in runs.iterrows()]
    metrics = {}
    for row, values in table.iterrows():
        row_key = "/".join(map(str, row)) if isinstance(row, tuple) else str(row)
        for col, value in values.items():
            col = "/".join(map(str, col)) if isinstance(col, tuple) else col
            if isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value):
                metrics[f"{row_key}/{col}"] = float(value)
    summary = {"artefact": artefact, "profile": profile_name, "code_version": code_version(),
               "metrics": metrics, **extra}
    atomic_write_json(path, summary)
    return summary


def output_dirs(artefact: str, profile_name: str, repo: str | Path = "..") -> dict[str, Path]:
    """Where a notebook writes: shared run records, its summary and its figures.

    Quick runs go to ``results/runs/quick``, ``results/<artefact>/quick`` and ``figures/quick``
    (all git-ignored); other profiles to ``results/runs/<profile>``, ``results/<artefact>/<profile>``
    and ``figures/``.
    """
    repo = Path(repo)
    dirs = {"runs": repo / "results" / "runs" / profile_name,
            "summary": repo / "results" / artefact / profile_name,
            "figures": repo / "figures" / ("quick" if profile_name == "quick" else "")}
    for d in dirs.values():
        d.mkdir(parents=True, exist_ok=True)
    return dirs


def _plain(value):
    """A JSON value: numpy scalars as Python numbers, NaN as None."""
    if hasattr(value, "item"):
        value = value.item()
    return None if isinstance(value, float) and math.isnan(value) else value


def _test_examples(record: dict, config: RunConfig) -> Optional[int]:
    """Test-set size: counted in the record's data provenance; for records made before it,
    ``data.max_test_examples`` (the packaged sets are larger than every profile's cap)."""
    counted = sum(record.get("data", {}).get("counts", {}).get("test", {}).values())
    return counted or config.data.max_test_examples
