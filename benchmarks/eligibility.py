"""Memory-aware selection: which devices can run each method, by the estimate and by the meter.

For every Table 1 method at a profile's settings (default ``cpu``: MiniLM-L6, batch 8, sequence
32, N = 100 devices of the paper's 4-12 GB tiers, the largest just holding Full Adapters) this
prints and records, side by side:

- the estimate the simulator selects clients with (``Method.peak_bytes``; ChainFed as
  deployed: streamed, the window fed from the activation cache) and the devices it admits
  (``Server.eligible``, the selection code itself);
- the meter's measured peak of one client's local round (``MemoryMeter``: ChainFed streamed
  from a layer store with the prefix cache filled first; every other method in memory, its
  widest plan), and the devices that measured peak would admit.

    .venv/bin/python benchmarks/eligibility.py [--profile cpu] [--models minilm-l6 mpnet-base]

Record: ``results/benchmarks/eligibility.json`` (read by the claims page).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from chainfed_core import experiments as ex  # noqa: E402
from chainfed_core.bench import measure_peak, random_token_dataset  # noqa: E402
from chainfed_core.config import RunConfig  # noqa: E402
from chainfed_core.memory_meter import MemoryMeter  # noqa: E402
from chainfed_core.population import device_capacity_gb  # noqa: E402
from chainfed_core.records import atomic_write_json, code_version  # noqa: E402
from chainfed_core.server import NoEligibleClient, Server  # noqa: E402
from chainfed_core.task import build_task  # noqa: E402

METHODS = [*ex.PAPER_BASELINES, "No-FT", "LP", "FFT", "Full Adapters", "ChainFed"]
# Where the meter measures something else than the estimate describes (said beside the numbers).
NOTES = {
    "FedKSeed": "the meter also counts the simulation's copy of the initial weights (a device reloads them from "
                "its weights file; the estimate leaves it out)",
    "FedRA": "the estimate is a device's own sub-model (its memory decides how many layers it trains); the meter "
             "runs the widest plan, every layer",
    "FLoRA": "the meter runs the widest plan (the largest rank); a device's rank follows its memory",
}


def measured_peak(run: ex.Run, backbone, server: Server, folder: Path) -> int:
    """The meter's peak of one client's local round of ``run``'s method."""
    cfg = run.config
    batch, seq = cfg.train.batch_size, cfg.model.max_length
    if cfg.method == "chainfed":                  # as deployed: streamed, cached
        return measure_peak(ex.model_config(cfg.model.name), "chainfed", server.window, batch_size=batch, seq_len=seq,
                            bottleneck=cfg.adapter.bottleneck, streamed=True, cached=True,
                            folder=folder / cfg.model.name).peak_bytes
    method = server.method
    if cfg.method == "fedkseed":        # a device regenerates z per update (the estimate's path); the simulator holds it
        method.options = dataclasses.replace(method.options, hold_noise=False)
    data = random_token_dataset(2 * batch, seq, backbone.config.vocab_size, getattr(backbone.config, "num_labels", 2))
    with MemoryMeter(backbone) as meter:
        method.client_update(backbone, data, method.widest_plan(), seed=0)
    return meter.report().peak_bytes


def one_model(profile: str, model: str, folder: Path) -> list[dict]:
    rows = []
    for run in ex.grid(profile, METHODS, models=[model], datasets=[ex.profile(profile)["datasets"][0]],
                       partitions=["iid"], seeds=[0]):
        cfg = run.config
        backbone = build_task(cfg).make_backbone()
        capacity = device_capacity_gb(cfg.seed, np.arange(cfg.data.num_clients), cfg.fed.memory_profile)
        # who could hold it under the profile's memory scale (the bounds included), and whom the run samples from
        aware = RunConfig.from_dict(ex.deep_merge(cfg.to_dict(), {"fed": ex.MEMORY_AWARE}))
        row = {"method": run.variant, "model": model, "memory_aware": cfg.fed.memory_aware,
               "num_devices": int(cfg.data.num_clients), "note": NOTES.get(run.variant, "")}
        try:
            server = Server(aware, backbone, capacity, cfg.model.max_length)
        except NoEligibleClient as error:
            rows.append({**row, "eligible": 0, "sampled_from": 0 if cfg.fed.memory_aware else row["num_devices"],
                         "note": str(error)})
            print(f"{model:12s} {run.variant:14s} no device holds it", flush=True)
            continue
        started = time.perf_counter()
        meter = measured_peak(run, backbone, server, folder)
        per_gb = server.bytes_per_gb
        row.update(estimate_bytes=int(server.need_bytes), meter_bytes=int(meter),
                   estimate_over_meter=server.need_bytes / meter, need_gb=server.need_bytes / per_gb,
                   meter_gb=meter / per_gb, eligible=int(len(server.eligible)),
                   eligible_by_meter=int((capacity * per_gb >= meter).sum()),
                   sampled_from=int(len(server.eligible)) if cfg.fed.memory_aware else row["num_devices"],
                   seconds=time.perf_counter() - started)
        rows.append(row)
        print(f"{model:12s} {run.variant:14s} estimate {row['estimate_bytes'] / 2**20:8.1f} MB  meter "
              f"{meter / 2**20:8.1f} MB  ({row['estimate_over_meter']:.3f})  holds it {row['eligible']:3d} "
              f"(by the meter {row['eligible_by_meter']:3d}) of {row['num_devices']}, sampled from "
              f"{row['sampled_from']}", flush=True)
        del backbone, server
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", default="cpu", choices=list(ex.PROFILES))
    parser.add_argument("--models", nargs="+", default=["minilm-l6"])
    parser.add_argument("--out", default=str(REPO / "results" / "benchmarks" / "eligibility.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        rows = [r for m in args.models for r in one_model(args.profile, m, Path(tmp))]
    atomic_write_json(Path(args.out), {"profile": args.profile, "code_version": code_version(), "rows": rows})
    print(f"record: {Path(args.out).relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
