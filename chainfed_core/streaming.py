"""Layer store and the compute-prefetch-evict pipeline (paper Appendix G.2).

Chain training touches one window of layers at a time, so a client never needs the whole
model in memory. The layer store keeps a model on disk as one safetensors shard per
transformer layer plus ``embed``, ``head`` and ``rest`` shards, with a JSON manifest of
sha256 sums::

    store/manifest.json
    store/embed.safetensors         embeddings (only the frozen prefix needs them)
    store/layer_000.safetensors ... one shard per transformer layer
    store/head.safetensors          task head (classifier, or final norm + LM head)
    store/rest.safetensors          anything else (rotary tables, relative position bias)

:func:`load_streamed` builds the model skeleton on the meta device (no weight memory),
loads ``rest`` and ``head`` and installs a :class:`LayerStreamer` as
``Backbone.residency``. While layer i computes, a background thread reads the next part
of the step from disk and layer i-1 is dropped, so at most the window plus one prefetched
part is resident. On the CPU a layer is memory-mapped from its shard (copy-on-write) and
the worker faults its pages in, so the compute threads never spend time copying weights;
dropping the layer unmaps it. On CUDA the worker reads into pinned host memory and copies
on a side stream with ``non_blocking=True``.

Every shard is checked against its manifest sum when it is read (``verify="always"``), or
the first time a process reads that file (``verify="once"``, the default: later reads of
an unchanged file skip hashing). Writes go to a temporary file that is renamed into place
and the manifest is rewritten after each shard, so a full disk leaves every shard already
written intact and a retry resumes.
"""

from __future__ import annotations

import copy
import errno
import hashlib
import json
import mmap
import os
import shutil
import struct
import tempfile
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Literal

import torch
import torch.nn.functional as F
from torch import nn

from .backbone import Backbone, from_model
from .memory import tagged

FORMAT = "chainfed-layer-store/1"
MANIFEST = "manifest.json"

# Embedding and extra head modules per family, by attribute path on the HF task model.
# (Trainable head modules come from the backbone's family spec.)
_EMBED = {"bert": "bert.embeddings", "roberta": "roberta.embeddings", "mpnet": "mpnet.embeddings",
          "distilbert": "distilbert.embeddings", "llama": "model.embed_tokens"}
_FROZEN_HEAD = {"llama": ("model.norm", "lm_head")}

_SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "F64": torch.float64, "I64": torch.int64, "I32": torch.int32,
                       "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}

# Files this process has already hashed, keyed by (path, size, mtime_ns, inode): verify="once".
_VERIFIED: set[tuple] = set()
_VERIFIED_LOCK = threading.Lock()


class LayerStoreError(RuntimeError):
    """The store cannot be written or read (unwritable folder, full disk, missing shard)."""


class ShardChecksumError(LayerStoreError):
    """A shard's bytes do not match the sha256 sum in the manifest."""


# ---------------------------------------------------------------------- parts of a model
def shard_key(index: int) -> str:
    return f"layer.{index}"


def _file_of(key: str) -> str:
    if key.startswith("layer."):
        return f"layer_{int(key.split('.')[1]):03d}.safetensors"
    return f"{key}.safetensors"


def _task_name(backbone: Backbone) -> str:
    return "causal_lm" if backbone.is_causal_lm else "sequence_classification"


def _part_modules(backbone: Backbone) -> dict[str, list[str]]:
    """Module paths (on the task model) of every part except the per-layer ones."""
    family = backbone.family
    layers_path = f"{backbone.spec.base}.{backbone.spec.layers}"
    head = [p for p in backbone.spec.head + _FROZEN_HEAD.get(family, ())
            if _get(backbone.model, p) is not None]
    return {"embed": [_EMBED[family]], "head": head, "layers": [layers_path]}


def _get(obj: Any, path: str) -> Any:
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def _part_tensors(model: nn.Module, backbone: Backbone) -> dict[str, dict[str, torch.Tensor]]:
    """Every parameter and buffer (persistent or not) of the model, grouped into parts.

    Keys are full names on the task model. Tied tensors shared across parts are rejected.
    """
    paths = _part_modules(backbone)
    layers_path = paths.pop("layers")[0]
    parts: dict[str, dict[str, torch.Tensor]] = {"embed": {}, "head": {}, "rest": {}}
    parts.update({shard_key(i): {} for i in range(backbone.num_layers)})
    owner_of: dict[int, str] = {}
    named = list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers(remove_duplicate=False))
    for name, tensor in named:
        if name.startswith("chainfed_adapters."):
            continue
        if name.startswith(layers_path + "."):
            part = shard_key(int(name[len(layers_path) + 1:].split(".")[0]))
        else:
            part = next((k for k, ps in paths.items() for p in ps if name.startswith(p + ".")), "rest")
        ptr = id(tensor)
        if ptr in owner_of and owner_of[ptr] != part:
            raise ValueError(f"tensor {name} is tied across parts {owner_of[ptr]} and {part}: "
                             "the layer store keeps each part separately")
        owner_of[ptr] = part
        parts[part][name] = tensor
    return parts


# ---------------------------------------------------------------------- writing
def _atomic_write(path: Path, data: bytes) -> None:
    """Write to a temporary file in the same folder, fsync, then rename into place."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _check_writable(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".probe.")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise LayerStoreError(f"layer store folder {folder} is not writable: {e.strerror or e}") from e


class StoreWriter:
    """Writes shards one at a time; the manifest on disk always lists the shards written so far."""

    def __init__(self, folder: str | os.PathLike, family: str, task: str, config: dict, dtype: torch.dtype,
                 num_layers: int):
        self.folder = Path(folder)
        _check_writable(self.folder)
        old = _read_manifest(self.folder) if (self.folder / MANIFEST).exists() else None
        config = json.loads(json.dumps(config, default=str))      # as the manifest will hold it
        self.manifest = {"format": FORMAT, "family": family, "task": task, "config": config,
                         "dtype": str(dtype).removeprefix("torch."), "num_layers": num_layers, "shards": {}}
        # A retry after a failure keeps shards that were written completely before.
        self.previous = old["shards"] if old and old.get("config") == config else {}

    def write(self, key: str, tensors: dict[str, torch.Tensor]) -> None:
        from safetensors.torch import save

        data = save({n: t.detach().contiguous().cpu() for n, t in tensors.items()})
        digest = hashlib.sha256(data).hexdigest()
        path = self.folder / _file_of(key)
        entry = {"file": path.name, "sha256": digest, "bytes": len(data), "tensors": sorted(tensors)}
        if not (self.previous.get(key) == entry and path.exists() and path.stat().st_size == len(data)):
            self._write_file(key, path, data)
        self.manifest["shards"][key] = entry
        self._write_file("manifest", self.folder / MANIFEST, json.dumps(self.manifest, indent=1).encode())

    def _write_file(self, key: str, path: Path, data: bytes) -> None:
        try:
            _atomic_write(path, data)
        except OSError as e:
            free = shutil.disk_usage(self.folder).free
            why = "no space left on device" if e.errno in (errno.ENOSPC, errno.EDQUOT) else (e.strerror or str(e))
            raise LayerStoreError(
                f"writing shard {key} ({len(data)} bytes) to {self.folder} failed: {why} ({free} bytes free). "
                f"The {len(self.manifest['shards'])} shards already written are intact and listed in "
                f"{MANIFEST}; rerun to resume.") from e


def save_layer_store(backbone: Backbone, folder: str | os.PathLike, dtype: torch.dtype | None = None) -> "LayerStore":
    """Write a model (without adapters) as a layer store; ``dtype`` casts floating weights
    (all but a trainable classification head)."""
    writer = StoreWriter(folder, backbone.family, _task_name(backbone), backbone.config.to_dict(),
                         dtype or next(backbone.layers.parameters()).dtype, backbone.num_layers)
    for key, tensors in _part_tensors(backbone.model, backbone).items():
        if dtype is not None and (key != "head" or backbone.family in _FROZEN_HEAD):
            tensors = {n: (t.to(dtype) if t.is_floating_point() else t) for n, t in tensors.items()}
        writer.write(key, tensors)
    return LayerStore(folder)


def write_random_store(config, folder: str | os.PathLike, dtype: torch.dtype = torch.float32,
                       seed: int = 0) -> "LayerStore":
    """A layer store of randomly initialised weights for a model config, written layer by layer.

    Never holds more than the non-layer parts and one layer in memory, so the store of a
    LLaMA2-7B-shaped model can be written on a machine with a few GB of RAM. Weights use the
    model's own ``_init_weights``; a classification head stays float32 like :func:`load_backbone`'s,
    a causal LM's frozen head (final norm, LM head) takes ``dtype`` like the layers.
    """
    family = config.model_type
    torch.manual_seed(seed)
    shallow = copy.deepcopy(config)
    _set_depth(shallow, 0)
    real = _build(shallow, family)                       # embeddings, head, rest: real and initialised
    with torch.device("meta"):
        skeleton = _build(config, family)
    backbone = from_model(skeleton, family)
    parts = _part_tensors(skeleton, backbone)
    real_named = dict(real.named_parameters(remove_duplicate=False)) | dict(real.named_buffers(remove_duplicate=False))
    writer = StoreWriter(folder, family, _task_name(backbone), config.to_dict(), dtype, backbone.num_layers)
    for key, tensors in parts.items():
        if key.startswith("layer."):
            index = int(key.split(".")[1])
            layer = copy.deepcopy(backbone.layers[index]).to_empty(device="cpu")
            if any(True for _ in layer.buffers()):
                raise NotImplementedError(f"{family} layers hold buffers; write the store from a built model")
            with torch.no_grad():
                layer.apply(skeleton._init_weights)
            prefix = f"{backbone.spec.base}.{backbone.spec.layers}.{index}."
            values = {prefix + n: p.to(dtype) for n, p in layer.named_parameters()}
        else:
            values = {n: real_named[n] for n in tensors}
            if key != "head" or family in _FROZEN_HEAD:
                values = {n: (t.to(dtype) if t.is_floating_point() else t) for n, t in values.items()}
        writer.write(key, values)
    return LayerStore(folder)


def _set_depth(config, num_layers: int) -> None:
    for attr in ("num_hidden_layers", "n_layers"):
        if hasattr(config, attr):
            setattr(config, attr, num_layers)


def _build(config, family: str) -> nn.Module:
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    if family == "llama":
        return AutoModelForCausalLM.from_config(config)
    return AutoModelForSequenceClassification.from_config(config)


# ---------------------------------------------------------------------- reading
def _read_manifest(folder: Path) -> dict:
    path = folder / MANIFEST
    if not path.exists():
        raise LayerStoreError(f"layer store {folder}: {MANIFEST} missing")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT:
        raise LayerStoreError(f"layer store {folder}: unknown format {manifest.get('format')!r}")
    return manifest


class LayerStore:
    """A layer store on disk: its manifest, and checked reads of one shard at a time."""

    def __init__(self, folder: str | os.PathLike, verify: Literal["always", "once", "never"] = "once"):
        if verify not in ("always", "once", "never"):
            raise ValueError(f"verify: {verify!r} is not one of ['always', 'once', 'never']")
        self.folder = Path(folder)
        self.verify = verify
        self.manifest = _read_manifest(self.folder)
        expected = {"embed", "head", "rest"} | {shard_key(i) for i in range(self.manifest["num_layers"])}
        missing = sorted(expected - set(self.manifest["shards"]))
        if missing:
            raise LayerStoreError(f"layer store {self.folder} is incomplete: shards {missing[:5]} not written")
        self.hash_seconds = 0.0          # time spent verifying sums (benchmarks report it)
        self.read_bytes = 0

    @property
    def num_layers(self) -> int:
        return self.manifest["num_layers"]

    @property
    def family(self) -> str:
        return self.manifest["family"]

    def path(self, key: str) -> Path:
        return self.folder / self.manifest["shards"][key]["file"]

    def nbytes(self, key: str) -> int:
        return self.manifest["shards"][key]["bytes"]

    def hf_config(self):
        from transformers import AutoConfig

        data = dict(self.manifest["config"])
        return AutoConfig.for_model(data.pop("model_type"), **data)

    def allocate(self, key: str, pin: bool = False) -> torch.Tensor:
        """The uint8 buffer a shard is read into (allocated by the caller's thread)."""
        with tagged("frozen_weights"):
            return torch.empty(self.nbytes(key), dtype=torch.uint8, pin_memory=pin)

    def _checked_stat(self, key: str) -> tuple[Path, os.stat_result]:
        entry = self.manifest["shards"][key]
        path = self.path(key)
        try:
            stat = path.stat()
        except FileNotFoundError as e:
            raise LayerStoreError(f"shard {key} missing: {path}") from e
        if stat.st_size != entry["bytes"]:
            raise ShardChecksumError(f"shard {key} ({path}) has {stat.st_size} bytes, manifest says {entry['bytes']}")
        return path, stat

    def _verify(self, key: str, path: Path, stat: os.stat_result, data) -> None:
        """Hash ``data`` (the shard's bytes) against the manifest, per the ``verify`` policy."""
        entry = self.manifest["shards"][key]
        self.read_bytes += entry["bytes"]
        stamp = (str(path), stat.st_size, stat.st_mtime_ns, stat.st_ino, entry["sha256"])
        if self.verify == "never" or (self.verify == "once" and stamp in _VERIFIED):
            return
        started = time.perf_counter()
        digest = hashlib.sha256(data).hexdigest()
        self.hash_seconds += time.perf_counter() - started
        if digest != entry["sha256"]:
            raise ShardChecksumError(f"shard {key} ({path}) is corrupted: sha256 {digest[:16]}... does not match "
                                     f"the manifest's {entry['sha256'][:16]}...")
        with _VERIFIED_LOCK:
            _VERIFIED.add(stamp)

    def read_into(self, key: str, buffer: torch.Tensor) -> None:
        """Read a shard's bytes into ``buffer`` and check them against the manifest."""
        path, stat = self._checked_stat(key)
        try:
            with open(path, "rb", buffering=0) as f:
                view = memoryview(buffer.numpy()).cast("B")
                got = f.readinto(view)
                while got < len(view):
                    more = f.readinto(view[got:])
                    if not more:
                        break
                    got += more
        except FileNotFoundError as e:
            raise LayerStoreError(f"shard {key} missing: {path}") from e
        if got != stat.st_size:
            raise ShardChecksumError(f"shard {key} ({path}) gave {got} bytes, manifest says {stat.st_size}")
        self._verify(key, path, stat, buffer.numpy())

    def map(self, key: str) -> torch.Tensor:
        """A shard's bytes as a uint8 tensor over a private memory map of its file (no copy).

        The map is copy-on-write: a stray write changes this process's page only, never the
        shard. It is released when the last tensor viewing it is freed. Its pages are read
        and checked by :meth:`fault_in`.
        """
        path, stat = self._checked_stat(key)
        try:
            with open(path, "rb") as f:
                mapped = mmap.mmap(f.fileno(), stat.st_size, access=mmap.ACCESS_COPY)
        except FileNotFoundError as e:
            raise LayerStoreError(f"shard {key} missing: {path}") from e
        return torch.frombuffer(mapped, dtype=torch.uint8).view(-1)   # an op: memory meters see it

    def fault_in(self, key: str, data: torch.Tensor) -> None:
        """Check a mapped shard against the manifest and fault its pages in by reading one
        byte per page: the page cache's pages are mapped, none is copied (the prefetch
        worker does this while the previous layer computes)."""
        path, stat = self._checked_stat(key)
        pages = data.numpy()
        self._verify(key, path, stat, pages)
        pages[::mmap.PAGESIZE].sum()     # numpy: one thread, GIL released; no OpenMP team beside the compute's

    def load(self, key: str) -> dict[str, torch.Tensor]:
        """A whole shard as ``{name: tensor}`` (views into one buffer)."""
        buffer = self.allocate(key)
        self.read_into(key, buffer)
        return tensors_of(buffer)


def tensors_of(buffer: torch.Tensor) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file held in a uint8 buffer, as views (copied only if misaligned)."""
    (header_len,) = struct.unpack("<Q", bytes(buffer[:8].tolist()))
    header = json.loads(bytes(buffer[8:8 + header_len].tolist()))
    header.pop("__metadata__", None)
    base = 8 + header_len
    out = {}
    for name, info in header.items():
        dtype = _SAFETENSORS_DTYPES[info["dtype"]]
        begin, end = info["data_offsets"]
        raw = buffer[base + begin: base + end]
        size = torch.empty((), dtype=dtype).element_size()
        if (base + begin) % size:
            raw = raw.clone()
        out[name] = raw.view(dtype).view(info["shape"])
    return out


# ---------------------------------------------------------------------- materialising parts
def _assign(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    owner_path, _, attr = name.rpartition(".")
    owner = model.get_submodule(owner_path) if owner_path else model
    if attr in owner._parameters:
        owner._parameters[attr] = nn.Parameter(tensor, requires_grad=False)
    else:
        owner._buffers[attr] = tensor


def _upcast_linear_forward(module: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return _UpcastLinear.apply(x, module.weight, module.bias)


# Bytes of a weight upcast at once by _UpcastLinear: a LLaMA2-7B LM head (32000 x 4096) in
# float32 would be 500 MB, more than the two bf16 layers of a W=2 window.
UPCAST_CHUNK_BYTES = 64 << 20


def _row_chunks(weight: torch.Tensor, dtype: torch.dtype):
    """(row slice, that block of ``weight`` in ``dtype``), a block of about UPCAST_CHUNK_BYTES at a time."""
    rows = max(1, UPCAST_CHUNK_BYTES // max(1, weight.shape[1] * torch.empty((), dtype=dtype).element_size()))
    for begin in range(0, weight.shape[0], rows):
        block = slice(begin, begin + rows)
        yield block, weight[block].to(dtype)


class _UpcastLinear(torch.autograd.Function):
    """y = x W^T + b with W stored in a narrow dtype and multiplied in x's dtype.

    Saves the narrow weight, not its upcast copy, and upcasts it a block of output rows at
    a time, so a bf16 window on a CPU without bf16 matrix units computes in float32 while
    holding bf16 weights plus one block.
    """

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(weight)
        if weight.shape[0] * weight.shape[1] * x.element_size() <= UPCAST_CHUNK_BYTES:
            return F.linear(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype))
        out = torch.cat([F.linear(x, w) for _, w in _row_chunks(weight, x.dtype)], dim=-1)
        return out if bias is None else out + bias.to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        if weight.shape[0] * weight.shape[1] * grad.element_size() <= UPCAST_CHUNK_BYTES:
            return grad @ weight.to(grad.dtype), None, None
        out = None
        for block, w in _row_chunks(weight, grad.dtype):
            part = grad[..., block] @ w
            out = part if out is None else out.add_(part)
        return out, None, None


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

    def drop_all(self) -> None:
        for key in list(self.resident):
            if key not in ("head", "rest"):
                self.drop(key)

    # -------------------------------------------------------------- loading
    def _start(self, key: str) -> Future:
        """Allocate in this thread (memory meters see it), read and copy in the worker."""
        if self.device.type == "cuda":
            host = self.store.allocate(key, pin=True)
            with tagged("frozen_weights"):
                target = torch.empty(self.store.nbytes(key), dtype=torch.uint8, device=self.device)
            job = (self._read_to_device, key, host, target)
        elif self.memory_map and key != "rest" and (key != "head" or self.store.family in _FROZEN_HEAD):
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


def load_streamed(store: LayerStore | str | os.PathLike, *, prefetch: bool = True,
                  device: torch.device | str = "cpu", compute_dtype: torch.dtype | None = None,
                  resident: Literal["streamed", "all"] = "streamed", pooling: str = "cls",
                  memory_map: bool | None = None) -> StreamedBackbone:
    """A backbone built on the meta device whose parts are read from ``store`` on use.

    ``compute_dtype`` runs layers in that dtype while their matrices stay in the store's
    dtype (bf16 weights, float32 arithmetic on CPUs without bf16 matrix units).
    ``resident="all"`` reads every part up front into process memory: the in-memory
    reference with the same compute path, for timing comparisons. ``memory_map`` (default:
    on when streaming on the CPU) maps shards instead of copying them.
    """
    store = store if isinstance(store, LayerStore) else LayerStore(store)
    config = store.hf_config()
    with torch.device("meta"):
        model = _build(config, store.family)
    bb = StreamedBackbone(model, store.family, pooling)
    model.eval()
    if memory_map is None:
        memory_map = resident == "streamed"
    bb.streamer = LayerStreamer(store, model, bb, prefetch=prefetch, device=device, compute_dtype=compute_dtype,
                                memory_map=memory_map)
    for key in ("rest", "head"):
        bb.streamer._materialise(key)
    if compute_dtype is not None:
        for module in model.modules():
            if isinstance(module, nn.Linear):
                module.forward = _upcast_linear_forward.__get__(module)
        _get(model, _EMBED[store.family]).register_forward_hook(lambda _m, _a, out: _as_dtype(out, compute_dtype))
    _get(model, _EMBED[store.family]).register_forward_pre_hook(lambda _m, _a: bb.residency.ensure("embed"))
    bb.residency = bb.streamer
    if resident == "all":
        for key in bb.streamer.order:
            bb.streamer._materialise(key)
        bb.residency = _AllResident()
    return bb


def step_times(store: LayerStore | str | os.PathLike, window: int, dataset, *, repeats: int = 2,
               local_steps: int = 2, compute_dtype: torch.dtype | None = torch.float32) -> dict:
    """Seconds per local round of ChainFed's last window, uncached (the prefix is streamed too):
    streamed with prefetch, streamed without, and every part resident (paper Appendix G.2).

    The three models are timed in turn ``repeats`` times, so a busy machine slows all alike;
    the ratios use each setting's fastest round.
    """
    from .config import AdapterConfig, TrainConfig
    from .schedule import stage_at
    from .train import plan_for, train_local

    settings = {"prefetch": dict(prefetch=True), "no_prefetch": dict(prefetch=False),
                "in_memory": dict(prefetch=False, resident="all")}
    models = {k: load_streamed(store, compute_dtype=compute_dtype, **kw) for k, kw in settings.items()}
    L = models["prefetch"].num_layers
    plan = plan_for("chainfed", L, stage_at(0, L, L - window, window, 1), lam=0.2)
    cfg = TrainConfig(optimizer="adamw", lr=1e-4, batch_size=1, local_steps=local_steps)
    for sb in models.values():
        sb.add_adapters(AdapterConfig())
    times: dict[str, list[float]] = {k: [] for k in settings}
    for _ in range(repeats):
        for key, sb in models.items():
            if key != "in_memory":
                sb.follow(plan)
            started = time.perf_counter()
            train_local(sb, dataset, plan, cfg)
            times[key].append(time.perf_counter() - started)
    for sb in models.values():
        sb.streamer.close()
    best = {k: min(v) for k, v in times.items()}
    return {"seconds": times, "prefetch_over_in_memory": best["prefetch"] / best["in_memory"],
            "prefetch_over_no_prefetch": best["prefetch"] / best["no_prefetch"]}


class _AllResident:
    def ensure(self, index) -> None:
        return None


def _as_dtype(out, dtype):
    return out.to(dtype) if torch.is_tensor(out) else out
