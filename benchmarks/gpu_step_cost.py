"""What one client's round and one evaluation cost at the gpu-full size, counted on the CPU:
the basis of ``scripts/gpu_profile.py``'s time estimate.

For each Table 1 method (and ChainFed at W = 2..6) on MiniLM-L6 and MPNet-base, one client of
the gpu-full population (sarcasm, IID, seed 0: its first client, about 230 examples) runs its
round on the CPU under two counters: the operators dispatched (those that launch a kernel on a
GPU; views and other metadata operations left out) and the floating-point operations
(``torch.utils.flop_counter``). An evaluation of 256 test examples is counted the same way. A
GPU runs a step of batch 8 in a few microseconds of arithmetic per kernel, so at this size the
kernel count, not the FLOPs, sets its time (the estimate says how). Also recorded: the data
sets' sizes and mean tokens per example at max_length 256, and this CPU's seconds per dispatched
operator on a step too small to compute anything (its per-operator overhead).

    .venv/bin/python benchmarks/gpu_step_cost.py            # about 10 minutes on one core
Writes results/benchmarks/gpu_step_cost.json.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from chainfed_core import experiments as ex  # noqa: E402
from chainfed_core.population import Population  # noqa: E402
from chainfed_core.records import atomic_write_json, code_version  # noqa: E402
from chainfed_core.rounds import client_update  # noqa: E402
from chainfed_core.server import Server  # noqa: E402
from chainfed_core.task import build_task, seq_len  # noqa: E402
from chainfed_core.train import evaluate  # noqa: E402

# Operators that only make a new view or read metadata: no kernel on a GPU.
NO_KERNEL = {"view", "_unsafe_view", "t", "transpose", "expand", "permute", "slice", "select", "unsqueeze",
             "squeeze", "as_strided", "detach", "alias", "reshape", "split", "split_with_sizes", "unbind",
             "chunk", "narrow", "_reshape_alias", "lift_fresh", "empty_like", "empty", "resolve_conj",
             "resolve_neg", "is_same_size", "_to_copy_meta", "numpy_T", "expand_as", "view_as", "unfold",
             "split_copy", "sym_size", "sym_stride", "_local_scalar_dense", "set_", "_has_compatible_shallow_copy_type"}
METHODS = [*ex.PAPER_BASELINES, "No-FT", "LP", "FFT", "Full Adapters", "ChainFed"]
WINDOWS = [3, 4, 5, 6]


class KernelCount(TorchDispatchMode):
    """Counts dispatched operators that launch a kernel."""

    def __init__(self):
        super().__init__()
        self.kernels = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__.removesuffix("_") not in NO_KERNEL:
            self.kernels += 1
        return func(*args, **(kwargs or {}))


def counted(fn):
    """(kernels, flops, seconds, result) of ``fn()``: seconds from a run outside the counters."""
    started = time.perf_counter()
    fn()
    seconds = time.perf_counter() - started
    with FlopCounterMode(display=False) as flops, KernelCount() as kernels:
        result = fn()
    return kernels.kernels, flops.get_total_flops(), seconds, result


def config_of(variant, model: str, dataset: str = "sarcasm"):
    """The gpu-full config of ``variant`` on the CPU, the chain from layer 0 (no FOAT)."""
    (run,) = ex.grid("gpu-full", [variant], models=[model], datasets=[dataset], partitions=["iid"], seeds=[0],
                     overrides={"train": {"device": "cpu"}, "chain": {"start_layer": 0}})
    return run.config


def client_round(variant, model: str) -> dict:
    """One client's round of ``variant``: kernels, FLOPs, CPU seconds, steps; or, where no device of
    the population holds the method (the run is recorded as "could not run" at once), why."""
    from chainfed_core.server import NoEligibleClient

    cfg = config_of(variant, model)
    task = build_task(cfg)
    backbone = task.make_backbone()
    pop = Population(cfg, task.train)
    try:
        server = Server(cfg, backbone, pop.capacity_gb, seq_len(task.train))
    except NoEligibleClient as err:
        return {"could_not_run": str(err)}
    client = int(server.eligible[0])
    plan = server.client_plan(0, client, server.plan(0))
    window, _ = server.downlink(0, client, plan)
    kernels, flops, seconds, result = counted(lambda: client_update(
        backbone, cfg, server.method, pop.data(client), plan, window, 0, client, task.pad_id))
    return {"kernels": kernels, "flops": flops, "cpu_s": seconds, "steps": result.steps,
            "examples": result.num_examples}


def evaluation(model: str, examples: int = 256) -> dict:
    cfg = config_of("Full Adapters", model)
    task = build_task(cfg)
    backbone = task.make_backbone()
    test = task.test.select(range(examples))
    kernels, flops, seconds, _ = counted(lambda: evaluate(backbone, test, pad_id=task.pad_id))
    return {"kernels": kernels, "flops": flops, "cpu_s": seconds, "examples": examples}


def per_operator_overhead(steps: int = 20) -> dict:
    """This CPU's seconds per dispatched operator where there is nothing to compute: MiniLM-L6's
    Full Adapters step on one 4-token example."""
    from datasets import Dataset

    from chainfed_core.methods import get_method
    from chainfed_core.train import train_local

    cfg = config_of("Full Adapters", "minilm-l6")
    backbone = build_task(cfg).make_backbone()
    one = Dataset.from_dict({"input_ids": [[101, 2023, 2003, 102]], "attention_mask": [[1, 1, 1, 1]], "label": [0]})
    plan = get_method("full_adapters").plan_at(backbone.num_layers)
    kernels, _, _, _ = counted(lambda: train_local(backbone, one, plan, cfg.train, seed=0))
    started = time.perf_counter()
    for _ in range(steps):
        train_local(backbone, one, plan, cfg.train, seed=0)
    return {"seconds_per_operator": (time.perf_counter() - started) / steps / kernels, "kernels_per_step": kernels}


def datasets() -> dict:
    """Training and test examples and mean tokens per training example of each gpu-full data set."""
    out = {}
    for name in ex.profile("gpu-full")["datasets"]:
        task = build_task(config_of("Full Adapters", "minilm-l6", name))
        tokens = np.array([sum(m) for m in task.train["attention_mask"]])
        out[name] = {"train": len(task.train), "test": len(task.test), "mean_tokens": float(tokens.mean()),
                     "max_tokens": int(tokens.max())}
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=ex.profile("gpu-full")["models"])
    parser.add_argument("--out", default=str(ROOT / "results" / "benchmarks" / "gpu_step_cost.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    started = time.perf_counter()
    record = {"benchmark": "gpu_step_cost", "code_version": code_version(), "torch": torch.__version__,
              "threads": 1, "datasets": datasets(), "overhead": per_operator_overhead(), "models": {}}
    for model in args.models:
        rounds = {}
        for v in METHODS + [ex.chainfed(f"W={w}", window=w) for w in WINDOWS]:
            name = v if isinstance(v, str) else v.name
            rounds[name] = client_round(v, model)
            print(model, name, rounds[name], flush=True)
        record["models"][model] = {"client_round": rounds, "evaluation": evaluation(model)}
    record["wall_s"] = time.perf_counter() - started
    atomic_write_json(Path(args.out), record)
    print(f"wrote {args.out} in {record['wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
