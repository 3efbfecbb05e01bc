"""The layer store: a model on disk, one safetensors shard per part (paper Appendix G.2).

Chain training touches one window of layers at a time, so a client never needs the whole
model in memory. The layer store keeps a model as one safetensors shard per part
(:mod:`~chainfed_core.model_parts`) with a JSON manifest of sha256 sums::

    store/manifest.json
    store/embed.safetensors         embeddings (only the frozen prefix needs them)
    store/layer_000.safetensors ... one shard per transformer layer
    store/head.safetensors          task head (classifier, or final norm + LM head)
    store/rest.safetensors          anything else (rotary tables, relative position bias)

The manifest also records every setting that changes the model's outputs besides its
weights: the family and task, the HF config, the pooling of a classifier (``cls`` or
``mean``) and the attention implementation. Every shard is checked against its manifest
sum when it is read (``verify="always"``), or the first time a process reads that file
(``verify="once"``, the default: later reads of an unchanged file skip hashing). Writes go
to a temporary file that is renamed into place and the manifest is rewritten after each
shard, so a full disk leaves every shard already written intact and a retry resumes.
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
from pathlib import Path
from typing import Literal

import torch

from .backbone import Backbone, from_model
from .families import detect_family
from .memory_meter import tagged
from .model_parts import build_model, head_is_frozen, hf_config, part_tensors, shard_key
from .records import atomic_write_bytes

FORMAT = "chainfed-layer-store/2"      # /2: the manifest records pooling and attention implementation
MANIFEST = "manifest.json"
# Manifest fields besides the format and the shards.
_SETTINGS = ("family", "task", "pooling", "attn_implementation", "config", "dtype", "num_layers")

_SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "F64": torch.float64, "I64": torch.int64, "I32": torch.int32,
                       "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}

# Files this process has already hashed, keyed by (path, size, mtime_ns, inode): verify="once".
_VERIFIED: set[tuple] = set()
_VERIFIED_LOCK = threading.Lock()


class LayerStoreError(RuntimeError):
    """The store cannot be written or read (unwritable folder, full disk, missing shard, bad manifest)."""


class ShardChecksumError(LayerStoreError):
    """A shard's bytes do not match the sha256 sum in the manifest."""


def _file_of(key: str) -> str:
    if key.startswith("layer."):
        return f"layer_{int(key.split('.')[1]):03d}.safetensors"
    return f"{key}.safetensors"


def _task_name(family: str) -> str:
    return "causal_lm" if head_is_frozen(family) else "sequence_classification"


# ---------------------------------------------------------------------- writing
def _check_writable(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".probe.")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise LayerStoreError(f"layer store folder {folder} is not writable: {e.strerror or e}") from e


def _settings(backbone: Backbone, config: dict, dtype: torch.dtype) -> dict:
    """The manifest's fields besides the format and the shards, for a model and its config dict."""
    return {"family": backbone.family, "task": _task_name(backbone.family), "pooling": backbone.pooling,
            "attn_implementation": backbone.config._attn_implementation,
            "config": json.loads(json.dumps(config, default=str)),      # as the manifest will hold it
            "dtype": str(dtype).removeprefix("torch."), "num_layers": backbone.num_layers}


class StoreWriter:
    """Writes shards one at a time; the manifest on disk always lists the shards written so far."""

    def __init__(self, folder: str | os.PathLike, settings: dict):
        self.folder = Path(folder)
        _check_writable(self.folder)
        old = _read_manifest(self.folder) if (self.folder / MANIFEST).exists() else None
        self.manifest = {"format": FORMAT, **settings, "shards": {}}
        # A retry after a failure keeps shards that were written completely before.
        self.previous = old["shards"] if old and old.get("config") == settings["config"] else {}

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
            atomic_write_bytes(path, data)
        except OSError as e:
            free = shutil.disk_usage(self.folder).free
            why = "no space left on device" if e.errno in (errno.ENOSPC, errno.EDQUOT) else (e.strerror or str(e))
            raise LayerStoreError(
                f"writing shard {key} ({len(data)} bytes) to {self.folder} failed: {why} ({free} bytes free). "
                f"The {len(self.manifest['shards'])} shards already written are intact and listed in "
                f"{MANIFEST}; rerun to resume.") from e


def _stored(key: str, family: str, tensors: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """A part's tensors as the store keeps them: floating ones cast to ``dtype``, except a
    classification head's, which trains and stays as it is."""
    if key == "head" and not head_is_frozen(family):
        return tensors
    return {n: (t.to(dtype) if t.is_floating_point() else t) for n, t in tensors.items()}


def save_layer_store(backbone: Backbone, folder: str | os.PathLike, dtype: torch.dtype | None = None) -> "LayerStore":
    """Write a model (without adapters) as a layer store; ``dtype`` casts floating weights
    (all but a trainable classification head). The backbone's pooling is recorded."""
    writer = StoreWriter(folder, _settings(backbone, backbone.config.to_dict(),
                                           dtype or next(backbone.layers.parameters()).dtype))
    for key, tensors in part_tensors(backbone.model, backbone).items():
        writer.write(key, tensors if dtype is None else _stored(key, backbone.family, tensors, dtype))
    return LayerStore(folder)


def write_random_store(config, folder: str | os.PathLike, dtype: torch.dtype = torch.float32,
                       seed: int = 0, pooling: str = "cls") -> "LayerStore":
    """A layer store of randomly initialised weights for a model config, written layer by layer.

    Never holds more than the non-layer parts and one layer in memory, so the store of a
    LLaMA2-7B-shaped model can be written on a machine with a few GB of RAM. Weights use the
    model's own ``_init_weights``; a classification head stays float32 like
    :func:`~chainfed_core.backbone.load_backbone`'s, a causal LM's frozen head (final norm,
    LM head) takes ``dtype`` like the layers. ``pooling`` is the classifier's (``cls`` or ``mean``).
    """
    family = detect_family(config)
    torch.manual_seed(seed)
    shallow = copy.deepcopy(config)
    _set_depth(shallow, 0)
    real = build_model(shallow, family)                  # embeddings, head, rest: real and initialised
    with torch.device("meta"):
        skeleton = build_model(config, family)
    backbone = from_model(skeleton, family, pooling)
    real_named = dict(real.named_parameters(remove_duplicate=False)) | dict(real.named_buffers(remove_duplicate=False))
    writer = StoreWriter(folder, _settings(backbone, config.to_dict(), dtype))
    for key, tensors in part_tensors(skeleton, backbone).items():
        if key.startswith("layer."):
            values = _random_layer(backbone, int(key.split(".")[1]), dtype)
        else:
            values = _stored(key, family, {n: real_named[n] for n in tensors}, dtype)
        writer.write(key, values)
    return LayerStore(folder)


def _random_layer(backbone: Backbone, index: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Layer ``index`` of a meta-device backbone, initialised on the CPU, by full name."""
    layer = copy.deepcopy(backbone.layers[index]).to_empty(device="cpu")
    if any(True for _ in layer.buffers()):
        raise NotImplementedError(f"{backbone.family} layers hold buffers; write the store from a built model")
    with torch.no_grad():
        layer.apply(backbone.model._init_weights)
    prefix = f"{backbone.spec.base}.{backbone.spec.layers}.{index}."
    return {prefix + n: p.to(dtype) for n, p in layer.named_parameters()}


def _set_depth(config, num_layers: int) -> None:
    for attr in ("num_hidden_layers", "n_layers"):
        if hasattr(config, attr):
            setattr(config, attr, num_layers)


# ---------------------------------------------------------------------- reading
def _read_manifest(folder: Path) -> dict:
    """The manifest of the store in ``folder``; a missing, malformed or foreign one is a
    :class:`LayerStoreError` naming the file."""
    path = folder / MANIFEST
    if not path.exists():
        raise LayerStoreError(f"layer store {folder}: {MANIFEST} missing")
    try:
        manifest = json.loads(path.read_text())
    except ValueError as e:                          # JSONDecodeError, UnicodeDecodeError
        raise LayerStoreError(f"layer store manifest {path} is not valid JSON: {e}") from e
    found = manifest.get("format") if isinstance(manifest, dict) else None
    if found != FORMAT:
        raise LayerStoreError(f"layer store {folder}: unknown format {found!r} in {path} "
                              f"(this code reads {FORMAT!r}: write the store again)")
    missing = [k for k in _SETTINGS + ("shards",) if k not in manifest]
    if missing:
        raise LayerStoreError(f"layer store manifest {path} lacks {missing}")
    if manifest["task"] != _task_name(manifest["family"]):
        raise LayerStoreError(f"layer store manifest {path}: task {manifest['task']!r} does not match "
                              f"family {manifest['family']!r}")
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

    @property
    def pooling(self) -> str:
        return self.manifest["pooling"]

    @property
    def attn_implementation(self) -> str | None:
        return self.manifest["attn_implementation"]

    def path(self, key: str) -> Path:
        return self.folder / self.manifest["shards"][key]["file"]

    def nbytes(self, key: str) -> int:
        return self.manifest["shards"][key]["bytes"]

    def hf_config(self):
        """The stored model's HF config."""
        return hf_config(self.manifest["config"])

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
