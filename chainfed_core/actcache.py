"""Frozen-prefix activation cache: the window's input per client, computed once.

Layers before the window are frozen while it trains, so their output on a client's data
is the same in every local step and every round until a layer before the window changes.
The cache keeps, per client, the hidden states at the window's input for each example:

- filled once (embeddings + frozen layers, forward only) and reused by every step;
- extended by one layer when the window slides by one (only the newly frozen layer runs);
- rebuilt when the adapter of any layer before the window changed (a new pass), detected
  from per-layer digests of the adapter weights rather than trusted from the caller.

Entries are keyed by token content, not by position in the dataset: the frozen prefix is
a function of an example's tokens alone, so any shuffle or batch composition of
:func:`~chainfed_core.train.batches` finds its rows. Each example is stored unpadded; a
batch is gathered right-padded with zeros to the batch's longest row, the length
``batches`` trims to. Padded positions are masked out of attention and of the loss, so
cached and recomputed prefixes give the same numbers (bit-identical on the tiny models of
the tests). Entries live in memory up to ``max_memory_bytes`` in total, beyond that in
files under ``folder`` that are read row by row.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .backbone import Backbone, LayerContext
from .memory_meter import tagged
from .records import atomic_write_bytes


@dataclass
class _Entry:
    rows: dict[bytes, int]            # token content -> row
    ids: list[torch.Tensor]           # real tokens of each row, (len_j,)
    offsets: list[int]                # row j occupies flat[offsets[j]:offsets[j+1]]
    depth: int                        # hidden states are the output of layers [0, depth)
    digests: list[str]                # adapter digest of each layer in [0, depth)
    flat: torch.Tensor | None = None  # (sum len_j, H) when in memory
    path: Path | None = None          # raw bytes of flat when on disk
    dtype: torch.dtype = torch.float32
    hidden: int = 0

    @property
    def nbytes(self) -> int:
        return self.offsets[-1] * self.hidden * torch.empty((), dtype=self.dtype).element_size()


@dataclass
class CacheStats:
    fills: int = 0           # entries built from the embeddings
    extensions: int = 0      # entries extended by newly frozen layers
    hits: int = 0            # rounds served without running any layer
    example_layers: int = 0  # (example, layer) forward passes the cache ran
    seconds: float = 0.0
    disk_entries: int = 0


def _row_key(ids: torch.Tensor) -> bytes:
    return ids.to(torch.int64).contiguous().numpy().tobytes()


class ActivationCache:
    """Window inputs of each client's examples, in memory up to a byte bound, else on disk."""

    def __init__(self, backbone: Backbone, max_memory_bytes: int = 256 << 20, folder: str | os.PathLike | None = None,
                 batch_size: int = 32, pad_id: int = 0):
        if max_memory_bytes < 0:
            raise ValueError(f"max_memory_bytes must be >= 0, got {max_memory_bytes}")
        self.backbone = backbone
        self.max_memory_bytes = max_memory_bytes
        self.folder = Path(folder) if folder is not None else None
        self.batch_size = batch_size
        self.pad_id = pad_id
        self.entries: dict[str, _Entry] = {}
        self.device = next(p.device for p in backbone.model.parameters() if p.device.type != "meta")
        self.stats = CacheStats()

    # -------------------------------------------------------------- public
    def prefix(self, client: str, dataset, plan):
        """A ``prefix`` for :func:`~chainfed_core.train.train_local`: the window input of a batch,
        read from the client's entry (filled, extended or rebuilt first as needed)."""
        if plan.frozen.start != 0:
            raise ValueError(f"the frozen prefix must start at layer 0, got {plan.frozen}")
        entry = self._current(str(client), dataset, plan.frozen.stop)

        def run(batch: dict) -> tuple[torch.Tensor, LayerContext]:
            hidden = self._gather(entry, batch)          # (B, T, H)
            return hidden, self.backbone.context(batch, hidden)
        return run

    @property
    def memory_bytes(self) -> int:
        return sum(e.nbytes for e in self.entries.values() if e.flat is not None)

    def tensors(self) -> list[torch.Tensor]:
        """In-memory entries (for :class:`~chainfed_core.memory_meter.MemoryMeter`'s ``cache`` category)."""
        return [e.flat for e in self.entries.values() if e.flat is not None]

    def invalidate(self, client: str | None = None) -> None:
        for key in ([str(client)] if client is not None else list(self.entries)):
            entry = self.entries.pop(key, None)
            if entry is not None and entry.path is not None and entry.path.exists():
                entry.path.unlink()

    # -------------------------------------------------------------- entry life cycle
    def _digest(self, index: int) -> str:
        adapter = self.backbone.adapter(index)
        if adapter is None:
            return "-"
        h = hashlib.sha1()
        for p in adapter.parameters():
            h.update(p.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        return h.hexdigest()

    def _current(self, client: str, dataset, depth: int) -> _Entry:
        started = time.perf_counter()
        entry = self.entries.get(client)
        examples = _examples(dataset)
        valid = (entry is not None and entry.depth <= depth and set(entry.rows) == {_row_key(x) for x in examples}
                 and entry.digests == [self._digest(i) for i in range(entry.depth)])
        if not valid:
            self.invalidate(client)
            entry = self._fill(client, examples, depth)
            self.stats.fills += 1
        elif entry.depth < depth:
            entry = self._extend(client, entry, depth)
            self.stats.extensions += 1
        else:
            self.stats.hits += 1
        self.stats.seconds += time.perf_counter() - started
        return entry

    @torch.no_grad()
    def _fill(self, client: str, examples: list[torch.Tensor], depth: int) -> _Entry:
        rows, ids = {}, []
        for x in examples:
            if _row_key(x) not in rows:
                rows[_row_key(x)] = len(ids)
                ids.append(x)
        pieces = []
        for start in range(0, len(ids), self.batch_size):
            batch = self._batch(ids[start:start + self.batch_size])
            hidden, ctx = self.backbone.embed(batch)
            hidden = self.backbone.run_layers(range(0, depth), hidden, ctx)       # (b, T, H)
            pieces += [hidden[j, :len(x)] for j, x in enumerate(ids[start:start + self.batch_size])]
            self.stats.example_layers += len(batch["input_ids"]) * depth
        return self._store(client, rows, ids, pieces, depth)

    @torch.no_grad()
    def _extend(self, client: str, entry: _Entry, depth: int) -> _Entry:
        pieces = []
        for start in range(0, len(entry.ids), self.batch_size):
            chunk = entry.ids[start:start + self.batch_size]
            batch = self._batch(chunk)
            hidden = self._gather(entry, batch)                                    # (b, T, H)
            ctx = self.backbone.context(batch, hidden)
            hidden = self.backbone.run_layers(range(entry.depth, depth), hidden, ctx)
            pieces += [hidden[j, :len(x)] for j, x in enumerate(chunk)]
            self.stats.example_layers += len(chunk) * (depth - entry.depth)
        self.invalidate(client)
        return self._store(client, entry.rows, entry.ids, pieces, depth)

    def _store(self, client: str, rows, ids, pieces: list[torch.Tensor], depth: int) -> _Entry:
        offsets = [0]
        for x in ids:
            offsets.append(offsets[-1] + len(x))
        with tagged("cache"):
            flat = torch.cat(pieces).contiguous()                                  # (sum len_j, H)
        entry = _Entry(rows=rows, ids=ids, offsets=offsets, depth=depth,
                       digests=[self._digest(i) for i in range(depth)], dtype=flat.dtype, hidden=flat.shape[-1])
        if self.memory_bytes + entry.nbytes <= self.max_memory_bytes:
            entry.flat = flat
        else:
            if self.folder is None:
                self.folder = Path(tempfile.mkdtemp(prefix="chainfed-actcache-"))
            self.folder.mkdir(parents=True, exist_ok=True)
            entry.path = self.folder / f"{hashlib.sha1(client.encode()).hexdigest()[:16]}.bin"
            atomic_write_bytes(entry.path, flat.cpu().view(torch.uint8).numpy().tobytes())
            self.stats.disk_entries += 1
        self.entries[client] = entry
        return entry

    # -------------------------------------------------------------- batches
    def _batch(self, ids: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        longest = max(len(x) for x in ids)
        input_ids = torch.full((len(ids), longest), self.pad_id, dtype=torch.long)   # (b, T)
        attention = torch.zeros((len(ids), longest), dtype=torch.long)              # (b, T)
        for j, x in enumerate(ids):
            input_ids[j, :len(x)] = x
            attention[j, :len(x)] = 1
        return {"input_ids": input_ids, "attention_mask": attention}

    def _gather(self, entry: _Entry, batch: dict) -> torch.Tensor:
        """Cached rows of a batch, right-padded with zeros to the batch's length: (B, T, H)."""
        ids, mask = batch["input_ids"], batch["attention_mask"]
        hidden = torch.zeros((ids.shape[0], ids.shape[1], entry.hidden), dtype=entry.dtype, device=self.device)
        handle = open(entry.path, "rb") if entry.path is not None else None
        try:
            for j in range(ids.shape[0]):
                length = int(mask[j].sum())
                row = entry.rows.get(_row_key(ids[j, :length].cpu()))
                if row is None:
                    raise KeyError(f"batch row {j} is not among the examples cached for this client")
                begin, end = entry.offsets[row], entry.offsets[row + 1]
                if handle is None:
                    hidden[j, :length] = entry.flat[begin:end]
                else:
                    part = torch.empty((end - begin, entry.hidden), dtype=entry.dtype)
                    handle.seek(begin * entry.hidden * part.element_size())
                    handle.readinto(memoryview(part.view(torch.uint8).numpy()).cast("B"))
                    hidden[j, :length] = part
        finally:
            if handle is not None:
                handle.close()
        return hidden


def _examples(dataset) -> list[torch.Tensor]:
    """Real (unpadded) token ids of every example, assuming right padding."""
    ids, masks = dataset["input_ids"], dataset["attention_mask"]
    out = []
    for x, m in zip(ids, masks):
        x, m = torch.as_tensor(x), torch.as_tensor(m)
        out.append(x[:int(m.sum())].to(torch.long))
    return out
