"""Peak training memory of Full Adapters vs ChainFed (streamed, cached), and streaming overheads.

Measures, side by side in one run:
  1. peak tensor bytes (MemoryMeter) of a training step, Full Adapters / ChainFed W=1..6 with the
     layers streamed from a layer store and the window input from the activation cache, for
     MiniLM-L6-, MPNet-base- and RoBERTa-large-shaped models (random weights, float32);
     the LLaMA2-7B shape (bf16 weights) comes from the analytic model (peak_training_bytes);
  2. process peak RSS of a real ChainFed W=2 step of the LLaMA2-7B shape (32 layers, bf16, a
     13 GB store written to disk), streamed, in a fresh process: the frozen prefix streams
     once to fill the activation cache, then the window trains from the cache;
  3. step time: streamed with prefetch / in memory, and with prefetch / without (a store of
     --timing-layers layers of the 7B width, so the in-memory reference fits); time to read
     the store checking every read's sha256 (verify="always") vs only a file's first read ("once");
  4. client compute per round: ChainFed (with cache) / Full Adapters.

    python benchmarks/memory_streaming.py            # default run
    python benchmarks/memory_streaming.py --quick    # about a minute (3-layer 7B-width store)
Writes results/benchmarks/memory_streaming.json.
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

from chainfed_core.actcache import ActivationCache
from chainfed_core.bench import SHAPES, random_token_dataset, step_times
from chainfed_core.config import AdapterConfig, TrainConfig
from chainfed_core.layer_store import LayerStore, write_random_store
from chainfed_core.memory_meter import metered_training
from chainfed_core.memory_model import peak_training_bytes
from chainfed_core.methods import plan_for
from chainfed_core.model_parts import hf_config
from chainfed_core.rss import measure_rss
from chainfed_core.schedule import stage_at
from chainfed_core.streaming import load_streamed
from chainfed_core.train import train_local


def _config(shape: dict, **changes):
    """The HF config of a shape, with fields changed."""
    return hf_config(dict(shape, **changes))


def encoder_memory(name: str, folder: Path, windows, batch_size: int, seq_len: int) -> dict:
    """Measured peaks: Full Adapters in memory vs ChainFed streamed + cached, same batch."""
    config = _config(SHAPES[name])
    store = write_random_store(config, folder / name)
    L = config.num_hidden_layers
    data = random_token_dataset(batch_size, seq_len, config.vocab_size)
    cfg = TrainConfig(batch_size=batch_size, local_steps=1)
    full = load_streamed(store, resident="all", prefetch=False)
    full.add_adapters(AdapterConfig())
    full_report, _ = metered_training(full, data, plan_for("full_adapters", L), cfg)
    del full
    out = {"full_adapters": full_report.to_dict(), "chainfed": {}}
    for w in windows:
        start = max(L - w - 1, 0)                  # a late window: the longest frozen prefix
        plan = plan_for("chainfed", L, stage_at(0, L, start, w, 1), lam=0.1)
        sb = load_streamed(store)
        sb.add_adapters(AdapterConfig())
        cache = ActivationCache(sb, max_memory_bytes=64 << 20)
        prefix = cache.prefix("client", data, plan)          # filled before the measured step
        sb.follow(plan, cached=True)
        report, _ = metered_training(sb, data, plan, cfg, prefix=prefix, cache=cache)
        model = peak_training_bytes(config, "chainfed", w, batch_size, seq_len, streamed=True, cached=True,
                                    cache_bytes=cache.memory_bytes, window_start=start)
        out["chainfed"][w] = {"measured": report.to_dict(), "modelled_total": model.total,
                              "ratio_full_over_chainfed": full_report.peak_bytes / report.peak_bytes}
        sb.streamer.close()
    out["modelled_full_total"] = peak_training_bytes(config, "full_adapters", L, batch_size, seq_len).total
    return out


def llama_modelled(windows, batch_size: int, seq_len: int) -> dict:
    config = _config(SHAPES["llama2-7b"])
    full = peak_training_bytes(config, "full_adapters", 32, batch_size, seq_len, dtype="bfloat16",
                               compute_dtype="float32", optimizer="adamw")
    out = {"full_adapters_modelled": full.to_dict(), "chainfed_modelled": {}}
    for w in windows:
        chain = peak_training_bytes(config, "chainfed", w, batch_size, seq_len, dtype="bfloat16",
                                    compute_dtype="float32", optimizer="adamw", streamed=True, cached=True,
                                    window_start=32 - w - 1)
        out["chainfed_modelled"][w] = {**chain.to_dict(), "ratio_full_over_chainfed": full.total / chain.total}
    return out


def llama_streamed_step(store: str, window: int, seq_len: int, prefetch: bool = True) -> dict:
    """One ChainFed step of the LLaMA store, layers streamed, window input from the cache
    (runs in a fresh process under measure_rss)."""
    from chainfed_core.rss import peak_rss, reset_peak_rss

    sb = load_streamed(store, prefetch=prefetch, compute_dtype=torch.float32)
    L = sb.num_layers
    sb.add_adapters(AdapterConfig())
    data = random_token_dataset(1, seq_len, sb.config.vocab_size)
    plan = plan_for("chainfed", L, stage_at(0, L, L - window, window, 1), lam=0.2)
    reset_peak_rss()
    cache = ActivationCache(sb, max_memory_bytes=64 << 20)
    sb.follow(plan, cached=True)
    started = time.perf_counter()
    prefix = cache.prefix("client", data, plan)       # the frozen prefix streams through once
    filled = time.perf_counter()
    result = train_local(sb, data, plan, TrainConfig(optimizer="adamw", lr=1e-4, batch_size=1, local_steps=1),
                         prefix=prefix)
    return {"seconds": time.perf_counter() - started, "fill_seconds": filled - started, "loss": result.loss,
            "peak_rss_step": peak_rss(), "max_resident_layers": sb.streamer.max_resident_layers}


def verify_read_times(store, repeats: int) -> dict:
    """Seconds to read every shard of the store once, hashing each read against the manifest
    (``verify="always"``) vs hashing a file only the first time this process reads it
    (``verify="once"``, timed after that first read, so no hashing)."""
    stores = {verify: LayerStore(store, verify=verify) for verify in ("always", "once")}
    keys = list(stores["once"].manifest["shards"])
    buffers = {key: stores["once"].allocate(key) for key in keys}
    for key in keys:                               # page cache warm, every file verified once
        stores["once"].read_into(key, buffers[key])
    times = {verify: [] for verify in stores}
    for _ in range(repeats):                       # interleaved, like step_times
        for verify, s in stores.items():
            started = time.perf_counter()
            for key in keys:
                s.read_into(key, buffers[key])
            times[verify].append(time.perf_counter() - started)
    best = {k: min(v) for k, v in times.items()}
    return {"bytes": sum(stores["once"].nbytes(k) for k in keys), "seconds": times,
            "verify_always_s": best["always"], "verify_once_s": best["once"],
            "always_over_once": best["always"] / best["once"]}


def compute_per_round(folder: Path, name: str, n: int, batch_size: int, seq_len: int, window: int) -> dict:
    """Wall time of one round of local training: Full Adapters vs ChainFed with the cache
    (the cache extends by the newly frozen layer; its fill is charged to the first round)."""
    config = _config(SHAPES[name])
    store = folder / name
    L = config.num_hidden_layers
    data = random_token_dataset(n, seq_len, config.vocab_size)
    cfg = TrainConfig(batch_size=batch_size)
    full = load_streamed(store, resident="all", prefetch=False)
    full.add_adapters(AdapterConfig())
    started = time.perf_counter()
    train_local(full, data, plan_for("full_adapters", L), cfg)
    full_s = time.perf_counter() - started
    sb = load_streamed(store, resident="all", prefetch=False)
    sb.add_adapters(AdapterConfig())
    cache = ActivationCache(sb)
    rounds = []
    for r in range(L - window + 1):
        plan = plan_for("chainfed", L, stage_at(r, L, 0, window, 1), lam=0.1)
        started = time.perf_counter()
        train_local(sb, data, plan, cfg, prefix=cache.prefix("client", data, plan))
        rounds.append(time.perf_counter() - started)
    return {"full_adapters_round_s": full_s, "chainfed_round_s": rounds,
            "chainfed_over_full_mean": sum(rounds) / len(rounds) / full_s,
            "chainfed_over_full_steady": sorted(rounds)[len(rounds) // 2] / full_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="MiniLM shape only, W=1..2, 2 LLaMA layers.")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--llama-layers", type=int, default=32,
                        help="Depth of the 7B-width store of the RSS step (32: LLaMA2-7B itself).")
    parser.add_argument("--timing-layers", type=int, default=4, help="Depth of the 7B-width store timed in 3.")
    parser.add_argument("--folder", default=None, help="Where layer stores are written (default: a temp dir).")
    parser.add_argument("--out", default="results/benchmarks/memory_streaming.json")
    args = parser.parse_args()
    torch.set_num_threads(2)
    shapes = ["minilm-l6"] if args.quick else ["minilm-l6", "mpnet-base", "roberta-large"]
    windows = [1, 2] if args.quick else [1, 2, 3, 4, 5, 6]
    llama_layers = 3 if args.quick else args.llama_layers
    timing_layers = min(args.timing_layers, llama_layers)
    folder = Path(args.folder or tempfile.mkdtemp(prefix="chainfed-bench-"))
    started = time.perf_counter()
    record = {"args": vars(args), "torch": torch.__version__, "platform": platform.platform(),
              "commit": subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip(),
              "memory": {}, "notes": {}}

    for name in shapes:
        res = encoder_memory(name, folder, windows, args.batch_size, args.seq_len)
        record["memory"][name] = res
        full = res["full_adapters"]["peak_bytes"]
        print(f"{name:14s} Full Adapters peak {full / 2**20:9.1f} MiB (measured)")
        for w, r in res["chainfed"].items():
            print(f"{'':14s} ChainFed W={w} streamed+cached {r['measured']['peak_bytes'] / 2**20:8.1f} MiB "
                  f"(model {r['modelled_total'] / 2**20:8.1f})  Full/ChainFed = {r['ratio_full_over_chainfed']:.2f}x")
    llama = llama_modelled(windows, args.batch_size, args.seq_len)
    record["memory"]["llama2-7b"] = llama
    record["notes"]["llama2-7b"] = "both peaks modelled with peak_training_bytes (7B end to end does not fit here)"
    for w, r in llama["chainfed_modelled"].items():
        print(f"{'llama2-7b':14s} Full {llama['full_adapters_modelled']['total'] / 2**30:.1f} GiB / ChainFed W={w} "
              f"{r['total'] / 2**30:.2f} GiB = {r['ratio_full_over_chainfed']:.2f}x (modelled)")

    config = _config(SHAPES["llama2-7b"], num_hidden_layers=llama_layers)
    store = folder / f"llama7b-width-{llama_layers}"
    t0 = time.perf_counter()
    write_random_store(config, store, dtype=torch.bfloat16)
    record["notes"]["llama_store"] = {"layers": llama_layers, "write_seconds": time.perf_counter() - t0,
                                      "bytes": sum(LayerStore(store).nbytes(k) for k in LayerStore(store).manifest["shards"])}
    # the child imports this file as a top-level module from its folder: opacus installs a regular
    # package named ``benchmarks``, which wins over this folder (a namespace package) on sys.path
    here = str(Path(__file__).resolve().parent)
    os.environ["PYTHONPATH"] = os.pathsep.join([here, *filter(None, [os.environ.get("PYTHONPATH")])])
    rss = measure_rss("memory_streaming:llama_streamed_step",
                      {"store": str(store), "window": 2, "seq_len": args.seq_len}, threads=2)
    record["llama_rss"] = rss
    print(f"LLaMA2-7B-width ({llama_layers} layers, {record['notes']['llama_store']['bytes'] / 2**30:.1f} GiB store) "
          f"W=2 streamed step: peak RSS {rss['peak_rss'] / 2**30:.2f} GiB "
          f"(baseline after imports {rss['baseline_rss'] / 2**30:.2f} GiB), {rss['result']['seconds']:.1f} s")
    if timing_layers != llama_layers:
        shutil.rmtree(store)
        config = _config(SHAPES["llama2-7b"], num_hidden_layers=timing_layers)
        store = folder / f"llama7b-width-{timing_layers}"
        write_random_store(config, store, dtype=torch.bfloat16)
    times = step_times(store, 1, random_token_dataset(1, args.seq_len // 2, 32000), repeats=1 if args.quick else 4)
    record["step_times"] = times
    print(f"step time streamed+prefetch / in memory = {times['prefetch_over_in_memory']:.2f}, "
          f"prefetch / no prefetch = {times['prefetch_over_no_prefetch']:.2f}")
    reads = verify_read_times(store, repeats=2 if args.quick else 3)
    record["verify_read_times"] = reads
    print(f"reading the {reads['bytes'] / 2**30:.2f} GiB store: verify always {reads['verify_always_s']:.2f} s, "
          f"verify once {reads['verify_once_s']:.2f} s ({reads['always_over_once']:.2f}x)")
    per_round = compute_per_round(folder, "minilm-l6", 16 if args.quick else 32, args.batch_size, args.seq_len, 2)
    record["compute_per_round"] = per_round
    print(f"client compute per round ChainFed (cache) / Full Adapters = {per_round['chainfed_over_full_mean']:.2f} "
          f"(mean over a pass), {per_round['chainfed_over_full_steady']:.2f} (median round)")
    record["seconds"] = time.perf_counter() - started
    if args.folder is None:
        shutil.rmtree(folder)                          # the stores are 13 GB
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1, default=str))
    print(f"wrote {out} in {record['seconds']:.0f} s")


if __name__ == "__main__":
    main()
