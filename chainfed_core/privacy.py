"""Client-level differential privacy (DP-FedAvg) and its accounting: the one home of both.

A round with ``dp.enabled`` (:func:`privatize`, called by :func:`chainfed_core.rounds.run_round`
between the clients' replies and the method's aggregation, so the simulator and the Flower
ServerApp run the same arithmetic):

1. clip: client k's update is the change Δ_k = x_k - s_k of the tensors it trains, against
   s_k, what it was sent this round; Δ_k is scaled to L2 norm C if longer (over all its
   tensors together), and the client's state becomes s_k + Δ_k;
2. weights: every client counts once (equal weights, as Flower's fixed-clipping wrappers
   require), so one client moves the sum of the clipped updates by at most C, and the average
   of the m clients that carry a tensor by at most C/m;
3. noise: ξ ~ N(0, (z·C/m)²) per coordinate, drawn from a generator seeded by (run seed,
   round) (:func:`noise_generator`: both runtimes draw the same), is added to each clipped
   update; the method's aggregation, a mean per tensor over the updates that carry it, then
   returns the mean plus ξ: the noise on the average. Put there, the method keeps its own
   aggregation (ChainFed's stage heads, FedRA's per-layer means); m is counted per tensor
   (FedRA's layers are trained by different numbers of clients).

The sum of the clipped updates plus N(0, z²C²) is the Gaussian mechanism of sensitivity C under
adding or removing one client (m, who replied, is taken as public: it is the K sampled unless
a client fails), so ε at δ after T rounds is the RDP accountant's for (q, z, T, δ)
(:func:`epsilon`, Opacus). The sampling it assumes is ``dp.sampling``: 'none' (q = 1, no
amplification: holds whatever the sampling, the default) or 'poisson' (q = K/N, the usual
DP-FedAvg report, an approximation for our fixed-size sampling of K of N). A round that every
client failed still counts: the reported ε is an upper bound.

Methods: DP covers those whose aggregation is a mean, per tensor, of updates that start from
one global value; :data:`UNSUPPORTED` says why the others are refused.

Secure aggregation (``secagg``, Flower's SecAgg+, run by :mod:`chainfed_core.flower.secagg_app`):
its checks before training (:func:`check_secagg`), its clipping range (:func:`secagg_clipping_range`)
and the bound on its quantisation error (:func:`secagg_bound`) are at the end. DP with SecAgg+:
step 1 runs on each client before it masks its update (the same :func:`clip_delta`), weights are 1
there too, and the server, which sees only the unmasked mean, adds step 3's noise to it (the same
draw). One client then moves the dequantised sum by at most C + sqrt(d)·2c/Q (d elements; the
stochastic rounding's step, 2c/Q = 2C/Q at c = C): the accountant takes C, about 2·sqrt(d)/Q
relative less (1.5e-4 at d = 10^5, Q = 2^22); the record's ``secagg`` section states it per round.
As with Flower's client-side fixed clipping, the noise is the server's: ε covers what the rounds
release (the global model), not the server itself, which sees the mean before it adds the noise.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch

from .seeding import mix

NOISE = 0xD9          # the noise's stream tag (chainfed_core.seeding's own tags are 0-4)
# The RDP orders: Opacus's defaults (1.1 ... 63) and larger ones, which small q and many
# rounds need for a tight bound.
ORDERS = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)) + [80, 96, 128, 192, 256]

UNSUPPORTED = {
    "fedkseed": "its clients send seed scalars and loss differences, not tensors whose change can be clipped",
    "fedadapter": "it averages within trial groups that start from different states and picks a group by "
                  "the clients' accuracy scores, which are not privatised",
    "flora": "its clients send LoRA factors whose stacked product is the update: clipping the factors does "
             "not bound the change the server applies",
    "fwdllm": "its clients send forward gradients and a variance statistic that paces the server's steps, "
              "not changes of the model's tensors",
}


# ---------------------------------------------------------------------- accounting
def sample_rate(config) -> float:
    """q, the chance that a given client takes part in a round, as the accountant assumes it."""
    if config.dp.sampling == "none":
        return 1.0
    return config.fed.clients_per_round / config.data.num_clients


def epsilon(sample_rate: float, noise_multiplier: float, rounds: int, delta: float) -> float:
    """ε at δ after ``rounds`` rounds of the sampled Gaussian mechanism (Opacus's RDP accountant, at :data:`ORDERS`)."""
    from opacus.accountants import RDPAccountant

    if noise_multiplier == 0:
        return math.inf
    accountant = RDPAccountant()
    accountant.history = [(noise_multiplier, sample_rate, rounds)]
    return float(accountant.get_epsilon(delta=delta, alphas=ORDERS))


@functools.lru_cache(maxsize=64)
def _solve(target_epsilon: float, delta: float, q: float, rounds: int) -> float:
    from opacus.accountants.utils import get_noise_multiplier

    try:
        return float(get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta, sample_rate=q,
                                          steps=rounds, accountant="rdp", epsilon_tolerance=0.005,
                                          alphas=ORDERS))
    except ValueError:
        raise ValueError(f"DPConfig.target_epsilon: no noise level reaches epsilon {target_epsilon} at delta "
                         f"{delta} in {rounds} rounds (q = {q}); ask for a larger epsilon, or fewer rounds") from None


def noise_multiplier(config) -> float:
    """z: ``dp.noise_multiplier``, or the smallest (within Opacus's search) whose ε after
    ``fed.rounds`` rounds is at most ``dp.target_epsilon``."""
    dp = config.dp
    if dp.noise_multiplier is not None:
        return dp.noise_multiplier
    return _solve(dp.target_epsilon, dp.delta, sample_rate(config), config.fed.rounds)


def check(config) -> None:
    """What a DP run needs beyond its own section; a one-line ``ValueError`` before training."""
    if config.method in UNSUPPORTED:
        raise ValueError(f"DPConfig.enabled: client-level DP is not defined for {config.method!r}: "
                         f"{UNSUPPORTED[config.method]}")
    if config.dp.sampling == "poisson" and config.fed.memory_aware:
        raise ValueError("DPConfig.sampling: 'poisson' takes q = K/N, which holds only when every client may "
                         "be sampled; set fed.memory_aware False, or dp.sampling 'none'")
    noise_multiplier(config)                         # an unreachable target epsilon fails here


# ---------------------------------------------------------------------- one round
def clip(state: dict[str, torch.Tensor], sent: dict[str, torch.Tensor],
         clip_norm: float | None) -> tuple[dict[str, torch.Tensor], float]:
    """(``state`` with its change from ``sent`` scaled to norm ``clip_norm`` if longer, the
    change's norm). An update within the norm is returned as it is, bit for bit."""
    missing = sorted(set(state) - set(sent))
    if missing:
        raise ValueError(f"DP: an update carries tensors it was not sent, so it has no change to clip: {missing[:3]}")
    delta = {n: t.detach().double() - sent[n].detach().double() for n, t in state.items()}
    clipped, norm = clip_delta(delta, clip_norm)
    if clipped is delta:
        return state, norm
    return {n: (sent[n].double() + d).to(state[n].dtype) for n, d in clipped.items()}, norm


def clip_delta(delta: dict[str, torch.Tensor], clip_norm: float | None) -> tuple[dict[str, torch.Tensor], float]:
    """(``delta``, float64 tensors, scaled to L2 norm ``clip_norm`` if longer, its norm): the
    clipping of :func:`clip`, and of a SecAgg+ client before it masks its update."""
    norm = math.sqrt(sum(float(d.pow(2).sum()) for d in delta.values()))
    if clip_norm is None or norm <= clip_norm:
        return delta, norm
    scale = clip_norm / norm
    return {n: d * scale for n, d in delta.items()}, norm


def noise_generator(seed: int, round_index: int) -> torch.Generator:
    """The round's noise generator: a pure function of (run seed, round), so every runtime draws the same."""
    return torch.Generator().manual_seed(int(mix(seed, NOISE, round_index)))


def add_noise(states: list[dict[str, torch.Tensor]], std_of_sum: float,
              generator: torch.Generator) -> list[dict[str, torch.Tensor]]:
    """Each state plus ξ_t ~ N(0, (std_of_sum / m_t)²), one draw per tensor t (by name, sorted)
    shared by the m_t states that carry it: a mean per tensor over them is their mean plus ξ_t."""
    counts: dict[str, int] = {}
    for state in states:
        for n in state:
            counts[n] = counts.get(n, 0) + 1
    shapes = {n: t.shape for state in states for n, t in state.items()}
    noise = {n: torch.randn(shapes[n], generator=generator, dtype=torch.float64) * (std_of_sum / counts[n])
             for n in sorted(counts)}
    return [{n: (t.double() + noise[n]).to(t.dtype) for n, t in state.items()} for state in states]


def privatize(config, round_index: int, updates: list[tuple[dict, int]],
              sent: list[dict]) -> tuple[list[tuple[dict, int]], dict]:
    """The round's updates as DP-FedAvg aggregates them (clipped, weight 1 each, with the
    average's noise) and the metrics it adds to the round's line; with DP off, the updates
    as they are and no metrics. With ``secagg`` too, every update is already s + the unmasked
    mean of the clients' clipped updates (:mod:`chainfed_core.flower.secagg_app`): only the
    noise is added (the same draw), and the per-client norms, which the server never sees, are
    None (``dp_update_norms``, ``dp_clipped``: the record's ``secagg`` section has the count)."""
    dp = config.dp
    if not dp.enabled:
        return updates, {}
    z = noise_multiplier(config)
    if config.secagg.enabled:        # the clients clipped before masking: each state is s + their mean
        states, norms = [state for state, _ in updates], None
    else:
        clipped = [clip(state, s, dp.clip_norm) for (state, _), s in zip(updates, sent)]
        states, norms = [state for state, _ in clipped], [norm for _, norm in clipped]
    if z > 0 and states:
        states = add_noise(states, z * dp.clip_norm, noise_generator(config.seed, round_index))
    q, m = sample_rate(config), len(updates)
    metrics = {"dp_epsilon": epsilon(q, z, round_index + 1, dp.delta), "dp_delta": dp.delta, "dp_sample_rate": q,
               "dp_noise_multiplier": z, "dp_noise_std": z * dp.clip_norm / m if z > 0 and m else 0.0,
               "dp_update_norms": norms,
               "dp_clipped": None if norms is None else
               int(sum(dp.clip_norm is not None and n > dp.clip_norm for n in norms))}
    return [(state, 1) for state in states], metrics


def signal_to_noise(clip_norm: float, noise_std: float, coordinates: int) -> float:
    """The largest ratio of the average update's norm (at most C) to the noise's expected norm,
    std·sqrt(d): the window's d = W/L of Full Adapters' gives sqrt(L/W) times the ratio."""
    return clip_norm / (noise_std * float(np.sqrt(coordinates)))


# ---------------------------------------------------------------------- the trade-off grid
def tradeoff_grid(profile_name: str, variants: list, epsilons: list, *, clip_norm: float, delta: float = 1e-5,
                  sampling: str = "none", **grid_args) -> list:
    """The experiment grid's runs (:func:`chainfed_core.experiments.grid`) at each target ε of
    ``epsilons``; None: the non-private run itself (the same record as every other artefact's)."""
    from .experiments import grid

    runs = []
    for eps in epsilons:
        dp = {} if eps is None else {"dp": {"enabled": True, "clip_norm": clip_norm, "target_epsilon": float(eps),
                                            "delta": delta, "sampling": sampling}}
        runs += grid(profile_name, variants, overrides=dp, **grid_args)
    return runs


def tradeoff_row(config, record: dict) -> dict:
    """What the trade-off reads from a run's record: the target and the spent ε (∞ without DP),
    z, the noise's std per coordinate of the average, the coordinates a client sends per round
    and the signal-to-noise bound C / (std·sqrt(d)) (:func:`signal_to_noise`)."""
    history = record["history"]
    floats = [m["bytes_up"] / 4 / len(m["trained"]) for m in history if m["trained"]]    # float32 tensors
    row = {"target_epsilon": math.inf, "epsilon": math.inf, "noise_multiplier": 0.0, "noise_std": 0.0,
           "coordinates": float(np.mean(floats)) if floats else math.nan, "snr": math.inf,
           "clipped": math.nan}
    if config.dp.enabled:
        final = record["final"]
        row.update(target_epsilon=config.dp.target_epsilon, epsilon=final["dp_epsilon"],
                   noise_multiplier=final["dp_noise_multiplier"], noise_std=final["dp_noise_std"],
                   snr=signal_to_noise(config.dp.clip_norm, final["dp_noise_std"], row["coordinates"]),
                   clipped=float(np.mean([_dp_clipped(m, record) / max(len(m["trained"]), 1) for m in history])))
    return row


def _dp_clipped(metrics: dict, record: dict) -> float:
    """A round's clipped clients: its line's, or with SecAgg+ the secure sum's (the record's ``secagg``)."""
    if metrics["dp_clipped"] is not None:
        return metrics["dp_clipped"]
    return next((n["dp_clipped"] for n in record.get("secagg", []) if n["round"] == metrics["round"]), math.nan)


# ---------------------------------------------------------------------- secure aggregation (SecAgg+)
MODULUS = 2 ** 32         # Flower's SecAgg+ modulus_range (its default, kept): the masked sums live mod this
SECAGG_UNSUPPORTED = {**UNSUPPORTED,
                      "fedra": "its clients train different sub-models (layer subsets), so a round has no one "
                               "vector to sum"}


def check_secagg(config) -> None:
    """What a SecAgg+ run needs beyond its own section; a one-line ``ValueError`` naming the
    field, before training. Flower's rules: 3 <= num_shares, threshold < num_shares; here also
    num_shares <= the clients of a round, and K·Q below the modulus (the sum must not wrap)."""
    sa, k = config.secagg, config.fed.clients_per_round
    if config.method in SECAGG_UNSUPPORTED:
        raise ValueError(f"SecAggConfig.enabled: SecAgg+ sums one weighted vector per round, which "
                         f"{config.method!r} does not send: {SECAGG_UNSUPPORTED[config.method]}")
    if config.dp.enabled:
        _check_secagg_dp(config)
    if k < 3:
        raise ValueError(f"SecAggConfig.enabled: Flower's SecAgg+ needs at least 3 nodes per round, got "
                         f"fed.clients_per_round={k}")
    shares = k if sa.num_shares is None else sa.num_shares
    if shares > k:
        raise ValueError(f"SecAggConfig.num_shares: {shares} shares need as many nodes per round, got "
                         f"fed.clients_per_round={k}")
    if sa.reconstruction_threshold >= shares:
        raise ValueError(f"SecAggConfig.reconstruction_threshold: {sa.reconstruction_threshold} needs more nodes "
                         f"than its threshold (it must be < num_shares = {shares}; nodes per round: "
                         f"fed.clients_per_round={k}); lower it or sample more nodes")
    if k * sa.quantization_range >= MODULUS:
        raise ValueError(f"SecAggConfig.quantization_range: K·Q = {k}·{sa.quantization_range} must stay below the "
                         f"modulus 2**32, or the masked sum wraps")


def _check_secagg_dp(config) -> None:
    """DP-FedAvg under SecAgg+: each client clips to norm C and weighs 1 (W = 1, so the mod's
    factor a_k = round(Q·1/1)/Q is exactly 1), hence every element is within [-C, C] and the
    clipping range must be at least C."""
    sa, clip_norm = config.secagg, config.dp.clip_norm
    if clip_norm is None:
        raise ValueError("DPConfig.clip_norm: SecAgg+ with DP quantises the clipped updates in [-C, C]; "
                         "None (no clipping) gives it no range")
    if sa.max_weight is not None:
        raise ValueError(f"SecAggConfig.max_weight: with dp.enabled every client weighs 1 (DP-FedAvg's equal "
                         f"weights, W = 1); leave it None, got {sa.max_weight}")
    if sa.clipping_range is not None and sa.clipping_range < clip_norm:
        raise ValueError(f"SecAggConfig.clipping_range: {sa.clipping_range} < dp.clip_norm={clip_norm} would clip "
                         f"elements of a clipped update (each |x| <= C) silently; leave it None (= C) or set it >= C")


def secagg_clipping_range(config) -> float:
    """c: ``secagg.clipping_range``; None: dp.clip_norm C with DP (every element of an update
    clipped to norm C, at weight factor 1, is within [-C, C]: nothing more is clipped), else
    Flower's default 8."""
    if config.secagg.clipping_range is not None:
        return config.secagg.clipping_range
    return float(config.dp.clip_norm) if config.dp.enabled else 8.0


def secagg_max_weight(config, largest_count: int) -> float:
    """W: 1 with DP (every client weighs 1); ``secagg.max_weight``, or the smallest power of two
    >= the largest client's example count (with Q a power of two >= W, Q·n_k/W is an integer:
    the weights are exact)."""
    if config.dp.enabled:
        return 1.0
    if config.secagg.max_weight is not None:
        return config.secagg.max_weight
    return float(2 ** max(0, math.ceil(math.log2(max(largest_count, 1)))))


def secagg_bound(num_examples: list[int], clipping_range: float, quantization_range: int,
                 max_weight: float) -> float:
    """The largest |SecAgg+ mean - FedAvg mean| of any element of the m clients' updates, for
    updates with every |Δ_k| <= c and every n_k <= W (nothing clipped).

    Flower's SecAgg+ (client ``secaggplus_mod``, server ``SecAggPlusWorkflow.unmask_stage``):
    client k's weight is q_k = round(Q·n_k/W); it sends u_k = stochastic_round((a_k·Δ_k + c)·Q/(2c)),
    a_k = q_k/Q, so |u_k·2c/Q - c - a_k·Δ_k| < 2c/Q (one step of the quantiser); the server unmasks
    Σu_k, takes Σu_k·2c/Q - m·c and divides by Σa_k = Σq_k/Q. Per element of the mean, then:

        quantisation: m·(2c/Q) / (Σq_k/Q) = 2·m·c / Σ_k q_k
        weights:      |Σ_k (q_k - Q·n_k/W)·(Δ_k - Δ̄)| / Σ_k q_k <= m·c / Σ_k q_k (|q_k - Q·n_k/W| <= 1/2,
                      |Δ_k - Δ̄| <= 2c), and 0 when every Q·n_k/W is an integer (Q and W powers of two,
                      W <= Q: :func:`secagg_max_weight`)

    so the bound is 2·m·c/Σq_k (exact weights) or 3·m·c/Σq_k. With n_k near W it is about 2c/Q:
    one quantisation step (c = 8, Q = 2**22: 3.8e-6). With DP (weights 1, W = 1, c = C): 2C/Q."""
    q = [round(n * quantization_range / max_weight) for n in num_examples]
    exact = all(n * quantization_range / max_weight == qk for n, qk in zip(num_examples, q))
    return (2 if exact else 3) * len(q) * clipping_range / sum(q)
