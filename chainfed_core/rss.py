"""The process's resident set: what the operating system sees, allocator slack included.

:func:`measure_rss` runs a function in a fresh Python process with a fixed thread count
and reports its peak resident set. The peak is Linux's ``VmHWM`` (high-water mark) from
``/proc/self/status``, restarted by writing 5 to ``/proc/self/clear_refs``: psutil reports
the current resident set (:func:`current_rss`) but neither reads nor resets that peak.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import psutil
import torch


def current_rss() -> int:
    """Resident set of this process now, in bytes, counted from its page tables.

    Linux's ``/proc/self/smaps_rollup`` walks the page tables; the counters behind ``statm``
    (what psutil reads) can lag: kernels before 6.2 fold a thread's count in every 64 page
    faults, and with transparent huge pages a fault is 2 MiB, so a fresh 64 MiB block can leave
    them unchanged. psutil where there is no ``smaps_rollup``. The peak (:func:`peak_rss`) comes
    from those counters and can lag the same way, by at most 64 faults a thread.
    """
    try:
        with open("/proc/self/smaps_rollup") as f:
            for line in f:
                if line.startswith("Rss:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return psutil.Process().memory_info().rss


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
    cmd = [sys.executable, "-m", "chainfed_core.rss", target, json.dumps(kwargs or {}), str(threads)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"{target} failed in a fresh process (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _child(target: str, kwargs_json: str, threads: str) -> None:
    """The fresh process of :func:`measure_rss`: import, reset the peak, run, print JSON."""
    import importlib

    torch.set_num_threads(int(threads))
    module_name, _, name = target.partition(":")
    fn = getattr(importlib.import_module(module_name), name)
    reset_peak_rss()
    baseline = current_rss()
    result = fn(**json.loads(kwargs_json))
    print(json.dumps({"result": result, "peak_rss": peak_rss(), "baseline_rss": baseline}))


if __name__ == "__main__":
    _child(*sys.argv[1:4])
