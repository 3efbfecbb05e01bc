"""The exact meter of tensor memory: peak live tensor bytes of a block, by category.

:class:`MemoryMeter` tracks every tensor storage allocated while it is active (a
``TorchDispatchMode`` sees each op's outputs; a weak reference on each storage sees it
die) and replays the log for the peak of live tensor bytes, broken down into
``frozen_weights``, ``trainable`` (adapters and head), ``gradients``,
``optimizer_state``, ``activations`` and ``cache``. On CUDA it also reports
``torch.cuda.max_memory_allocated``. :func:`tagged` names the category of what a block
allocates; :func:`metered_training` meters one client's local training.
"""

from __future__ import annotations

import threading
import weakref
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any, Iterable

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


@dataclass
class MemoryReport:
    """What :meth:`MemoryMeter.report` found."""
    peak_bytes: int                          # peak of live tensor bytes
    breakdown: dict[str, int]                # live bytes per category at that peak
    final_bytes: int                         # live tracked bytes when the meter stopped
    cuda_max_allocated: int | None = None    # torch.cuda.max_memory_allocated over the block

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class MemoryMeter(TorchDispatchMode):
    """Exact peak tensor bytes of a block, with a breakdown by category.

    ``with MemoryMeter(backbone) as meter: train_local(...)``, then ``meter.report()``.
    Tensors alive on entry count only if registered: the backbone's weights (adapters, head
    and a method's modules as ``trainable``, the rest as ``frozen_weights``) and ``extra`` tensors by
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
            for p in [*self.backbone.head_parameters().values(), *self.backbone.method_modules.parameters()]:
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
