"""FwdLLM (Xu et al. 2023): backpropagation-free federated fine-tuning by forward gradients.

A client never runs a backward pass. For each local mini-batch it draws a perturbation v of
the trainable tensors (every layer's adapter and the classification head), measures the
directional derivative of the loss along v by central differences,

    jvp = (L(θ + h v) - L(θ - h v)) / (2 h),      h = 0.01,

under ``no_grad``, and accumulates the forward gradient jvp * v (an unbiased estimate of the
gradient when v ~ N(0, I)). It uploads the mean over its batches, a dense tensor the size of
the adapters and head, and one scalar: the variance statistic below. The server applies
FedSGD, θ <- θ - η_t * sum_i n_i g_i / sum_i n_i, with η warmed up linearly over the first
``warmup_ratio`` of the rounds and decayed linearly to zero after.

- Perturbation sampling: per batch and tensor, ``candidates`` perturbations are drawn and
  the one with the highest cosine similarity to the last applied global gradient is kept
  (:func:`sample_perturbation`). The server sends that gradient down with the model, as the
  extra global tensor ``fwdllm.reference``.
- Variance-controlled pacing: a client measures, on the adapter of ``check_layer``, the
  mean element-wise variance between the means of the first and second half of its
  per-batch forward gradients (:func:`half_variance`). Our round is one dispatch, so the
  original's extra "more perturbations" sub-rounds map onto the following rounds: while the
  variance of the pooled estimate stays above ``var_threshold`` the server caches the
  gradients (in :attr:`Method.state`, checkpointed), leaves the model unchanged and the next
  round's clients compute more forward gradients at the same θ; then it applies all it
  cached plus the new ones. (No core hook for a second dispatch within a round: the cached
  rounds are real rounds, so their traffic and time are counted like any other.)

Deviations from the authors' code, and why:

- the forward gradient is the mean over the client's batches (the original sums and the
  server divides by the sample count), so η multiplies a gradient estimate whatever the
  batch size; clients are weighted by their example counts;
- the cosine reference is the last *global* gradient, sent down (the original keeps each
  simulated client process's own previous gradient, a state our sampled clients lack);
  the downlink carries it as context, counted in ``bytes_down_context``;
- candidates are drawn per batch, tensor by tensor (``candidates`` x the tensor's size, the
  best kept), instead of 10 x n_batches per tensor up front: the pool no longer grows with
  the client's data;
- the pacing criterion is the variance of the pooled mean, sum_i w_i^2 var_i with
  w_i = n_i / sum_j n_j, from each client's scalar (one client: its own statistic), since
  the clients of the next round are new ones; ``max_deferred`` (ours) bounds the rounds
  the server may wait in a row, as our runs have few rounds to give;
- the check tensor is the adapter of ``check_layer`` (the original names a position in its
  parameter list: 20 for DistilBERT, 12 for BERT);
- the head trains by forward gradients too (the original's DistilBERT drops the
  pre-classifier), which keeps the method free of backpropagation end to end;
- no autocast: the CPU runs here are float32.

Original defaults (AGNews, ``run_text_classification.sh 100 0.01 FedFwd``): 100 of 1000
clients a round, η = 0.01, 3000 rounds, batch 8, sequence 64, 10 candidates, thresholds
0.1 (DistilBERT) and 0.2 (BERT, RoBERTa-L). Our runs are smaller: rounds, clients and
sequence length come from the profile (``fed``, ``data``, ``model.max_length``), batch size
from ``train.batch_size``; ``warmup_ratio`` is not in the notes and defaults to 0.1. The
thresholds are on the scale of the original models' gradients; tiny models set their own.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Optional

from .base import Method, register
from ..config import Config, option

REFERENCE = "fwdllm.reference"        # global name of the last global gradient (flat, |θ|)
VARIANCE = "fwdllm.variance"          # the scalar a client uploads beside its gradient
UNMEASURED = -1.0                     # its value from a client with one forward gradient (no halves):
                                      # finite, so the update passes validation; a variance is >= 0
THRESHOLDS = {"distilbert": 0.1, "bert": 0.2, "roberta": 0.2}   # the original's; others take BERT's


@dataclass
class FwdLLMOptions(Config):
    lr: float = option("Server learning rate η of FedSGD (original: 0.01).", 0.01, gt=0)
    warmup_ratio: float = option("Share of fed.rounds over which η rises linearly; it then falls linearly "
                                 "to 0.", 0.1, ge=0, lt=1)
    h: float = option("Central-difference step: jvp = (L(θ+hv) - L(θ-hv)) / 2h (original: 0.01).", 0.01, gt=0)
    candidates: int = option("Perturbations drawn per batch and tensor; the one most aligned (cosine) with the "
                             "last global gradient is kept; 1: plain N(0, I), nothing sent down (original: 10).",
                             10, ge=1)
    var_threshold: Optional[float] = option("Variance control: the server waits for more forward gradients while "
                                            "the pooled variance exceeds this; None: 0.1 DistilBERT, 0.2 "
                                            "otherwise (original).", None, gt=0)
    check_layer: Optional[int] = option("Layer whose adapter the variance is measured on; None: the last.",
                                        None, ge=0)
    max_deferred: int = option("Rounds in a row the server may wait for more forward gradients; 0 turns "
                               "variance control off (ours: the original waits as long as it takes).", 4, ge=0)


# ---------------------------------------------------------------------- the method's parts
def lr_at(round_index: int, rounds: int, lr: float, warmup_ratio: float) -> float:
    """η_t: linear warmup over the first ceil(rounds * warmup_ratio) rounds, then linear decay
    to 0 at ``rounds`` (the original's schedule)."""
    warmup = math.ceil(rounds * warmup_ratio)
    if round_index < warmup:
        return lr * (round_index + 1) / warmup
    return lr * max(0.0, (rounds - round_index) / max(1, rounds - warmup))


def sample_perturbation(params: list, reference: list | None, candidates: int, generator) -> list:
    """One perturbation per tensor: N(0, I), or with a (nonzero) ``reference`` the most
    cosine-similar of ``candidates`` draws, tensor by tensor."""
    import torch

    if reference is None or candidates == 1:
        return [torch.randn(p.shape, generator=generator, device=p.device, dtype=p.dtype) for p in params]
    out = []
    for p, ref in zip(params, reference):
        pool = torch.randn((candidates, p.numel()), generator=generator, device=p.device, dtype=p.dtype)   # (C, n)
        # cosine up to the reference's norm, which does not change the order (no (C, n) temporaries)
        best = int((pool @ ref.reshape(-1) / pool.norm(dim=1)).argmax())
        out.append(pool[best].reshape(p.shape).clone())         # not a view: the pool is freed
    return out


def central_difference(loss: Callable[[], tuple], params: list, v: list, h: float, origin: list) -> tuple:
    """(loss at θ, directional derivative along v, logits) from L(θ + hv) and L(θ - hv).

    ``params`` are moved in place and restored bit for bit from ``origin`` (their values at θ).
    ``loss()`` returns (loss, logits) at the current values. The loss and logits at θ are
    the means of the two sides (exact to O(h^2))."""
    import torch

    torch._foreach_add_(params, v, alpha=h)
    plus, logits_plus = loss()
    torch._foreach_copy_(params, origin)
    torch._foreach_add_(params, v, alpha=-h)
    minus, logits_minus = loss()
    torch._foreach_copy_(params, origin)
    jvp = (float(plus) - float(minus)) / (2 * h)
    return (float(plus) + float(minus)) / 2, jvp, (logits_plus + logits_minus) / 2


def half_variance(first_sum: list, n_first: int, second_sum: list, n_second: int) -> float:
    """Mean over elements of the (unbiased) variance of the two half-means, (m1 - m2)^2 / 2;
    NaN with fewer than one forward gradient in a half."""
    import torch

    if n_first == 0 or n_second == 0:
        return math.nan
    diff = torch.cat([(a / n_first - b / n_second).reshape(-1) for a, b in zip(first_sum, second_sum)])
    return float((diff.double() ** 2 / 2).mean())


def pooled_variance(variances: list[float], weights: list[float]) -> float:
    """Variance statistic of the weighted mean of independent estimates: sum_i w_i^2 var_i,
    w_i = n_i / sum_j n_j over the estimates that measured one (not NaN, not ``UNMEASURED``;
    NaN: none did)."""
    measured = [(v, n) for v, n in zip(variances, weights) if math.isfinite(v) and v >= 0]
    total = sum(n for _, n in measured)
    return sum(n * n * v for v, n in measured) / total ** 2 if measured else math.nan


def local_steps(num_examples: int, batch_size: int, epochs: int, cap: int | None) -> int:
    """Forward gradients a client computes: one per mini-batch, over its epochs, up to ``cap``."""
    steps = epochs * math.ceil(num_examples / batch_size)
    return steps if cap is None else min(steps, cap)


# ---------------------------------------------------------------------- the method
@register
class FwdLLM(Method):
    name, label, Options = "fwdllm", "FwdLLM", FwdLLMOptions
    adapters, trains = True, "adapters"
    memory_shape = "no_ft"              # an inference-only step (see peak_bytes)
    variants = {"FwdLLM": {}}

    def __init__(self, config, num_layers, family):
        super().__init__(config, num_layers, family)
        opt = self.options
        if opt.check_layer is not None and opt.check_layer >= num_layers:
            raise ValueError(f"FwdLLMOptions.check_layer: {opt.check_layer} is past the last layer "
                             f"({num_layers - 1})")
        self.check_layer = num_layers - 1 if opt.check_layer is None else opt.check_layer
        self.threshold = opt.var_threshold if opt.var_threshold is not None else THRESHOLDS.get(family, 0.2)
        self.reference = None           # a client's copy of the last global gradient (load_state)

    @property
    def samples(self) -> bool:
        """Whether perturbations are sampled against the last global gradient (sent down)."""
        return self.options.candidates > 1

    # -- the global state: the adapters and head, and the last global gradient
    def initial_state(self, backbone) -> dict:
        import torch

        state = dict(super().initial_state(backbone))
        if self.samples:
            state[REFERENCE] = torch.zeros(sum(t.numel() for t in state.values()))   # (|θ|,) none yet
        return state

    def load_state(self, backbone, state, tensors=None) -> None:
        """The model's tensors into the backbone; the reference, when sent, kept for sampling."""
        from ..train import set_state

        if REFERENCE in state:
            self.reference = state[REFERENCE]
        set_state(backbone, {n: t for n, t in state.items() if n != REFERENCE}, tensors)

    # -- one client: forward passes only
    def client_update(self, backbone, dataset, plan, *, seed, pad_id=0):
        import torch
        from ..aggregation import pack
        from ..memory_meter import tagged
        from ..train import LocalResult, batches, tensors_by_name, trainable_names

        started, cfg, opt = time.perf_counter(), self.config.train, self.options
        names = trainable_names(backbone, plan)
        tensors = tensors_by_name(backbone, names)
        params = [tensors[n] for n in names]
        reference = None
        if self.samples and self.reference is not None and bool(self.reference.any()):
            reference = list(self.reference.to(params[0].device).split([p.numel() for p in params]))
        check = [k for k, n in enumerate(names) if n.startswith(f"adapters.{self.check_layer}.")]
        planned = local_steps(len(dataset), cfg.batch_size, cfg.local_epochs, cfg.local_steps)
        generator = torch.Generator(device=params[0].device).manual_seed(seed)

        def loss():
            hidden, ctx = backbone.embed(batch)
            hidden = backbone.run_layers(range(backbone.num_layers), hidden, ctx)
            return backbone.head_loss(hidden, batch, ctx)

        with torch.no_grad():
            with tagged("gradients"):         # the accumulator and the two halves of the check tensor
                total = [torch.zeros_like(p) for p in params]
                halves = [[torch.zeros_like(params[k]) for k in check] for _ in range(2)]
            origin = [p.clone() for p in params]
            losses, correct, seen, steps = [], 0, 0, 0
            for epoch in range(cfg.local_epochs):
                for batch in batches(dataset, cfg.batch_size, shuffle=True, seed=seed * 1000 + epoch,
                                     pad_id=pad_id, device=backbone.device):
                    with tagged("cache"):     # the candidate pool and the kept perturbation
                        v = sample_perturbation(params, reference, opt.candidates, generator)
                    value, jvp, logits = central_difference(loss, params, v, opt.h, origin)
                    torch._foreach_add_(total, v, alpha=jvp)
                    torch._foreach_add_(halves[0 if steps < planned // 2 else 1], [v[k] for k in check], alpha=jvp)
                    del v
                    losses.append(value)
                    if not backbone.is_causal_lm:
                        correct += int((logits.argmax(-1) == batch["labels"]).sum())
                        seen += len(batch["labels"])
                    steps += 1
                    if steps >= planned:
                        break
                if steps >= planned:
                    break
            variance = half_variance(halves[0], planned // 2, halves[1], steps - planned // 2)
            upload = {n: g / steps for n, g in zip(names, total)}
        variance = variance if math.isfinite(variance) else UNMEASURED
        upload[VARIANCE] = torch.tensor([variance], dtype=params[0].dtype, device=params[0].device)
        return LocalResult(state=pack(upload), num_examples=len(dataset), steps=steps,
                           loss=sum(losses) / len(losses), accuracy=correct / seen if seen else math.nan,
                           seconds=time.perf_counter() - started, history=losses)

    # -- the server: FedSGD with variance-controlled pacing
    def aggregate(self, updates, *, round_index=0, clients=None):
        import torch

        names = [n for n in updates[0][0] if n != VARIANCE]
        flat = lambda state: torch.cat([state[n].reshape(-1) for n in names]).double()   # noqa: E731
        pending = self.state.get("pending") or {"sum": torch.zeros(sum(updates[0][0][n].numel() for n in names),
                                                                   dtype=torch.float64),
                                                "weights": [], "variances": [], "deferred": 0}
        weighted = pending["sum"].clone()
        for state, n in updates:
            weighted += n * flat(state)
        weights = pending["weights"] + [float(n) for _, n in updates]
        variances = pending["variances"] + [float(state[VARIANCE]) for state, _ in updates]
        variance = pooled_variance(variances, weights)
        self.state.setdefault("variance", []).append(variance)
        if variance > self.threshold and pending["deferred"] < self.options.max_deferred:
            self.state["pending"] = {"sum": weighted, "weights": weights, "variances": variances,
                                     "deferred": pending["deferred"] + 1}
            self.state.setdefault("deferred_rounds", []).append(round_index)
            return {}                         # the model stays: next round's clients add forward gradients
        self.state["pending"] = None
        gradient = weighted / sum(weights)                                    # (|θ|,) float64
        lr = lr_at(round_index, self.config.fed.rounds, self.options.lr, self.options.warmup_ratio)
        new, begin = {}, 0
        for name in names:
            old = self.global_state[name]
            step = gradient[begin:begin + old.numel()].reshape(old.shape)
            new[name] = (old.double() - lr * step).to(old.dtype)
            begin += old.numel()
        if self.samples:
            new[REFERENCE] = gradient.float()
        return new

    # -- memory
    @classmethod
    def peak_bytes(cls, hf_config, window, *, batch_size, seq_len, bottleneck, optimizer, dtype):
        """Inference of one batch with every weight resident, plus the adapters and head (float32)
        and, of their size θ, the saved values, the gradient accumulator, the last global gradient
        and the perturbation; at the widest point of a step either the forward's activations or
        the candidate pool of the largest tensor (``candidates`` of the default options) are live."""
        from ..backbone import from_model
        from ..families import detect_family
        from ..memory_model import MemoryEstimate, peak_training_bytes
        from ..model_parts import build_model, hf_config as to_hf_config

        import torch

        inference = peak_training_bytes(hf_config, "no_ft", 1, batch_size=batch_size, seq_len=seq_len,
                                        dtype=dtype, bottleneck=bottleneck)
        config = to_hf_config(hf_config)
        family = detect_family(config)
        with torch.device("meta"):
            model = build_model(config, family)
        backbone = from_model(model, family)
        hidden, layers = backbone.hidden_size, backbone.num_layers
        adapter = 2 * hidden * bottleneck + hidden + bottleneck
        head = [p.numel() for p in backbone.head_parameters().values()]       # none for an LM head
        theta = (layers * adapter + sum(head)) * 4                              # float32
        pool = FwdLLMOptions().candidates * max(head + [hidden * bottleneck]) * 4
        return MemoryEstimate(frozen_weights=inference.frozen_weights - sum(head) * 4, trainable=theta,
                              gradients=2 * theta + 2 * adapter * 4,   # accumulator, reference, check halves
                              optimizer_state=0, activations=theta + max(inference.activations, pool),
                              cache=theta, notes={**inference.notes, "method": cls.name})
