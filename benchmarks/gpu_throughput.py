"""How fast client rounds run when W worker processes share one device: the measurement that
replaces the stated GPU constants of ``scripts/gpu_profile.py``'s estimate.

Each worker builds MiniLM-L6's (or MPNet-base's) shape with random weights
(:data:`chainfed_core.bench.SHAPES`: no model file is needed, so it runs on a machine the
model assets cannot reach), adds Full Adapters, and runs ``--steps`` local steps of batch 8 on
random tokens of ``--tokens`` length (sarcasm's mean is 15) with the shared loop
(``train.train_local``) on ``--device``; the workers start together. Recorded per worker
count: the wall time, steps per second in all, and seconds per dispatched kernel in all (the
kernels of one step counted on the CPU, as ``benchmarks/gpu_step_cost.py`` counts them).

    .venv/bin/python benchmarks/gpu_throughput.py --device cuda --workers 1 4 12     # on the GPU machine
Writes results/benchmarks/gpu_throughput.json (``--out`` elsewhere, e.g. $OUT).
"""

from __future__ import annotations

import argparse
import multiprocessing
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _backbone(shape: str, device: str):
    import torch

    from chainfed_core.backbone import from_model
    from chainfed_core.bench import SHAPES
    from chainfed_core.config import AdapterConfig
    from chainfed_core.model_parts import build_model, hf_config

    torch.manual_seed(0)
    config = hf_config({**SHAPES[shape], "num_labels": 2})
    backbone = from_model(build_model(config, config.model_type), config.model_type)
    backbone.add_adapters(AdapterConfig())
    return backbone.to(device)


def _worker(shape: str, device: str, steps: int, tokens: int, start, out) -> None:
    import torch

    from chainfed_core.bench import random_token_dataset
    from chainfed_core.config import TrainConfig
    from chainfed_core.methods import get_method
    from chainfed_core.train import train_local

    torch.set_num_threads(1)
    backbone = _backbone(shape, device)
    plan = get_method("full_adapters").plan_at(backbone.num_layers)
    data = random_token_dataset(8 * steps, tokens, backbone.config.vocab_size)
    train_local(backbone, random_token_dataset(16, tokens, backbone.config.vocab_size), plan, TrainConfig())  # warm-up
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start.wait()
    began = time.perf_counter()
    result = train_local(backbone, data, plan, TrainConfig())     # its last read synchronises the device
    out.put((began, time.perf_counter(), result.steps))


def kernels_per_step(shape: str, tokens: int) -> float:
    """Kernels of one Full Adapters step of batch 8, counted on the CPU."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from gpu_step_cost import KernelCount

    from chainfed_core.bench import random_token_dataset
    from chainfed_core.config import TrainConfig
    from chainfed_core.methods import get_method
    from chainfed_core.train import train_local

    backbone = _backbone(shape, "cpu")
    plan = get_method("full_adapters").plan_at(backbone.num_layers)
    with KernelCount() as count:
        result = train_local(backbone, random_token_dataset(16, tokens, backbone.config.vocab_size), plan, TrainConfig())
    return count.kernels / result.steps


def measure(shape: str, device: str, workers: int, steps: int, tokens: int) -> dict:
    context = multiprocessing.get_context("spawn")
    start, out = context.Barrier(workers + 1), context.Queue()
    procs = [context.Process(target=_worker, args=(shape, device, steps, tokens, start, out)) for _ in range(workers)]
    for p in procs:
        p.start()
    start.wait()
    results = [out.get(timeout=1800) for _ in procs]
    for p in procs:
        p.join()
    wall = max(end for _, end, _ in results) - min(began for began, _, _ in results)
    total = sum(n for _, _, n in results)
    return {"workers": workers, "wall_s": wall, "steps": total, "steps_per_s": total / wall}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--shapes", nargs="+", default=["minilm-l6", "mpnet-base"])
    parser.add_argument("--workers", nargs="+", type=int, default=[1, 4, 12])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--tokens", type=int, default=15)
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "benchmarks" / "gpu_throughput.json")
    args = parser.parse_args(argv)
    import torch

    from chainfed_core.backbone import describe_device, resolve_device
    from chainfed_core.records import atomic_write_json, code_version

    device = resolve_device(args.device) if args.device in ("cpu", "cuda", "auto") else torch.device(args.device)
    record = {"benchmark": "gpu_throughput", "code_version": code_version(), "torch": torch.__version__,
              "device": describe_device(device), "steps_per_worker": args.steps, "tokens": args.tokens, "shapes": {}}
    for shape in args.shapes:
        kernels = kernels_per_step(shape, args.tokens)
        rows = []
        for w in args.workers:
            row = measure(shape, str(device), w, args.steps, args.tokens)
            row["s_per_kernel"] = row["wall_s"] / (row["steps"] * kernels)
            rows.append(row)
            print(shape, row, flush=True)
        record["shapes"][shape] = {"kernels_per_step": kernels, "runs": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out, record)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
