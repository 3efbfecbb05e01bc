"""A run's files on disk: the server checkpoint and the append-only metrics record.

``checkpoint.pkl`` is the server state after a round (a pickle, tensors as numpy arrays);
``metrics.jsonl`` holds one line per round and is the history: the checkpoint stands for its
first ``round`` lines. Both are written by :class:`Checkpointer` in a background thread, the
metrics line first (fsynced), then the checkpoint atomically, so a kill at any point leaves
a consistent pair and a restart resumes bitwise.
"""

from __future__ import annotations

import json
import os
import pickle
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from .records import atomic_write_bytes

CHECKPOINT_FILE = "checkpoint.pkl"
METRICS_FILE = "metrics.jsonl"


def to_numpy(t: torch.Tensor):
    """A CPU numpy copy of ``t`` (bit for bit), or ``t`` itself where numpy lacks its dtype (bfloat16)."""
    t = t.detach()
    if t.dtype == torch.bfloat16:
        return t.cpu()
    return t.cpu().numpy().copy() if t.device.type != "cpu" else t.numpy()


def checkpoint_bytes(snapshot: dict) -> bytes:
    """A server snapshot as a pickle, tensors as numpy arrays where numpy has their dtype
    (a tenth of ``torch.save``'s time for a few dozen small tensors)."""
    snap = dict(snapshot)
    snap["global"] = {k: to_numpy(v) for k, v in snap["global"].items()}
    snap["torch_rng"] = to_numpy(snap["torch_rng"])
    return pickle.dumps(snap, protocol=pickle.HIGHEST_PROTOCOL)


def read_checkpoint(path) -> dict:
    """A checkpoint written by :func:`checkpoint_bytes`, tensors back as torch tensors."""
    with open(path, "rb") as f:
        saved = pickle.load(f)
    as_tensor = lambda v: torch.from_numpy(v) if isinstance(v, np.ndarray) else v  # noqa: E731
    saved["global"] = {k: as_tensor(v) for k, v in saved["global"].items()}
    saved["torch_rng"] = as_tensor(saved["torch_rng"])
    return saved


def load_final_state(out_dir) -> dict[str, torch.Tensor]:
    """Global tensors of a run's last checkpoint."""
    return read_checkpoint(Path(out_dir) / CHECKPOINT_FILE)["global"]


def read_metrics(out: Path) -> list[dict]:
    """The rounds in ``metrics.jsonl`` (a line cut short by a kill ends the list)."""
    history = []
    path = Path(out) / METRICS_FILE
    for line in (path.read_text().splitlines() if path.exists() else []):
        try:
            history.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return history


def rewrite_metrics(out: Path, history: list[dict]) -> None:
    """Make metrics.jsonl agree with the checkpoint (a kill may have come between the two)."""
    atomic_write_bytes(Path(out) / METRICS_FILE, "".join(json.dumps(m) + "\n" for m in history).encode())


class Checkpointer:
    """Writes the server's checkpoints (and appends the metrics record) in a background thread,
    one at a time, in order.

    ``save`` serialises the state on the caller's thread and returns: the file writes (and
    the checkpoint's fsync) overlap the next round. A write that fails is raised by the next
    ``save`` or by ``close``, naming the round; the checkpoint before it is intact, and a
    restart resumes from it, bitwise as ever (every round is a pure function of the seed),
    dropping any metrics line past it.
    """

    def __init__(self, out: Path):
        self.path, self.metrics_path = Path(out) / CHECKPOINT_FILE, Path(out) / METRICS_FILE
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint")
        self._pending: Future | None = None

    def save(self, snapshot: dict, label: str, metrics_line: str = "") -> None:
        self.wait()
        data = checkpoint_bytes(snapshot)    # here: pickling holds the GIL, it would stall this thread anyway
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
