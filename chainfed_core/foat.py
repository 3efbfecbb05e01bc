"""Function-Oriented Adaptive Tuning (FOAT, paper Eq. 3-4, Appendix A).

Early layers of a pre-trained model barely change its input representation; tuning
them buys little. Each client runs one forward pass on one local mini-batch and scores
every layer by the linear CKA between the layer's output and the input representation
(the embedding output). The server averages the scores, weighted by client sample
counts, and the chain starts at the first layer whose score falls below tau.

Profiling runs block by block (:func:`profile_client`), so a client streaming its layers
from a layer store holds only ``block_size`` of them at once.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Sequence

import numpy as np
import torch


def hsic(k: torch.Tensor, l: torch.Tensor) -> torch.Tensor:
    """Biased HSIC estimate of two Gram matrices: tr(K H L H) / (n-1)^2."""
    n = k.shape[0]
    h = torch.eye(n, dtype=k.dtype, device=k.device) - 1.0 / n
    return torch.trace(k @ h @ l @ h) / (n - 1) ** 2


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA of two representations of the same n examples, (n, d1) and (n, d2).

    Computed in float64 through the feature-space identity
    CKA = ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F) on centred X, Y, which equals
    HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L)) with linear kernels K = X X^T, L = Y Y^T.
    """
    if x.ndim != 2 or y.ndim != 2 or x.shape[0] != y.shape[0]:
        raise ValueError(f"linear_cka needs (n, d) inputs with equal n, got {tuple(x.shape)} and {tuple(y.shape)}")
    if x.shape[0] < 2:
        raise ValueError("linear_cka needs at least 2 examples")
    x = x.detach().to(torch.float64)
    y = y.detach().to(torch.float64)
    x = x - x.mean(dim=0, keepdim=True)
    y = y - y.mean(dim=0, keepdim=True)
    cross = torch.linalg.matrix_norm(y.T @ x) ** 2
    norm = torch.linalg.matrix_norm(x.T @ x) * torch.linalg.matrix_norm(y.T @ y)
    if norm == 0:
        raise ValueError("linear_cka is undefined for a constant representation")
    return float(cross / norm)


def token_matrix(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Flatten (B, T, H) hidden states to (n_tokens, H), keeping only real (unpadded) tokens."""
    keep = attention_mask.bool().reshape(-1)              # (B*T,)
    return hidden.reshape(-1, hidden.shape[-1])[keep]     # (n_tokens, H)


def aggregate_scores(client_scores: Sequence[Sequence[float]], weights: Sequence[float]) -> np.ndarray:
    """Server side: per-layer scores averaged over clients, weighted by sample counts."""
    scores = np.asarray(client_scores, dtype=np.float64)   # (clients, L)
    w = np.asarray(weights, dtype=np.float64)
    if scores.ndim != 2 or scores.shape[0] != w.shape[0]:
        raise ValueError(f"need one score vector per client: {scores.shape} scores, {w.shape} weights")
    if (w < 0).any() or w.sum() <= 0:
        raise ValueError("client weights must be non-negative with a positive sum")
    return (w[:, None] * scores).sum(axis=0) / w.sum()


def start_layer(scores: Sequence[float], tau: float) -> int:
    """First layer whose aggregated CKA score falls below ``tau`` (Eq. 4).

    With tau = 1.0 every layer that changes the representation at all qualifies, so the
    chain starts at layer 0 (the "w/o FOAT" ablation). If no layer falls below tau the
    chain is reduced to the last layer alone.
    """
    if not 0.0 < tau <= 1.0:
        raise ValueError(f"tau must lie in (0, 1], got {tau}")
    scores = list(scores)
    if not scores:
        raise ValueError("no layer scores")
    if tau == 1.0:
        return 0
    for i, s in enumerate(scores):
        if s < tau:
            return i
    return len(scores) - 1


@torch.no_grad()
def profile_client(backbone, batch: dict[str, torch.Tensor], block_size: int = 1) -> list[float]:
    """CKA score of every layer's output against the input representation, on one batch.

    Layers run block by block (Appendix G.3): a backbone streamed from a layer store
    (:class:`~chainfed_core.streaming.StreamedBackbone`) reads a block of ``block_size``
    layers, runs it and evicts it before the next, so it holds one block at a time; only
    the current hidden states and the input token matrix are kept between blocks. An
    in-memory backbone holds every layer anyway. The scores do not depend on ``block_size``.
    """
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    hidden, ctx = backbone.embed(batch)
    reference = token_matrix(hidden, ctx.attention_mask)   # (n_tokens, H)
    scores = []
    for begin in range(0, backbone.num_layers, block_size):
        block = range(begin, min(begin + block_size, backbone.num_layers))
        with _resident(backbone, block):
            for i in block:
                hidden = backbone.run_layer(i, hidden, ctx)
                scores.append(linear_cka(reference, token_matrix(hidden, ctx.attention_mask)))
    return scores


def _resident(backbone, block: range):
    """The context holding ``block``'s layers: the backbone's ``resident_layers`` where it
    streams them, else nothing to do."""
    hold = getattr(backbone, "resident_layers", None)
    return nullcontext() if hold is None else hold(block)
