"""FLoRA (Wang et al. 2024): LoRA of heterogeneous ranks, aggregated by stacking, merged each round.

Each round every selected client k puts a fresh LoRA of its own rank r_k (set by its device
memory) on the query and value projections of every layer of the current global model W_t
(``chainfed_core.lora``; A drawn from the client's training seed, B = 0, α = 2 r_k so the scale
s = α / r is 2 for every client), trains it and the classification head with the shared loop,
and uploads A_k (r_k, d_in), B_k (d_out, r_k) per target and the head. The server stacks them
with p_k = n_k / Σ n,

    A = [p_1 A_1; ...; p_K A_K],   B = [B_1, ..., B_K],   B A = Σ_k p_k B_k A_k  (no cross terms),

merges s · B A into the dense target weights, W_{t+1} = W_t + s Σ_k p_k B_k A_k (float64, cast
back), and averages the head by examples (FedAvg). The LoRAs are dropped; the next round's
clients start fresh ones on W_{t+1}.

What travels: up, r_k (d_in + d_out) float32 per target and layer, plus the head; down, the
merged dense target weights a client has not seen since its last round (``bytes_down_context``:
the original's merge_and_unload result) and the head (``bytes_down``). The stack would be
Σ_k r_k (d_in + d_out) per target and round, growing with the clients and with every round a
client missed; the dense weights are what a client needs to start the next round.

Ranks by device memory: the original gives its 10 clients the ranks [64, 32, 16, 16, 8, 8, 4,
4, 4, 4], largest first. Here ``ranks`` is that ladder and a client whose capacity is exceeded
by a fraction q of the population (ties share a rank) takes ranks[floor(q · len(ranks))]: the
same shares of each rank for any N. Peak memory (:meth:`FLoRA.peak_bytes`) is the whole model,
the LoRA of the smallest rank (the smallest devices' rank) and its optimizer state: a client
that holds that may take part.

Original defaults (LLaMA-7B, 10 clients all selected, 3 rounds of 1 local epoch in the README,
AdamW lr 3e-4, batch 128 with micro-batch 16): the ``FLoRA`` variant sets AdamW and lr 3e-4;
rounds, clients, batch size and epochs come from the run's profile (our runs are smaller).
Deviations: no LoRA dropout and no fp16 (the core trains float32 with the base in eval mode);
the classification head of our encoders trains and is averaged (the original tunes a causal
LM, whose head stays frozen, as ours does for LLaMA).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from ..config import Config, option
from .base import Method, register

ORIGINAL_RANKS = [64, 32, 16, 16, 8, 8, 4, 4, 4, 4]


@dataclass
class FLoRAOptions(Config):
    ranks: list[int] = option("LoRA ranks from the largest device down; a client takes the rank of its memory "
                              "quantile (original: [64, 32, 16, 16, 8, 8, 4, 4, 4, 4]).",
                              factory=lambda: list(ORIGINAL_RANKS))
    scaling: float = option("s = α / r, the same for every client so that stacking is exact (original: α = 2r).",
                            2.0, gt=0)

    def _check(self) -> None:
        if not self.ranks or any(r < 1 for r in self.ranks):
            raise ValueError(f"FLoRAOptions.ranks: every rank must be >= 1 (and at least one given), got {self.ranks}")


def rank_of(capacity: float, capacities: np.ndarray, ranks: list[int]) -> int:
    """The rank of a client of ``capacity`` among the population's ``capacities``: ranks[floor(q · R)]
    with q the fraction of clients with more memory (R = len(ranks))."""
    above = int((np.asarray(capacities) > capacity).sum())
    return ranks[min(above * len(ranks) // len(capacities), len(ranks) - 1)]


def stacked_delta(factors, weights, scaling: float):
    """s · B A of the stacked LoRAs (``lora.stack``): the dense update of one target, float64."""
    from ..lora import stack

    a, b = stack(factors, weights)
    return scaling * (b @ a)                                                      # (d_out, d_in)


@register
class FLoRA(Method):
    name, label, Options = "flora", "FLoRA", FLoRAOptions
    adapters, trains = False, "adapters"
    variants = {"FLoRA": {"train": {"optimizer": "adamw", "lr": 3e-4}}}

    def __init__(self, config, num_layers, family):
        super().__init__(config, num_layers, family)
        self.capacities: np.ndarray | None = None      # the population's, set by choose_window

    # -- plans: every layer's LoRA and the head; each client's rank by its memory
    @classmethod
    def plan_at(cls, num_layers, stage=None, lam=0.0, train_head=True):
        from ..schedule import TrainPlan
        return TrainPlan(range(0, 0), range(0, num_layers), range(num_layers, num_layers), train_head=train_head,
                         lora_rank=max(ORIGINAL_RANKS))

    def plan(self, round_index, start_layer, window):
        return self.widest_plan()

    def widest_plan(self):
        return replace(self.plan_at(self.num_layers), lora_rank=max(self.options.ranks))

    def choose_window(self, capacities, peak) -> int:
        """Keeps the population's capacities, which set each client's rank (:func:`rank_of`)."""
        self.capacities = np.asarray(capacities, dtype=np.float64)
        return super().choose_window(capacities, peak)

    def client_plan(self, round_index, client, plan, capacity_bytes):
        if self.capacities is None:
            raise RuntimeError("FLoRA: choose_window must see the population's capacities first")
        return replace(plan, lora_rank=rank_of(capacity_bytes, self.capacities, self.options.ranks))

    # -- the global state: the dense target weights (merged every round) and the head
    def exchanged_names(self, backbone):
        from ..lora import target_weight_names
        return target_weight_names(backbone) + list(backbone.head_parameters())

    def load_state(self, backbone, state, tensors=None):
        from ..train import set_state
        set_state(backbone, state, tensors if tensors is not None and tensors.keys() >= state.keys() else None)

    # -- one client: a fresh LoRA of its rank, trained, uploaded, removed
    def client_update(self, backbone, dataset, plan, *, seed, pad_id=0):
        import torch
        from ..lora import attach, detach
        from ..train import train_local

        attach(backbone, plan.lora_rank, self.options.scaling, plan.training,      # A drawn where it lives
               generator=torch.Generator(device=backbone.device).manual_seed(seed))
        try:
            return train_local(backbone, dataset, plan, self.config.train, seed=seed, pad_id=pad_id)
        finally:
            detach(backbone)

    # -- the server: stack, merge, FedAvg of the head
    def aggregate(self, updates, *, round_index=0, clients=None):
        from ..aggregation import fedavg

        total = float(sum(n for _, n in updates))
        weights = [n / total for _, n in updates]
        new = {}
        for name in [n for n in updates[0][0] if n.endswith(".lora_A")]:
            target = name.removesuffix(".lora_A")
            factors = [(state[name], state[f"{target}.lora_B"]) for state, _ in updates]
            old = self.global_state[f"{target}.weight"]
            new[f"{target}.weight"] = (old.double() + stacked_delta(factors, weights, self.options.scaling)).to(old.dtype)
        head = [n for n in updates[0][0] if n.startswith("head.")]
        if head:
            new.update(fedavg([({n: state[n] for n in head}, n) for state, n in updates]))
        return new

    # -- memory
    @classmethod
    def peak_bytes(cls, hf_config, window, *, batch_size, seq_len, bottleneck, optimizer, dtype):
        """The whole model, a LoRA of the smallest default rank on every layer, its gradients and
        optimizer state, and the activations of every layer (``lora.lora_peak_bytes``)."""
        from ..lora import lora_peak_bytes
        return lora_peak_bytes(hf_config, None, min(ORIGINAL_RANKS), batch_size=batch_size, seq_len=seq_len,
                               optimizer=optimizer, dtype=dtype, method=cls.name)
