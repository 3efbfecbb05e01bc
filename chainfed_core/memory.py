"""Memory of adapter training: an exact meter, the process peak, and an analytic model.

Three tools, from most to least direct:

- :class:`MemoryMeter` tracks every tensor storage allocated while it is active (a
  ``TorchDispatchMode`` sees each op's outputs; a weak reference on each storage sees it
  die) and replays the log for the peak of live tensor bytes, broken down into
  ``frozen_weights``, ``trainable`` (adapters and head), ``gradients``,
  ``optimizer_state``, ``activations`` and ``cache``. On CUDA it also reports
  ``torch.cuda.max_memory_allocated``.
- :func:`measure_rss` runs a function in a fresh Python process with a fixed thread count
  and reports its peak resident set (``VmHWM`` after writing 5 to
  ``/proc/self/clear_refs``): what the operating system sees, allocator slack included.
- :func:`peak_training_bytes` predicts the meter's peak from a model config alone, for
  shapes that cannot run here (LLaMA2-7B/13B); :func:`client_peak_bytes` applies it to a
  federated client as deployed (memory-aware selection, result tables).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import weakref
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Literal

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

CATEGORIES = ("frozen_weights", "trainable", "gradients", "optimizer_state", "activations", "cache")

_TAG = threading.local()


@contextmanager
def tagged(category: str):
    """Storages allocated by this thread inside the block count as ``category``
    (the layer store tags weights it reads, the activation cache its entries)."""
    if category not in CATEGORIES:
        raise ValueError(f"memory category {category!r} is not one of {list(CATEGORIES)}")
    previous = getattr(_TAG, "value", None)
    _TAG.value = category
    try:
        yield
    finally:
        _TAG.value = previous


# ---------------------------------------------------------------------- the meter
@dataclass
class MemoryReport:
    peak_bytes: int                          # peak of live tensor bytes
    breakdown: dict[str, int]                # live bytes per category at that peak
    final_bytes: int                         # live tracked bytes when the meter stopped
    cuda_max_allocated: int | None = None    # torch.cuda.max_memory_allocated over the block

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class MemoryMeter(TorchDispatchMode):
    """Exact peak tensor bytes of a block, with a breakdown by category.

    ``with MemoryMeter(backbone) as meter: train_local(...)``, then ``meter.report()``.
    Tensors alive on entry count only if registered: the backbone's weights (adapters and
    head as ``trainable``, the rest as ``frozen_weights``) and ``extra`` tensors by
    category (for example the activation cache's entries). Storages allocated inside the
    block count as the tag of :func:`tagged`, else ``activations``; after each optimizer
    step its state and the gradients it used are reclassified.
    Allocations made by other threads are invisible unless made under this mode, which is
    why the layer streamer allocates its read buffers on the calling thread.
    """

    def __init__(self, backbone=None, extra: dict[str, Iterable[torch.Tensor]] | None = None):
        super().__init__()
        self.backbone = backbone
        self.extra = extra or {}
        self._lock = threading.Lock()

    # -------------------------------------------------------------- bookkeeping
    def __enter__(self):
        self._live: dict[int, tuple[int, int, Any]] = {}   # storage key -> (uid, nbytes, weakref)
        self._category: dict[int, str] = {}
        self._log: list[tuple[int, int]] = []                # (uid, +/- bytes) in order
        self._uid = 0
        self._cuda = torch.cuda.is_available()
        if self._cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        self._register_existing()
        self._hook = register_optimizer_step_post_hook(self._after_step)
        return super().__enter__()

    def __exit__(self, *exc):
        out = super().__exit__(*exc)
        self._hook.remove()
        self._cuda_peak = torch.cuda.max_memory_allocated() if self._cuda else None
        return out

    def _register_existing(self) -> None:
        if self.backbone is not None:
            trainable = set()
            adapters = getattr(self.backbone.model, "chainfed_adapters", None)
            if adapters is not None:
                for p in adapters.parameters():
                    trainable.add(id(p))
                    self._see(p, "trainable")
            for p in self.backbone.head_parameters().values():
                trainable.add(id(p))
                self._see(p, "trainable")
            for t in list(self.backbone.model.parameters()) + list(self.backbone.model.buffers()):
                if id(t) not in trainable:
                    self._see(t, "frozen_weights")
        for category, tensors in self.extra.items():
            for t in tensors:
                self._see(t, category)

    def _see(self, t: torch.Tensor, category: str) -> None:
        if t.device.type == "meta" or t.is_sparse:
            return
        try:
            storage = t.untyped_storage()
        except (NotImplementedError, RuntimeError):
            return
        key, nbytes = storage._cdata, storage.nbytes()
        with self._lock:
            known = self._live.get(key)
            if known is not None:
                uid, old, ref = known
                if nbytes != old:            # resized in place
                    self._live[key] = (uid, nbytes, ref)
                    self._log.append((uid, nbytes - old))
                return
            if nbytes == 0:
                return
            self._uid += 1
            uid = self._uid
            ref = weakref.ref(storage, lambda _r, k=key, u=uid: self._dead(k, u))
            self._live[key] = (uid, nbytes, ref)
            self._category[uid] = category
            self._log.append((uid, nbytes))

    def _dead(self, key: int, uid: int) -> None:
        with self._lock:
            known = self._live.get(key)
            if known is not None and known[0] == uid:
                del self._live[key]
                self._log.append((uid, -known[1]))

    def classify(self, tensors: Iterable[torch.Tensor], category: str) -> None:
        """Put live tensors' storages (whenever allocated) in ``category``."""
        for t in tensors:
            if t is None or t.device.type == "meta":
                continue
            self._see(t, category)
            known = self._live.get(t.untyped_storage()._cdata)
            if known is not None:
                self._category[known[0]] = category

    def _after_step(self, optimizer, _args, _kwargs) -> None:
        state = [v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
        self.classify(state, "optimizer_state")
        self.classify([p.grad for g in optimizer.param_groups for p in g["params"]], "gradients")

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        category = getattr(_TAG, "value", None) or "activations"
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self._see(t, category)
        return out

    # -------------------------------------------------------------- result
    def report(self) -> MemoryReport:
        """Replay the allocation log: the peak of live bytes and its breakdown."""
        with self._lock:
            log = list(self._log)
            category = dict(self._category)
        live, total, peak, peak_at = {}, 0, 0, 0
        for n, (uid, delta) in enumerate(log):
            total += delta
            live[uid] = live.get(uid, 0) + delta
            if total > peak:
                peak, peak_at = total, n
        breakdown = dict.fromkeys(CATEGORIES, 0)
        for uid, delta in log[:peak_at + 1]:
            breakdown[category[uid]] += delta
        return MemoryReport(peak_bytes=peak, breakdown=breakdown, final_bytes=total,
                            cuda_max_allocated=getattr(self, "_cuda_peak", None))


def metered_training(backbone, dataset, plan, cfg, *, seed: int = 0, prefix=None, cache=None) -> tuple[MemoryReport, Any]:
    """Run :func:`~chainfed_core.train.train_local` under a :class:`MemoryMeter`.

    The peak covers whatever happens inside: the prefix (or the cache's fill or extension),
    every step's forward and backward, and the optimizer state created on the first step.
    """
    from .train import train_local

    extra = {"cache": cache.tensors()} if cache is not None else None
    with MemoryMeter(backbone, extra) as meter:
        result = train_local(backbone, dataset, plan, cfg, seed=seed, prefix=prefix)
    return meter.report(), result


# ---------------------------------------------------------------------- process peak RSS
def reset_peak_rss() -> None:
    """Reset this process's peak resident set (Linux: VmHWM restarts from the current RSS)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak_rss() -> int:
    """Peak resident set of this process since start or the last :func:`reset_peak_rss`, in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("VmHWM not found in /proc/self/status")


def measure_rss(target: str, kwargs: dict | None = None, threads: int = 2, timeout: float | None = None) -> dict:
    """Run ``module:function(**kwargs)`` in a fresh process with ``threads`` compute threads.

    Returns the function's JSON-able result under ``"result"``, ``"peak_rss"`` (bytes, peak
    since the child last called :func:`reset_peak_rss`, which it does after importing the
    target's module; the function may call it again to leave its own setup out) and
    ``"baseline_rss"`` (resident set right after those imports).
    """
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    cmd = [sys.executable, "-m", "chainfed_core.memory", target, json.dumps(kwargs or {}), str(threads)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"{target} failed in a fresh process (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _child(target: str, kwargs_json: str, threads: str) -> None:
    import importlib

    torch.set_num_threads(int(threads))
    module_name, _, name = target.partition(":")
    fn = getattr(importlib.import_module(module_name), name)
    reset_peak_rss()
    baseline = peak_rss()
    result = fn(**json.loads(kwargs_json))
    print(json.dumps({"result": result, "peak_rss": peak_rss(), "baseline_rss": baseline}))


# ---------------------------------------------------------------------- analytic model
@dataclass
class MemoryEstimate:
    """Predicted peak bytes of adapter training, by the meter's categories."""
    frozen_weights: int
    trainable: int
    gradients: int
    optimizer_state: int
    activations: int
    cache: int = 0
    notes: dict[str, Any] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(getattr(self, c) for c in CATEGORIES)

    def to_dict(self) -> dict[str, Any]:
        return {**{c: getattr(self, c) for c in CATEGORIES}, "total": self.total, "notes": self.notes}


_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def _hf_config(config_like):
    from transformers import AutoConfig, PretrainedConfig

    if isinstance(config_like, PretrainedConfig):
        return config_like
    data = dict(config_like)
    return AutoConfig.for_model(data.pop("model_type"), **data)


def part_sizes(config_like) -> dict[str, int]:
    """Parameter (and buffer) element counts of one layer, the embeddings, the head and the rest,
    counted exactly on a model built on the meta device (no memory, any size)."""
    from .backbone import from_model
    from .streaming import _build, _part_tensors

    config = _hf_config(config_like)
    with torch.device("meta"):
        model = _build(config, config.model_type)
    parts = _part_tensors(model, from_model(model, config.model_type))
    sizes = {key: sum(t.numel() for t in ts.values()) for key, ts in parts.items()}
    return {"embed": sizes["embed"], "head": sizes["head"], "rest": sizes["rest"],
            "layer": sizes["layer.0"], "num_layers": sum(k.startswith("layer.") for k in sizes)}


def _dims(config) -> dict[str, int]:
    hidden = int(getattr(config, "hidden_size", None) or config.dim)
    heads = int(getattr(config, "num_attention_heads", None) or config.n_heads)
    inter = int(getattr(config, "intermediate_size", None) or config.hidden_dim)
    kv = int(getattr(config, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(config, "head_dim", None) or hidden // heads)
    return {"H": hidden, "I": inter, "heads": heads, "kv": kv, "head_dim": head_dim,
            "V": int(config.vocab_size), "K": int(getattr(config, "num_labels", 2))}


def _layer_activation_elements(family: str, d: dict[str, int], seq_len: int, bottleneck: int) -> int:
    """Elements autograd saves per token for one layer whose input needs a gradient, adapter included.

    Encoders (SDPA): q, k, v, attention output (4H) and log-sum-exp (heads); the inputs of
    both LayerNorms (2H) with their mean and rstd (4); the GELU input (I); the adapter's
    input (H) and bottleneck activation (r).
    MPNet (eager attention): q, k, v (3H), softmax probabilities (heads * T), then as above.
    LLaMA (SDPA): two RMSNorm inputs (2H) with rstd (2); q (H), k and v (2 * kv * head_dim),
    log-sum-exp (heads), attention output (H); gate, up and SiLU outputs (3I); adapter (H + r).
    """
    H, I, r = d["H"], d["I"], bottleneck
    if family == "llama":
        return 5 * H + 2 * d["kv"] * d["head_dim"] + d["heads"] + 3 * I + r + 2
    if family == "mpnet":
        return 6 * H + d["heads"] * seq_len + I + r + 4
    return 7 * H + d["heads"] + I + r + 4


def _fft_layer_activation_elements(family: str, d: dict[str, int], seq_len: int) -> int:
    """Per-token elements saved by one layer whose own weights train (no adapter).

    As :func:`_layer_activation_elements` without the adapter (H + r), plus the inputs the
    trainable projections keep for their weight gradients that are not saved already: the
    two normalisation outputs (2H) and the activation output feeding the down projection (I).
    """
    return _layer_activation_elements(family, d, seq_len, 0) - d["H"] + 2 * d["H"] + d["I"]


def _inference_elements(family: str, d: dict[str, int], seq_len: int) -> int:
    """Per-token elements alive at the widest point of one layer's forward under ``no_grad``,
    its input included: the attention block (input, q, k, v, attention output, its reshaped
    copy and the projection) or the feed-forward block (input, normalised input, the up
    projection and its activation; LLaMA's gate, up and their product)."""
    H, I = d["H"], d["I"]
    if family == "llama":
        return max(6 * H + 4 * d["kv"] * d["head_dim"], 3 * H + 3 * I)
    attention = 7 * H + (2 * d["heads"] * seq_len if family == "mpnet" else 0)   # eager scores, probabilities
    return max(attention, 3 * H + 2 * I)


METHODS = ("full_adapters", "chainfed", "fft", "linear_probe", "no_ft")


def peak_training_bytes(model_config_like, method: Literal["full_adapters", "chainfed", "fft", "linear_probe", "no_ft"],
                        window: int = 1, batch_size: int = 8, seq_len: int = 128, dtype: str = "float32",
                        compute_dtype: str | None = None, bottleneck: int = 64,
                        optimizer: Literal["sgd", "adamw"] = "sgd", streamed: bool = False,
                        cached: bool = False, cache_bytes: int = 0, gpo: bool = True,
                        window_start: int = 0) -> MemoryEstimate:
    """Predicted peak tensor bytes of one client's training step (or, for ``no_ft``, inference).

    Args:
        model_config_like: a HF config or a dict with ``model_type`` and the config's fields
            (``hidden_size``, ``num_hidden_layers``, ``intermediate_size``, ...).
        method: ``"full_adapters"`` (every layer's adapter, end to end), ``"chainfed"``
            (a window of ``window`` adapters after a frozen prefix), ``"fft"`` (every layer's
            own weights train, end to end, no adapters), ``"linear_probe"`` (the head trains
            on a forward-only pass through every layer) or ``"no_ft"`` (one forward pass of
            a batch, nothing trains).
        window: W, the number of adapters trained together (chainfed).
        batch_size, seq_len: tokens per step are ``batch_size * seq_len``.
        dtype: storage dtype of the frozen weights (and of FFT's trainable layer weights,
            their gradients and optimizer state); ``compute_dtype`` that of activations
            (default: ``dtype``). Adapters and classification heads are float32.
        bottleneck: adapter size r. optimizer: ``"sgd"`` (momentum: one state tensor per
            parameter) or ``"adamw"`` (two).
        streamed: chainfed reads layers from a layer store: only the window, the head and
            (when the prefix is computed, not cached) the embeddings and one prefetched part
            are resident; otherwise every weight is. Other methods keep every weight.
        cached: the window's input comes from the activation cache (no prefix forward);
            ``cache_bytes`` is the part of the cache held in memory (chainfed only).
        gpo: chainfed's global branch runs the later adapters and the head a second time.
        window_start: first layer of the window; the default 0 leaves the most later
            adapters to GPO's global branch (the largest chainfed peak).

    The first trained layer of the adapter methods saves only its adapter's activations
    because its input needs no gradient; under FFT every layer saves its inputs for its
    weight gradients. A causal LM's head (final norm and LM head) is frozen, so linear
    probing a LLaMA trains nothing and its peak is the weights. The gradients of a step are
    freed only after the next step's forward, so gradients, optimizer state and activations
    are live together. The model covers tensor bytes, as :class:`MemoryMeter` counts them;
    the process adds the runtime and allocator slack (:func:`measure_rss`).
    """
    if method not in METHODS:
        raise ValueError(f"method: {method!r} is not one of {list(METHODS)}")
    if (streamed or cached) and method != "chainfed":
        raise ValueError(f"streamed/cached: only 'chainfed' streams layers or caches its prefix, not {method!r}")
    config = _hf_config(model_config_like)
    family = config.model_type
    sizes = part_sizes(config)
    d = _dims(config)
    L = sizes["num_layers"]
    if not 1 <= window <= L:
        raise ValueError(f"window: W={window} must lie in 1..{L}")
    wb = _BYTES[dtype]
    cb = _BYTES[compute_dtype or dtype]
    H, r, B, T = d["H"], bottleneck, batch_size, seq_len
    causal = family == "llama"
    adapters = method in ("full_adapters", "chainfed")

    # Weights. Classification heads are float32 and trainable (frozen under no_ft); the LM head is frozen.
    head_trains = not causal and method != "no_ft"
    if method == "chainfed" and streamed:
        prefetch = 0 if cached else sizes["embed"]      # next step's first part, read during the window
        frozen = (sizes["rest"] + window * sizes["layer"] + prefetch) * wb
    else:
        frozen = (sizes["embed"] + sizes["rest"] + L * sizes["layer"]) * wb
    frozen += 0 if head_trains else sizes["head"] * (wb if causal else 4)
    adapter_params = 2 * H * r + H + r if adapters else 0
    head_trainable = sizes["head"] * 4 if head_trains else 0
    trainable = L * adapter_params * 4 + head_trainable
    if method == "fft":                                  # the layers' own weights move to trainable
        frozen -= L * sizes["layer"] * wb
        trainable += L * sizes["layer"] * wb
    trained_adapters = {"full_adapters": L, "chainfed": window}.get(method, 0)
    grads = trained_adapters * adapter_params * 4 + head_trainable
    grads += L * sizes["layer"] * wb if method == "fft" else 0
    opt = grads * (2 if optimizer == "adamw" else 1)

    # Activations (elements of the compute dtype).
    if method in ("no_ft", "linear_probe"):
        acts = 0
        if head_trains or method == "no_ft":             # a causal LM's linear probe never runs a step
            acts = B * T * _inference_elements(family, d, T) * cb
            acts += B * T * T * cb                       # attention mask
            if family == "mpnet":
                acts += B * d["heads"] * T * T * cb      # relative position bias
            acts += B * T * d["V"] * (cb + 4) if causal else B * H * 4 * 4   # logits and log-softmax; pooled
            if method == "linear_probe":
                acts += B * T * H * cb                   # the last step's output, held until the next prefix returns
    else:
        if method == "fft":
            saved = L * _fft_layer_activation_elements(family, d, T)
        else:
            per_token = _layer_activation_elements(family, d, T, r)
            trained = L if method == "full_adapters" else window
            saved = (trained - 1) * per_token + (H + r)        # first trained layer: its adapter only
        subsequent = 0 if method != "chainfed" or not gpo else max(L - window_start - window, 0)
        saved += subsequent * r                                  # global branch through later frozen adapters
        acts = B * T * saved * cb
        acts += B * T * T * cb                                   # attention mask (B, 1, T, T), shared by layers
        if family == "mpnet":
            acts += B * d["heads"] * T * T * cb                  # relative position bias
        if causal:
            branches = 2 if subsequent else 1
            acts += B * T * (H + 1) * 4 * branches               # final RMSNorm input and rstd
            acts += B * T * d["V"] * (cb + 4 * branches)         # logits, and the log-softmax of each branch
            acts += 2 * T * d["head_dim"] * cb                   # rotary cos / sin
        else:
            acts += B * H * 4 * 4                                # pooled features and their gradients
        acts += B * T * H * cb * 2                               # window input and the layer output in flight
        acts += B * T * (d["I"] + 3 * H) * cb                    # one layer's backward working set

    return MemoryEstimate(frozen_weights=int(frozen), trainable=int(trainable), gradients=int(grads),
                          optimizer_state=int(opt), activations=int(acts), cache=int(cache_bytes if cached else 0),
                          notes={"family": family, "num_layers": L, "window": window, "method": method,
                                 "streamed": streamed, "cached": cached, "batch_size": B, "seq_len": T,
                                 "dtype": dtype, "compute_dtype": compute_dtype or dtype})


def client_peak_bytes(model_config_like, method: str, window: int = 1, *, batch_size: int, seq_len: int,
                      bottleneck: int = 64, optimizer: Literal["sgd", "adamw"] = "sgd",
                      dtype: str = "float32") -> MemoryEstimate:
    """Peak memory of one federated client running ``method`` as the method is deployed.

    The one estimate behind memory-aware client selection, ``fed.window_from_memory`` and
    the peak memory column of the result tables. ChainFed clients are taken to stream their
    layers from a layer store (``streamed=True``, prefix recomputed, not cached): the
    paper's memory claim is for such clients, so eligibility reflects ChainFed as deployed
    even though the in-process simulator keeps every layer in memory. Every other method
    holds the whole model.
    """
    return peak_training_bytes(model_config_like, method, window if method == "chainfed" else 1,
                               batch_size=batch_size, seq_len=seq_len, dtype=dtype, bottleneck=bottleneck,
                               optimizer=optimizer, streamed=method == "chainfed")


# ---------------------------------------------------------------------- paper shapes, measured
# HF config fields of the paper's models (random weights of these shapes stand in for them).
# MiniLM-L6 plays the paper's DistilBERT role, MPNet-base its BERT-base role.
SHAPES: dict[str, dict[str, Any]] = {
    "minilm-l6": dict(model_type="bert", hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                      intermediate_size=1536, vocab_size=30522, num_labels=2),
    "mpnet-base": dict(model_type="mpnet", hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                       intermediate_size=3072, vocab_size=30527, num_labels=2),
    "roberta-large": dict(model_type="roberta", hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                          intermediate_size=4096, vocab_size=50265, max_position_embeddings=514,
                          pad_token_id=1, num_labels=2),
    "llama2-7b": dict(model_type="llama", hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=32, intermediate_size=11008, vocab_size=32000,
                      tie_word_embeddings=False),
    "llama2-13b": dict(model_type="llama", hidden_size=5120, num_hidden_layers=40, num_attention_heads=40,
                       num_key_value_heads=40, intermediate_size=13824, vocab_size=32000,
                       tie_word_embeddings=False),
}


def random_token_dataset(n: int, seq_len: int, vocab: int, num_labels: int = 2, seed: int = 0):
    """``n`` unpadded rows of ``seq_len`` random token ids with random labels (a tokenized Dataset)."""
    from datasets import Dataset

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (n, seq_len), generator=g)      # (n, T)
    return Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": [[1] * seq_len] * n,
                              "label": torch.randint(0, num_labels, (n,), generator=g).tolist()})


def measure_peak(config_like, method: str, window: int = 1, *, batch_size: int, seq_len: int, folder,
                 bottleneck: int = 64, streamed: bool = False, window_start: int = 0) -> MemoryReport:
    """The meter's peak over two steps of ``method`` (``no_ft``: two inference batches) on a
    random-weight model of a config's shape, float32 with SGD: the setting
    :func:`peak_training_bytes` predicts for the same arguments.

    The weights are written once as a layer store in ``folder`` (reused when it is there);
    ``streamed`` ChainFed reads them part by part with prefetch, otherwise all are resident.
    """
    from pathlib import Path

    from .config import AdapterConfig, TrainConfig
    from .schedule import stage_at
    from .streaming import MANIFEST, LayerStore, load_streamed, write_random_store
    from .train import evaluate, plan_for

    config = _hf_config(config_like)
    folder = Path(folder)
    store = LayerStore(folder) if (folder / MANIFEST).exists() else write_random_store(config, folder)
    bb = load_streamed(store, prefetch=streamed, resident="streamed" if streamed else "all")
    if method in ("full_adapters", "chainfed"):
        bb.add_adapters(AdapterConfig(bottleneck=bottleneck))
    L = bb.num_layers
    stage = stage_at(window_start, L, 0, window, 1) if method == "chainfed" else None
    plan = plan_for(method, L, stage, lam=0.1)
    if streamed:
        bb.follow(plan)
    data = random_token_dataset(2 * batch_size, seq_len, config.vocab_size, getattr(config, "num_labels", 2))
    try:
        if method == "no_ft":
            with MemoryMeter(bb) as meter:
                evaluate(bb, data, batch_size=batch_size)
            return meter.report()
        report, _ = metered_training(bb, data, plan, TrainConfig(batch_size=batch_size, local_steps=2))
        return report
    finally:
        bb.streamer.close()


if __name__ == "__main__":
    _child(*sys.argv[1:4])
