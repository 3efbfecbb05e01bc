"""ChainFed: adapters trained layer by layer, a window of W at a time (the paper's method).

Its hyper-parameters are ``RunConfig.chain`` (:class:`chainfed_core.config.ChainConfig`):

- DLCT: at round r the window ``[p, p+W)`` trains (``schedule.stage_at``), the layers before
  it run forward only, the layers after it are not run;
- GPO: the loss mixes in, with weight λ, the end-to-end loss through the later adapters
  and the head (``gpo.gpo_loss``);
- FOAT: the chain starts at the first layer whose CKA score falls below τ (``foat``), unless
  ``chain.start_layer`` fixes it;
- with ``fed.window_from_memory`` W is the widest window the smallest eligible device holds
  (paper D.3).

The paper's ablations are settings of this one method (:attr:`ChainFed.variants`).
Memory is that of a client streaming its layers from a layer store (only the window, the
head and one prefetched part resident), as the method is deployed.
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
    }

    @classmethod
    def plan_at(cls, num_layers, stage=None, lam=0.0, train_head=True) -> TrainPlan:
        if stage is None:
            raise ValueError("chainfed needs the chain stage of the round")
        return TrainPlan(stage.frozen, stage.training, stage.idle, lam=lam, train_head=train_head)

    def plan(self, round_index: int, start_layer: int, window: int) -> TrainPlan:
        stage = stage_at(round_index, self.num_layers, start_layer, window, self.config.chain.passes)
        return self.plan_at(self.num_layers, stage, self.config.chain.resolved_lambda(self.family))

    def widest_plan(self) -> TrainPlan:
        stage = stage_at(0, self.num_layers, 0, self.num_layers, 1)     # one window over every layer
        return self.plan_at(self.num_layers, stage)

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

    @classmethod
    def peak_bytes(cls, hf_config, window, *, batch_size, seq_len, bottleneck, optimizer, dtype):
        from ..memory_model import peak_training_bytes
        return peak_training_bytes(hf_config, "chainfed", window, batch_size=batch_size, seq_len=seq_len,
                                   dtype=dtype, bottleneck=bottleneck, optimizer=optimizer, streamed=True)
