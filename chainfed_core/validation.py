"""Which client updates may enter the average: the one check every runtime's round applies.

A client's reply must hold exactly the tensors it was sent to train (the job's window), each
of the window's shape and dtype, with finite values, and a positive example count. A method
with a client update of its own (FedKSeed uploads seed scalars, FwdLLM a variance beside its
gradients) uploads other names than it is sent: there the names are not compared, and the
tensors it shares with the window must still have the window's shape and dtype.
Anything else (a buggy or malicious client, a corrupted transfer) is rejected by
:func:`chainfed_core.rounds.run_round` before aggregation and recorded among the round's
``failures`` with kind ``"rejected"`` and the reason :func:`update_problem` gives.
"""

from __future__ import annotations

import torch


class RejectedUpdate(ValueError):
    """A client's reply that may not enter the average; the message says why."""


def _names(names) -> str:
    names = sorted(names)
    return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def update_problem(update: dict, window: dict[str, torch.Tensor], num_examples, same_names: bool = True) -> str | None:
    """Why ``update`` (a client's trained tensors) must not be averaged into ``window`` (what
    it was sent), or None when it may be: names (``same_names``), shapes, dtypes, finite
    values, example count."""
    if not isinstance(update, dict):
        return f"the update is a {type(update).__name__}, not a dict of tensors"
    if isinstance(num_examples, bool) or not isinstance(num_examples, int) or num_examples <= 0:
        return f"num_examples is {num_examples!r}, not a positive integer"
    missing, unexpected = set(window) - set(update), set(update) - set(window)
    if same_names and missing:
        return f"missing tensors: {_names(missing)}"
    if same_names and unexpected:
        return f"unexpected tensors: {_names(unexpected)}"
    for name in sorted(update):
        got, want = update[name], window.get(name)
        if not isinstance(got, torch.Tensor):
            return f"{name} is a {type(got).__name__}, not a tensor"
        if want is not None and got.shape != want.shape:
            return f"{name} has shape {tuple(got.shape)}, expected {tuple(want.shape)}"
        if want is not None and got.dtype != want.dtype:
            dtype = lambda t: str(t.dtype).removeprefix("torch.")  # noqa: E731
            return f"{name} has dtype {dtype(got)}, expected {dtype(want)}"
        if (got.is_floating_point() or got.is_complex()) and not bool(torch.isfinite(got).all()):
            return f"{name} holds non-finite values (NaN or inf)"
    return None
