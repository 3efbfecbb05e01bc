"""Where ChainFed's decoder objective reads the model: the held-out response loss after every layer.

ChainFed's local loss decodes a window's output through the model's frozen final norm and LM
head; while the later adapters are the identity (a whole first pass), GPO's global branch is the
same loss. This reads that loss after every layer of Table 3's final models (No-FT, Full Adapters,
ChainFed W = 2, 3, 4; :func:`chainfed_core.instruct_state.layer_losses`) on the 32 held-out
Alpaca records: how far an early exit is from the model's own loss before training (No-FT), and
what each method left at each depth. The last layer's entry is each run's held-out loss; it is
checked against the record's last evaluation.

    .venv/bin/python benchmarks/decoder_early_exit.py            # Table 3's cpu runs (their checkpoints)

Needs each run's folder under ``results/runs/<profile>/`` with its checkpoint (the notebook's runs
write them; No-FT needs none). Writes ``results/instruct/early_exit_<profile>.json``, which
Table 3's notebook plots. A variant already in the record from the same run is kept, not read again.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def measure(profile: str, root: Path, done: dict) -> dict:
    import torch

    from chainfed_core import instruct_table as it
    from chainfed_core.experiments import config_hash
    from chainfed_core.instruct_runs import build_instruct_task
    from chainfed_core.instruct_state import final_backbone, layer_losses
    from chainfed_core.records import RECORD_FILE

    torch.set_num_threads(it.profile(profile)["threads"])
    out = {}
    for variant in it.VARIANTS:
        cfg = it.run_config(profile, variant)
        if done.get(variant, {}).get("run_id") == config_hash(cfg):
            out[variant] = done[variant]                  # read already, from the same run
            continue
        folder = root / config_hash(cfg)
        if not (folder / RECORD_FILE).exists():
            raise SystemExit(f"error: {variant}: no record {folder / RECORD_FILE}; "
                             f"run Table 3's notebook at {profile} first")
        started = time.perf_counter()
        task = build_instruct_task(cfg, {})
        losses = layer_losses(final_backbone(cfg, folder, task), task.test, task.pad_id)
        recorded = json.loads((folder / RECORD_FILE).read_text())["history"][-1]["test_loss"]
        if not math.isclose(losses[-1], recorded, rel_tol=1e-4):
            raise SystemExit(f"error: {variant}: the last layer's loss {losses[-1]:.5f} is not the "
                             f"record's {recorded:.5f}")
        out[variant] = {"run_id": config_hash(cfg), "layer_loss": losses, "record_test_loss": recorded,
                        "seconds": time.perf_counter() - started}
        print(f"{variant:15s} " + " ".join(f"{x:.2f}" for x in losses), flush=True)
    return out


def main(argv=None) -> int:
    from chainfed_core.records import atomic_write_json, code_version

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", default="cpu", help="Table 3's profile whose runs are read")
    parser.add_argument("--out", default=None, help="default: results/instruct/early_exit_<profile>.json")
    args = parser.parse_args(argv)
    from chainfed_core import instruct_table as it
    profile = it.canonical(args.profile)
    out = Path(args.out or ROOT / "results" / "instruct" / f"early_exit_{profile}.json")
    started = time.time()
    done = json.loads(out.read_text())["variants"] if out.exists() else {}
    variants = measure(profile, ROOT / "results" / "runs" / profile, done)
    atomic_write_json(out, {"what": __doc__.split("\n\n")[0], "profile": profile, "commit": code_version(),
                            "model": it.profile(profile)["model"], "variants": variants,
                            "wall_s": time.time() - started})
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
