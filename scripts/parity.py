"""Rerun committed configurations and compare their metrics lines, timing fields aside.

    python scripts/parity.py run  OUT [--cpu-full ID ...] [--quick]   # write OUT/<id>/metrics.jsonl
    python scripts/parity.py diff OLD NEW                             # compare two such folders

Used to show that a restructuring leaves results bit for bit unchanged: run it with the old
code into one folder, with the new code into another, then ``diff`` them.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

TIMING = ("seconds_train", "seconds_round", "seconds_since_start", "seconds_clients")
DEFAULT_CPU_FULL = ["a630ea81cd2f", "8475236bc71a", "1d33a675afb4"]   # ChainFed, Full Adapters, FFT


def _configs(cpu_full: list[str], quick: bool) -> dict[str, dict]:
    root = Path(__file__).resolve().parent.parent
    out = {}
    for rid in cpu_full:
        out[f"cpu-full-{rid}"] = json.loads((root / "results/runs/cpu-full" / rid / "record.json").read_text())["config"]
    if quick:
        from chainfed_core.experiments import VARIANTS, grid
        for run in grid("quick", list(VARIANTS)):
            out[f"quick-{run.run_id}"] = run.config.to_dict()
    return out


def run(out: Path, cpu_full: list[str], quick: bool) -> None:
    import torch

    from chainfed_core.config import RunConfig
    from chainfed_core.federated import run as simulate

    for name, cfg in _configs(cpu_full, quick).items():
        folder = out / name
        if (folder / "record.json").exists():
            continue
        torch.set_num_threads(1 if name.startswith("quick") else 2)
        record = simulate(RunConfig.from_dict(cfg), folder, progress=False)
        print(name, cfg["method"], record["history"][-1].get("test_accuracy"), flush=True)


def _lines(folder: Path) -> list[dict]:
    rows = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


def diff(old: Path, new: Path) -> int:
    bad = 0
    names = sorted(p.name for p in old.iterdir() if (p / "metrics.jsonl").exists())
    for name in names:
        a, b = _lines(old / name), _lines(new / name) if (new / name / "metrics.jsonl").exists() else None
        same = a == b
        bad += not same
        keys = sorted({k for x, y in zip(a, b or []) for k in set(x) | set(y) if x.get(k) != y.get(k)})
        print(f"{'same' if same else 'DIFFERENT'}  {name}  ({len(a)} rounds)" + (f"  keys: {keys}" if keys else ""))
    print(f"{len(names) - bad} of {len(names)} runs identical (timing fields aside)")
    return 1 if bad else 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("out", type=Path)
    r.add_argument("--cpu-full", nargs="*", default=DEFAULT_CPU_FULL)
    r.add_argument("--no-quick", action="store_true")
    d = sub.add_parser("diff")
    d.add_argument("old", type=Path)
    d.add_argument("new", type=Path)
    a = p.parse_args(argv)
    if a.cmd == "run":
        run(a.out, a.cpu_full, not a.no_quick)
        return 0
    return diff(a.old, a.new)


if __name__ == "__main__":
    sys.exit(main())
