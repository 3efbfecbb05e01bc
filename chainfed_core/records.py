"""Run records with provenance: config, seed, code version, wall time, peak memory, metrics.

Figures and tables are drawn from these JSON files (:func:`load_records`), never from
numbers typed into a notebook. Every file is written atomically (temporary file, then
``os.replace``), so a run killed mid-write leaves the previous version intact.
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
from pathlib import Path
from typing import Any

RECORD_FILE = "record.json"


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` so readers see either the old or the new file, never half.

    The temporary file beside it is named per process and thread; a failed write (a full
    disk) removes it and leaves the old file as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_bytes(path, json.dumps(obj, indent=1, sort_keys=False, default=_plain).encode())


def _plain(value: Any) -> Any:
    """JSON fallback for numpy scalars, ranges and paths."""
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, (range, tuple, set)):
        return list(value)
    return str(value)


def _read_code_version(root: Path | None = None) -> str | None:
    """The git commit of the tree this package lies in, with ``+dirty`` if tracked files other than
    outputs (``results/``, ``figures/``: records, summaries, rendered figures) differ from it, so a
    batch of notebooks rendered one after another stamps the code, not its neighbours' outputs."""
    root = root or Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                                ":(exclude)results", ":(exclude)figures"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("+dirty" if dirty else "")


# Read once, when a process first imports this module (before it has written anything): a run
# that rewrites a tracked figure or record must not stamp its own later records "+dirty".
_CODE_VERSION = _read_code_version()


def code_version() -> str | None:
    """The git commit of the code this process started with, ``+dirty`` if tracked files had
    uncommitted changes then; None outside git."""
    return _CODE_VERSION


def peak_rss_bytes() -> int:
    """Peak resident set size of this process (VmHWM; ru_maxrss where /proc is missing)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def make_record(config: dict, *, seed: int, wall_s: float, history: list[dict], **extra: Any) -> dict:
    """The final record of a run."""
    return {"config": config, "seed": seed, "code_version": code_version(), "wall_s": wall_s,
            "peak_rss_bytes": peak_rss_bytes(), "history": history, **extra}


def load_records(folder: str | os.PathLike, pattern: str = f"**/{RECORD_FILE}"):
    """Every record under ``folder`` as one DataFrame row: config fields flattened to
    ``config.<section>.<field>`` columns, the metrics history kept as a list column,
    and ``path`` pointing at the file."""
    import pandas as pd

    rows = []
    for path in sorted(Path(folder).glob(pattern)):
        record = json.loads(path.read_text())
        row = pd.json_normalize({k: v for k, v in record.items() if k != "history"}).iloc[0].to_dict()
        row["history"] = record.get("history", [])
        row["path"] = str(path)
        rows.append(row)
    return pd.DataFrame(rows)
