"""The LLaMA2-7B shape trained by one deployed SuperNode under a 2 GiB budget: its peak RSS.

Writes (or reuses) the 32-layer LLaMA2-7B-shaped bf16 layer store of random weights (13.5 GB,
``chainfed_core.bench.SHAPES["llama2-7b"]``, written layer by layer), a local HF model folder of
the same weights for the ServerApp (``config.json`` and a safetensors index whose shards are
links to the store's), and one device's data file (random token ids); then starts a SuperLink
with TLS and SuperNode authentication and ONE SuperNode (``chainfed_core.flower.loopback``)
with ``layer-store``, ``memory-gb`` and ``cache-dir``, and runs ChainFed W=2 for one round
through ``flwr run flower_app``. The node does what a deployed ChainFed client does in the
round whose window is at the top of the chain (``chain.start_layer = L - W``): its ClientApp
checks the window against ``memory-gb``, streams the 30-layer frozen prefix once into its
activation cache and trains the window's adapters from it (AdamW, batch 1).

The ClientApp processes (children of the SuperNode) and the ServerApp (a child of the
SuperLink) are sampled for VmHWM while the run lasts; the ClientApp also reports its own
peak at the end of training (``record.json``'s ``client_peak_rss``). The ServerApp holds the
whole model in memory (it evaluates the global model), as the server does in every runtime.

    python benchmarks/supernode_llama7b.py                       # 32 layers, budget 2 GiB
    python benchmarks/supernode_llama7b.py --layers 3 --keep     # a 3-layer 7B-width smoke run
Writes results/benchmarks/supernode_llama7b.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from chainfed_core.bench import SHAPES
from chainfed_core.layer_store import MANIFEST, LayerStore, LayerStoreError, write_random_store
from chainfed_core.model_parts import hf_config, shard_key

NUM_LABELS = 3                     # the synthetic task's classes, which the server sends
GIB = 2 ** 30


class Parser(argparse.ArgumentParser):
    def error(self, message: str):                 # one line, no usage block
        self.exit(2, f"{self.prog}: error: {message}\n")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = Parser(prog="supernode_llama7b.py", description=__doc__.split("\n")[0])
    p.add_argument("--store-dir", default=None, help="where the store, model folder and run go (default: a temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the store and model folder (rerun reuses them)")
    p.add_argument("--layers", type=int, default=32, help="depth of the 7B-width model (32: LLaMA2-7B)")
    p.add_argument("--window", type=int, default=2, help="ChainFed window W")
    p.add_argument("--budget-gb", type=float, default=2.0, help="the SuperNode's memory-gb")
    p.add_argument("--seq-len", type=int, default=32, help="tokens per example")
    p.add_argument("--local-steps", type=int, default=3, help="local steps (batch 1, one example each)")
    p.add_argument("--threads", type=int, default=2, help="OpenMP threads of every process")
    p.add_argument("--timeout", type=float, default=3600, help="seconds the round may take")
    p.add_argument("--out", default="results/benchmarks/supernode_llama7b.json")
    args = p.parse_args(argv)
    checks = [(args.window >= 1, f"--window must be at least 1, got {args.window}"),
              (args.layers > args.window, f"--layers must exceed --window ({args.window}) so a prefix streams, "
                                          f"got {args.layers}"),
              (args.budget_gb > 0, f"--budget-gb must be positive, got {args.budget_gb}"),
              (2 <= args.seq_len <= 2048, f"--seq-len must be 2..2048 (the shape's positions), got {args.seq_len}"),
              (args.local_steps >= 1, f"--local-steps must be at least 1, got {args.local_steps}"),
              (args.threads >= 1, f"--threads must be at least 1, got {args.threads}"),
              (args.timeout > 0, f"--timeout must be positive, got {args.timeout}"),
              (args.store_dir is None or not Path(args.store_dir).exists() or Path(args.store_dir).is_dir(),
               f"--store-dir {args.store_dir} exists and is not a folder")]
    for ok, message in checks:
        if not ok:
            p.error(message)
    return args


# ---------------------------------------------------------------------- the model on disk
def shape_config(layers: int):
    """The HF config of the LLaMA2-7B shape, ``layers`` deep."""
    return hf_config(dict(SHAPES["llama2-7b"], num_hidden_layers=layers))


def _matches(folder: Path, config) -> bool:
    """Whether ``folder`` holds a complete bf16 store of ``config`` (then it is reused)."""
    if not (folder / MANIFEST).exists():
        return False
    try:
        store = LayerStore(folder)
    except LayerStoreError:
        return False
    shards, wanted = store.manifest["shards"], {"embed", "head", *map(shard_key, range(config.num_hidden_layers))}
    return (store.manifest["config"] == json.loads(json.dumps(config.to_dict(), default=str))
            and store.manifest["dtype"] == "bfloat16" and wanted <= set(shards)
            and all(store.path(k).exists() and store.path(k).stat().st_size == shards[k]["bytes"] for k in shards))


def ensure_store(folder: Path, config) -> dict:
    """The bf16 random-weight store of ``config`` in ``folder``: reused if complete, else written."""
    started = time.perf_counter()
    reused = _matches(folder, config)
    store = LayerStore(folder) if reused else write_random_store(config, folder, dtype=torch.bfloat16)
    return {"store": store, "reused": reused, "write_seconds": None if reused else time.perf_counter() - started,
            "bytes": sum(store.nbytes(k) for k in store.manifest["shards"])}


def model_folder(store: LayerStore, folder: Path, config) -> Path:
    """A local HF model folder of the store's weights (``from_pretrained`` reads the store's own
    shard files through links; the ``rest`` part holds only non-persistent buffers)."""
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    config.save_pretrained(folder)
    weight_map = {}
    for key, entry in store.manifest["shards"].items():
        if key == "rest":
            continue
        (folder / entry["file"]).symlink_to(store.path(key).resolve())
        weight_map.update({name: entry["file"] for name in entry["tensors"]})
    total = sum(store.nbytes(k) for k in store.manifest["shards"] if k != "rest")
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    return folder


# ---------------------------------------------------------------------- the run
def run_config(model: Path, args):
    from chainfed_core.config import RunConfig

    return RunConfig.from_dict({
        "method": "chainfed", "seed": 0,        # write_random_store's seed: the store is this model's
        "model": {"name": str(model), "dtype": "bfloat16", "max_length": args.seq_len},
        "chain": {"window": args.window, "start_layer": args.layers - args.window},
        "train": {"optimizer": "adamw", "lr": 1e-4, "batch_size": 1, "local_steps": args.local_steps},
        "data": {"dataset": "synthetic", "num_clients": 1, "max_train_examples": 8, "max_test_examples": 2},
        "fed": {"rounds": 1, "clients_per_round": 1, "eval_every": 1, "memory_aware": False,
                "memory_scale": float(GIB)}})           # memory-gb in GiB, as the node reads it


def write_device_data(folder: Path, n: int, seq_len: int, vocab: int) -> Path:
    """The device's own examples: ``n`` rows of ``seq_len`` random token ids (a JSONL file)."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, vocab, (n, seq_len), generator=g)              # (n, T)
    folder.mkdir(parents=True)
    (folder / "train.jsonl").write_text("".join(json.dumps({"input_ids": row.tolist(), "label": k % NUM_LABELS})
                                                + "\n" for k, row in enumerate(ids)))
    return folder


class Sampler:
    """The highest VmHWM seen of each descendant of some processes (polled)."""

    def __init__(self):
        self.peaks: dict[int, dict] = {}

    def sample(self, parent: int, role: str) -> None:
        import psutil

        from chainfed_core.flower.loopback import children, vm_hwm

        for pid in children(parent):
            try:
                hwm, cmd = vm_hwm(pid), " ".join(Path(a).name for a in psutil.Process(pid).cmdline()[:2])
            except (OSError, RuntimeError, psutil.Error):
                continue                                   # ended between listing and reading
            entry = self.peaks.setdefault(pid, {"pid": pid, "role": role, "cmd": cmd, "vmhwm": 0})
            entry["vmhwm"] = max(entry["vmhwm"], hwm)

    def peak(self, role: str) -> int:
        return max((e["vmhwm"] for e in self.peaks.values() if e["role"] == role), default=0)


def federate(folder: Path, cfg, node_config: str, args) -> dict:
    """SuperLink + one SuperNode, ``flwr run`` of one round; the record and the sampled peaks."""
    from chainfed_core.flower.loopback import BIN, ROOT, Federation, vm_hwm
    from chainfed_core.records import RECORD_FILE

    (folder / "cfg.json").write_text(json.dumps(cfg.to_dict()))
    out, fed, sampler = folder / "flower_out", Federation(folder, 1, threads=args.threads), Sampler()
    started = time.perf_counter()
    try:
        fed.start([node_config])
        with open(folder / "logs" / "flwr.log", "w") as log:
            flwr = subprocess.Popen([str(BIN / "flwr"), "run", str(ROOT / "flower_app"), "federation", "--stream",
                                     "--run-config", f"config-file='{folder / 'cfg.json'}' overrides='' "
                                                     f"out-dir='{out}'"],
                                    env=fed.env, cwd=folder, stdout=log, stderr=subprocess.STDOUT)
            fed.procs["flwr"] = flwr
            while not (out / RECORD_FILE).exists() and time.perf_counter() - started < args.timeout:
                sampler.sample(fed.procs["supernode0"].pid, "clientapp")
                sampler.sample(fed.procs["superlink"].pid, "serverapp")
                if flwr.poll() is not None and not (out / RECORD_FILE).exists():
                    time.sleep(5)                          # the record may trail flwr's exit
                    break
                time.sleep(0.05)                           # VmHWM is kept until a process ends
        seconds = time.perf_counter() - started
        if not (out / RECORD_FILE).exists():
            tail = "\n".join(fed.log(n)[-3000:] for n in ("flwr", "supernode0"))
            raise RuntimeError(f"no {RECORD_FILE} after {seconds:.0f} s; the logs end:\n{tail}")
        supernode, superlink = vm_hwm(fed.procs["supernode0"].pid), vm_hwm(fed.procs["superlink"].pid)
    finally:
        fed.stop()
    return {"record": json.loads((out / RECORD_FILE).read_text()), "run_seconds": seconds, "sampler": sampler,
            "supernode_vmhwm": supernode, "superlink_vmhwm": superlink}


# ---------------------------------------------------------------------- the record
def _versions() -> dict:
    import flwr
    import transformers

    git = lambda *a: subprocess.run(["git", *a], capture_output=True, text=True).stdout  # noqa: E731
    return {"torch": torch.__version__, "flwr": flwr.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "platform": platform.platform(),
            "commit": git("rev-parse", "HEAD").strip(),
            "uncommitted": git("diff", "--name-only", "HEAD").split()}      # tracked files changed since the commit


def make_record(args, built: dict, cfg, node_config: str, fed: dict, wall: float) -> dict:
    rec, sampler = fed["record"], fed["sampler"]
    reported = max(rec.get("client_peak_rss", {}).values(), default=0)
    clientapp = max(sampler.peak("clientapp"), reported)
    budget = args.budget_gb * GIB
    round0 = rec["history"][0]
    return {
        "benchmark": "supernode_llama7b", "command": "python " + " ".join(sys.argv), "args": vars(args),
        "shape": "llama2-7b", "layers": args.layers, "store_dtype": "bfloat16", "store_bytes": built["bytes"],
        "store_reused": built["reused"], "store_write_seconds": built["write_seconds"],
        "budget_gb": args.budget_gb, "budget_bytes": budget,
        "clientapp_vmhwm_bytes": clientapp, "clientapp_peak_rss_reported": reported,
        "clientapp_processes": [e for e in sampler.peaks.values() if e["role"] == "clientapp"],
        "supernode_vmhwm_bytes": fed["supernode_vmhwm"],
        "within_budget": clientapp <= budget and fed["supernode_vmhwm"] <= budget,
        "serverapp_vmhwm_bytes": sampler.peak("serverapp"), "superlink_vmhwm_bytes": fed["superlink_vmhwm"],
        "wall_seconds": wall, "run_seconds": fed["run_seconds"],
        "round": {k: round0.get(k) for k in ("window", "trained", "failed", "num_examples", "train_loss",
                                             "bytes_up", "bytes_down", "bytes_down_context", "seconds_train",
                                             "seconds_clients", "test_loss", "test_perplexity")},
        "failures": rec["failures"], "start_layer": rec["start_layer"], "need_gb": rec.get("need_gb"),
        "node_config": node_config, "run_config": cfg.to_dict(), **_versions(),
        "notes": "random weights; ClientApp VmHWM is the highest of the sampled /proc VmHWM of the SuperNode's "
                 "children and the peak the ClientApp reports after training; the ServerApp holds the whole model."}


def _paths(args) -> tuple[Path, bool]:
    if args.store_dir is None:
        return Path(tempfile.mkdtemp(prefix="chainfed-supernode7b-")), True
    Path(args.store_dir).mkdir(parents=True, exist_ok=True)
    return Path(args.store_dir).resolve(), False


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    from chainfed_core.flower.device import mark_store

    started = time.perf_counter()
    root, temporary = _paths(args)
    run_dir = root / "run"
    try:
        config = shape_config(args.layers)
        built = ensure_store(root / "store", config)
        model = model_folder(built["store"], root / "model", config)
        cfg = run_config(model, args)
        mark_store(cfg, NUM_LABELS, root / "store")
        shutil.rmtree(run_dir, ignore_errors=True)
        data = write_device_data(run_dir / "device0", args.local_steps, args.seq_len, config.vocab_size)
        node_config = (f"partition-id=0 num-partitions=1 data-path='{data}' layer-store='{root / 'store'}' "
                       f"memory-gb={args.budget_gb} cache-dir='{run_dir / 'cache'}'")
        fed = federate(run_dir, cfg, node_config, args)
        record = make_record(args, built, cfg, node_config, fed, time.perf_counter() - started)
    finally:
        if not args.keep:                        # --keep keeps the run's logs too
            for name in ("run", "store", "model"):
                shutil.rmtree(root / name, ignore_errors=True)
            if temporary or not any(root.iterdir()):
                shutil.rmtree(root, ignore_errors=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1, default=str))
    verdict = "within" if record["within_budget"] else "OVER"
    print(f"LLaMA2-7B shape ({args.layers} layers, {record['store_bytes'] / GIB:.1f} GiB bf16 store), one SuperNode, "
          f"ChainFed W={args.window}: ClientApp VmHWM {record['clientapp_vmhwm_bytes'] / GIB:.2f} GiB, SuperNode "
          f"{record['supernode_vmhwm_bytes'] / GIB:.2f} GiB: {verdict} the {args.budget_gb:g} GiB budget "
          f"(loss {record['round']['train_loss']:.3f}, {record['wall_seconds']:.0f} s); wrote {out}")
    return record


if __name__ == "__main__":
    main()
