"""FedKSeed's learning rate at our scale: a centralised probe of its zeroth-order steps.

The original's code defaults to η = 1e-3 (LLaMA-1B, batch 1) and its README's runs use
3e-7; neither was chosen for a 22M-parameter encoder. This probe runs FedKSeed's own step
(:func:`chainfed_core.methods.fedkseed.zo_step`, ε = 5e-4, each step on a new candidate seed)
for ``--steps`` mini-batches of 8 on the cpu-full training data (MiniLM-L6, sarcasm), from the
pretrained weights and a fresh head, at each η, and records the mean loss and accuracy per
block of 30 steps. The default η of :class:`~chainfed_core.methods.fedkseed.FedKSeedOptions`
is the largest one whose loss does not grow.

    .venv/bin/python benchmarks/fedkseed_lr.py            # about 10 minutes on one core
Writes results/benchmarks/fedkseed_lr.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from chainfed_core.config import RunConfig  # noqa: E402
from chainfed_core.methods import get_method  # noqa: E402
from chainfed_core.methods.fedkseed import zo_step  # noqa: E402
from chainfed_core.profiles import profile  # noqa: E402
from chainfed_core.records import code_version  # noqa: E402
from chainfed_core.task import build_task  # noqa: E402
from chainfed_core.train import batches, tensors_by_name  # noqa: E402


def probe(lr: float, steps: int, block: int = 30) -> dict:
    """Loss and accuracy per block of ``block`` zeroth-order steps at learning rate ``lr``."""
    base = profile("cpu-full")["base"]
    cfg = RunConfig.from_dict({**base, "method": "fedkseed", "model": {**base["model"], "name": "minilm-l6"},
                               "data": {**base["data"], "dataset": "sarcasm"}, "method_options": {"lr": lr}})
    task = build_task(cfg)
    bb = task.make_backbone()
    method = get_method("fedkseed")(cfg, bb.num_layers, bb.family)
    method.initial_state(bb)
    params = list(tensors_by_name(bb, method.tuned_names(bb)).values())
    bb.model.eval()
    losses, hits, stream, epoch = [], [], iter(()), 0
    with torch.inference_mode():
        for step in range(steps):
            batch = next(stream, None)
            if batch is None:
                stream = batches(task.train, 8, shuffle=True, seed=epoch, pad_id=task.pad_id)
                epoch, batch = epoch + 1, next(stream)
            logits = []

            def loss() -> float:
                hidden, ctx = bb.embed(batch)
                value, out = bb.head_loss(bb.run_layers(range(bb.num_layers), hidden, ctx), batch, ctx)
                logits.append(out)
                return float(value)
            _, mean_loss = zo_step(params, int(method.seeds[step % len(method.seeds)]), 5e-4, lr, loss)
            losses.append(mean_loss)
            hits.append(float((logits[0].argmax(-1) == batch["labels"]).float().mean()))
    blocks = range(0, steps, block)
    return {"lr": lr, "loss": [float(np.mean(losses[i:i + block])) for i in blocks],
            "accuracy": [float(np.mean(hits[i:i + block])) for i in blocks]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lrs", type=float, nargs="+", default=[1e-3, 1e-4, 1e-5, 1e-6])
    parser.add_argument("--steps", type=int, default=150)
    args = parser.parse_args()
    if args.steps < 30 or any(lr <= 0 for lr in args.lrs):
        parser.error("--steps must be at least 30 and every --lrs value positive")
    torch.set_num_threads(1)
    started, rows = time.perf_counter(), []
    for lr in args.lrs:
        rows.append(probe(lr, args.steps))
        print(f"lr {lr:g}: loss per 30 steps {[round(x, 3) for x in rows[-1]['loss']]}")
    out = ROOT / "results" / "benchmarks" / "fedkseed_lr.json"
    out.write_text(json.dumps({"what": __doc__.split("\n\n")[1], "steps": args.steps, "rows": rows,
                               "code_version": code_version(), "seconds": time.perf_counter() - started}, indent=1))
    print(f"wrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
