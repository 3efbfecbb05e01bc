"""Figure 10 (ChainFed's GPO weight λ and FOAT threshold τ on the decoder) and Appendix F.2
(ChainFed vs Full Adapters on MMLU on each decoder): the profiles, every config derived from
Table 3's (:func:`chainfed_core.instruct_table.run_config`), the records (reused, run, or
"not run" with the reason) and their rows; the notebooks ``fig10_llm_sensitivity`` and
``appF2_generalization`` only call these.

Every config is Table 3's at the profile with a few fields changed, so runs share the record
machinery (:func:`chainfed_core.experiments.ensure_run`) and root ``results/runs/<table 3
profile>``: the λ = 0.2 / τ = 0.8 point and F.2's SmolLM2-135M rows *are* Table 3's records
(same config, same hash). Runs made here score MMLU alone; a record that scored more (Table
3's) is reused if it scored MMLU on the same questions.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from .config import RunConfig
from .experiments import config_hash, deep_merge
from . import instruct_table as it

SWEEPS = {"lambda": "gpo_lambda", "tau": "foat_tau"}            # the sweep's name -> ChainConfig field
BASE_VARIANT = "ChainFed W=2"                                    # Table 3's variant the sweeps start from
F2_VARIANTS = ("Full Adapters", "ChainFed W=2")
DECODERS = ("smollm2-135m", "gemma3-270m", "qwen2.5-coder-0.5b")   # F.2's decoders (asset names)
NOT_RUN = "not run"
TOO_FEW = "fewer than two values run"
PAPER_LAMBDAS = (0.0, 0.1, 0.2, 0.5, 1.0)                        # Figure 9's set (Section 5.5)
# Figure 10's τ values are not in the text; Section 5.6's set {1.0, 0.9, 0.8} and two below it,
# so that an optimum at 0.8 is an inner point
PAPER_TAUS = (0.6, 0.7, 0.8, 0.9, 1.0)
_TINY = {"smollm2-135m": {"model": "tiny-llama-L4-H32"}, "gemma3-270m": {"model": "tiny-gemma3-L4-H32"},
         "qwen2.5-coder-0.5b": {"model": "tiny-qwen2-L4-H32"}}
PROFILES: dict[str, dict[str, Any]] = {
    "quick": {"help": "CI-sized, on Table 3's quick runs (a random tiny LLaMA over byte tokens, 48 Alpaca records, "
                      "2 rounds of 2 local steps, MMLU on 8 questions); F.2's Gemma 3 and Qwen2.5 roles are random "
                      "tiny Gemma 3 and Qwen2 decoders of the same size. "
                      "Seconds a run; the numbers mean nothing.",
              "table3": "quick", "evals": {"mmlu": 8}, "seeds": (0,), "lambda": (0.0, 0.2, 1.0),
              "tau": (0.6, 0.8, 1.0), "decoders": _TINY},
    # sized from chainfed_core.instruct_cost's measured step ratios and Table 3's cpu records (README of each notebook)
    "cpu": {"help": "Table 3's cpu runs (SmolLM2-135M, 20 clients, 2 a round, 29 rounds of 10 local AdamW steps of "
                    "2 x 192 tokens, one thread), MMLU's 282 questions. Figure 10: λ {0, 0.2, 0.5, 1.0}, τ {0.6, 0.7, "
                    "0.8, 1.0}, six new runs of about 20 min: about 2.0 h on one core. F.2: SmolLM2 is Table 3's runs; "
                    "Gemma 3 270M 17 rounds, Qwen2.5-Coder-0.5B 23 (W = 2's window visits each layer once) of 3 local "
                    "steps, a step measured at 2.5x / 6.5x (Full Adapters / ChainFed) and 3.4x / 4.3x SmolLM2's: "
                    "about 1.9 h on one core.",
            "table3": "cpu", "evals": {"mmlu": None}, "seeds": (0,), "lambda": (0.0, 0.2, 0.5, 1.0),
            "tau": (0.6, 0.7, 0.8, 1.0),
            "decoders": {"smollm2-135m": {}, "gemma3-270m": {"rounds": 17, "local_steps": 3},
                         "qwen2.5-coder-0.5b": {"rounds": 23, "local_steps": 3}}},
    "gpu-full": {"help": "Table 3's gpu-full runs (the paper's step: batch 16 of 512 tokens, 10 local AdamW steps, "
                         "20 clients, 2 a round, 30 rounds), every MMLU question; λ in {0, 0.1, 0.2, 0.5, 1.0}, "
                         "τ in {0.6, 0.7, 0.8, 0.9, 1.0}; F.2's three decoders at the same settings.",
                 "table3": "gpu-full", "evals": {"mmlu": None}, "seeds": (0,), "lambda": PAPER_LAMBDAS,
                 "tau": PAPER_TAUS, "decoders": {d: {} for d in DECODERS}},
}
PROFILES["cpu-full"] = PROFILES["cpu"]


def profile(name: str) -> dict[str, Any]:
    if name not in PROFILES:
        raise ValueError(f"profile: {name!r} is not one of {list(PROFILES)}")
    return dict(PROFILES[name])


def root_of(profile_name: str, repo: str | Path = "..") -> Path:
    """The run root the profile shares with Table 3's: ``results/runs/<table 3 profile>``."""
    return Path(repo) / "results" / "runs" / profile(profile_name)["table3"]


# ---------------------------------------------------------------------- configs
def check_values(sweep: str, values) -> tuple[float, ...]:
    """The sweep's values as floats, or a ValueError naming the field: λ in [0, 1], τ in (0, 1]."""
    if sweep not in SWEEPS:
        raise ValueError(f"sweep: {sweep!r} is not one of {list(SWEEPS)}")
    where, allowed = f"{sweep} sweep (ChainConfig.{SWEEPS[sweep]})", "[0, 1]" if sweep == "lambda" else "(0, 1]"
    values = list(values) if values is not None else []
    if not values or len(set(values)) != len(values):
        raise ValueError(f"{where}: {values} must be distinct values, at least one")
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or math.isnan(v):
            raise ValueError(f"{where}: {v!r} is not a number")
        if not ((v >= 0 if sweep == "lambda" else v > 0) and v <= 1):
            raise ValueError(f"{where}: {v} is outside {allowed}")
    return tuple(float(v) for v in values)


def derived(config: RunConfig, **sections: dict) -> RunConfig:
    """``config`` with some fields of its sections changed (``chain={"gpo_lambda": 0.5}``)."""
    return RunConfig.from_dict(deep_merge(config.to_dict(), sections))


def base_config(profile_name: str, seed: int = 0) -> RunConfig:
    """Table 3's ChainFed W = 2 config at the profile: the sweeps' shared point."""
    return it.run_config(profile(profile_name)["table3"], BASE_VARIANT, seed)


def sweep_configs(profile_name: str, sweep: str, values=None, *, seed: int = 0,
                  chain: dict | None = None) -> dict[float, RunConfig]:
    """One config per value of the sweep (default: the profile's), Table 3's W = 2 config with
    the swept ChainConfig field set (and ``chain``'s fields, the same for every point)."""
    values = check_values(sweep, profile(profile_name).get(sweep) if values is None else values)
    base = base_config(profile_name, seed)
    return {v: derived(base, chain={**(chain or {}), SWEEPS[sweep]: v}) for v in values}


def decoder_config(profile_name: str, decoder: str, variant: str, seed: int = 0) -> RunConfig:
    """F.2's config of ``variant`` on ``decoder``: Table 3's at the profile with the decoder's
    model (the decoder's asset, or the profile's stand-in for it) and rounds / local steps where
    the profile sets them; SmolLM2's (Table 3's model) is Table 3's config itself."""
    p = profile(profile_name)
    if decoder not in p["decoders"]:
        raise ValueError(f"decoder: {decoder!r} is not one of {list(p['decoders'])}")
    if variant not in F2_VARIANTS:
        raise ValueError(f"variant: {variant!r} is not one of {list(F2_VARIANTS)}")
    base, over = it.run_config(p["table3"], variant, seed), p["decoders"][decoder]
    sections: dict[str, dict] = {}
    if over.get("model", decoder) != base.model.name:
        sections["model"] = {"name": over.get("model", decoder)}
    if "rounds" in over:
        sections["fed"] = {"rounds": over["rounds"], "eval_every": min(base.fed.eval_every, over["rounds"])}
    if "local_steps" in over:
        sections["train"] = {"local_steps": over["local_steps"]}
    return derived(base, **sections) if sections else base


# ---------------------------------------------------------------------- records
def scored(record: dict, evals: dict) -> bool:
    """Whether a record's final evaluation scored every suite of ``evals`` on as many questions."""
    done = record.get("final_eval", {}).get("evals") or {}
    return all(name in done and done[name] == limit for name, limit in evals.items())


def outcome(config: RunConfig, root: str | Path, evals: dict, *, run_missing: bool = True,
            progress: bool = False) -> dict:
    """``{"status", "reason", "record"}`` of one config: its record under ``root`` if there
    (it must have scored ``evals``), else run (``run_missing``), else "not run"; a model or
    data set that cannot be had (:class:`~chainfed_core.assets.AssetError`) is "not run" with it."""
    import json

    from .assets import AssetError
    from .records import RECORD_FILE

    path = Path(root) / config_hash(config) / RECORD_FILE
    if not path.exists() and not run_missing:
        return {"status": NOT_RUN, "reason": "no record (run_missing=False)", "record": None}
    if path.exists() and not scored(found := json.loads(path.read_text()), evals):
        raise ValueError(f"{path} scored {found.get('final_eval', {}).get('evals')}, this profile asks for "
                         f"{evals}; remove its folder to rerun it")
    try:
        record = it.ensure_instruct(config, root, evals, progress=progress)
    except AssetError as err:
        return {"status": NOT_RUN, "reason": f"AssetError: {err}", "record": None}
    return {"status": record.get("status", "done"), "reason": record.get("reason", ""), "record": record}


def scores(record: dict | None) -> dict[str, float]:
    """MMLU (subject average and micro, %), its questions, and the last held-out response loss."""
    mmlu = (record or {}).get("final_eval", {}).get("mmlu") or {}
    last = ((record or {}).get("history") or [{}])[-1]
    pct = lambda key: math.nan if mmlu.get(key) is None else 100 * mmlu[key]  # noqa: E731
    loss = last.get("test_loss")
    return {"MMLU": pct("subject_average"), "MMLU micro": pct("micro_accuracy"),
            "questions": len(mmlu.get("predictions", [])) or math.nan,
            "held-out loss": math.nan if loss is None else loss}


def row(config: RunConfig, out: dict, **labels) -> dict:
    """One tidy row: the labels, the scores, FOAT's start layer, rounds, seconds, status and run id."""
    rec = out["record"] or {}
    return {**labels, **scores(out["record"]), "start_layer": rec.get("start_layer"),
            "rounds": len(rec.get("history", [])) or math.nan, "local_steps": config.train.local_steps,
            "wall_s": rec.get("wall_s", math.nan), "status": out["status"], "reason": out["reason"],
            "run_id": config_hash(config)}


# ---------------------------------------------------------------------- Figure 10
def sweep_runs(profile_name: str, sweep: str, values=None, *, chain: dict | None = None) -> list[tuple[dict, RunConfig]]:
    """(labels, config) of every (value, seed) of a sweep; every value is checked first."""
    seeds = profile(profile_name)["seeds"]
    return [({sweep: v, "seed": seed}, cfg) for seed in seeds
            for v, cfg in sweep_configs(profile_name, sweep, values, seed=seed, chain=chain).items()]


def frame_of(profile_name: str, runs: list[tuple[dict, RunConfig]], root: str | Path, *,
             run_missing: bool = True, progress: bool = False):
    """One row per run (:func:`row`), each read back, run, or "not run"."""
    import pandas as pd

    evals = profile(profile_name)["evals"]
    return pd.DataFrame([row(cfg, outcome(cfg, root, evals, run_missing=run_missing, progress=progress), **labels)
                         for labels, cfg in runs])


def start_layers(record: dict | None, taus) -> dict[float, int | None]:
    """The start layer FOAT picks at each τ from one run's scores (FOAT profiles the untrained
    model before any round, so its scores do not depend on λ or τ; the start layer alone does)."""
    from .foat import start_layer

    found = (record or {}).get("foat_scores")
    return {t: (start_layer(found, t) if found else None) for t in taus}


def mean_over_seeds(frame, key: str, columns=("MMLU", "MMLU micro", "held-out loss")):
    """Mean, standard deviation and count over seeds of each column, by ``key`` (runs with a record)."""
    return frame[frame["status"] == "done"].groupby(key)[list(columns)].agg(["mean", "std", "count"])


def best(frame, key: str, column: str, lowest: bool = False):
    """The value of ``key`` with the best mean ``column`` over the runs done: a float, the
    values tied at the best as a string ("0, 0.2 (tied)"), or None where fewer than two values
    were done (nothing to compare)."""
    done = frame[frame["status"] == "done"].groupby(key)[column].mean().dropna()
    if len(done) < 2:
        return None
    top = done.min() if lowest else done.max()
    tied = [float(v) for v in done.index[done == top]]
    return tied[0] if len(tied) == 1 else ", ".join(f"{v:g}" for v in tied) + " (tied)"


def fig10_shape(lam, tau) -> "Any":
    """Ours beside the paper's text: the best λ and τ by MMLU and by held-out loss (where at
    least two values were run)."""
    import pandas as pd

    from . import paper

    ours = {"best λ": [best(lam, "lambda", "MMLU"), best(lam, "lambda", "held-out loss", lowest=True)],
            "best τ": [best(tau, "tau", "MMLU"), best(tau, "tau", "held-out loss", lowest=True)]}
    frame = pd.DataFrame(ours, index=["ours, by MMLU", "ours, by held-out loss"], dtype=object)
    frame.loc["paper (LLaMA2-7B, Figure 10)"] = [paper.TEXT["fig10_best_lambda"].value,
                                                 paper.TEXT["fig10_best_tau"].value]
    return frame.where(frame.notna(), TOO_FEW)


# ---------------------------------------------------------------------- Appendix F.2
def f2_runs(profile_name: str, decoders=None) -> list[tuple[dict, RunConfig]]:
    """(labels, config) of Full Adapters and ChainFed W = 2 on each decoder, per seed."""
    p = profile(profile_name)
    configs = [(d, v, s, decoder_config(profile_name, d, v, s)) for d in (decoders or p["decoders"])
               for v in F2_VARIANTS for s in p["seeds"]]
    return [({"decoder": d, "model": cfg.model.name, "variant": v, "seed": s}, cfg) for d, v, s, cfg in configs]


def f2_table(frame):
    """Per decoder: MMLU of Full Adapters and ChainFed W = 2 (%, mean over seeds), the gain in
    points, and what one question is worth in points of micro accuracy."""
    import pandas as pd

    done = frame[frame["status"] == "done"]
    rows = []
    for decoder in dict.fromkeys(frame["decoder"]):
        by = done[done["decoder"] == decoder].groupby("variant")
        mmlu, micro = by["MMLU"].mean(), by["MMLU micro"].mean()
        full, chain = (mmlu.get(v, math.nan) for v in F2_VARIANTS)
        questions = done[done["decoder"] == decoder]["questions"].max()
        reasons = frame[(frame["decoder"] == decoder) & (frame["status"] != "done")]["reason"]
        model = frame.loc[frame["decoder"] == decoder, "model"].iloc[0]
        rows.append({"decoder": decoder, "model": model, "Full Adapters": full, "ChainFed W=2": chain, "gain": chain - full,
                     "Full Adapters micro": micro.get(F2_VARIANTS[0], math.nan),
                     "ChainFed W=2 micro": micro.get(F2_VARIANTS[1], math.nan),
                     "one question (pts)": 100 / questions if questions == questions else math.nan,
                     "not run": "; ".join(dict.fromkeys(reasons))})
    return pd.DataFrame(rows).set_index("decoder")


def f2_claim(table) -> str:
    """A plain sentence per decoder: does ChainFed W = 2 reach Full Adapters on MMLU here, by how much."""
    parts = []
    for decoder, r in table.iterrows():
        if math.isnan(r["gain"]):
            parts.append(f"{decoder}: {NOT_RUN}" + (f" ({r['not run']})" if r["not run"] else ""))
            continue
        verdict = "holds" if r["gain"] > 0 else "holds, equal" if r["gain"] == 0 else "does not hold"
        parts.append(f"{decoder}: ChainFed W=2 {r['ChainFed W=2']:.2f} vs Full Adapters {r['Full Adapters']:.2f} "
                     f"({r['gain']:+.2f} points, {verdict}; one question is {r['one question (pts)']:.2f} points of micro accuracy)")
    return "ChainFed >= Full Adapters on MMLU (subject average, %): " + "; ".join(parts) + "."


def f2_paper():
    """The paper's MMLU gains of ChainFed over Full Adapters: App. F.2's sentences (TinyLLaMA,
    LLaMA3.2-3B; the window's size was lost from the text) and Table 3's W = 2 rows."""
    import pandas as pd

    from . import paper

    rows = [("TinyLLaMA", "App. F.2", paper.TEXT["appF2_tinyllama_mmlu_gain"].value),
            ("LLaMA3.2-3B", "App. F.2", paper.TEXT["appF2_llama32_3b_mmlu_gain"].value)]
    for model in paper.TABLE3_MODELS:
        full, chain = (paper.TABLE3[(model, v)]["MMLU"].value for v in F2_VARIANTS)
        rows.append((model, "Table 3, W = 2", round(chain - full, 2)))
    return pd.DataFrame(rows, columns=["model", "source", "ChainFed − Full Adapters (MMLU pts)"]).set_index("model")


# ---------------------------------------------------------------------- the cpu estimate
def estimate(profile_name: str, runs: list[tuple[dict, RunConfig]], root: str | Path, cost: dict | None):
    """The estimated wall time of each run without a record
    (:func:`chainfed_core.instruct_cost.estimate_seconds`, from Table 3's record of the same
    method at the profile); NaN where that record or the decoder's measured cost is missing."""
    import json

    import pandas as pd

    from .instruct_cost import estimate_seconds
    from .records import RECORD_FILE

    p = profile(profile_name)
    bases = {}
    for variant in F2_VARIANTS:
        path = Path(root) / config_hash(it.run_config(p["table3"], variant)) / RECORD_FILE
        bases[it.VARIANTS[variant][0]] = json.loads(path.read_text()) if path.exists() else None
    rows = []
    for labels, cfg in runs:
        if (Path(root) / config_hash(cfg) / RECORD_FILE).exists():
            continue
        base = bases.get(cfg.method)
        known = base is not None and cost is not None and cfg.model.name in cost["ratio_to_base"]
        seconds = estimate_seconds(cfg, base, cost, p["evals"].get("mmlu")) if known else math.nan
        rows.append({**labels, "run_id": config_hash(cfg), "estimated_s": seconds})
    labels = dict.fromkeys(k for lab, _ in runs for k in lab)
    return pd.DataFrame(rows, columns=[*labels, "run_id", "estimated_s"])


# ---------------------------------------------------------------------- figures
def axis_limits(values, min_span: float, bounds: tuple[float, float] | None = None) -> tuple[float, float]:
    """Limits around ``values`` at least ``min_span`` wide (so a small difference is drawn
    small), shifted to stay within ``bounds`` (e.g. 0-100 %) where given."""
    finite = [float(v) for v in values if v == v]
    if not finite:
        return bounds or (0.0, 1.0)
    low, high = min(finite), max(finite)
    pad = max(min_span - (high - low), 0.0) / 2 + 0.05 * max(high - low, min_span)
    low, high = low - pad, high + pad
    if bounds is not None:
        shift = max(bounds[0] - low, 0.0) - max(high - bounds[1], 0.0)
        low, high = max(low + shift, bounds[0]), min(high + shift, bounds[1])
    return low, high


def plot_sweep(ax, frame, key: str, column: str, *, min_span: float, xlabel: str, chance: float | None = None,
               bounds: tuple[float, float] | None = None):
    """Mean ``column`` by ``key`` over the runs done, error bars (standard deviation) only where
    there are several seeds; limits at least ``min_span`` wide (within ``bounds``) around the points
    of every panel that shares the y axis; the values not run named under the axis."""
    stats = mean_over_seeds(frame, key, (column,))[column] if len(frame) else None
    if stats is not None and len(stats):
        err = stats["std"].where(stats["count"] > 1)
        ax.errorbar(stats.index, stats["mean"], yerr=None if err.isna().all() else err.fillna(0.0),
                    marker="o", capsize=3)
        drawn = [y for a in ax.get_shared_y_axes().get_siblings(ax) for line in a.get_lines()
                 for y in line.get_ydata() if line.get_marker() == "o"]    # a shared y axis: every panel's points
        ax.set_ylim(*axis_limits(drawn, min_span, bounds))
    if chance is not None:
        ax.axhline(chance, color="grey", linestyle=":", linewidth=1)
    swept, missing = sorted(frame[key].unique()), sorted(frame.loc[frame["status"] != "done", key].unique())
    if swept:     # the whole sweep on the x axis, the points run or not
        pad = 0.05 * max(swept[-1] - swept[0], 0.1)
        ax.set_xticks(swept, [f"{v:g}" for v in swept])
        ax.set_xlim(swept[0] - pad, swept[-1] + pad)
    ax.set(xlabel=xlabel + (f"\n{NOT_RUN}: {', '.join(f'{v:g}' for v in missing)}" if missing else ""))


def plot_f2(ax, table, chance: float | None = 25.0):
    """MMLU of both variants per decoder as bars from 0 (a decoder not run: no bar, named)."""
    import numpy as np

    x, width = np.arange(len(table)), 0.38
    for k, variant in enumerate(F2_VARIANTS):
        values = table[variant].to_numpy(dtype=float)
        if not np.isnan(values).all():
            ax.bar(x + (k - 0.5) * width, np.nan_to_num(values), width, label=variant)
    labels = [d + ("" if table.loc[d, "model"] == d else f"\n({table.loc[d, 'model']})")
              + (f"\n({NOT_RUN})" if table.loc[d, [*F2_VARIANTS]].isna().all() else "") for d in table.index]
    ax.set_xticks(x, labels)
    if chance is not None:
        ax.axhline(chance, color="grey", linestyle=":", linewidth=1, label="chance (4 choices)")
    ax.set_ylim(0, max(50.0, float(np.nanmax(table[[*F2_VARIANTS]].to_numpy(dtype=float), initial=0)) + 10))
    ax.set_ylabel("MMLU, subject average (%)")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0))


def sweep_summary(frames: dict) -> "Any":
    """One row per swept value (``lambda=0.2``, ``tau=0.8``): MMLU, micro and held-out loss,
    mean / std / count over the seeds done (the notebook's machine-readable table)."""
    import pandas as pd

    parts = []
    for key, frame in frames.items():
        stats = mean_over_seeds(frame, key)
        stats.index = [f"{key}={v}" for v in stats.index]
        parts.append(stats)
    return pd.concat(parts) if parts else pd.DataFrame()
