"""SecAgg+ (Flower's SecAggPlusWorkflow + secaggplus_mod, chainfed_core.flower.secagg_app): the
masked aggregate equals plain FedAvg within the stated quantisation bound, a node that drops out
after sharing its keys is reconstructed and the round completes, bad input fails before training,
DP-FedAvg with SecAgg+ (clients clip before masking, the server noises the unmasked mean) equals
the DP round within the bound with the same noise, and the runtimes that do not mask refuse it.

The fast tests run Flower's SecAgg+ workflow and mod as they are, over an in-process Grid (every
message a real Flower Message to the node's ClientApp, each node with its own Context); the long
test runs it over a real SuperLink and SuperNodes on loopback."""

import copy
import json
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Context, Error, Message, RecordDict

from chainfed_core import privacy
from chainfed_core.config import RunConfig
from chainfed_core.records import RECORD_FILE

from runtime_checks import InProcessGrid

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parent.parent
NODES = 4


def config(secagg: dict | None = None, rounds: int = 1, **fed) -> dict:
    """A tiny ChainFed run: 4 nodes of 20 examples each (so W = 32), every node in every round."""
    return {"method": "chainfed", "seed": 7, "model": {"name": "tiny-bert"}, "adapter": {"bottleneck": 4},
            "chain": {"window": 2, "start_layer": 0},
            "data": {"dataset": "synthetic", "num_clients": NODES, "max_train_examples": 80, "max_test_examples": 16},
            "fed": {"rounds": rounds, "clients_per_round": NODES, "eval_every": 1, "memory_aware": False, **fed},
            **({"secagg": {"enabled": True, "reconstruction_threshold": 3, **secagg}} if secagg is not None else {})}


class Grid(InProcessGrid):
    """:class:`runtime_checks.InProcessGrid` with any ClientApp, each message a copy; a node whose app raises replies
    with an error (as Flower's runtimes do); ``drop``: nodes that fail every TRAIN message
    (the plain app) or drop out after sharing their keys (the SecAgg+ app)."""

    def __init__(self, num_nodes: int, app, drop: tuple[int, ...] = (), secagg: bool = True):
        super().__init__(num_nodes)
        self.app, self.drop, self.secagg = app, drop, secagg
        for k in drop:
            if secagg:
                self.contexts[100 + k].node_config["secagg-drop-after"] = "share-keys"

    def _deliver(self, m: Message) -> Message:
        m = copy.deepcopy(m)            # a message travels as bytes: the workflow sends one content to all
        nid = m.metadata.dst_node_id
        if not self.secagg and nid - 100 in self.drop and m.metadata.message_type == "train":
            return Message(Error(code=0, reason="dropped"), reply_to=m)
        try:
            return self.app(m, self.contexts[nid])
        except Exception as err:                       # noqa: BLE001: the node's error goes back as its reply
            return Message(Error(code=0, reason=f"{type(err).__name__}: {err}"), reply_to=m)

    def send_and_receive(self, messages, timeout=None):
        for m in messages:               # an id per message, as Flower's grid sets when it pushes one
            m.metadata.__dict__["_message_id"] = uuid.uuid4().hex
        return [self._deliver(m) for m in messages]


def run_app(cfg: dict, out: Path, *, secagg: bool, drop: tuple[int, ...] = ()) -> dict:
    """The SecAgg+ ServerApp (or the plain one) over an in-process Grid; its record."""
    from flwr.supercore.task_identity import TaskIdentity

    from chainfed_core.flower import client_app, secagg_app, secagg_client, server_app
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 1
    out.mkdir(parents=True)
    (out / "cfg.json").write_text(json.dumps(cfg))
    context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={
        "config-file": str(out / "cfg.json"), "overrides": "", "out-dir": str(out)})
    app = secagg_client.clientapp if secagg else client_app.app
    (secagg_app.main if secagg else server_app.main)(Grid(NODES, app, drop, secagg), context)
    return json.loads((out / RECORD_FILE).read_text())


def max_error(a: Path, b: Path) -> tuple[float, float]:
    """(max |a - b| over the global tensors, the float32 rounding allowance: 2 ulp of the values)."""
    sa, sb = (torch.load(p / "final_state.pt", weights_only=False) for p in (a, b))
    assert sa.keys() == sb.keys()
    err = max(float((sa[k].double() - sb[k].double()).abs().max()) for k in sa)
    ulp = max(float(np.spacing(np.abs(sb[k].numpy()).max().astype(np.float32))) for k in sb)
    return err, 2 * ulp


def compare(tmp_path, secagg: dict, drop: tuple[int, ...] = ()) -> tuple[float, float, dict]:
    """One round with SecAgg+ and the same round in the plain app (FedAvg of the same updates):
    (max error, the bound plus float32 rounding, the SecAgg+ record)."""
    started = time.perf_counter()
    masked = run_app(config(secagg), tmp_path / "secagg", secagg=True, drop=drop)
    took = time.perf_counter() - started
    plain = run_app(config(), tmp_path / "plain", secagg=False, drop=drop)
    (note,) = masked["secagg"]
    err, rounding = max_error(tmp_path / "secagg", tmp_path / "plain")
    print(f"SecAgg+ {secagg} drop={drop}: max |secagg - fedavg| = {err:.3g}, bound {note['bound']:.3g}, "
          f"SecAgg+ run {took:.1f} s")
    assert masked["history"][0]["trained"] == plain["history"][0]["trained"] == note["completed"]
    assert note["clipped"] == 0                                    # the bound's condition
    return err, note["bound"] + rounding, masked


# ---------------------------------------------------------------- (a) equals FedAvg within the bound
def test_secagg_equals_fedavg_within_the_quantisation_bound(tmp_path):
    err, bound, record = compare(tmp_path / "fine", {})
    assert record["secagg"][0]["bound"] == pytest.approx(2 * 8.0 / 2 ** 22 * 32 / 20)
    assert err <= bound
    # coarse quantisation: the error is visible, and still within the bound
    err, bound, _ = compare(tmp_path / "coarse", {"clipping_range": 0.5, "quantization_range": 2 ** 8})
    assert 1e-4 < err <= bound


# ---------------------------------------------------------------- (b) a node drops out after sharing its keys
def test_a_node_dropping_out_after_sharing_its_keys_is_reconstructed(tmp_path):
    err, bound, record = compare(tmp_path, {"clipping_range": 0.5, "quantization_range": 2 ** 12}, drop=(2,))
    (note,) = record["secagg"]
    assert note["dropped"] == [2] and note["completed"] == [0, 1, 3]
    assert [f["client"] for f in record["history"][0]["failures"]] == [2]
    assert 0 < err <= bound


def test_too_many_drop_outs_for_the_threshold_stop_the_run_clearly(tmp_path):
    from chainfed_core.rounds import AllClientsFailed

    with pytest.raises(AllClientsFailed, match="reconstruction_threshold=3 nodes left"):
        run_app(config({}), tmp_path / "run", secagg=True, drop=(1, 2))


# ---------------------------------------------------------------- (c) bad input, before training
@pytest.mark.parametrize("secagg, fed, message", [
    ({"reconstruction_threshold": 4}, {}, r"SecAggConfig.reconstruction_threshold: 4 needs more nodes than its "
                                          r"threshold .*fed.clients_per_round=4"),
    ({"reconstruction_threshold": 5, "num_shares": 5}, {}, r"SecAggConfig.num_shares: 5 shares need"),
    ({}, {"clients_per_round": 2}, r"at least 3 nodes per round"),
    ({"quantization_range": 2 ** 31}, {}, r"SecAggConfig.quantization_range: .* below the modulus"),
    ({"reconstruction_threshold": 1}, {}, r"SecAggConfig.reconstruction_threshold: must be >= 2"),
])
def test_bad_secagg_input_is_refused_at_construction(secagg, fed, message):
    with pytest.raises(ValueError, match=message):
        RunConfig.from_dict(config(secagg, **fed))


def test_secagg_is_refused_for_methods_without_one_sum():
    with pytest.raises(ValueError, match="SecAggConfig.enabled: .*'fedra'"):
        RunConfig.from_dict({**config({}), "method": "fedra"})


# ---------------------------------------------------------------- (d) DP-FedAvg with SecAgg+
DP = {"enabled": True, "clip_norm": 0.05, "noise_multiplier": 1.0}


@pytest.mark.parametrize("secagg, dp, message", [
    ({"clipping_range": 0.01}, {}, r"SecAggConfig.clipping_range: 0.01 < dp.clip_norm=0.05 would clip"),
    ({"max_weight": 32}, {}, r"SecAggConfig.max_weight: with dp.enabled every client weighs 1"),
    ({}, {"clip_norm": None, "noise_multiplier": 0.0}, r"DPConfig.clip_norm: SecAgg\+ with DP quantises"),
])
def test_bad_dp_with_secagg_input_is_refused_at_construction(secagg, dp, message):
    with pytest.raises(ValueError, match=message):
        RunConfig.from_dict({**config(secagg), "dp": {**DP, **dp}})


def test_the_clipping_range_is_the_clip_norm_with_dp_and_8_without():
    assert privacy.secagg_clipping_range(RunConfig.from_dict({**config({}), "dp": DP})) == 0.05
    assert privacy.secagg_clipping_range(RunConfig.from_dict({**config({"clipping_range": 0.2}), "dp": DP})) == 0.2
    assert privacy.secagg_clipping_range(RunConfig.from_dict(config({}))) == 8.0


def test_dp_with_secagg_equals_the_dp_round_within_the_bound_with_the_same_noise(tmp_path):
    """Clients clip before masking, weights 1, the server noises the unmasked mean: the plain
    ServerApp's DP round (bitwise the simulator's, tests/test_privacy.py) within 2C/Q, the same ε."""
    plain = run_app({**config(), "dp": DP}, tmp_path / "plain", secagg=False)
    p = plain["history"][0]
    assert p["dp_clipped"] > 0 and p["dp_noise_std"] == DP["noise_multiplier"] * DP["clip_norm"] / NODES
    for name, q in (("fine", 2 ** 22), ("coarse", 2 ** 8)):
        masked = run_app({**config({"quantization_range": q}), "dp": DP}, tmp_path / name, secagg=True)
        (note,) = masked["secagg"]
        m = masked["history"][0]
        err, rounding = max_error(tmp_path / name, tmp_path / "plain")
        print(f"DP + SecAgg+ Q=2^{q.bit_length() - 1}: max |dp-secagg - dp| = {err:.3g}, bound {note['bound']:.3g}, "
              f"noise std {p['dp_noise_std']:.3g}, clients clipped {note['dp_clipped']}")
        assert note["clipped"] == 0 and note["clipping_range"] == DP["clip_norm"] and note["weights"] == [1] * NODES
        assert note["bound"] == pytest.approx(2 * DP["clip_norm"] / q)
        assert note["dp_clipped"] == p["dp_clipped"] and m["dp_clipped"] is None and m["dp_update_norms"] is None
        assert note["dp_sensitivity"] > DP["clip_norm"]
        assert {k: m[k] for k in ("dp_epsilon", "dp_noise_std", "dp_delta", "trained", "num_examples")} == \
               {k: p[k] for k in ("dp_epsilon", "dp_noise_std", "dp_delta", "trained", "num_examples")}
        assert err <= note["bound"] + rounding and note["bound"] < p["dp_noise_std"] / 10     # the same noise
    assert err > 1e-5                                          # the coarse quantisation is seen


def test_the_secagg_app_refuses_a_config_without_secagg_and_waits_for_every_node(tmp_path):
    with pytest.raises(ValueError, match="secagg.enabled=true only"):
        run_app(config(), tmp_path / "off", secagg=True)
    with pytest.raises(RuntimeError, match="DataConfig.num_clients: expected 4 SuperNodes, 3 connected"):
        from chainfed_core.flower import secagg_app, secagg_client
        grid = Grid(NODES - 1, secagg_client.clientapp)
        secagg_app.SecAggClients(grid, RunConfig.from_dict(config({}))).discover(wait_s=0.1)


def test_the_simulator_and_the_plain_server_app_refuse_secagg_in_one_line(tmp_path):
    """They would otherwise run the rounds unmasked."""
    from chainfed_core.federated import run

    refusal = r"^SecAggConfig.enabled: {} does not mask the updates; run SecAgg\+ with .*flower_app/secagg"
    with pytest.raises(ValueError, match=refusal.format("the simulator")) as err:
        run(RunConfig.from_dict(config({})), tmp_path / "sim", progress=False)
    assert "\n" not in str(err.value) and not (tmp_path / "sim").exists()
    with pytest.raises(ValueError, match=refusal.format("this ServerApp")) as err:
        run_app(config({}), tmp_path / "plain", secagg=False)
    assert "\n" not in str(err.value)


def test_the_section_at_its_default_leaves_the_hash_alone():
    from chainfed_core.experiments import config_hash

    plain = RunConfig.from_dict(config())
    assert "secagg" not in plain.to_dict()
    assert config_hash(RunConfig.from_dict(config({}))) != config_hash(plain)


def test_the_bound_is_two_steps_per_client_with_exact_weights_and_three_otherwise():
    assert privacy.secagg_bound([16, 16], 1.0, 2 ** 10, 16) == pytest.approx(2 * 2 * 1.0 / (2 * 2 ** 10))
    assert privacy.secagg_bound([10, 7, 3], 1.0, 1000, 16) == pytest.approx(3 * 3 * 1.0 / (625 + 438 + 188))
    assert privacy.secagg_max_weight(RunConfig.from_dict(config({})), 20) == 32


# ---------------------------------------------------------------- real SuperLink and SuperNodes on loopback
@pytest.mark.slow
@pytest.mark.long
def test_secagg_on_loopback_supernodes_with_a_drop_out_equals_fedavg_of_the_rest(tmp_path):
    """A TLS SuperLink and 4 SuperNodes (real processes; node 2 drops out after sharing its keys):
    the SecAgg+ ServerApp's aggregate equals the plain app's FedAvg of the other 3 within the bound."""
    from chainfed_core.flower.loopback import Federation

    started = time.time()
    secagg = {"clipping_range": 0.5, "quantization_range": 2 ** 12}
    (tmp_path / "cfg.json").write_text(json.dumps(config(secagg)))
    fed, out = Federation(tmp_path / "fed", NODES), tmp_path / "flower_out"
    try:
        fed.start([f"partition-id={k} num-partitions={NODES}" + (" secagg-drop-after='share-keys'" if k == 2 else "")
                   for k in range(NODES)])
        record = fed.run_app(ROOT / "flower_app" / "secagg", tmp_path / "cfg.json", out, timeout=600,
                             logs=("superlink", "supernode2"))
    finally:
        fed.stop()
    took = time.time() - started
    (note,) = record["secagg"]
    assert note["dropped"] == [2] and note["completed"] == [0, 1, 3] and note["clipped"] == 0
    assert "drops out after sharing its keys" in fed.log("supernode2")
    run_app(config(), tmp_path / "plain", secagg=False, drop=(2,))
    err, rounding = max_error(out, tmp_path / "plain")
    print(f"loopback SecAgg+ (4 SuperNodes, node 2 dropped): max |secagg - fedavg| = {err:.3g}, "
          f"bound {note['bound']:.3g}; {took:.0f} s")
    assert 0 < err <= note["bound"] + rounding
