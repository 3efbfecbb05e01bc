"""SecAgg+ ServerApp and ClientApp: the project's rounds with Flower's secure aggregation.

The server learns only the sum of the clients' masked, quantised updates, never one client's.
Each round is :func:`chainfed_core.rounds.run_rounds`'s (FOAT, the chain schedule, sampling,
evaluation, metrics, checkpoints, the record) with :class:`SecAggClients` as the transport:

* server: Flower's ``SecAggPlusWorkflow`` (setup, share keys, collect masked vectors, unmask)
  runs once per round over the round's K nodes; in the collect stage each node receives the
  project's TRAIN content (its window, context and plan: :class:`_Workflow`) in place of Flower's
  legacy ``FitIns``;
* client (:mod:`.secagg_client`): Flower's ``secaggplus_mod`` wraps its ``train``, which runs the project's client update
  (:func:`chainfed_core.flower.client_app.train`) and hands the mod the update Δ_k = x_k - s of the
  window's tensors (sorted by name) and the example count n_k; the mod masks and quantises Δ_k, and
  clears the plain tensors before the reply leaves the node (the count and the training metrics
  travel in the clear, as in Flower's FitRes).

Why a ServerApp of its own rather than the plain one (:mod:`.server_app`): SecAgg+ replaces the
round's one TRAIN exchange by four, and Flower's workflow drives them through the legacy
Strategy API (``LegacyContext``: ``configure_fit``/``aggregate_fit``); :class:`_RoundStrategy` is
that adapter, one round at a time. The server gets the weighted mean Δ̄ and, as Flower itself
does for the legacy strategies, every surviving client's reply carries the same aggregate
(s + Δ̄) with its own count, so the method's FedAvg of them is s + Δ̄. Hence the methods whose
aggregation is one example-weighted mean of the same tensors (:data:`chainfed_core.privacy.SECAGG_UNSUPPORTED`
names the others), and no per-client update validation (the server never sees one).

DP-FedAvg with SecAgg+ (``dp.enabled`` and ``secagg.enabled``): each client clips its Δ_k to norm
C (:func:`chainfed_core.privacy.clip_delta`, the DP path's clipping) before the mod masks it and
weighs 1 (W = 1: the mod's factor is exactly 1), so the unmasked aggregate is the plain mean of
the clipped updates, as DP-FedAvg's; the clipping range c is C (every element of a clipped Δ_k is
within [-C, C]: nothing is clipped; a smaller ``clipping_range`` is refused), the bound 2C/Q. The
round (:func:`chainfed_core.privacy.privatize`) then adds the same noise N(0, (z·C/m)²), drawn
from the same (seed, round) generator, as the DP path of the simulator and the plain ServerApp,
and records ε alike. The secure sum carries one more element, C·[client k clipped], so the
record's ``secagg`` section gives the round's count of clipped clients (``dp_clipped``; the
round's line has None: the server sees no client's norm) and the sensitivity of the dequantised
sum (``dp_sensitivity``: C + sqrt(d)·2c/Q, d elements, against the accountant's C).

Accuracy: |(s + Δ̄) - FedAvg| per element is at most :func:`chainfed_core.privacy.secagg_bound`
(2·m·c/Σq_k with exact weights: about one quantisation step 2c/Q), provided |Δ_k| <= c and
n_k <= W; the record's ``secagg`` section gives each round's bound and the number of elements a
client clipped (``clipped``: then the bound does not hold). Drop-outs: a node that stops after
sharing its keys is reconstructed from its neighbours' shares; the round completes with the
others while ``reconstruction_threshold`` of each node's neighbours remain, and is recorded as
failed otherwise (with every client dropped: the run stops, as for any round where all fail).

Run-config keys as :mod:`.server_app`'s, whose :func:`~.server_app.serve` runs this app with
:class:`SecAggClients`; ``secagg.enabled`` must be true. The Flower app:
``flower_app/secagg`` (its README section). Fault injection for tests: :mod:`.secagg_client`.
"""

from __future__ import annotations

from logging import INFO, WARNING

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, RecordDict
from flwr.common import FitIns, FitRes, parameters_to_ndarrays
from flwr.common.logger import log
from flwr.server.client_manager import SimpleClientManager
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import Strategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.serverapp import Grid, ServerApp

from .. import privacy
from ..server import Server
from .server_app import serve
from .transport import FlowerClients, RemoteError


class SecAggHalted(RuntimeError):
    """Flower's SecAgg+ stopped the round: too few nodes left to reconstruct the secrets."""


# ---------------------------------------------------------------------- server: one round of SecAgg+
class _RoundStrategy(Strategy):
    """The legacy Strategy the workflow asks: the round's nodes, and what the unmasking gives."""

    def __init__(self, node_ids: list[int]):
        self.proxies = [GridClientProxy(nid, None, 0) for nid in node_ids]
        self.aggregate: list[np.ndarray] | None = None
        self.replies: dict[int, FitRes] = {}

    def configure_fit(self, server_round, parameters, client_manager):
        return [(p, FitIns(parameters, {})) for p in self.proxies]     # content: _Workflow's

    def aggregate_fit(self, server_round, results, failures):
        self.replies = {proxy.node_id: res for proxy, res in results}
        if results:
            self.aggregate = parameters_to_ndarrays(results[0][1].parameters)   # every reply carries the sum
        return None, {}

    def initialize_parameters(self, client_manager):
        return None

    def configure_evaluate(self, server_round, parameters, client_manager):
        return []

    def aggregate_evaluate(self, server_round, results, failures):
        return None, {}

    def evaluate(self, server_round, parameters):
        return None


class _Workflow(SecAggPlusWorkflow):
    """Flower's SecAgg+ with the project's TRAIN content (window, context, plan) per node."""

    def __init__(self, contents: dict[int, RecordDict], **kwargs):
        super().__init__(**kwargs)
        self.contents = contents

    def setup_stage(self, grid, context, state) -> bool:
        ok = super().setup_stage(grid, context, state)
        state.nid_to_fitins = {nid: self.contents[nid] for nid in state.nid_to_fitins}
        return ok


def _same_tensors(jobs) -> list[str]:
    """The window's names (sorted), which every job of a SecAgg+ round must share with their shapes."""
    names = sorted(jobs[0].window)
    shapes = [tuple(jobs[0].window[n].shape) for n in names]
    for j in jobs[1:]:
        if sorted(j.window) != names or [tuple(j.window[n].shape) for n in names] != shapes:
            raise RuntimeError(f"SecAgg+ sums one vector per round: client {j.client} trains other tensors "
                               f"than client {jobs[0].client}")
    return names


class SecAggClients(FlowerClients):
    """:class:`FlowerClients` whose TRAIN round is one run of Flower's SecAgg+ workflow.

    ``rounds``: per round, the nodes that completed and dropped, their counts and weights, W, c,
    the bound of :func:`chainfed_core.privacy.secagg_bound` and the elements the clients clipped;
    with DP, the clients that clipped (a secure sum) and the sum's sensitivity."""

    max_weight: float = 0.0

    def __init__(self, grid: Grid, config, classes=None):
        super().__init__(grid, config, classes)
        self.rounds: list[dict] = []

    def _query(self, node_ids, task, state=None):
        replies = super()._query(node_ids, task, state)
        if task == "info":                                  # discovery: the nodes' example counts give W
            counts = [int(m.content["info"]["num-examples"]) for m in replies]
            self.max_weight = privacy.secagg_max_weight(self.config, max(counts))
        return replies

    def _workflow(self, contents: dict[int, RecordDict], m: int) -> _Workflow:
        sa = self.config.secagg
        return _Workflow(contents, num_shares=sa.num_shares or m, reconstruction_threshold=sa.reconstruction_threshold,
                         max_weight=self.max_weight, clipping_range=privacy.secagg_clipping_range(self.config),
                         quantization_range=sa.quantization_range, modulus_range=privacy.MODULUS,
                         timeout=self.config.fed.client_timeout_s or 3600)

    def _run_protocol(self, round_index: int, jobs, global_state: dict) -> _RoundStrategy:
        sa, m = self.config.secagg, len(jobs)
        if sa.reconstruction_threshold >= (sa.num_shares or m) or (sa.num_shares or 0) > m:
            raise SecAggHalted(f"SecAggConfig.reconstruction_threshold: {sa.reconstruction_threshold} needs more "
                               f"than {m} nodes in round {round_index}")
        dp = {"dp-clip-norm": float(self.config.dp.clip_norm)} if self.config.dp.enabled else {}
        contents = {self.node_of[j.client]: self.train_content(round_index, j, global_state, **dp) for j in jobs}
        strategy = _RoundStrategy(list(contents))
        state = RecordDict({"config": ConfigRecord({"current_round": round_index + 1}), "parameters": ArrayRecord()})
        nodes = SimpleClientManager()
        for proxy in strategy.proxies:
            nodes.register(proxy)
        context = LegacyContext(Context(run_id=0, node_id=0, node_config={}, state=state, run_config={}),
                                strategy=strategy, client_manager=nodes)
        self._workflow(contents, m)(self.grid, context)
        return strategy

    def train(self, round_index: int, jobs, state: dict):
        names = _same_tensors(jobs)
        strategy = self._run_protocol(round_index, jobs, state)
        done = {c for c, nid in self.node_of.items() if nid in strategy.replies} if strategy.aggregate else set()
        self._note(round_index, jobs, strategy, done)
        for j in jobs:
            if j.client not in done:
                self.lost.add(j.client)
                why = ("no masked vector from this node (it dropped out)" if strategy.aggregate is not None else
                       f"SecAgg+ halted the round: fewer than SecAggConfig.reconstruction_threshold="
                       f"{self.config.secagg.reconstruction_threshold} nodes left to unmask it")
                yield j.client, RemoteError(why)
                continue
            mean = {n: (j.window[n].double() + torch.from_numpy(np.asarray(a, dtype=np.float64))).to(j.window[n].dtype)
                    for n, a in zip(names, strategy.aggregate[:len(names)])}    # with DP, then the clipped flags
            yield j.client, self.result(j.client, mean, strategy.replies[self.node_of[j.client]].metrics)

    def _note(self, round_index: int, jobs, strategy: _RoundStrategy, done: set[int]) -> None:
        sa, dp, c = self.config.secagg, self.config.dp, privacy.secagg_clipping_range(self.config)
        replies = [strategy.replies[self.node_of[k]] for k in sorted(done)]
        weights = [int(r.num_examples) for r in replies]           # the mod's: n_k, or 1 each with DP
        clipped = sum(int(r.metrics.get("secagg-clipped", 0)) for r in replies)
        note = {"round": round_index, "completed": sorted(done),
                "dropped": sorted(j.client for j in jobs if j.client not in done),
                "num_examples": [int(r.metrics["num-examples"]) for r in replies], "weights": weights,
                "max_weight": self.max_weight, "clipping_range": c, "clipped": clipped,
                "bound": privacy.secagg_bound(weights, c, sa.quantization_range, self.max_weight) if weights else None}
        if dp.enabled:       # the secure sum of C·[clipped] over the m clients, whose mean the server unmasked
            d = sum(a.size for a in strategy.aggregate[:-1]) if weights else 0
            note["dp_clipped"] = round(float(strategy.aggregate[-1][0]) * len(weights) / dp.clip_norm) if weights else 0
            note["dp_sensitivity"] = dp.clip_norm + np.sqrt(d) * 2 * c / sa.quantization_range
        self.rounds.append(note)
        if clipped:
            log(WARNING, "SecAgg+ round %s: %s update elements clipped to +-%s (the bound does not hold)",
                round_index, clipped, c)


serverapp = ServerApp()


def _check_threshold(server: Server) -> None:
    threshold = server.config.secagg.reconstruction_threshold
    if server.clients_per_round <= threshold:
        raise ValueError(f"SecAggConfig.reconstruction_threshold: {threshold} needs "
                         f"more nodes per round than the {server.clients_per_round} eligible")


def _record(clients: SecAggClients) -> dict:
    log(INFO, "ChainFed SecAgg+: %s rounds, dropped per round %s", len(clients.rounds),
        [r["dropped"] for r in clients.rounds])
    return {"secagg": clients.rounds}


@serverapp.main()
def main(grid: Grid, context: Context) -> None:
    serve(grid, context, transport=SecAggClients, secagg=True, check=_check_threshold, extra=_record)
