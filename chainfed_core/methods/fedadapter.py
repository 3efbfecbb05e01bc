"""FedAdapter (Cai et al., MobiCom'22): adapters whose depth and width are searched online.

The backbone stays frozen; a bottleneck adapter after each layer (on the FFN output, ReLU)
is built from parallel *units* of ``unit`` bottleneck each. A configuration (d, w) trains
the first w / unit units of the adapters of the top d layers and the head; the layers below
run forward only (no backprop below them). The server runs FedAvg on what trains.

The search runs in trial windows. In each, every round's sampled clients are split into up
to three trial groups (the k-th client the server plans for joins group k mod 3), each with
its own adapters and head on the server:

- shallow (d, w): the incumbent, kept as the global state (what evaluation tests);
- deep (d + 1, w), unless d is the model's depth;
- wide (d, w + unit), unless w is the widest (``AdapterConfig.bottleneck``).

A window lasts ``time_threshold * (expand * d_o + 1)`` simulated seconds (d_o: the original's
depth, :func:`original_depth`); each round adds the incumbent's simulated round time,
``step_s * d * batches + 2 * bytes / bandwidth`` (:func:`round_seconds`). When it is spent,
the group with the best score wins (compared as numbers), its (d, w) becomes the incumbent
and its state is copied over the other groups. The search state is :attr:`Method.state`.

How it maps onto our code:

- width as units: one adapter of bottleneck ``AdapterConfig.bottleneck`` (the widest, 64 by
  default: 8 units of 8, reduction 768 / 8 = 96 for BERT-base); unit k is rows / columns
  [k * unit, (k + 1) * unit). A client of width w is sent its adapters' first w units only
  (:func:`narrow`), the model's other units are zero, so they get zero gradients and stay
  zero: the model computes what a width-w adapter computes. It uploads those w units.
- depth from the top: our depth counts the adapters trained from the top. The original's
  starting d = 0 trains no adapter and its deep group skips depth 1 (0 -> 2); we start at
  depth 1, the smallest that trains an adapter, and deep is d + 1 (1 -> 2), so from depth 2
  on the two agree. The window budget uses the original's depth (0 for our 1).
- the score that picks the winner: each client evaluates the model it is sent on its local
  data before it trains and uploads that accuracy (negated loss for a causal LM), one
  float32; a group's score is the example-weighted mean of its clients' in the last round
  it had clients. The original tests each group's model on the server's test set; ours
  keeps the test split for the run's own evaluation and asks the data the groups train on.
- what travels: up, a group's top-d adapters at width w, the head and the score; down, the
  same at the group's width plus, for the shallow and wide groups, the adapter of the layer
  just below d, which only the deep group trains (a client that was in the deep group
  holds that group's copy and must be sent the incumbent's back).
- the cost model: the original's Jetson TX2 per-layer latency table is replaced by our
  measured step time per trained layer, ``step_s``; the payload is our exact bytes of the
  configuration (up or down), not the original's (0.02 + 0.05 d w / 32) * 4 MB formula;
  ``batches`` is the round's mean over its clients of their local steps.
- the three groups share each round's K clients (the original runs three parallel jobs of
  K clients each) and train the same rounds (the original gives each the same time).
- memory: every weight and every adapter unit resident, activations and gradients of the
  top layers only; memory-aware selection sizes a device for the deepest configuration the
  search can move to, every layer (:meth:`FedAdapter.peak_bytes`).

Original defaults (README: ``--depth 0 --width 8 --time_threshold 60 --max_round 3000``;
the code's default threshold is 90; expand 4, depth step 1; client lr 0.1, 5 clients a round,
batch 4, sequence 256, 1 epoch). Our runs are smaller: rounds, clients, batch size, sequence
length and learning rate come from the run's profile (``fed``, ``train``, ``model``), so a run
of tens of rounds holds a few trial windows. ``step_s`` = 0.30 s was measured here: one
local step of BERT-base's shape (random weights, ``chainfed_core.bench.random_token_dataset``,
batch 4, sequence 256, float32, one CPU thread), top-3 minus top-1 adapters trained, over two.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

from .base import Method, register
from ..config import Config, option
from ..schedule import TrainPlan

SCORE = "fedadapter.score"                 # the float32 a client uploads: its pre-training accuracy
ROLES = ("shallow", "deep", "wide")        # the trial groups, in the order ties are broken


@dataclass
class FedAdapterOptions(Config):
    depth: int = option("Starting depth d: adapters trained from the top (original --depth 0, which trains "
                        "none; ours starts at 1, see the module docstring).", 1, ge=1)
    width: int = option("Starting width w: adapter units trained x unit (original --width 8).", 8, ge=1)
    unit: int = option("Bottleneck of one parallel adapter unit (original: 8).", 8, ge=1)
    time_threshold: float = option("Seconds of simulated time per trial window, times (expand * d + 1) "
                                   "(original README: 60; its code's default: 90).", 60.0, gt=0)
    expand: float = option("How much longer a window of a deeper configuration lasts (original: 4).", 4.0, ge=0)
    step_s: float = option("Seconds of one local step per trained layer (the cost model's compute; ours, "
                           "measured for BERT-base at batch 4, sequence 256 on one CPU thread).", 0.30, gt=0)
    bandwidth_mb_s: float = option("Link bandwidth of the cost model, MB/s (original: 1).", 1.0, gt=0)

    def _check(self) -> None:
        if self.width % self.unit:
            raise ValueError(f"FedAdapterOptions.width: {self.width} is not a multiple of unit {self.unit}")


# ---------------------------------------------------------------------- the method's parts
def trial_configs(depth: int, width: int, num_layers: int, max_width: int, unit: int) -> dict[str, tuple]:
    """The trial groups of a window around the incumbent (d, w): shallow (d, w), deep
    (d + 1, w) and wide (d, w + unit), leaving out a group past the model's depth or width."""
    configs = {"shallow": (depth, width)}
    if depth < num_layers:
        configs["deep"] = (depth + 1, width)
    if width + unit <= max_width:
        configs["wide"] = (depth, width + unit)
    return configs


def original_depth(depth: int) -> int:
    """The original's depth of ours: our depth 1 is its starting depth 0; from 2 on they agree."""
    return 0 if depth == 1 else depth


def window_seconds(depth: int, time_threshold: float, expand: float) -> float:
    """Simulated seconds of a trial window whose incumbent has depth ``depth``."""
    return time_threshold * (expand * original_depth(depth) + 1)


def round_seconds(depth: int, batches: float, step_s: float, payload_bytes: int, bandwidth_mb_s: float) -> float:
    """Simulated seconds of one round: local steps through ``depth`` trained layers, then the
    payload up and down."""
    return step_s * depth * batches + 2 * payload_bytes / (bandwidth_mb_s * 1e6)


def best_group(scores: dict[str, float]) -> str:
    """The group with the highest score, compared as numbers; ties go to the earlier of
    shallow, deep, wide (the incumbent first)."""
    return max((r for r in ROLES if r in scores), key=lambda r: scores[r])


def narrow(name: str, tensor, width: int):
    """The first ``width`` units of an adapter tensor (``adapters.<i>.down.weight`` (r, H) ->
    (width, H), ``down.bias`` (r,) -> (width,), ``up.weight`` (H, r) -> (H, width)); the up
    bias and any other tensor whole."""
    if not name.startswith("adapters."):
        return tensor
    if name.endswith("down.weight") or name.endswith("down.bias"):
        return tensor[:width]
    if name.endswith("up.weight"):
        return tensor[:, :width]
    return tensor


def width_of(name: str, tensor) -> int:
    """The units an adapter tensor holds (:func:`narrow`'s ``width``)."""
    return tensor.shape[1] if name.endswith("up.weight") else tensor.shape[0]


def widen(name: str, full, narrowed):
    """``full`` with its first units replaced by ``narrowed`` (:func:`narrow`'s inverse on
    those units; the others kept)."""
    if narrowed.shape == full.shape:
        return narrowed
    out = full.clone()
    narrow(name, out, width_of(name, narrowed)).copy_(narrowed)
    return out


def layer_names(names, layers) -> list[str]:
    """The adapter names among ``names`` of the given layers."""
    wanted = {f"adapters.{i}." for i in layers}
    return [n for n in names if n.startswith("adapters.") and n[:n.index(".", 9) + 1] in wanted]


# ---------------------------------------------------------------------- the method
@register
class FedAdapter(Method):
    name, label, Options = "fedadapter", "FedAdapter", FedAdapterOptions
    adapters, trains = True, "adapters"
    variants = {"FedAdapter": {}}

    def __init__(self, config, num_layers, family):
        super().__init__(config, num_layers, family)
        opt, widest = self.options, config.adapter.bottleneck
        if widest % opt.unit:
            raise ValueError(f"AdapterConfig.bottleneck: FedAdapter's widest adapter ({widest}) is not a multiple "
                             f"of FedAdapterOptions.unit {opt.unit}")
        if opt.width > widest:
            raise ValueError(f"FedAdapterOptions.width: {opt.width} exceeds AdapterConfig.bottleneck {widest}")
        if opt.depth > num_layers:
            raise ValueError(f"FedAdapterOptions.depth: {opt.depth} exceeds the model's {num_layers} layers")
        self.width = widest             # a client's width: that of the adapters it was last sent
        self._round_roles: tuple[int, dict[int, str]] = (-1, {})     # this round's groups, by client

    # -- the search state (plain values and tensors, checkpointed with the server)
    @property
    def search(self) -> dict:
        if not self.state:
            self.state.update(depth=self.options.depth, width=self.options.width, window_start=0,
                              elapsed_s=0.0, scores={}, groups={}, windows=[], step_s=self.options.step_s)
        return self.state

    def configs(self) -> dict[str, tuple]:
        s = self.search
        return trial_configs(s["depth"], s["width"], self.num_layers, self.config.adapter.bottleneck,
                             self.options.unit)

    def depth_plan(self, depth: int) -> TrainPlan:
        L = self.num_layers
        return TrainPlan(frozen=range(0, L - depth), training=range(L - depth, L), idle=range(L, L))

    # -- what trains when
    def plan(self, round_index, start_layer, window) -> TrainPlan:
        return self.depth_plan(self.search["depth"])

    def client_plan(self, round_index, client, plan, capacity_bytes) -> TrainPlan:
        """The k-th client the server plans for this round (it asks in the round's client
        order) joins the k-th group, cyclically."""
        if self._round_roles[0] != round_index:
            self._round_roles = (round_index, {})
        configs, roles = self.configs(), self._round_roles[1]
        roles[client] = list(configs)[len(roles) % len(configs)]
        return self.depth_plan(configs[roles[client]][0])

    def choose_window(self, capacities, peak) -> int:
        """The deepest configuration the search can move to: every layer (sizes eligibility)."""
        return self.num_layers

    def client_window(self, round_index, client, plan, window):
        """The client's group's adapters of the top layers any group trains, at the group's
        width, and its head (the window's own tensors are the shallow group's)."""
        configs, role = self.configs(), self._round_roles[1][client]
        groups = self.search["groups"]
        if not groups:              # the first window: every group starts from the initial state
            groups.update({r: dict(self.global_state) for r in configs if r != "shallow"})
        source = self.global_state if role == "shallow" else groups[role]
        deepest = max(d for d, _ in configs.values())
        names = layer_names(source, range(self.num_layers - deepest, self.num_layers))
        names += [n for n in source if n.startswith("head.")]
        width = configs[role][1]
        return {n: narrow(n, source[n], width).clone() for n in names}

    # -- the model
    def load_state(self, backbone, state, tensors=None) -> None:
        """Copy a state in; an adapter sent narrowed fills its first units, the others are
        zeroed. The client's width is that of the top layer's adapter."""
        import torch
        from ..train import tensors_by_name

        lookup = dict(tensors or {})
        lookup.update(tensors_by_name(backbone, [n for n in state if n not in lookup]))
        with torch.no_grad():
            for name, value in state.items():
                target = lookup[name]
                if value.shape == target.shape:
                    target.copy_(value)
                else:
                    target.zero_()
                    narrow(name, target, width_of(name, value)).copy_(value)
        top = f"adapters.{backbone.num_layers - 1}.down.weight"
        if top in state:
            self.width = state[top].shape[0]

    # -- one client
    def client_update(self, backbone, dataset, plan, *, seed, pad_id=0):
        """Score the model as sent on the local data, train the plan by backprop, upload the
        trained tensors at the client's width and the score."""
        import torch
        from ..aggregation import pack
        from ..train import LocalResult, evaluate, train_local

        started, cfg = time.perf_counter(), self.config.train
        metrics = evaluate(backbone, dataset, batch_size=cfg.batch_size, pad_id=pad_id)
        score = metrics["accuracy"] if "accuracy" in metrics else -metrics["loss"]
        res = train_local(backbone, dataset, plan, cfg, seed=seed, pad_id=pad_id)
        upload = {n: narrow(n, t, self.width) for n, t in res.state.items()}
        upload[SCORE] = torch.tensor([score], dtype=torch.float32, device="cpu")     # sent up: on the CPU
        return LocalResult(state=pack(upload), num_examples=res.num_examples, steps=res.steps, loss=res.loss,
                           accuracy=res.accuracy, seconds=time.perf_counter() - started, history=res.history)

    # -- the server
    def aggregate(self, updates, *, round_index=0, clients=None):
        """FedAvg within each group; the shallow group's result is the new global state. At
        a window's end the best group's state becomes the global state and every group's."""
        from ..aggregation import fedavg

        s, configs, roles = self.search, self.configs(), self._round_roles[1]
        g = self.global_state
        new_global, steps = {}, []
        for role in configs:
            group = [(state, n) for (state, n), c in zip(updates, clients) if roles[c] == role]
            if not group:
                continue
            base = g if role == "shallow" else s["groups"][role]
            average = fedavg([({n: t for n, t in state.items() if n != SCORE}, n) for state, n in group])
            trained = {n: widen(n, base[n], t) for n, t in average.items()}
            if role == "shallow":
                new_global = trained
            else:
                s["groups"][role] = {**base, **trained}
            total = sum(n for _, n in group)
            s["scores"][role] = sum(float(state[SCORE]) * n for state, n in group) / total
        cfg = self.config.train
        for _, n in updates:
            per_epoch = math.ceil(n / cfg.batch_size)
            steps.append(per_epoch * cfg.local_epochs if cfg.local_steps is None
                         else min(per_epoch * cfg.local_epochs, cfg.local_steps))
        depth, width = configs["shallow"]
        s["elapsed_s"] += round_seconds(depth, sum(steps) / len(steps), s["step_s"],
                                        self.payload_bytes(depth, width), self.options.bandwidth_mb_s)
        if s["elapsed_s"] < window_seconds(depth, self.options.time_threshold, self.options.expand):
            return new_global
        return self._end_window(round_index, {**g, **new_global}, configs)

    def _end_window(self, round_index: int, shallow: dict, configs: dict) -> dict:
        """Move to the best group: its state over the global one and the next window's groups."""
        s, g = self.search, self.global_state
        winner = best_group(s["scores"]) if s["scores"] else "shallow"
        state = shallow if winner == "shallow" else s["groups"][winner]
        s["windows"].append({"end_round": round_index, "configs": {r: list(c) for r, c in configs.items()},
                             "scores": dict(s["scores"]), "winner": winner, "elapsed_s": s["elapsed_s"]})
        s["depth"], s["width"] = configs[winner]
        s.update(window_start=round_index + 1, elapsed_s=0.0, scores={})
        s["groups"] = {r: dict(state) for r in self.configs() if r != "shallow"}
        return {n: t for n, t in state.items() if t is not g[n]}

    def payload_bytes(self, depth: int, width: int) -> int:
        """Bytes of a configuration's trained tensors: its top-``depth`` adapters at ``width``
        and the head (the cost model's payload, each way)."""
        g = self.global_state
        names = layer_names(g, range(self.num_layers - depth, self.num_layers))
        names += [n for n in g if n.startswith("head.")]
        return sum(narrow(n, g[n], width).numel() * g[n].element_size() for n in names)

    # -- memory
    @classmethod
    def peak_bytes(cls, hf_config, window, *, batch_size, seq_len, bottleneck, optimizer, dtype):
        """Every weight and adapter unit resident; the top ``window`` layers' adapters (all
        units: the masked ones are computed, as zeros) and the head train after a frozen
        prefix run forward only (the analytic model's window step, unstreamed, no GPO). The
        client's scoring pass is inference of the same batches, below the training peak."""
        from ..memory_model import peak_training_bytes
        from ..model_parts import hf_config as to_hf_config

        layers = to_hf_config(hf_config).num_hidden_layers
        estimate = peak_training_bytes(hf_config, "chainfed", window, batch_size=batch_size, seq_len=seq_len,
                                       dtype=dtype, bottleneck=bottleneck, optimizer=optimizer, gpo=False,
                                       window_start=layers - window)
        estimate.notes["method"] = cls.name
        return estimate
