"""benchmarks/instruct_memory.py on a tiny decoder: both steps run as the benchmark runs them (Full
Adapters resident, ChainFed W = 2 streamed from the layer store and fed from the activation cache),
the meter sees the frozen weights the estimate prices, and the summary's ratios come from them."""

import importlib.util
from pathlib import Path

import torch

from chainfed_core.backbone import from_model
from chainfed_core.experiments import model_config
from chainfed_core.layer_store import save_layer_store
from chainfed_core.model_parts import build_model

NAME = "tiny-llama-L4-H32"
STEP = {"batch_size": 2, "seq_len": 16, "optimizer": "adamw", "lr": 1e-3, "bottleneck": 8, "lam": 0.2,
        "window": 2, "local_steps": 2}


def _benchmark():
    # loaded from its file: opacus installs a top-level ``benchmarks`` package that shadows the folder
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "instruct_memory.py"
    spec = importlib.util.spec_from_file_location("instruct_memory", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_both_steps_are_metered_beside_the_estimate(tmp_path):
    bench = _benchmark()
    config = model_config(NAME)
    torch.manual_seed(0)
    store = save_layer_store(from_model(build_model(config, "llama"), "llama"), tmp_path / "store")
    res = {"store": {"result": {"vocab_size": config.vocab_size}}, "estimate": bench.estimates(NAME, STEP)}
    for method in ("full_adapters", "chainfed"):
        measured = bench.measured_step(str(store.folder), method, STEP)
        assert measured["steps"] == 2 and measured["step_peak_rss"] > 0
        frozen = measured["meter"]["breakdown"]["frozen_weights"]
        assert abs(res["estimate"][method]["frozen_weights"] / frozen - 1) <= 0.05, method   # a tiny model: its buffers weigh in
        res[method] = {"result": measured, "peak_rss": measured["step_peak_rss"], "baseline_rss": 0}
    assert res["estimate"]["chainfed"]["notes"]["streamed"] and res["estimate"]["chainfed"]["notes"]["cached"]
    summary = bench.summary(res, STEP)
    meter = summary["meter_bytes"]
    assert summary["reduction"]["meter"] == meter["full_adapters"] / meter["chainfed"] > 1
    assert set(summary["activation_gap_in_logits_tensors"]) == {"full_adapters", "chainfed"}
    assert bench.table3_step()["batch_size"] == 2 and bench.table3_step()["seq_len"] == 192
