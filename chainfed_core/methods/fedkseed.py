"""FedKSeed (Qin et al., ICML'24): zeroth-order full-parameter tuning with K candidate seeds.

Every party derives the same K candidate seeds from the run's seed (:func:`candidate_seeds`).
A client runs τ zeroth-order steps on the rebuilt global model, each on its own seed s
(:func:`seed_order`): regenerate z ~ N(0, I) from s for every tuned tensor in order, probe
L(θ+εz) and L(θ−εz), take the scalar g = (L+ − L−) / 2ε and step θ ← θ − η g z
(:func:`zo_step`). It uploads one float32 scalar per used seed, in the order it used them:
4τ bytes, at most 4K. The server re-derives each client's seeds (a pure function of the
client's training seed, ``seeding.client_seed``, and the round's probabilities), adds the
example-weighted scalars into the pool G of K accumulated scalars, and every party rebuilds
the global model from the initial weights by replaying the seeds with a nonzero G in index
order: θ = θ0 − η Σ_s G_s z_s (:func:`rebuild`). The global state is G (and, for Pro, the
seed probabilities): the only tensors that travel down, and only when they changed since a
client last synced.

Bitwise: a perturbation is one function (:func:`perturb`) and the client's step is the
probe's round trip θ+εz, −2εz, +εz followed by −ηgz. :func:`replay_walk` applies exactly
those operations for the uploaded (seed, scalar) pairs, so it rebuilds a client's trained
model bit for bit; the round trip is not the identity in floating point, which is why the
replay repeats it rather than applying −ηgz alone. Replay is exact only with a constant lr
and no weight decay (the original raises otherwise; so does this module).

FedKSeed-Pro (``probability_differentiated``): the server keeps each seed's history of
|clip(g, ±grad_clip)|, starting from one 0 (``grad_initial``), and seeds are drawn with
p = softmax(minmax(mean history)) (:func:`seed_probabilities`); p travels down with G.

Defaults and what was scaled (the original: LLaMA-1B in fp16, K 4096, τ 200, batch 1,
ε 5e-4, lr 1e-3 in the code and 3e-7 in the README's runs, 200 clients, 5% per round):

- K 4096 -> 1024 (the README's own ``-K 1024``): rebuilding costs nnz(G) x |θ| Gaussian
  draws per party and round, which a 2-core CPU pays at every round;
- τ 200 -> 50: each step is four passes of Gaussian draws over θ; our clients hold tens of
  examples; the batch size is ``train.batch_size`` (memory estimates read it);
- ε 5e-4 as in the code; lr 1e-3 (the code's) -> 1e-4: on MiniLM-L6 (10.8M tuned weights) the
  probe ``benchmarks/fedkseed_lr.py`` (record ``results/benchmarks/fedkseed_lr.json``) sees the
  loss grow within 150 steps at 1e-3 (and cpu-full runs at 1e-3 diverged, train loss up to 5e7),
  while 1e-4 and below stay stable; weights stay float32 (fp16 with tiny lrs underflows);
- within one client's round the τ seeds are distinct (drawn without replacement; the
  original draws with replacement, a handful of repeats among 200 of 4096), so the upload
  is exactly one scalar per used seed and τ <= K is checked at construction.

"Full-parameter" here is every transformer layer's own tensors and the head, the tensors
the core exchanges for FFT; the token embeddings stay frozen: on our encoders they are
about half of all weights, so tuning them would double every replay, and the paper's
gains come from the layers.

Memory (:meth:`FedKSeed.peak_bytes`): inference only: the weights, one forward's
activations or one tensor's transient z, whichever is larger; no gradients, no optimizer
state: a device's memory-lean path, z regenerated for each of a step's four updates
(``hold_noise=False``). The simulator holds a step's z instead (``hold_noise``, the default):
the same numbers bitwise, a quarter of the Gaussian draws that are most of a CPU step's time,
|θ| floats more than the estimate. In simulation a party also keeps θ0 and the last rebuilt θ in memory (restoring
between clients is then a copy); a device would reload θ0 from its weights file.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np

from ..config import Config, option
from .base import Method, register

if TYPE_CHECKING:
    import torch

POOL, PROBABILITIES, SCALARS = "seeds.pool", "seeds.probabilities", "seeds.scalars"
_CANDIDATES = 0x5EED        # stream tag of the candidate seeds (seeding.py's tags are small ints)


@dataclass
class FedKSeedOptions(Config):
    num_seeds: int = option("K: candidate seeds shared by every party (original 4096; README runs 1024).",
                            1024, ge=1)
    local_steps: int = option("τ: zeroth-order steps per client and round, each on its own seed (original 200).",
                              50, ge=1)
    eps: float = option("ε: scale of the two-point perturbation (zo_eps).", 5e-4, gt=0)
    lr: float = option("η: constant zeroth-order SGD learning rate (replay is exact only for a constant lr).",
                       1e-4, gt=0)
    probability_differentiated: bool = option("FedKSeed-Pro: draw seeds by p = softmax(minmax(mean |g|)).",
                                              False)
    grad_clip: float = option("Pro: |g| is clipped at this before it enters a seed's history (bias_loss_clip).",
                              1000.0, gt=0)
    equal_weight: bool = option("Average clients' scalars with equal weights (default: by examples).", False)
    hold_noise: bool = option("Hold a step's z for its four updates (4x fewer Gaussian draws, |θ| floats more); "
                              "False: regenerate it for each, the device's memory-lean path the estimate "
                              "describes. Bitwise the same results.", True, added="2026-12")

    def _check(self) -> None:
        if self.local_steps > self.num_seeds:
            raise ValueError(f"FedKSeedOptions.local_steps: τ={self.local_steps} exceeds num_seeds K="
                             f"{self.num_seeds}; each local step uses a distinct candidate seed")


# ---------------------------------------------------------------------- seeds
def candidate_seeds(run_seed: int, num_seeds: int) -> np.ndarray:
    """The K candidate seeds in [1, 1e11), a pure function of the run's seed: (K,) int64."""
    return np.random.default_rng([run_seed, _CANDIDATES]).integers(1, 10 ** 11, num_seeds)


def seed_order(sampler_seed: int, num_seeds: int, steps: int, probabilities: "torch.Tensor | None" = None) -> list[int]:
    """Indices of the candidate seeds a client uses, in step order: ``steps`` distinct ones,
    uniformly or with ``probabilities`` (K,), from a generator seeded with ``sampler_seed``."""
    import torch

    gen = torch.Generator().manual_seed(int(sampler_seed))
    if probabilities is None:
        return torch.randperm(num_seeds, generator=gen, device="cpu")[:steps].tolist()   # every party, any device
    return torch.multinomial(probabilities, steps, replacement=False, generator=gen).tolist()


def seed_probabilities(abs_sum: np.ndarray, count: np.ndarray) -> np.ndarray:
    """FedKSeed-Pro: softmax of the min-max normalised mean of each seed's history of
    |clip(g)| (the history starts with one 0, so the mean is abs_sum / (count + 1)): (K,) float32."""
    mean = abs_sum / (count + 1)
    spread = mean.max() - mean.min()
    x = (mean - mean.min()) / spread if spread > 0 else np.zeros_like(mean)
    e = np.exp(x - x.max())
    return (e / e.sum()).astype(np.float32)


# ---------------------------------------------------------------------- the model as a function of seeds
def noise(params: Sequence["torch.Tensor"], seed: int) -> list["torch.Tensor"]:
    """z(seed): one N(0, I) tensor per tuned tensor, drawn in order from one generator seeded with ``seed``."""
    import torch

    gen = torch.Generator(device=params[0].device).manual_seed(int(seed))
    return [torch.randn(p.shape, generator=gen, dtype=p.dtype, device=p.device) for p in params]


def perturb(params: Sequence["torch.Tensor"], seed: int, scale: float,
            z: Sequence["torch.Tensor"] | None = None) -> None:
    """θ ← θ + scale · z(seed); without ``z`` it is regenerated tensor by tensor in order (one
    transient tensor at a time), the same numbers as :func:`noise`."""
    import torch

    gen = None if z is not None else torch.Generator(device=params[0].device).manual_seed(int(seed))
    with torch.no_grad():
        for i, p in enumerate(params):
            step = z[i] if z is not None else torch.randn(p.shape, generator=gen, dtype=p.dtype, device=p.device)
            p.add_(step, alpha=scale)


def zo_step(params: Sequence["torch.Tensor"], seed: int, eps: float, lr: float,
            loss: Callable[[], float] | None = None, g: float | None = None,
            hold: bool = True) -> tuple[float, float]:
    """One zeroth-order step on ``seed``: probe θ+εz and θ−εz, return to θ, then θ ← θ − η g z.

    With ``loss`` (the loss at the current parameters) g = (L+ − L−) / 2ε is measured and
    rounded to float32, the precision it is uploaded in; with ``g`` given (a replay) the same
    operations run without a loss. Returns (g, mean of L+ and L−; nan in a replay). A
    non-finite g becomes 0 (the step is skipped).

    ``hold``: z is drawn once and held for the step's four updates (|θ| floats more, a quarter
    of the Gaussian draws); else regenerated for each, as the original does. The numbers, and
    so every result, are bitwise the same either way."""
    z = noise(params, seed) if hold else None
    perturb(params, seed, eps, z)
    plus = loss() if loss is not None else math.nan
    perturb(params, seed, -2 * eps, z)
    minus = loss() if loss is not None else math.nan
    perturb(params, seed, eps, z)
    if g is None:
        g = float(np.float32((plus - minus) / (2 * eps)))
        g = g if math.isfinite(g) else 0.0
    perturb(params, seed, -lr * g, z)
    return g, (plus + minus) / 2


def replay_walk(params: Sequence["torch.Tensor"], seeds: Sequence[int], scalars: Sequence[float],
                eps: float, lr: float, hold: bool = True) -> None:
    """A client's local walk from its starting θ, from its uploaded (seed, scalar) pairs in
    the order it used them: bitwise the model it trained (:func:`zo_step` without a loss)."""
    for seed, g in zip(seeds, scalars):
        zo_step(params, seed, eps, lr, g=float(g), hold=hold)


def rebuild(params: Sequence["torch.Tensor"], initial: Sequence["torch.Tensor"], seeds: np.ndarray,
            pool: np.ndarray, lr: float) -> None:
    """The global model θ = θ0 − η Σ_s G_s z_s: θ0 copied in, then every seed with a nonzero
    accumulated scalar G_s replayed in index order (every party the same operations)."""
    import torch

    with torch.no_grad():
        torch._foreach_copy_(list(params), list(initial))
    for s in np.flatnonzero(pool):
        perturb(params, int(seeds[s]), -lr * float(pool[s]))


# ---------------------------------------------------------------------- the method
@register
class FedKSeed(Method):
    name, label, memory_shape = "fedkseed", "FedKSeed", "no_ft"
    trains, trains_head = "weights", True
    Options = FedKSeedOptions
    variants = {"FedKSeed": {}, "FedKSeed-Pro": {"method_options": {"probability_differentiated": True}}}

    def __init__(self, config, num_layers: int, family: str):
        super().__init__(config, num_layers, family)
        if config.train.weight_decay != 0:
            raise ValueError(f"TrainConfig.weight_decay: FedKSeed replays seeds, which is exact only "
                             f"without weight decay; got {config.train.weight_decay}")
        o = self.options
        self.seeds = candidate_seeds(config.seed, o.num_seeds)
        pool = np.zeros(o.num_seeds, dtype=np.float32)
        self.state.update(pool=pool)
        if o.probability_differentiated:
            count = np.zeros(o.num_seeds)
            self.state.update(abs_sum=count.copy(), count=count, probabilities=seed_probabilities(count, count))
        self._initial: dict | None = None     # θ0, kept by initial_state
        self._built: tuple[bytes, dict] | None = None      # (G's bytes, the model rebuilt from it)
        self._probabilities = None            # the loaded state's p (Pro)

    # -- the global state: the seed pool (and p), never the weights
    def initial_state(self, backbone) -> dict:
        import torch
        from ..train import get_state

        self._initial = get_state(backbone, self.tuned_names(backbone))
        state = {POOL: torch.from_numpy(self.state["pool"].copy())}
        if self.options.probability_differentiated:
            state[PROBABILITIES] = torch.from_numpy(self.state["probabilities"].copy())
        return state

    def tuned_names(self, backbone) -> list[str]:
        """The tensors z perturbs, in their fixed order: every layer's own and the head's."""
        from ..train import trainable_names
        return trainable_names(backbone, self.widest_plan())

    def load_state(self, backbone, state, tensors=None) -> None:
        """Rebuild the model from the state's pool G (a copy when G is the last one rebuilt)."""
        if POOL not in state:            # a round's window holds no model tensor: nothing to load
            return
        if PROBABILITIES in state:
            self._probabilities = state[PROBABILITIES]
        self._restore(backbone, state[POOL].numpy())

    def _restore(self, backbone, pool: np.ndarray | None = None) -> list:
        """Put θ(G) into the backbone, G = ``pool`` or (None) the pool last loaded (θ0 before
        any); rebuilt from θ0 when G is new, else copied from the last rebuild. Returns the
        tuned tensors in order."""
        import torch
        from ..aggregation import pack
        from ..train import tensors_by_name

        if self._initial is None:
            raise RuntimeError("FedKSeed: initial_state must read θ0 from a fresh backbone first")
        params = list(tensors_by_name(backbone, self._initial).values())
        if pool is None and self._built is None:
            pool = np.zeros(len(self.seeds), np.float32)
        if pool is not None and (self._built is None or self._built[0] != pool.tobytes()):
            rebuild(params, list(self._initial.values()), self.seeds, pool, self.options.lr)
            self._built = (pool.tobytes(), pack(dict(zip(self._initial, params))))
        else:
            with torch.no_grad():
                torch._foreach_copy_(params, list(self._built[1].values()))
        return params

    # -- one client
    def client_update(self, backbone, dataset, plan, *, seed: int, pad_id: int = 0):
        """τ zeroth-order steps from the loaded global model; uploads one scalar per used seed."""
        import torch
        from ..train import LocalResult, batches

        started, o = time.perf_counter(), self.options
        params = self._restore(backbone)
        order = seed_order(seed, o.num_seeds, o.local_steps, self._probabilities)
        was_training = backbone.model.training
        backbone.model.eval()
        scalars, losses, correct, seen = [], [], 0, 0
        epoch, stream = 0, iter(())
        try:
            with torch.inference_mode():
                for index in order:
                    batch = next(stream, None)
                    while batch is None:      # cycle the local data until τ steps
                        stream = batches(dataset, self.config.train.batch_size, shuffle=True,
                                         seed=seed * 1000 + epoch, pad_id=pad_id, device=backbone.device)
                        epoch, batch = epoch + 1, next(stream, None)
                    logits = []

                    def loss() -> float:
                        hidden, ctx = backbone.embed(batch)
                        hidden = backbone.run_layers(range(backbone.num_layers), hidden, ctx)
                        value, out = backbone.head_loss(hidden, batch, ctx)
                        logits.append(out)
                        return float(value)
                    g, mean_loss = zo_step(params, int(self.seeds[index]), o.eps, o.lr, loss, hold=o.hold_noise)
                    scalars.append(g)
                    losses.append(mean_loss)
                    if not backbone.is_causal_lm:
                        correct += int((logits[0].argmax(-1) == batch["labels"]).sum())
                        seen += len(batch["labels"])
        finally:
            backbone.model.train(was_training)
        upload = torch.tensor(scalars, dtype=torch.float32, device="cpu")
        return LocalResult(state={SCALARS: upload}, num_examples=len(dataset),
                           steps=len(scalars), loss=sum(losses) / len(losses),
                           accuracy=correct / seen if seen else math.nan,
                           seconds=time.perf_counter() - started, history=losses)

    # -- the server
    def client_seeds(self, round_index: int, client: int) -> list[int]:
        """Indices of the seeds ``client`` used in ``round_index`` (its training seed as every
        federated runtime gives it, ``seeding.client_seed``, and the round's p)."""
        import torch
        from ..seeding import client_seed

        p = self.state.get("probabilities")
        return seed_order(client_seed(self.config.seed, round_index, client), len(self.seeds),
                          self.options.local_steps, None if p is None else torch.from_numpy(p))

    def aggregate(self, updates, *, round_index=0, clients=None):
        """G += Σ_i w_i pool_i (w_i by examples, or equal), in client order, in float64."""
        import torch

        o, total = self.options, sum(n for _, n in updates)
        pool = self.state["pool"].astype(np.float64)
        abs_sum, count = self.state.get("abs_sum"), self.state.get("count")
        abs_sum, count = (None, None) if abs_sum is None else (abs_sum.copy(), count.copy())
        for (state, n), client in zip(updates, clients):
            g = state[SCALARS].numpy().astype(np.float64)
            used = self.client_seeds(round_index, client)
            if len(g) != len(used):
                raise ValueError(f"client {client} sent {len(g)} scalars for {len(used)} seeds")
            pool[used] += g * (1 / len(updates) if o.equal_weight else n / total)
            if abs_sum is not None:
                abs_sum[used] += np.abs(np.clip(g, -o.grad_clip, o.grad_clip))
                count[used] += 1
        self.state["pool"] = pool.astype(np.float32)        # replaced, never written: snapshots share it
        out = {POOL: torch.from_numpy(self.state["pool"].copy())}
        if abs_sum is not None:
            p = seed_probabilities(abs_sum, count)
            self.state.update(abs_sum=abs_sum, count=count, probabilities=p)
            out[PROBABILITIES] = torch.from_numpy(p.copy())
        return out

    # -- memory
    @classmethod
    def peak_bytes(cls, hf_config, window, *, batch_size, seq_len, bottleneck, optimizer, dtype):
        """Inference only: the weights (layers and head as trainable) and the larger of one
        forward's activations and the largest tuned tensor's transient z."""
        import torch
        from ..families import detect_family
        from ..memory_model import MemoryEstimate, part_sizes, peak_training_bytes
        from ..model_parts import build_model, head_is_frozen, hf_config as as_hf_config

        config = as_hf_config(hf_config)
        forward = peak_training_bytes(config, "no_ft", 1, batch_size, seq_len, dtype)
        sizes, wb = part_sizes(config), torch.finfo(getattr(torch, dtype)).bits // 8
        head = 0 if head_is_frozen(detect_family(config)) else sizes["head"] * 4   # an LM head stays frozen
        tuned = sizes["num_layers"] * sizes["layer"] * wb + head
        largest_z = _largest_layer_tensor(config, build_model) * wb
        weights = forward.frozen_weights + forward.trainable
        return MemoryEstimate(frozen_weights=weights - tuned, trainable=tuned, gradients=0, optimizer_state=0,
                              activations=max(forward.activations, largest_z),
                              notes={**forward.notes, "method": "fedkseed"})


def _largest_layer_tensor(config, build_model) -> int:
    """Elements of the largest tensor of one layer, counted on the meta device."""
    import torch
    from ..backbone import from_model
    from ..families import detect_family

    family = detect_family(config)
    with torch.device("meta"):
        model = build_model(config, family)
    layers = from_model(model, family).layers
    return max(p.numel() for p in layers[0].parameters())
