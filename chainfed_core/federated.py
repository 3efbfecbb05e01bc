"""The federated runtime: an in-process simulator of N memory-heterogeneous clients.

One run, top to bottom (:func:`run`):

1. Population: N clients, each a partition of the training set (index ranges of one
   array, so memory does not grow with N) and a device memory capacity drawn from a
   profile as a pure function of (seed, client id).
2. Eligibility: the method's peak training memory (:func:`chainfed_core.memory.client_peak_bytes`,
   ChainFed with its layers streamed, as deployed) decides which devices can take part; with
   ``fed.window_from_memory`` the chain window W is the widest the smallest eligible device
   can hold (paper D.3).
3. FOAT (chainfed, unless ``chain.start_layer`` is set): sampled clients profile one batch,
   the server averages the layer scores and picks the chain's start layer.
4. Rounds: sample K eligible clients, send each the window (and any tensor it has not seen
   since its last round), train locally, FedAvg the window, evaluate every ``eval_every``.

Every random choice is a pure function of (seed, round, client id), and the server state is
checkpointed atomically after every round, so a killed run restarted with the same command
ends bitwise identical to an uninterrupted one. :class:`Server` holds the schedule and the
aggregation; the Flower strategy (``chainfed_core.flower``) drives the same object.
"""

from __future__ import annotations

import argparse
import functools
import gc
import io
import json
import math
import os
import pickle
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from . import foat
from .aggregation import fedavg, merge, stale_names, state_bytes
from .memory import client_peak_bytes
from .partition import client_indices
from .backbone import Backbone
from .config import RunConfig
from .records import RECORD_FILE, atomic_write_bytes, atomic_write_json, make_record
from .schedule import stage_at
from .train import (batches, evaluate, get_state, plan_for, set_state, tensors_by_name, train_local,
                    trainable_names)

GB = 2 ** 30
CHECKPOINT_FILE = "checkpoint.pkl"
METRICS_FILE = "metrics.jsonl"

# Device memory profiles in GB. "paper": phone/Jetson-class tiers of about 4-12 GB.
PROFILES = {"paper": (np.array([4.0, 6.0, 8.0, 12.0]), np.array([0.3, 0.3, 0.25, 0.15])),
            "uniform": (np.array([4.0, 12.0]), None)}
LARGEST_DEVICE_GB = 12.0

# Stream tags keep the pure random functions of different purposes apart.
_CAPACITY, _FAILURE, _TRAIN, _SAMPLE, _FOAT = range(5)


# ---------------------------------------------------------------------- pure randomness
def _mix(*keys) -> np.ndarray:
    """splitmix64 of a tuple of non-negative integers (broadcast over arrays): uint64."""
    with np.errstate(over="ignore"):
        h = np.uint64(0x9E3779B97F4A7C15)
        for k in keys:
            h = h ^ (np.asarray(k, dtype=np.uint64) + np.uint64(0x9E3779B97F4A7C15))
            h = (h ^ (h >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
            h = (h ^ (h >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
            h = h ^ (h >> np.uint64(31))
    return h


def _unit(*keys) -> np.ndarray:
    """Uniform in [0, 1) as a pure function of ``keys``."""
    return (_mix(*keys) >> np.uint64(11)).astype(np.float64) / float(2 ** 53)


def client_seed(seed: int, round_index: int, client_id) -> int | np.ndarray:
    """Local training seed of a client in a round (an array of them for an array of ids)."""
    out = _mix(seed, _TRAIN, round_index, client_id) % np.uint64(2 ** 31 - 1)
    return int(out) if np.ndim(out) == 0 else out.astype(np.int64)


def injected_failure(seed: int, round_index: int, client_id: int, rate: float) -> bool:
    return rate > 0 and float(_unit(seed, _FAILURE, round_index, client_id)) < rate


def sample_clients(seed: int, round_index: int, eligible: np.ndarray, k: int, tag: int = _SAMPLE) -> list[int]:
    """K distinct client ids from ``eligible``, a pure function of (seed, round)."""
    rng = np.random.default_rng([seed, tag, round_index])
    return sorted(int(c) for c in rng.choice(eligible, size=k, replace=False))


def device_capacity_gb(seed: int, client_ids, profile: str) -> np.ndarray:
    """Device memory (GB) of each client id, drawn from ``profile`` by (seed, id) alone."""
    u = _unit(seed, _CAPACITY, np.asarray(client_ids))
    tiers, probs = PROFILES[profile]
    if probs is None:
        return tiers[0] + u * (tiers[1] - tiers[0])
    return tiers[np.searchsorted(np.cumsum(probs), u, side="right").clip(max=len(tiers) - 1)]


# ---------------------------------------------------------------------- task: model and data
@dataclass
class Task:
    """What every client and the server build the same way from the config."""
    make_backbone: Callable[[], Backbone]   # fresh model with adapters, seeded
    train: Any                              # tokenized datasets.Dataset
    test: Any
    num_labels: int
    pad_id: int = 0


def synthetic_dataset(n: int, num_labels: int = 3, seq_len: int = 12, seed: int = 0):
    """A learnable tokenized toy task: the label is the vocabulary third most tokens fall in."""
    from datasets import Dataset
    from .tiny import VOCAB

    rng = np.random.default_rng([seed, n])
    labels = rng.integers(0, num_labels, n)
    band = (VOCAB - 5) // num_labels
    lo = 5 + labels[:, None] * band
    ids = np.where(rng.random((n, seq_len)) < 0.6, rng.integers(0, band, (n, seq_len)) + lo,
                   rng.integers(5, VOCAB, (n, seq_len)))
    return Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": np.ones_like(ids).tolist(),
                              "label": labels.tolist()})


def _tiny_spec(name: str) -> dict:
    """``tiny-<family>[-L<layers>][-H<hidden>]`` -> tiny_backbone kwargs."""
    parts = name.split("-")
    spec = {"family": parts[1] if len(parts) > 1 else "bert", "num_layers": 4, "hidden": 32}
    for p in parts[2:]:
        key = {"L": "num_layers", "H": "hidden"}.get(p[:1])
        if key is None or not p[1:].isdigit():
            raise ValueError(f"ModelConfig.name: {name!r} is not tiny-<family>[-L<layers>][-H<hidden>]")
        spec[key] = int(p[1:])
    return spec


def build_task(config: RunConfig) -> Task:
    """Model factory and tokenized train/test splits for ``config``.

    ``model.name = "tiny-<family>[-L4][-H32]"`` and ``data.dataset = "synthetic"`` give the
    CPU-sized toy task used by tests and quick runs; anything else goes through
    ``chainfed_core.data`` and ``chainfed_core.backbone.load_backbone``.
    """
    cfg = config
    if cfg.data.dataset == "synthetic":
        num_labels = 3
        train = synthetic_dataset(cfg.data.max_train_examples or 512, num_labels, seed=cfg.seed)
        test = synthetic_dataset(cfg.data.max_test_examples or 128, num_labels, seed=cfg.seed + 10 ** 6)
        pad_id = 0
    else:
        from transformers import AutoTokenizer

        from . import data
        from .assets import model_path

        splits = data.load_dataset(cfg.data.dataset, seed=cfg.seed, test_fraction=cfg.data.test_fraction,
                                   max_train=cfg.data.max_train_examples, max_test=cfg.data.max_test_examples)
        tokenizer = AutoTokenizer.from_pretrained(model_path(cfg.model.name))
        splits = data.tokenize(splits, tokenizer, cfg.model.max_length)
        train, test = splits["train"], splits["test"]
        num_labels = len(data.label_names(splits))
        pad_id = tokenizer.pad_token_id or 0

    def make_backbone() -> Backbone:
        torch.manual_seed(cfg.seed)
        if cfg.model.name.startswith("tiny"):
            from .tiny import tiny_backbone
            bb = tiny_backbone(num_labels=num_labels, seed=cfg.seed, **_tiny_spec(cfg.model.name))
        else:
            from .backbone import load_backbone
            bb = load_backbone(cfg.model, num_labels)
        if cfg.method in ("chainfed", "full_adapters"):
            torch.manual_seed(cfg.seed)
            bb.add_adapters(cfg.adapter)
        return bb

    return Task(make_backbone, train, test, num_labels, pad_id)


# ---------------------------------------------------------------------- one client
class InjectedFailure(RuntimeError):
    """A failure injected by ``fed.failure_rate``."""


def seed_generators(seed: int) -> None:
    """``torch.manual_seed`` for the generators a client uses. (``torch.manual_seed`` itself
    queues a CUDA seeding call with a stack trace whenever CUDA is not initialised: 0.2 ms
    and a little memory on every call, 15 times a round.)"""
    torch.default_generator.manual_seed(seed)
    if torch.cuda.is_initialized():
        torch.cuda.manual_seed_all(seed)


def client_update(backbone: Backbone, config: RunConfig, dataset, plan, state: dict[str, torch.Tensor],
                  round_index: int, client_id: int, pad_id: int = 0, *, seed: int | None = None,
                  targets: dict[str, torch.Tensor] | None = None):
    """One client's round: load ``state``, train the plan's tensors, return the LocalResult.

    ``seed`` (:func:`client_seed`) and ``targets`` (``tensors_by_name`` of ``state``'s names)
    may be passed when the caller computed them for a whole round.
    Raises :class:`InjectedFailure` when the failure injection picks this (round, client).
    """
    if injected_failure(config.seed, round_index, client_id, config.fed.failure_rate):
        raise InjectedFailure(f"injected failure (rate {config.fed.failure_rate})")
    set_state(backbone, state, targets)
    seed = client_seed(config.seed, round_index, client_id) if seed is None else seed
    seed_generators(seed)
    return train_local(backbone, dataset, plan, config.train, seed=seed, pad_id=pad_id)


def client_profile(backbone: Backbone, config: RunConfig, dataset, pad_id: int = 0) -> list[float]:
    """FOAT on a client: CKA scores of every layer on its first local batch."""
    batch = next(batches(dataset, min(config.chain.foat_batch_size, len(dataset)), shuffle=True,
                         seed=config.seed, pad_id=pad_id))
    return foat.profile_client(backbone, batch)


# ---------------------------------------------------------------------- the server
def exchanged_names(backbone: Backbone, method: str) -> list[str]:
    """Every tensor ``method`` can train at some round: the global state the server keeps."""
    widest = "full_adapters" if method == "chainfed" else method
    return trainable_names(backbone, plan_for(widest, backbone.num_layers))


class Server:
    """Schedule, client selection, downlink and FedAvg of the window; checkpointable.

    ``capacity_gb[k]`` is client k's device memory. The simulator and the Flower strategy
    both call :meth:`foat_clients`/:meth:`set_start`, then per round :meth:`plan`,
    :meth:`round_clients`, :meth:`downlink` and :meth:`aggregate`.
    """

    def __init__(self, config: RunConfig, backbone: Backbone, capacity_gb: np.ndarray, seq_len: int):
        self.config = config
        cfg, L = config, backbone.num_layers
        self.num_layers = L
        dtype = str(next(backbone.layers.parameters()).dtype).removeprefix("torch.")

        def peak(method: str, w: int) -> int:
            """Analytic peak of one client; ChainFed's assumes a streamed client (client_peak_bytes)."""
            return client_peak_bytes(backbone.config, method, w, batch_size=cfg.train.batch_size, seq_len=seq_len,
                                     bottleneck=cfg.adapter.bottleneck, optimizer=cfg.train.optimizer,
                                     dtype=dtype).total
        self.bytes_per_gb = cfg.fed.memory_scale or peak("full_adapters", L) / LARGEST_DEVICE_GB
        capacity = np.asarray(capacity_gb, dtype=np.float64) * self.bytes_per_gb
        window = cfg.chain.window
        if cfg.method == "chainfed" and cfg.fed.window_from_memory:
            fits_one = capacity[capacity >= peak("chainfed", 1)]
            if len(fits_one):
                smallest = fits_one.min()
                window = max(w for w in range(1, L + 1) if w == 1 or peak("chainfed", w) <= smallest)
        cfg.chain.replace(window=window).validate_for(L)
        self.window = window
        self.need_bytes = peak(cfg.method, window)
        fits = capacity >= self.need_bytes
        if not fits.any():
            raise ValueError(f"RunConfig.method: no client can fit {cfg.method!r}: it needs "
                             f"{self.need_bytes / self.bytes_per_gb:.2f} GB-equivalent, the largest device has "
                             f"{capacity.max() / self.bytes_per_gb:.2f} GB")
        self.eligible = np.flatnonzero(fits) if cfg.fed.memory_aware else np.arange(len(capacity))
        if cfg.fed.clients_per_round > len(self.eligible):
            raise ValueError(f"FedConfig.clients_per_round: K={cfg.fed.clients_per_round} exceeds the "
                             f"{len(self.eligible)} eligible clients (of {len(capacity)}; method {cfg.method!r} "
                             f"needs {self.need_bytes / self.bytes_per_gb:.2f} GB-equivalent)")
        self.state: dict[str, Any] = {
            "round": 0, "start_layer": cfg.chain.start_layer if cfg.method == "chainfed" else 0,
            "foat_scores": None, "global": get_state(backbone, exchanged_names(backbone, cfg.method)),
            "versions": {}, "last_sync": np.full(len(capacity), -1, dtype=np.int64), "history": [],
        }
        self._backbone = backbone
        self._window: tuple = (None, [], [])

    # -- FOAT
    @property
    def needs_foat(self) -> bool:
        return self.state["start_layer"] is None

    def foat_clients(self) -> list[int]:
        k = min(self.config.fed.clients_per_round, len(self.eligible))
        return sample_clients(self.config.seed, 0, self.eligible, k, tag=_FOAT)

    def set_start(self, client_scores: list[list[float]], weights: list[float]) -> int:
        scores = foat.aggregate_scores(client_scores, weights)
        tau = self.config.chain.resolved_tau(self._backbone.family)
        self.state["foat_scores"] = scores.tolist()
        self.state["start_layer"] = foat.start_layer(scores, tau)
        return self.state["start_layer"]

    # -- rounds
    def plan(self, round_index: int):
        cfg = self.config
        stage = None
        if cfg.method == "chainfed":
            stage = stage_at(round_index, self.num_layers, self.state["start_layer"], self.window, cfg.chain.passes)
        return plan_for(cfg.method, self.num_layers, stage, cfg.chain.resolved_lambda(self._backbone.family))

    def round_clients(self, round_index: int) -> list[int]:
        return sample_clients(self.config.seed, round_index, self.eligible, self.config.fed.clients_per_round)

    def window_names(self, plan) -> list[str]:
        """Global tensors the plan trains (computed once per plan: every client of a round asks)."""
        if self._window[0] is not plan:
            names = [n for n in trainable_names(self._backbone, plan) if n in self.state["global"]]
            chosen = set(names)
            self._window = (plan, names, [n for n in self.state["global"] if n not in chosen])
        return self._window[1]

    def window_state(self, plan) -> dict[str, torch.Tensor]:
        g = self.state["global"]
        return {n: g[n] for n in self.window_names(plan)}

    def downlink(self, round_index: int, client_id: int, plan) -> tuple[dict, dict]:
        """(window tensors, context tensors the client has not seen since its last round)."""
        g = self.state["global"]
        window = self.window_state(plan)          # also caches the names outside the window
        last_sync = self.state["last_sync"]
        context = stale_names(self._window[2], self.state["versions"], int(last_sync[client_id]))
        last_sync[client_id] = round_index
        return window, {n: g[n] for n in context}

    def aggregate(self, round_index: int, updates: list[tuple[dict, int]]) -> dict:
        """FedAvg the window into the global state; returns the averaged tensors."""
        if not updates or not updates[0][0]:
            return {}
        avg = fedavg(updates)
        self.state["global"] = merge(self.state["global"], avg)
        for n in avg:
            self.state["versions"][n] = round_index
        return avg

    # -- checkpoint
    def snapshot(self) -> dict:
        """The checkpoint's content, safe to serialise later: the containers the next rounds
        change are copied (the tensors are not: the server replaces them, never writes them).
        The metrics history is left out: it is the append-only ``metrics.jsonl``, whose first
        ``round`` lines the checkpoint stands for, so a checkpoint costs the same at every round."""
        st = self.state
        return {**{k: v for k, v in st.items() if k != "history"}, "global": dict(st["global"]),
                "versions": dict(st["versions"]), "last_sync": st["last_sync"].copy(),
                "config": self.config.to_dict(), "window": self.window, "torch_rng": torch.get_rng_state()}

    def checkpoint_bytes(self, snapshot: dict | None = None) -> bytes:
        """The server state as a pickle, tensors as numpy arrays where numpy has their dtype
        (a tenth of ``torch.save``'s time for a few dozen small tensors; read by :func:`read_checkpoint`)."""
        snap = snapshot if snapshot is not None else self.snapshot()
        snap["global"] = {k: _to_numpy(v) for k, v in snap["global"].items()}
        snap["torch_rng"] = _to_numpy(snap["torch_rng"])
        return pickle.dumps(snap, protocol=pickle.HIGHEST_PROTOCOL)

    def restore(self, path: Path, history: list[dict]) -> None:
        """Continue from the checkpoint at ``path``; ``history``: the metrics of the rounds so
        far (at least the checkpoint's ``round`` of them; later ones are dropped)."""
        saved = read_checkpoint(path)
        if saved.pop("config") != self.config.to_dict():
            raise ValueError(f"{path} holds a run with a different config; use a fresh out_dir")
        if len(history) < saved["round"]:
            raise ValueError(f"{path} is at round {saved['round']} but the metrics record has {len(history)} "
                             "rounds: it was truncated or edited; use a fresh out_dir")
        torch.set_rng_state(saved.pop("torch_rng"))
        saved.pop("window")
        self.state = {**saved, "history": history[:saved["round"]]}


def _to_numpy(t: torch.Tensor):
    """A CPU numpy copy of ``t`` (bit for bit), or ``t`` itself where numpy lacks its dtype (bfloat16)."""
    t = t.detach()
    if t.dtype == torch.bfloat16:
        return t.cpu()
    return t.cpu().numpy().copy() if t.device.type != "cpu" else t.numpy()


def read_checkpoint(path) -> dict:
    """A checkpoint written by :meth:`Server.checkpoint_bytes`, tensors back as torch tensors."""
    with open(path, "rb") as f:
        saved = pickle.load(f)
    as_tensor = lambda v: torch.from_numpy(v) if isinstance(v, np.ndarray) else v  # noqa: E731
    saved["global"] = {k: as_tensor(v) for k, v in saved["global"].items()}
    saved["torch_rng"] = as_tensor(saved["torch_rng"])
    return saved


class Checkpointer:
    """Writes the server's checkpoints (and appends the metrics record) in a background thread,
    one at a time, in order.

    ``save`` serialises the state on the caller's thread and returns: the file writes (and
    the checkpoint's fsync) overlap the next round. A write that fails is raised by the next
    ``save`` or by ``close``, naming the round; the checkpoint before it is intact, and a
    restart resumes from it, bitwise as ever (every round is a pure function of the seed),
    dropping any metrics line past it.
    """

    def __init__(self, path: Path, metrics_path: Path):
        self.path, self.metrics_path = path, metrics_path
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint")
        self._pending: Future | None = None

    def save(self, server: Server, label: str, metrics_line: str = "") -> None:
        self.wait()
        data = server.checkpoint_bytes()     # here: pickling holds the GIL, it would stall this thread anyway
        self._pending = self._pool.submit(self._write, data, label, metrics_line)

    def _write(self, data: bytes, label: str, metrics_line: str) -> None:
        try:
            if metrics_line:      # on disk before the checkpoint that stands for it
                with open(self.metrics_path, "a") as f:
                    f.write(metrics_line)
                    f.flush()
                    os.fsync(f.fileno())
            atomic_write_bytes(self.path, data)
        except OSError as e:
            raise OSError(e.errno, f"checkpoint after {label} not written to {self.path} ({e.strerror}); "
                                   "the previous checkpoint is intact and a restart resumes from it") from e

    def wait(self) -> None:
        """Block until the last checkpoint is on disk; raise its write error, if any."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self._pool.shutdown()


# ---------------------------------------------------------------------- the simulator
class Population:
    """N clients, built lazily: a partition (one index array) and a capacity per id."""

    def __init__(self, config: RunConfig, train):
        d = config.data
        self.config = config
        self.train = train
        self.partition = client_indices(train, d.num_clients, scheme=d.partition, alpha=d.alpha,
                                        min_partition_size=d.min_partition_size, seed=config.seed)
        self.capacity_gb = device_capacity_gb(config.seed, np.arange(d.num_clients), config.fed.memory_profile)

    @functools.cached_property
    def _columns(self) -> dict[str, torch.Tensor]:
        """The training set's columns as tensors, gathered once and shared by every client."""
        columns = ["input_ids", "attention_mask", "label"]
        return {k: torch.as_tensor(v) for k, v in self.train.with_format("torch", columns=columns)[:].items()}

    @functools.cached_property
    def _order(self) -> torch.Tensor:
        return torch.as_tensor(self.partition.order, dtype=torch.long)

    def data(self, client_id: int) -> "ClientRows":
        begin, end = self.partition.offsets[client_id:client_id + 2].tolist()
        return ClientRows(self._columns, self._order[begin:end])     # a view: nothing copied per client

    def num_examples(self, client_id: int) -> int:
        return int(self.partition.sizes()[client_id])


class ClientRows:
    """One client's examples as an index into the shared columns: rows are gathered per
    batch, so building a client costs nothing however large N is (``Dataset.select`` cost
    milliseconds per client). Reads like a tokenized ``datasets.Dataset``: ``len``, a column
    by name, or a dict of columns for a slice or a list of row positions."""

    def __init__(self, columns: dict[str, torch.Tensor], indices):
        self.columns = columns
        self.indices = (indices if isinstance(indices, torch.Tensor)
                        else torch.as_tensor(np.asarray(indices), dtype=torch.long))

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, key):
        if isinstance(key, str):
            return self.columns[key][self.indices]
        rows = self.indices[key] if isinstance(key, slice) else self.indices[torch.as_tensor(key, dtype=torch.long)]
        return {name: column[rows] for name, column in self.columns.items()}


def _seq_len(dataset) -> int:
    return int(max(sum(m) for m in dataset[: min(len(dataset), 256)]["attention_mask"]))


def _round_metrics(round_index, plan, clients, results, failures, bytes_up, bytes_down, bytes_ctx) -> dict:
    n = sum(r.num_examples for _, r in results)
    mean = lambda key: (sum(getattr(r, key) * r.num_examples for _, r in results) / n  # noqa: E731
                        if n and results[0][1].steps else math.nan)
    return {"round": round_index, "window": [plan.training.start, plan.training.stop],
            "clients": clients, "trained": [c for c, _ in results], "failed": [f["client"] for f in failures],
            "num_examples": n, "train_loss": mean("loss"), "train_accuracy": mean("accuracy"),
            "bytes_up": bytes_up, "bytes_down": bytes_down, "bytes_down_context": bytes_ctx,
            "seconds_train": sum(r.seconds for _, r in results)}


def run(config: RunConfig, out_dir, *, progress: bool = True, task: Task | None = None) -> dict:
    """Run (or resume) a federated experiment; return its record, also written to out_dir.

    ``out_dir`` receives ``metrics.jsonl`` (one line per round, with its failures),
    ``checkpoint.pkl`` (server state after every round; it stands for the metrics lines before
    it) and ``record.json`` (at the end). Rerunning the same command on the same ``out_dir``
    continues from the last checkpoint.
    """
    started = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = config
    task = task or build_task(cfg)
    backbone = task.make_backbone()
    pop = Population(cfg, task.train)
    server = Server(cfg, backbone, pop.capacity_gb, _seq_len(task.train))
    ckpt = out / CHECKPOINT_FILE
    if ckpt.exists():
        server.restore(ckpt, _read_metrics(out))
        _rewrite_metrics(out, server.state["history"])
    elif (out / METRICS_FILE).exists():
        (out / METRICS_FILE).unlink()

    checkpoints = Checkpointer(ckpt, out / METRICS_FILE)
    gc.freeze()      # the model, data and libraries live all run: keep them out of every full collection
    try:
        _rounds(cfg, task, backbone, pop, server, out, checkpoints, progress, started)
    finally:
        gc.unfreeze()
        checkpoints.close()

    record = make_record(cfg.to_dict(), seed=cfg.seed, wall_s=time.perf_counter() - started,
                         history=server.state["history"],
                         failures=[f for m in server.state["history"] for f in m["failures"]],
                         start_layer=server.state["start_layer"], window=server.window,
                         foat_scores=server.state["foat_scores"],
                         eligible_clients=int(len(server.eligible)), num_clients=cfg.data.num_clients,
                         need_gb=server.need_bytes / server.bytes_per_gb,
                         final=server.state["history"][-1] if server.state["history"] else {})
    atomic_write_json(out / RECORD_FILE, record)
    return record


def _rounds(cfg: RunConfig, task: Task, backbone: Backbone, pop: "Population", server: Server, out: Path,
            checkpoints: Checkpointer, progress: bool, started: float) -> None:
    """FOAT (if the start layer is not set yet), then the rounds from the checkpoint's on."""
    from tqdm.auto import tqdm

    if server.needs_foat:
        clients = server.foat_clients()
        set_state(backbone, server.state["global"])
        scores = [client_profile(backbone, cfg, pop.data(c), task.pad_id) for c in clients]
        server.set_start(scores, [pop.num_examples(c) for c in clients])
        checkpoints.save(server, "FOAT")

    rounds, st = cfg.fed.rounds, server.state
    bar = tqdm(range(st["round"], rounds), total=rounds, initial=st["round"], disable=not progress,
               desc=f"{cfg.method} N={cfg.data.num_clients} K={cfg.fed.clients_per_round}")
    everything = tensors_by_name(backbone, st["global"])      # the model's tensors, looked up once
    for r in bar:
        round_started = time.perf_counter()
        plan = server.plan(r)
        clients = server.round_clients(r)
        results, failures, bytes_up, bytes_down, bytes_ctx = [], [], 0, 0, 0
        # Clients share one model: it starts the round at the global state, and since a
        # client trains only the window, resetting the window gives the next one that state.
        set_state(backbone, server.state["global"], everything)
        targets = {n: everything[n] for n in server.window_names(plan)}
        seeds = client_seed(cfg.seed, r, np.asarray(clients))
        window_bytes, clients_s = state_bytes(server.window_state(plan)), 0.0
        for c, seed in zip(clients, seeds.tolist()):
            window, context = server.downlink(r, c, plan)
            bytes_down += window_bytes
            bytes_ctx += state_bytes(context)
            rows = pop.data(c)                            # the simulator's stand-in for the device's data
            client_started = time.perf_counter()
            try:
                res = client_update(backbone, cfg, rows, plan, window, r, c, task.pad_id,
                                    seed=seed, targets=targets)
            except Exception as err:     # a failing client is dropped from the round, not the run
                failures.append({"round": r, "client": c, "kind": "injected" if isinstance(err, InjectedFailure)
                                 else "error", "message": f"{type(err).__name__}: {err}"})
                continue
            finally:
                clients_s += time.perf_counter() - client_started
            timeout = cfg.fed.client_timeout_s
            if timeout is not None and res.seconds > timeout:
                failures.append({"round": r, "client": c, "kind": "timeout",
                                 "message": f"local training took {res.seconds:.2f} s > {timeout} s"})
                continue
            bytes_up += state_bytes(res.state)
            results.append((c, res))
        server.aggregate(r, [(res.state, res.num_examples) for _, res in results])
        metrics = _round_metrics(r, plan, clients, results, failures, bytes_up, bytes_down, bytes_ctx)
        metrics["skipped"] = not results
        metrics["failures"] = failures
        metrics["seconds_clients"] = clients_s       # what the clients do: load the window, seed, train
        if not results:
            bar.write(f"round {r}: every client failed; round skipped")
        if (r + 1) % cfg.fed.eval_every == 0 or r == rounds - 1:
            set_state(backbone, server.state["global"], everything)
            metrics.update({f"test_{k}": v for k, v in evaluate(backbone, task.test, pad_id=task.pad_id).items()})
        metrics["seconds_round"] = time.perf_counter() - round_started     # without the checkpoint below
        metrics["seconds_since_start"] = round_started - started           # round spacing: everything
        st = server.state
        st["history"].append(metrics)
        st["round"] = r + 1
        checkpoints.save(server, f"round {r}", json.dumps(metrics) + "\n")
        bar.set_postfix(loss=f"{metrics['train_loss']:.3f}",
                        acc=f"{metrics.get('test_accuracy', math.nan):.3f}")
    bar.close()


def _read_metrics(out: Path) -> list[dict]:
    """The rounds in ``metrics.jsonl`` (a line cut short by a kill ends the list)."""
    history = []
    path = out / METRICS_FILE
    for line in (path.read_text().splitlines() if path.exists() else []):
        try:
            history.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return history


def _rewrite_metrics(out: Path, history: list[dict]) -> None:
    """Make metrics.jsonl agree with the checkpoint (a kill may have come between the two)."""
    atomic_write_bytes(out / METRICS_FILE, "".join(json.dumps(m) + "\n" for m in history).encode())


def load_final_state(out_dir) -> dict[str, torch.Tensor]:
    """Global tensors of a run's last checkpoint."""
    return read_checkpoint(Path(out_dir) / CHECKPOINT_FILE)["global"]


# ---------------------------------------------------------------------- CLI
def config_from_args(config_path: str | None, overrides: list[str]) -> RunConfig:
    """A RunConfig from an optional JSON file plus ``section.field=value`` overrides
    (values parsed as JSON when they parse, else kept as strings)."""
    data: dict[str, Any] = json.loads(Path(config_path).read_text()) if config_path else {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ValueError(f"override {item!r} is not key=value")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        node = data
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return RunConfig.from_dict(data)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run a federated experiment in-process (resumes from --out).")
    parser.add_argument("--config", help="RunConfig as JSON")
    parser.add_argument("--out", required=True, help="output folder (checkpoint, metrics.jsonl, record.json)")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("overrides", nargs="*", help="section.field=value, e.g. fed.rounds=3")
    args = parser.parse_args(argv)
    record = run(config_from_args(args.config, args.overrides), args.out, progress=not args.no_progress)
    print(json.dumps({k: record[k] for k in ("wall_s", "peak_rss_bytes", "final")}, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
