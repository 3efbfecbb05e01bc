"""The method registry: the built-in methods, and the README's example method (registered from
the README's own code block) run through the simulator and the Flower ServerApp/ClientApp (in
process) without touching the core."""

import types
from pathlib import Path

import pytest
import torch

from chainfed_core import experiments as ex
from chainfed_core.checkpoint import load_final_state
from chainfed_core.config import RunConfig
from chainfed_core.federated import run
from chainfed_core.methods import Method, get_method, method_names, plan_for, register, unregister
from chainfed_core.schedule import TrainPlan
from chainfed_core.task import build_task
from chainfed_core.train import get_state

from runtime_checks import assert_flower_equals_simulator


# ---------------------------------------------------------------- a toy method: the README's example
ROOT = Path(__file__).resolve().parent.parent


def readme_method_source() -> str:
    """The code block of the README's "Adding a method" section, as a user would save it."""
    section = (ROOT / "README.md").read_text().split("## Adding a method", 1)[1]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


@pytest.fixture
def toy():
    module = types.ModuleType("top_adapters")
    exec(compile(readme_method_source(), "README.md", "exec"), module.__dict__)     # registers it
    yield module.TopAdapters
    unregister(module.TopAdapters.name)


def toy_config(**fed) -> RunConfig:
    return RunConfig.from_dict({
        "method": "top_adapters", "method_options": {"top": 2}, "seed": 4, "model": {"name": "tiny-bert"},
        "adapter": {"bottleneck": 4},
        "data": {"dataset": "synthetic", "num_clients": 3, "max_train_examples": 60, "max_test_examples": 16},
        "fed": {"rounds": 2, "clients_per_round": 2, "eval_every": 1, "memory_aware": False, **fed}})


# ---------------------------------------------------------------- the registry
def test_builtin_methods_are_registered_once_with_labels():
    builtins = ["no_ft", "linear_probe", "fft", "full_adapters", "chainfed"]      # first; then the other modules
    assert method_names()[:5] == builtins and len(set(method_names())) == len(method_names())
    assert [get_method(m).label for m in builtins] == ["No-FT", "Linear Probing", "FFT", "Full Adapters", "ChainFed"]
    assert list(ex.VARIANTS)[:9] == ["No-FT", "LP", "FFT", "Full Adapters", "Full Adapters, memory-limited", "ChainFed",
                                     "w/o DLCT", "w/o GPO", "w/o FOAT"]
    with pytest.raises(ValueError, match=r"RunConfig.method: 'fedprox' is not one of \['no_ft'"):
        get_method("fedprox")
    with pytest.raises(ValueError, match="already registered"):
        register(type("Other", (Method,), {"name": "chainfed", "label": "x"}))


def test_plans_of_the_builtin_methods():
    from chainfed_core.schedule import stage_at
    assert plan_for("linear_probe", 4) == TrainPlan(range(0, 4), range(4, 4), range(4, 4))
    assert plan_for("no_ft", 4) == TrainPlan(range(0, 4), range(4, 4), range(4, 4), train_head=False)
    assert plan_for("fft", 4) == TrainPlan(range(0, 0), range(0, 4), range(4, 4), train_base=True)
    assert plan_for("full_adapters", 4) == TrainPlan(range(0, 0), range(0, 4), range(4, 4))
    assert plan_for("chainfed", 4, stage_at(1, 4, 0, 2, 1), 0.2) == TrainPlan(range(0, 1), range(1, 3),
                                                                               range(3, 4), lam=0.2)


def test_a_toy_method_runs_in_the_simulator(toy, tmp_path):
    cfg = toy_config()
    assert ex.variant("Top-2 adapters").overrides == {"method_options": {"top": 2}}
    record = run(cfg, tmp_path, progress=False)
    hidden, r, labels = 32, 4, 3
    adapter = 2 * hidden * r + hidden + r
    head = hidden * hidden + hidden + hidden * labels + labels            # bert.pooler + classifier
    for m in record["history"]:                # even clients send two adapters, odd ones one
        assert m["window"] == [2, 4]
        assert m["bytes_up"] == 4 * sum((2 - c % 2) * adapter + head for c in m["trained"])
        assert m["bytes_down"] == 4 * sum((2 - c % 2) * adapter + head for c in m["clients"])
    final = load_final_state(tmp_path)
    initial = get_state(build_task(cfg).make_backbone(), final)
    assert sorted({k.split(".")[1] for k in final if k.startswith("adapters.")}) == ["2", "3"]
    assert all(not torch.equal(final[k], initial[k]) for k in final)


def test_a_toy_method_runs_on_the_flower_apps_like_the_simulator(toy, tmp_path):
    sim, flower = assert_flower_equals_simulator(toy_config(), tmp_path)
    assert [set(m) for m in flower["history"]] == [set(m) for m in sim["history"]]     # one metrics schema


def test_chainfed_on_the_flower_apps_equals_the_simulator_bitwise(tmp_path):
    """The window moves each round, so nodes must be sent what changed since they last trained."""
    cfg = RunConfig.from_dict({
        "method": "chainfed", "seed": 5, "model": {"name": "tiny-bert"}, "adapter": {"bottleneck": 4},
        "chain": {"window": 2, "start_layer": 0, "gpo_lambda": 0.5},
        "data": {"dataset": "synthetic", "num_clients": 3, "max_train_examples": 60, "max_test_examples": 16},
        "fed": {"rounds": 5, "clients_per_round": 2, "eval_every": 1, "memory_aware": False}})
    sim, flower = assert_flower_equals_simulator(cfg, tmp_path)
    assert [m["train_loss"] for m in flower["history"]] == [m["train_loss"] for m in sim["history"]]
