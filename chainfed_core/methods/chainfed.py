"""ChainFed: adapters trained layer by layer, a window of W at a time (the paper's method).

Its hyper-parameters are ``RunConfig.chain`` (:class:`chainfed_core.config.ChainConfig`):

- DLCT: at round r the window ``[p, p+W)`` trains (``schedule.stage_at``), the layers before
  it run forward only, the layers after it are not run; after ``chain.passes`` passes the window
  stays at the last position, or with ``chain.cycle`` goes on cycling from the start layer;
- GPO: the loss mixes in, with weight λ, the end-to-end loss through the later adapters
  and the head (``gpo.gpo_loss``); with ``chain.local_head="stage"`` the local loss reads
  with a head of the stage's own (one per window position, see ``gpo``): the server keeps
  each position's head in :attr:`Method.state` (checkpointed, never part of the evaluated
  global model), sends it with the window and stores its FedAvg back;
- FOAT: the chain starts at the first layer whose CKA score falls below τ (``foat``), unless
  ``chain.start_layer`` fixes it;
- with ``fed.window_from_memory`` W is the widest window the smallest eligible device holds
  (paper D.3).

The paper's ablations are settings of this one method (:attr:`ChainFed.variants`).
Memory is that of a client as deployed (``memory_model.streamed_chainfed_bytes``): layers
streamed from a layer store, the window's input read from the frozen-prefix activation
cache (one batch in memory, the rest spilled to disk), so only the window, the adapters and
the head are resident; the cache fill, once per window position, holds two layers at a time.
"""

from __future__ import annotations

from .base import Method, register
from ..schedule import TrainPlan, stage_at


@register
class ChainFed(Method):
    name = "chainfed"
    label = "ChainFed"
    adapters = True
    uses_chain = True
    memory_shape = "chainfed"
    variants = {
        "ChainFed": {},
        "w/o DLCT": {"chain": {"window": 1}},        # the plain chain: one adapter at a time
        "w/o GPO": {"chain": {"gpo_lambda": 0.0}},   # local loss only
        "w/o FOAT": {"chain": {"foat_tau": 1.0}},    # start the chain at layer 0
        # GPO's other reading: the local loss from a head of the stage's own (``gpo``)
        "ChainFed (stage head)": {"chain": {"local_head": "stage"}},
        "w/o GPO (stage head)": {"chain": {"gpo_lambda": 0.0, "local_head": "stage"}},
        # the window keeps cycling after its passes instead of staying at the last position
        "ChainFed, cycling": {"chain": {"cycle": True}},
        "w/o FOAT, cycling": {"chain": {"foat_tau": 1.0, "cycle": True}},
    }

    @classmethod
    def plan_at(cls, num_layers, stage=None, lam=0.0, train_head=True) -> TrainPlan:
        if stage is None:
            raise ValueError("chainfed needs the chain stage of the round")
        return TrainPlan(stage.frozen, stage.training, stage.idle, lam=lam, train_head=train_head)

    def plan(self, round_index: int, start_layer: int, window: int) -> TrainPlan:
        chain = self.config.chain
        stage = stage_at(round_index, self.num_layers, start_layer, window, chain.passes, chain.cycle)
        return self.plan_at(self.num_layers, stage, chain.resolved_lambda(self.family))

    def widest_plan(self) -> TrainPlan:
        stage = stage_at(0, self.num_layers, 0, self.num_layers, 1)     # one window over every layer
        return self.plan_at(self.num_layers, stage)

    # -- GPO's stage heads (chain.local_head = "stage")
    def prepare(self, backbone) -> None:
        from ..gpo import add_stage_head
        super().prepare(backbone)
        if self.config.chain.local_head == "stage":
            add_stage_head(backbone, self.config.adapter)

    def initial_state(self, backbone) -> dict:
        """The global state, which holds no stage head; the stage head's initial value is kept
        here, as every window position's head starts from it."""
        from ..gpo import stage_head_parameters
        self._fresh_stage_head = {n: t.detach().clone() for n, t in stage_head_parameters(backbone).items()}
        return super().initial_state(backbone)

    def client_window(self, round_index, client, plan, window):
        """The window, and the stage head of the window's position if the plan trains one:
        as the last round at that position left it, else fresh."""
        from ..gpo import stage_head_layer
        layer = stage_head_layer(plan) if self.config.chain.local_head == "stage" else None
        if layer is None:
            return window
        self._stage_head_at = (round_index, layer)       # for this round's aggregate
        return {**window, **self.state.get("stage_heads", {}).get(layer, self._fresh_stage_head)}

    def load_state(self, backbone, state, tensors=None) -> None:
        """As the base method; a stage head (not among the global tensors) is looked up by name."""
        from ..train import tensors_by_name
        if tensors is not None and any(n not in tensors for n in state):
            tensors = {**tensors, **tensors_by_name(backbone, [n for n in state if n not in tensors])}
        super().load_state(backbone, state, tensors)

    def aggregate(self, updates, *, round_index=0, clients=None):
        """FedAvg; the stage head's average is kept for its window position, the rest is the global update."""
        from ..gpo import STAGE_HEAD
        avg = super().aggregate(updates, round_index=round_index, clients=clients)
        stage = {n: t for n, t in avg.items() if n.startswith(f"{STAGE_HEAD}.")}
        if stage:
            at_round, layer = self._stage_head_at
            if at_round != round_index:
                raise RuntimeError(f"chainfed: round {round_index}'s stage head was never sent "
                                   f"(the last one went out in round {at_round})")
            self.state["stage_heads"] = {**self.state.get("stage_heads", {}), layer: stage}
        return {n: t for n, t in avg.items() if n not in stage}

    def initial_start_layer(self) -> int | None:
        return self.config.chain.start_layer

    def choose_window(self, capacities, peak) -> int:
        window = self.config.chain.window
        if self.config.fed.window_from_memory:
            fits_one = capacities[capacities >= peak(1)]
            if len(fits_one):
                smallest = fits_one.min()
                window = max(w for w in range(1, self.num_layers + 1) if w == 1 or peak(w) <= smallest)
        return window

    def held_window(self, start_layer: int, window: int) -> int:
        return min(window, self.num_layers - start_layer)

    def min_rounds(self, start_layer: int, window: int) -> int:
        """Every window position of every pass trains before the run may stop as converged: a
        plateau while the window still slides says nothing about the layers it has not reached."""
        from ..schedule import total_rounds
        return total_rounds(self.num_layers, start_layer, window, self.config.chain.passes)

    @classmethod
    def peak_bytes(cls, hf_config, window, *, batch_size, seq_len, bottleneck, optimizer, dtype):
        from ..memory_model import streamed_chainfed_bytes
        return streamed_chainfed_bytes(hf_config, window, batch_size=batch_size, seq_len=seq_len, dtype=dtype,
                                       bottleneck=bottleneck, optimizer=optimizer)
