"""FedRA (Su et al., ECCV'24): random allocation of layers to memory-limited clients, with LoRA.

Every party puts the same seeded LoRA (rank 8, α 8) on the query and value projections of
every layer (``chainfed_core.lora``); the global state is those LoRAs and the head. Each round:

- allocation: client i holds L_i layers, the most its device memory fits by the memory model
  (:meth:`FedRA.peak_bytes` of an L_i-layer sub-model; :meth:`FedRA.choose_window` reads the
  thresholds). For the round's sampled clients the server draws the allocation matrix
  M ∈ {0, 1}^{K×L}: row i has L_i ones, chosen uniformly without replacement
  (:func:`allocation`, a pure function of (seed, round, client), so a resumed run draws the same);
- client: it runs its L_i layers in their original order and skips the others (absent, not
  frozen: ``TrainPlan.training`` is the tuple of its layers), training their LoRA and the head
  with the shared loop; it is sent, and sends back, exactly those LoRAs and the head;
- aggregation: each layer's LoRA is the plain mean over the clients that trained it
  (M[i, j] = 1); a layer nobody trained keeps its value bit for bit; the head is the plain
  mean over all participants (the original ignores data size, and so does this).

Original defaults (ViT-B/16, 100 rounds, batch 128, budgets [12, 10, 8, 6, 4, 3] of 12 blocks):
LoRA r 8, α 8; SGD momentum 0.9, weight decay 1e-5, lr 0.01, 1 local epoch: the ``FedRA``
variant sets the optimizer's; rounds, clients and batch size come from the run's profile (our
runs are smaller), and the budgets from device memory rather than a fixed list.
Deviations: LoRA on the query and value projections of our encoders and decoder (the
original: ViT's attention output ``proj`` and ``mlp.fc2``, dropout 0.1); no LoRA dropout (the
core trains with the base in eval mode); local iterations are not capped at the smallest
client's batch count (``train.local_steps`` caps every client alike); the patch-embedding LoRA
and the final norm have no counterpart in a text encoder (the encoders' head is averaged
over all participants, as the original's head and norm are).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..config import Config, option
from .base import Method, register

_ALLOCATION = 0xFED5A      # stream tag of the layer allocation (seeding.py's tags are small ints)


@dataclass
class FedRAOptions(Config):
    rank: int = option("LoRA rank r on every layer's query and value projections (original: 8).", 8, ge=1)
    alpha: float = option("LoRA α; the update is scaled by α / r (original: 8).", 8.0, gt=0)


def allocation(seed: int, round_index: int, client: int, budget: int, num_layers: int) -> tuple[int, ...]:
    """The layers ``client`` holds in ``round_index``: ``budget`` of 0..L-1 drawn uniformly
    without replacement, in increasing order; a pure function of its arguments."""
    rng = np.random.default_rng([seed, _ALLOCATION, round_index, client])
    return tuple(sorted(int(j) for j in rng.choice(num_layers, size=budget, replace=False)))


def allocation_matrix(seed: int, round_index: int, clients, budgets, num_layers: int) -> np.ndarray:
    """M ∈ {0, 1}^{K×L} of a round: row k marks the layers of ``clients[k]`` (:func:`allocation`)."""
    m = np.zeros((len(clients), num_layers), dtype=np.int64)
    for row, (client, budget) in enumerate(zip(clients, budgets)):
        m[row, list(allocation(seed, round_index, client, budget, num_layers))] = 1
    return m


def layer_budget(capacity: float, thresholds: list[int]) -> int:
    """L_i: how many layers a device of ``capacity`` bytes holds, ``thresholds[l - 1]`` being the
    peak bytes of an l-layer sub-model (increasing in l)."""
    return sum(1 for need in thresholds if need <= capacity)


@register
class FedRA(Method):
    name, label, Options = "fedra", "FedRA", FedRAOptions
    adapters, trains = False, "adapters"
    variants = {"FedRA": {"train": {"optimizer": "sgd", "lr": 0.01, "momentum": 0.9, "weight_decay": 1e-5}}}

    def __init__(self, config, num_layers, family):
        super().__init__(config, num_layers, family)
        self.thresholds: list[int] | None = None        # peak bytes of 1..L layers, set by choose_window

    # -- the model: one seeded LoRA on every layer, kept across rounds
    def prepare(self, backbone):
        import torch
        from ..lora import attach

        o = self.options
        attach(backbone, o.rank, o.alpha / o.rank, generator=torch.Generator().manual_seed(self.config.seed))

    @classmethod
    def plan_at(cls, num_layers, stage=None, lam=0.0, train_head=True):
        from ..schedule import TrainPlan
        return TrainPlan(range(0, 0), range(0, num_layers), range(num_layers, num_layers), train_head=train_head,
                         lora_rank=FedRAOptions().rank)

    def widest_plan(self):
        from dataclasses import replace
        return replace(self.plan_at(self.num_layers), lora_rank=self.options.rank)

    def plan(self, round_index, start_layer, window):
        return self.widest_plan()

    # -- layer budgets from memory, and each round's allocation
    def choose_window(self, capacities, peak) -> int:
        """Reads the peak bytes of 1..L-layer sub-models; the method's window is the smallest
        sub-model, one layer (which decides eligibility). Without memory-aware selection every
        client may be sampled, so every client must hold a layer."""
        self.thresholds = [int(peak(layers)) for layers in range(1, self.num_layers + 1)]
        capacities = np.asarray(capacities, dtype=np.float64)
        if not self.config.fed.memory_aware:
            short = np.flatnonzero(capacities < self.thresholds[0])
            if len(short):
                raise ValueError(f"FedConfig.memory_aware: FedRA client {int(short[0])} cannot hold one layer "
                                 f"({capacities[short[0]]:.0f} bytes < {self.thresholds[0]}); "
                                 f"{len(short)} client(s) hold none: select by memory (memory_aware) "
                                 "or give the devices more memory (fed.memory_scale)")
        return 1

    def client_plan(self, round_index, client, plan, capacity_bytes):
        from dataclasses import replace

        if self.thresholds is None:
            raise RuntimeError("FedRA: choose_window must read the layer thresholds first")
        budget = layer_budget(capacity_bytes, self.thresholds)
        if budget < 1:
            raise ValueError(f"FedRA: client {client} cannot hold one layer ({capacity_bytes:.0f} bytes)")
        return replace(plan, training=allocation(self.config.seed, round_index, client, budget, self.num_layers))

    # -- the server: each layer over the clients that trained it, unweighted
    def aggregate(self, updates, *, round_index=0, clients=None):
        from ..aggregation import fedavg_by_tensor
        return fedavg_by_tensor([(state, 1) for state, _ in updates])

    # -- memory
    @classmethod
    def peak_bytes(cls, hf_config, window, *, batch_size, seq_len, bottleneck, optimizer, dtype):
        """A sub-model of ``window`` layers as deployed: the embeddings, those layers and the
        head, their LoRA (default rank) and head with gradients and optimizer state, and the
        activations of those layers (``lora.lora_peak_bytes``)."""
        from ..lora import lora_peak_bytes
        return lora_peak_bytes(hf_config, window, FedRAOptions().rank, batch_size=batch_size, seq_len=seq_len,
                               optimizer=optimizer, dtype=dtype, method=cls.name)
