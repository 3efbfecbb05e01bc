"""Bad updates never enter the average: the round rejects them, records why, and averages the rest."""

import math

import pytest
import torch

from chainfed_core import federated
from chainfed_core.checkpoint import load_final_state
from chainfed_core.config import RunConfig
from chainfed_core.flower import client_app
from chainfed_core.validation import update_problem

from runtime_checks import assert_same_state, run_flower_in_process

pytestmark = pytest.mark.usefixtures("one_thread")

WINDOW = {"a": torch.zeros(2, 3), "b": torch.zeros(4)}


@pytest.mark.parametrize("update, examples, reason", [
    ({"a": torch.ones(2, 3), "b": torch.ones(4)}, 5, None),
    ({"a": torch.ones(2, 3)}, 5, "missing tensors: b"),
    ({**WINDOW, "c": torch.ones(1)}, 5, "unexpected tensors: c"),
    ({"a": torch.ones(3, 2), "b": torch.ones(4)}, 5, "a has shape (3, 2), expected (2, 3)"),
    ({"a": torch.ones(2, 3, dtype=torch.float64), "b": torch.ones(4)}, 5, "a has dtype float64, expected float32"),
    ({"a": torch.ones(2, 3), "b": torch.tensor([1, math.nan, 0, 0])}, 5, "b holds non-finite values (NaN or inf)"),
    ({"a": torch.ones(2, 3), "b": torch.tensor([1, math.inf, 0, 0])}, 5, "b holds non-finite values (NaN or inf)"),
    ({"a": [1.0], "b": torch.ones(4)}, 5, "a is a list, not a tensor"),
    (WINDOW, 0, "num_examples is 0, not a positive integer"),
])
def test_update_problem_names_the_reason(update, examples, reason):
    assert update_problem(update, WINDOW, examples) == reason


def test_other_names_pass_where_the_method_uploads_its_own():
    assert update_problem({"seeds.scalars": torch.ones(3)}, WINDOW, 5, same_names=False) is None
    assert update_problem({"a": torch.ones(1)}, WINDOW, 5, same_names=False) == "a has shape (1,), expected (2, 3)"
    assert "non-finite" in update_problem({"s": torch.tensor([math.nan])}, WINDOW, 5, same_names=False)


def config() -> RunConfig:
    return RunConfig.from_dict({
        "method": "chainfed", "seed": 5, "model": {"name": "tiny-bert"}, "adapter": {"bottleneck": 4},
        "chain": {"window": 2, "start_layer": 1},
        "data": {"dataset": "synthetic", "num_clients": 4, "max_train_examples": 60, "max_test_examples": 16},
        "fed": {"rounds": 2, "clients_per_round": 3, "eval_every": 1, "memory_aware": False}})


def _corrupting(update, bad: dict):
    """``client_update`` with the replies of the clients in ``bad`` (client id -> how) spoiled."""
    def spoiled(*args, **kwargs):
        client = args[7]                      # client_update(backbone, config, method, data, plan, state, r, client, ...)
        if bad.get(client) == "raise":
            raise RuntimeError(f"client {client} fails")
        res = update(*args, **kwargs)
        res.state = dict(res.state)
        name = sorted(res.state)[0]
        if bad.get(client) == "nan":
            res.state[name] = torch.full_like(res.state[name], math.nan)
        elif bad.get(client) == "shape":
            res.state[name] = res.state[name].flatten()[:-1]
        return res
    return spoiled


def _final_state(runtime: str, out):
    return load_final_state(out) if runtime == "simulator" else torch.load(out / "final_state.pt", weights_only=False)


@pytest.mark.parametrize("runtime", ["simulator", "flower"])
def test_rejected_replies_are_recorded_and_the_rest_averaged(runtime, tmp_path, monkeypatch):
    cfg = config()
    module = federated if runtime == "simulator" else client_app
    update = module.client_update      # the simulator and the ClientApp each import it

    monkeypatch.setattr(module, "client_update", _corrupting(update, {1: "shape", 3: "nan"}))
    out = tmp_path / "bad"
    record = federated.run(cfg, out, progress=False) if runtime == "simulator" else run_flower_in_process(cfg, out)
    failures = record["failures"]
    assert {f["client"] for f in failures} == {1, 3} and all(f["kind"] == "rejected" for f in failures)
    assert all(m["failed"] == [c for c in m["clients"] if c in (1, 3)] and m["trained"] for m in record["history"])
    assert all(("has shape" in f["message"]) == (f["client"] == 1) for f in failures)
    assert all(("non-finite" in f["message"]) == (f["client"] == 3) for f in failures)
    if runtime == "flower":                               # the SuperNode's id (InProcessGrid: 100 + client)
        assert all(f["node"] == 100 + f["client"] for f in failures)
    # the same clients failing outright in the simulator give the same global state: the bad
    # replies never entered it
    monkeypatch.setattr(federated, "client_update", _corrupting(federated.client_update, {1: "raise", 3: "raise"}))
    federated.run(cfg, tmp_path / "failed", progress=False)
    bad, failed = _final_state(runtime, tmp_path / "bad"), load_final_state(tmp_path / "failed")
    assert_same_state(bad, failed)
    assert all(torch.isfinite(t).all() for t in bad.values())
