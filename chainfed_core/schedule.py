"""The chain schedule with Dynamic Layer Co-Tuning (DLCT).

Layers are indexed 0..L-1. A window of W adapters starts at the chain's start layer s
(chosen by FOAT) and moves one layer on every federated round, overlapping the previous
window by W-1, until it covers the last layer; then the next pass starts again at s.
After ``passes`` passes the window stays at the last position, or with ``chain.cycle`` goes
on cycling until the run stops. W=1 is the plain chain (the "w/o DLCT" ablation).

At round r with window [p, p+W):
  - layers [0, p)   are frozen and only run forward (no gradients);
  - layers [p, p+W) train their adapters;
  - layers [p+W, L) are not run; only their adapters feed GPO's global branch.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Stage:
    round: int
    pass_index: int
    stage_index: int     # position of the window within the pass, 0-based
    frozen: range        # forward only
    training: range      # adapters trained this round
    idle: range          # transformer layers not run at all
    num_layers: int

    @property
    def is_last(self) -> bool:
        """The window covers the last layer: GPO uses the end-to-end loss alone."""
        return self.training.stop == self.num_layers

    @property
    def new_pass(self) -> bool:
        """First stage of a pass: any frozen-prefix activation cache is stale."""
        return self.stage_index == 0


def stages_per_pass(num_layers: int, start_layer: int, window: int) -> int:
    """Window positions in one pass. A window wider than the remaining chain is clipped."""
    _check(num_layers, start_layer, window, passes=1)
    return max(num_layers - start_layer - window + 1, 1)


def total_rounds(num_layers: int, start_layer: int, window: int, passes: int) -> int:
    return stages_per_pass(num_layers, start_layer, window) * passes


def stage_at(round_index: int, num_layers: int, start_layer: int, window: int, passes: int,
             cycle: bool = False) -> Stage:
    """Which layers are frozen, training and idle at ``round_index`` (0-based).

    Rounds past the schedule's end stay at the last stage of the last pass, so a federation
    that runs longer than the chain keeps fine-tuning the final window end to end; with
    ``cycle`` they start further passes from the start layer instead (``chain.cycle``).
    """
    _check(num_layers, start_layer, window, passes)
    if round_index < 0:
        raise ValueError(f"round_index must be >= 0, got {round_index}")
    per_pass = stages_per_pass(num_layers, start_layer, window)
    r = round_index if cycle else min(round_index, per_pass * passes - 1)
    pass_index, stage_index = divmod(r, per_pass)
    begin = start_layer + stage_index
    end = min(begin + window, num_layers)
    return Stage(round=round_index, pass_index=pass_index, stage_index=stage_index,
                 frozen=range(0, begin), training=range(begin, end),
                 idle=range(end, num_layers), num_layers=num_layers)


def _check(num_layers: int, start_layer: int, window: int, passes: int) -> None:
    if num_layers < 1:
        raise ValueError(f"num_layers must be >= 1, got {num_layers}")
    if not 0 <= start_layer < num_layers:
        raise ValueError(f"start_layer {start_layer} outside 0..{num_layers - 1}")
    if not 1 <= window <= num_layers:
        raise ValueError(f"window W={window} must lie in 1..{num_layers}")
    if passes < 1:
        raise ValueError(f"passes must be >= 1, got {passes}")


@dataclass(frozen=True)
class TrainPlan:
    """What one client's step does with each layer: ``frozen`` layers run forward only,
    ``training`` layers train (their adapters, or with ``train_base`` their own weights),
    ``idle`` layers are not run (GPO's global branch passes through their adapters with
    weight ``lam``). Each method says its plan at round r (``chainfed_core.methods``).

    ``training`` may also be a tuple of layer indices in increasing order (a sub-model,
    FedRA): layers in none of the three are absent, neither run nor sent. ``lora_rank`` r >= 1:
    the training layers' LoRA of rank r trains instead of their adapters (``chainfed_core.lora``)."""
    frozen: range
    training: range | tuple[int, ...]
    idle: range
    lam: float = 0.0
    train_head: bool = True
    train_base: bool = False
    lora_rank: int = 0

    @property
    def trains_anything(self) -> bool:
        return self.train_head or len(self.training) > 0

    def absent(self, num_layers: int) -> frozenset[int]:
        """Layers in none of frozen, training and idle: not part of this client's model."""
        return frozenset(range(num_layers)).difference(self.frozen, self.training, self.idle)
