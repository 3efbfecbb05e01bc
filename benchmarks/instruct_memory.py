"""Memory reduction of ChainFed W = 2 over Full Adapters on real decoder weights, measured beside the model.

For SmolLM2-135M and Qwen2.5-Coder-1.5B (real weights, float32), one client's local training at
Table 3's cpu step (batch 2 x 192 tokens, AdamW, adapters of bottleneck 64, GPO lambda 0.2; two
steps, so the second step's forward meets the first step's gradients and the optimizer state):

- Full Adapters: every part of the model resident (read from the layer store up front), every
  layer's adapter trained end to end;
- ChainFed W = 2 as deployed: layers streamed from the layer store with prefetch (memory-mapped),
  the window's input read from the frozen-prefix activation cache (one batch in memory, the rest
  on disk), the window at the chain's first position (the largest step: GPO's global branch runs
  through every later adapter and the head), as :func:`chainfed_core.memory_model.client_peak_bytes`
  prices a ChainFed client.

Each step runs in a fresh process (:func:`chainfed_core.rss.measure_rss`, one thread), one at a
time: the MemoryMeter's peak of live tensor bytes (by category) and the process's peak resident
set during the measured part (after the model is set up), beside the memory model's estimate of
the same step. The model's LM head is untied as the Table 3 runs untie it, and the layer store
(written once per model, in its own process) holds those weights.

    .venv/bin/python benchmarks/instruct_memory.py             # both models (Qwen2.5-1.5B: ~9 GB peak)
    .venv/bin/python benchmarks/instruct_memory.py --models smollm2-135m
Writes results/benchmarks/instruct_memory.json; needs the assets (qwen2.5-coder-1.5b is heavy:
``python -m chainfed_core.assets qwen2.5-coder-1.5b``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import torch

MODELS = ("smollm2-135m", "qwen2.5-coder-1.5b")
PROFILE, VARIANT = "cpu", "ChainFed W=2"         # Table 3's cpu step (chainfed_core.instruct_table)
LOCAL_STEPS = 2
OUT = Path("results/benchmarks/instruct_memory.json")
# The child processes import this file as ``instruct_memory`` from its folder: opacus installs a
# top-level ``benchmarks`` package that shadows this folder as ``benchmarks``.
HERE = Path(__file__).resolve().parent


def table3_step() -> dict:
    """Table 3's cpu step: batch, length, optimizer, learning rate, adapter size, GPO lambda, window."""
    from chainfed_core.instruct_table import run_config

    cfg = run_config(PROFILE, VARIANT)
    return {"batch_size": cfg.train.batch_size, "seq_len": cfg.model.max_length, "optimizer": cfg.train.optimizer,
            "lr": cfg.train.lr, "bottleneck": cfg.adapter.bottleneck, "lam": cfg.chain.gpo_lambda,
            "window": cfg.chain.window, "local_steps": LOCAL_STEPS}


def write_store(name: str, folder: str) -> dict:
    """The model's real weights, head untied, as a layer store (a fresh process; returns its size)."""
    from chainfed_core.backbone import load_backbone
    from chainfed_core.config import ModelConfig
    from chainfed_core.instruct_runs import untie_head
    from chainfed_core.layer_store import save_layer_store

    started = time.perf_counter()
    store = save_layer_store(untie_head(load_backbone(ModelConfig(name=name))), folder)
    return {"bytes": sum(store.nbytes(k) for k in store.manifest["shards"]), "family": store.family,
            "num_layers": store.num_layers, "vocab_size": store.hf_config().vocab_size,
            "seconds": time.perf_counter() - started}


def _rows(step: dict, vocab: int):
    from chainfed_core.instruct_cost import causal_rows

    return causal_rows(step["batch_size"] * step["local_steps"], step["seq_len"], vocab)


def _train_config(step: dict):
    from chainfed_core.config import TrainConfig

    return TrainConfig(optimizer=step["optimizer"], lr=step["lr"], batch_size=step["batch_size"],
                       local_steps=step["local_steps"])


def measured_step(store: str, method: str, step: dict) -> dict:
    """One client's training of ``method`` (``full_adapters`` or ``chainfed``) on the store's model,
    under the meter (a fresh process: the peak RSS covers this call after the model is set up)."""
    from chainfed_core.actcache import ActivationCache
    from chainfed_core.config import AdapterConfig
    from chainfed_core.memory_meter import metered_training
    from chainfed_core.methods import plan_for
    from chainfed_core.rss import current_rss, peak_rss, reset_peak_rss
    from chainfed_core.schedule import stage_at
    from chainfed_core.streaming import load_streamed

    chain = method == "chainfed"
    bb = load_streamed(store, prefetch=chain, resident="streamed" if chain else "all")
    bb.add_adapters(AdapterConfig(bottleneck=step["bottleneck"]))
    L = bb.num_layers
    stage = stage_at(0, L, 0, step["window"], 1) if chain else None
    plan = plan_for(method, L, stage, lam=step["lam"])
    data = _rows(step, bb.config.vocab_size)
    setup_rss = current_rss()
    reset_peak_rss()
    started = time.perf_counter()
    prefix = cache = None
    if chain:
        one_batch = step["batch_size"] * step["seq_len"] * bb.hidden_size * 4
        cache = ActivationCache(bb, max_memory_bytes=one_batch, folder=Path(store).parent / f"cache-{Path(store).name}")
        prefix = cache.prefix("client", data, plan)          # filled before the metered steps
        bb.follow(plan, cached=True)
    try:
        report, result = metered_training(bb, data, plan, _train_config(step), prefix=prefix, cache=cache)
    finally:
        bb.streamer.close()
    return {"meter": report.to_dict(), "loss": result.loss, "steps": result.steps, "setup_rss": setup_rss,
            "step_peak_rss": peak_rss(), "seconds": time.perf_counter() - started}


def estimates(name: str, step: dict) -> dict:
    """The memory model's estimate of both steps, as Table 3 prices them (client_peak_bytes)."""
    from chainfed_core.experiments import model_config
    from chainfed_core.memory_model import client_peak_bytes

    config = model_config(name)
    kw = dict(batch_size=step["batch_size"], seq_len=step["seq_len"], bottleneck=step["bottleneck"],
              optimizer=step["optimizer"])
    return {"full_adapters": client_peak_bytes(config, "full_adapters", 1, **kw).to_dict(),
            "chainfed": client_peak_bytes(config, "chainfed", step["window"], **kw).to_dict()}


def measure(name: str, folder: Path, step: dict) -> dict:
    """Store, then Full Adapters, then ChainFed, each in its own process, one after the other."""
    from chainfed_core.rss import measure_rss

    store = folder / name
    os.environ["PYTHONPATH"] = os.pathsep.join([str(HERE), *filter(None, [os.environ.get("PYTHONPATH")])])
    out = {"store": measure_rss("instruct_memory:write_store",
                                {"name": name, "folder": str(store)}, threads=1)}
    for method in ("full_adapters", "chainfed"):
        out[method] = measure_rss("instruct_memory:measured_step",
                                  {"store": str(store), "method": method, "step": step}, threads=1)
        print(f"  {name} {method}: meter {out[method]['result']['meter']['peak_bytes'] / 2**30:.3f} GiB, "
              f"peak RSS {out[method]['peak_rss'] / 2**30:.3f} GiB, "
              f"{out[method]['result']['seconds']:.0f} s", flush=True)
    shutil.rmtree(store)
    out["estimate"] = estimates(name, step)
    return out


def summary(res: dict, step: dict) -> dict:
    """Measured and modelled peaks of both steps, their ratios Full Adapters / ChainFed, and the
    estimate's gap to the meter: by category, and the activations' gap in units of one
    (batch, length, vocab) float32 logits tensor (where a causal LM's loss keeps its copies)."""
    meter = {m: res[m]["result"]["meter"]["peak_bytes"] for m in ("full_adapters", "chainfed")}
    logits = step["batch_size"] * step["seq_len"] * res["store"]["result"]["vocab_size"] * 4
    gap = {m: {c: res[m]["result"]["meter"]["breakdown"][c] - res["estimate"][m][c]
               for c in res[m]["result"]["meter"]["breakdown"]} for m in meter}
    rss = {m: res[m]["peak_rss"] for m in meter}
    above = {m: res[m]["peak_rss"] - res[m]["baseline_rss"] for m in meter}
    model = {m: res["estimate"][m]["total"] for m in meter}
    ratio = lambda d: d["full_adapters"] / d["chainfed"]      # noqa: E731
    return {"meter_bytes": meter, "rss_bytes": rss, "rss_above_imports_bytes": above, "estimate_bytes": model,
            "estimate_over_meter": {m: model[m] / meter[m] for m in meter}, "meter_minus_estimate_bytes": gap,
            "activation_gap_in_logits_tensors": {m: gap[m]["activations"] / logits for m in meter},
            "reduction": {"meter": ratio(meter), "rss": ratio(rss), "rss_above_imports": ratio(above),
                          "estimate": ratio(model)}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--folder", default=None, help="where the layer stores go (default: a temp dir; a store "
                                                       "of Qwen2.5-1.5B is 7.1 GB, removed after its steps)")
    parser.add_argument("--out", default=str(OUT))
    args = parser.parse_args()
    step = table3_step()
    folder = Path(args.folder or tempfile.mkdtemp(prefix="chainfed-instruct-memory-"))
    started = time.perf_counter()
    record = {"what": " ".join(" ".join(__doc__.split("\n\n")[1:4]).split()), "step": step, "torch": torch.__version__,
              "platform": platform.platform(), "threads": 1,
              "commit": subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip(),
              "models": {}}
    for name in args.models:
        t0 = time.perf_counter()
        res = measure(name, folder, step)
        res["summary"], res["wall_s"] = summary(res, step), time.perf_counter() - t0
        record["models"][name] = res
        s = res["summary"]
        print(f"{name}: Full Adapters / ChainFed W={step['window']} = {s['reduction']['meter']:.2f}x (meter), "
              f"{s['reduction']['rss']:.2f}x (peak RSS), {s['reduction']['estimate']:.2f}x (estimate); "
              f"estimate / meter: FA {s['estimate_over_meter']['full_adapters']:.3f}, "
              f"ChainFed {s['estimate_over_meter']['chainfed']:.3f} (activations short by "
              f"{s['activation_gap_in_logits_tensors']['full_adapters']:.2f} and "
              f"{s['activation_gap_in_logits_tensors']['chainfed']:.2f} logits tensors); {res['wall_s']:.0f} s",
              flush=True)
    record["wall_s"] = time.perf_counter() - started
    if args.folder is None:
        shutil.rmtree(folder, ignore_errors=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {out} in {record['wall_s']:.0f} s")


if __name__ == "__main__":
    main()
