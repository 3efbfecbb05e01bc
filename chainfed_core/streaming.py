"""The compute-prefetch-evict pipeline over a layer store (paper Appendix G.2).

:func:`load_streamed` builds the model skeleton on the meta device (no weight memory),
loads ``rest`` and ``head`` from a :class:`~chainfed_core.layer_store.LayerStore` and
installs a :class:`LayerStreamer` as ``Backbone.residency``. While layer i computes, a
background thread reads the next part of the step from disk and layer i-1 is dropped, so
at most the window plus one prefetched part is resident. On the CPU a layer is
memory-mapped from its shard (copy-on-write) and the worker faults its pages in, so the
compute threads never spend time copying weights; dropping the layer unmaps it. On CUDA
the worker reads into pinned host memory and copies on a side stream with
``non_blocking=True``. FOAT's block-wise profiling holds one block of layers at a time
(:meth:`StreamedBackbone.resident_layers`).
"""

from __future__ import annotations

import os
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from typing import Iterable, Literal

import torch
from torch import nn

from .backbone import Backbone
from .layer_store import LayerStore, LayerStoreError, tensors_of
from .memory_meter import tagged
from .model_parts import build_model, embedding_modules, head_is_frozen, shard_key
from .upcast import upcast_linears


class LayerStreamer:
    """``Backbone.residency`` for a model whose parts live in a :class:`LayerStore`.

    ``ensure(key)`` makes a part resident (waiting for its prefetch if one is running),
    drops parts the step no longer needs, and starts reading the next part of the step's
    order in a background thread. Which parts a step uses and which stay resident between
    steps is set by :meth:`follow`. On the CPU a part is memory-mapped from its shard
    (``memory_map=True``: no copy, the worker only faults the pages in); otherwise it is read
    into a buffer (on CUDA a pinned one, then copied to the device on a side stream).
    """

    def __init__(self, store: LayerStore, model: nn.Module, backbone: Backbone, *, prefetch: bool = True,
                 device: torch.device | str = "cpu", compute_dtype: torch.dtype | None = None,
                 memory_map: bool = True):
        self.store = store
        self.model = model
        self.backbone = backbone
        self.prefetch = prefetch
        self.device = torch.device(device)
        self.compute_dtype = compute_dtype
        self.memory_map = memory_map and self.device.type == "cpu"   # CUDA reads into pinned memory
        self.names = {key: entry["tensors"] for key, entry in store.manifest["shards"].items()}
        self.placeholders = {key: {n: _get_tensor(model, n) for n in names} for key, names in self.names.items()}
        self.resident: set[str] = set()
        self.pending: dict[str, Future] = {}
        self.order: list[str] = ["embed"] + [shard_key(i) for i in range(store.num_layers)]
        self.keep: set[str] = set()
        self.training: set[str] = set()
        self.max_resident_layers = 0
        self.loads = 0
        self.prefetched = 0
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="layer-prefetch") if prefetch else None
        self._stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None

    # -------------------------------------------------------------- the step's plan
    def follow(self, frozen: Iterable[int], training: Iterable[int], cached: bool = False) -> None:
        """Set the step's order of use: embeddings and frozen layers (unless the activation
        cache supplies the window input), then the window. A cached window stays resident
        between steps; otherwise every part is dropped once the step is past it."""
        window = [shard_key(i) for i in training]
        prefix = [] if cached else ["embed"] + [shard_key(i) for i in frozen]
        self.order = prefix + window
        self.training = set(window)
        self.keep = set(window) if cached else set()
        # Parts the new order does not use (the last prefix layer after a cache fill, a
        # window that slid on) are freed now, not whenever the next eviction comes by.
        for key in [k for k in self.resident if k not in ("head", "rest") and k not in self.order]:
            self.drop(key)
        for key in [k for k in self.pending if k not in self.order]:
            self.pending.pop(key)        # the worker keeps its buffer only until the read ends

    @contextmanager
    def holding(self, indices: Iterable[int]):
        """Keep layers ``indices`` resident together while one block runs, then drop them
        and restore the step's order (block-wise FOAT profiling, Appendix G.3). Entering
        frees every other part but ``head`` and ``rest``; within the block each layer is
        read on first use, the next one prefetched, and none is evicted."""
        saved = self.order, self.training, self.keep
        self.follow((), indices, cached=True)
        try:
            yield
        finally:
            for key in [k for k in self.resident if k in self.keep]:
                self.drop(key)
            for key in [k for k in self.pending if k in self.keep]:
                self.pending.pop(key)
            self.order, self.training, self.keep = saved

    def reset_stats(self) -> None:
        self.max_resident_layers = len(self._layers_resident())
        self.loads = self.prefetched = 0

    # -------------------------------------------------------------- residency protocol
    def ensure(self, index: int | str) -> None:
        key = index if isinstance(index, str) else shard_key(index)
        if key not in self.resident:
            self._materialise(key)
        self._evict(key)
        following = self._next(key)
        if following is not None and following not in self.resident and following not in self.pending:
            if self.prefetch:
                self._start(following)
                self.prefetched += 1
        self.max_resident_layers = max(self.max_resident_layers, len(self._layers_resident()) + len(self.pending))

    def _layers_resident(self) -> set[str]:
        return {k for k in self.resident if k.startswith("layer.") or k == "embed"}

    def _next(self, key: str) -> str | None:
        """The part used after ``key``: its successor in the step's order (cyclic, the next
        step starts over), or for a part outside the order (evaluation) the next layer."""
        if key in self.order:
            return self.order[(self.order.index(key) + 1) % len(self.order)]
        following = 0 if key == "embed" else int(key.split(".")[1]) + 1 if key.startswith("layer.") else None
        return shard_key(following) if following is not None and following < self.store.num_layers else None

    def _evict(self, current: str) -> None:
        following = self._next(current)
        position = {k: n for n, k in enumerate(self.order)}
        here = position.get(current, -1)
        for key in list(self.resident):
            if key in ("head", "rest") or key in self.keep or key in (current, following):
                continue
            if key in self.training and 0 <= position.get(key, -1) < here:
                continue          # used earlier in this step: autograd still holds its weights
            self.drop(key)

    def drop(self, key: str) -> None:
        """Swap a part's tensors back to meta placeholders (its memory is freed once unused)."""
        for name, placeholder in self.placeholders[key].items():
            _assign(self.model, name, placeholder)
        self.resident.discard(key)

    # -------------------------------------------------------------- loading
    def _start(self, key: str) -> Future:
        """Allocate in this thread (memory meters see it), read and copy in the worker."""
        if self.device.type == "cuda":
            host = self.store.allocate(key, pin=True)
            with tagged("frozen_weights"):
                target = torch.empty(self.store.nbytes(key), dtype=torch.uint8, device=self.device)
            job = (self._read_to_device, key, host, target)
        elif self.memory_map and key != "rest" and (key != "head" or head_is_frozen(self.store.family)):
            # (a classification head trains in place: it gets its own copy)
            with tagged("frozen_weights"):
                job = (self._fault_in, key, self.store.map(key))
        else:
            job = (self._read, key, self.store.allocate(key))
        future = self._pool.submit(*job) if self._pool is not None else _done(*job)
        self.pending[key] = future
        return future

    def _fault_in(self, key: str, data: torch.Tensor):
        self.store.fault_in(key, data)
        return data, None

    def _read(self, key: str, buffer: torch.Tensor):
        self.store.read_into(key, buffer)
        return buffer, None

    def _read_to_device(self, key: str, host: torch.Tensor, target: torch.Tensor):
        self.store.read_into(key, host)
        with torch.cuda.stream(self._stream):
            target.copy_(host, non_blocking=True)
            event = torch.cuda.Event()
            event.record(self._stream)
        return target, (event, host)     # host buffer stays alive until the copy is done

    def _materialise(self, key: str) -> None:
        if key not in self.pending:
            self._start(key)
        target, copying = self.pending.pop(key).result()   # re-raises read or checksum errors here
        if copying is not None:
            event, _host = copying
            torch.cuda.current_stream(self.device).wait_event(event)
            target.record_stream(torch.cuda.current_stream(self.device))
        with tagged("frozen_weights"):   # a buffer prefetched before a meter started is first seen here
            for name, tensor in tensors_of(target).items():
                _assign(self.model, name, self._compute_form(name, tensor))
        self.resident.add(key)
        self.loads += 1

    def _compute_form(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """Small tensors move to the compute dtype; Linear and Embedding weights stay narrow."""
        if self.compute_dtype is None or not tensor.is_floating_point() or tensor.dtype == self.compute_dtype:
            return tensor
        owner = self.model.get_submodule(name.rpartition(".")[0])
        if isinstance(owner, (nn.Linear, nn.Embedding)) and name.endswith(".weight"):
            return tensor
        return tensor.to(self.compute_dtype)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None


def _done(fn, *args) -> Future:
    future: Future = Future()
    try:
        future.set_result(fn(*args))
    except BaseException as e:   # surfaced by future.result() in _materialise
        future.set_exception(e)
    return future


def _assign(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    owner_path, _, attr = name.rpartition(".")
    owner = model.get_submodule(owner_path) if owner_path else model
    if attr in owner._parameters:
        owner._parameters[attr] = nn.Parameter(tensor, requires_grad=False)
    else:
        owner._buffers[attr] = tensor


def _get_tensor(model: nn.Module, name: str) -> torch.Tensor:
    owner_path, _, attr = name.rpartition(".")
    return getattr(model.get_submodule(owner_path) if owner_path else model, attr)


class StreamedBackbone(Backbone):
    """A :class:`Backbone` whose layers and embeddings are read from a layer store on use."""

    streamer: LayerStreamer

    def add_adapters(self, config, indices=None):
        # inject_adapters places adapters on the device of the model's first parameter (the
        # embeddings): make it real while they are created.
        with self.resident("embed"):
            return super().add_adapters(config, indices)

    @contextmanager
    def resident(self, key: str):
        was = key in self.streamer.resident
        if not was:
            self.streamer._materialise(key)
        try:
            yield
        finally:
            if not was:
                self.streamer.drop(key)

    def follow(self, plan, cached: bool = False) -> None:
        """Stream the parts of a :class:`~chainfed_core.train.TrainPlan` in its order of use."""
        self.streamer.follow(plan.frozen, plan.training, cached)

    def resident_layers(self, indices: Iterable[int]):
        """A context in which layers ``indices`` are resident together and no others
        (:meth:`LayerStreamer.holding`); with every part resident already, a no-op."""
        return self.streamer.holding(indices) if self.residency is self.streamer else nullcontext()


def load_streamed(store: LayerStore | str | os.PathLike, *, prefetch: bool = True,
                  device: torch.device | str = "cpu", compute_dtype: torch.dtype | None = None,
                  resident: Literal["streamed", "all"] = "streamed", pooling: str | None = None,
                  memory_map: bool | None = None) -> StreamedBackbone:
    """A backbone built on the meta device whose parts are read from ``store`` on use.

    ``compute_dtype`` runs layers in that dtype while their matrices stay in the store's
    dtype (bf16 weights, float32 arithmetic on CPUs without bf16 matrix units).
    ``resident="all"`` reads every part up front into process memory: the in-memory
    reference with the same compute path, for timing comparisons. ``memory_map`` (default:
    on when streaming on the CPU) maps shards instead of copying them. The model pools as
    the store records; a ``pooling`` that differs is refused with a :class:`LayerStoreError`.
    """
    store = store if isinstance(store, LayerStore) else LayerStore(store)
    if pooling is not None and pooling != store.pooling:
        raise LayerStoreError(f"layer store {store.folder} was written with pooling {store.pooling!r}, not "
                              f"{pooling!r}: its outputs would differ from the stored model's")
    with torch.device("meta"):
        model = build_model(store.hf_config(), store.family, store.attn_implementation)
    bb = StreamedBackbone(model, store.family, store.pooling)
    model.eval()
    if memory_map is None:
        memory_map = resident == "streamed"
    bb.streamer = LayerStreamer(store, model, bb, prefetch=prefetch, device=device, compute_dtype=compute_dtype,
                                memory_map=memory_map)
    for key in ("rest", "head"):
        bb.streamer._materialise(key)
    embeddings = embedding_modules(model, store.family)
    if compute_dtype is not None:
        upcast_linears(model)
        for module in embeddings:
            module.register_forward_hook(lambda _m, _a, out: _as_dtype(out, compute_dtype))
    embeddings[0].register_forward_pre_hook(lambda _m, _a: bb.residency.ensure("embed"))
    bb.residency = bb.streamer
    if resident == "all":
        for key in bb.streamer.order:
            bb.streamer._materialise(key)
        bb.residency = _AllResident()
    return bb


class _AllResident:
    """Residency of a model whose parts were all read up front (``resident="all"``)."""

    def ensure(self, index) -> None:
        return None


def _as_dtype(out, dtype):
    return out.to(dtype) if torch.is_tensor(out) else out
