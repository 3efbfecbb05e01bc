"""Configs are checked when they are made: types, allowed values, ranges, method options; hashes kept."""

import dataclasses
import json
from pathlib import Path

import pytest

from chainfed_core.config import (AdapterConfig, ChainConfig, DataConfig, FedConfig, ModelConfig, RunConfig,
                                  TrainConfig, Config, option)
from chainfed_core.experiments import config_hash
from chainfed_core.methods import Method, register, unregister
from chainfed_core.methods.full_adapters import FullAdapters

ROOT = Path(__file__).resolve().parent.parent
RECORDS = sorted((ROOT / "results" / "runs" / "cpu-full").glob("*/record.json"))
SECTIONS = {"model": ModelConfig, "adapter": AdapterConfig, "chain": ChainConfig, "train": TrainConfig,
            "data": DataConfig, "fed": FedConfig}

# (section, keyword arguments, the start of the message). A section of None is RunConfig itself.
BAD = [
    (None, {"method": "fedprox"}, "RunConfig.method: 'fedprox' is not one of ["),
    (None, {"seed": -1}, "RunConfig.seed: must be in [0, 4294967296), got -1"),
    (None, {"seed": 2 ** 32}, "RunConfig.seed: must be in [0, 4294967296)"),
    (None, {"seed": 1.0}, "RunConfig.seed: expected int, got float 1.0"),
    (None, {"seed": True}, "RunConfig.seed: expected int, got bool True"),
    (None, {"method_options": {"mu": 0.1}}, "RunConfig.method_options: method 'chainfed' has no options"),
    (None, {"method_options": [1]}, "RunConfig.method_options: expected a mapping"),
    (None, {"train": 3}, "RunConfig.train: expected a mapping for TrainConfig, got int"),
    ("adapter", {"activation": "swish"}, "AdapterConfig.activation: 'swish' is not one of ['relu', 'gelu', 'tanh']"),
    ("adapter", {"bottleneck": 0}, "AdapterConfig.bottleneck: must be >= 1, got 0"),
    ("model", {"dtype": "int8"}, "ModelConfig.dtype: 'int8' is not one of ['float32', 'bfloat16', 'float16']"),
    ("model", {"family": "bloom"}, "ModelConfig.family: 'bloom' is not one of ['bert'"),
    ("model", {"pooling": "max"}, "ModelConfig.pooling: 'max' is not one of ['auto', 'cls', 'mean']"),
    ("model", {"name": 3}, "ModelConfig.name: expected str, got int 3"),
    ("model", {"max_length": 0}, "ModelConfig.max_length: must be >= 1"),
    ("train", {"optimizer": "adam"}, "TrainConfig.optimizer: 'adam' is not one of ['sgd', 'adamw']"),
    ("train", {"momentum": -5}, "TrainConfig.momentum: must be >= 0, got -5.0"),
    ("train", {"weight_decay": -1}, "TrainConfig.weight_decay: must be >= 0, got -1.0"),
    ("train", {"max_grad_norm": -0.5}, "TrainConfig.max_grad_norm: must be >= 0"),
    ("train", {"lr": 0}, "TrainConfig.lr: must be > 0"),
    ("train", {"lr": "fast"}, "TrainConfig.lr: expected float, got str 'fast'"),
    ("train", {"lr": float("nan")}, "TrainConfig.lr: must be a finite number, got nan"),
    ("train", {"lr": True}, "TrainConfig.lr: expected float, got bool True"),
    ("train", {"batch_size": 2.5}, "TrainConfig.batch_size: expected int, got float 2.5"),
    ("train", {"local_steps": 0}, "TrainConfig.local_steps: must be >= 1"),
    ("chain", {"window": 0}, "ChainConfig.window: must be >= 1"),
    ("chain", {"gpo_lambda": 1.5}, "ChainConfig.gpo_lambda: must be in [0, 1], got 1.5"),
    ("chain", {"foat_tau": 0.0}, "ChainConfig.foat_tau: must be in (0, 1], got 0.0"),
    ("chain", {"start_layer": -1}, "ChainConfig.start_layer: must be >= 0"),
    ("chain", {"foat_batch_size": 1}, "ChainConfig.foat_batch_size: must be >= 2"),
    ("data", {"partition": "skewed"}, "DataConfig.partition: 'skewed' is not one of ['iid', 'dirichlet']"),
    ("data", {"alpha": 0}, "DataConfig.alpha: must be > 0"),
    ("data", {"test_fraction": 1}, "DataConfig.test_fraction: must be in (0, 1), got 1.0"),
    ("data", {"max_train_examples": 0}, "DataConfig.max_train_examples: must be >= 1"),
    ("fed", {"rounds": 2.5}, "FedConfig.rounds: expected int, got float 2.5"),
    ("fed", {"rounds": 0}, "FedConfig.rounds: must be >= 1"),
    ("fed", {"memory_aware": 1}, "FedConfig.memory_aware: expected bool, got int 1"),
    ("fed", {"failure_rate": 1.0}, "FedConfig.failure_rate: must be in [0, 1)"),
    ("fed", {"client_timeout_s": 0}, "FedConfig.client_timeout_s: must be > 0"),
    ("fed", {"memory_scale": -1}, "FedConfig.memory_scale: must be > 0"),
]


def _check_message(err: pytest.ExceptionInfo, start: str) -> None:
    message = str(err.value)
    assert message.startswith(start) and "\n" not in message, message


@pytest.mark.parametrize("section, kwargs, start", BAD)
def test_bad_values_fail_at_construction(section, kwargs, start):
    with pytest.raises(ValueError) as err:
        SECTIONS[section](**kwargs) if section else RunConfig(**kwargs)
    _check_message(err, start)


@pytest.mark.parametrize("section, kwargs, start", BAD)
def test_bad_values_fail_from_dict(section, kwargs, start):
    with pytest.raises(ValueError) as err:
        RunConfig.from_dict({section: kwargs} if section else kwargs)
    _check_message(err, start)


def test_replace_is_checked_too():
    with pytest.raises(ValueError, match=r"^TrainConfig.momentum: must be >= 0"):
        TrainConfig().replace(momentum=-1)


def test_unknown_keys_list_the_allowed_ones():
    with pytest.raises(ValueError, match=r"^ChainConfig: unknown key\(s\) \['windw'\]; allowed: \['window', "):
        RunConfig.from_dict({"chain": {"windw": 2}})
    with pytest.raises(ValueError, match=r"^RunConfig: expected a mapping, got list"):
        RunConfig.from_dict([1])


def test_ints_convert_to_float_fields_and_values_are_kept():
    cfg = RunConfig(train={"lr": 1, "momentum": 0}, fed={"client_timeout_s": 30})
    assert cfg.train.lr == 1.0 and type(cfg.train.lr) is float and type(cfg.train.momentum) is float
    assert type(cfg.fed.client_timeout_s) is float
    assert isinstance(cfg.train, TrainConfig)
    assert RunConfig(seed=2 ** 32 - 1).seed == 2 ** 32 - 1


def test_valid_configs_round_trip():
    cfg = RunConfig(method="full_adapters", seed=7, chain=ChainConfig(window=3, gpo_lambda=0.5),
                    train=TrainConfig(optimizer="adamw", weight_decay=0.01),
                    data=DataConfig(partition="dirichlet", alpha=0.1, max_train_examples=100),
                    fed=FedConfig(rounds=4, client_timeout_s=2.5, memory_scale=1e9))
    data = cfg.to_dict()
    assert RunConfig.from_dict(data) == cfg
    assert RunConfig.from_dict(json.loads(json.dumps(data))).to_dict() == data
    assert "method_options" not in data  # left out when empty: hashes of older configs stay


def test_every_field_has_a_help_text():
    for cls in (RunConfig, *SECTIONS.values()):
        for f in dataclasses.fields(cls):
            assert f.metadata.get("help"), f"{cls.__name__}.{f.name}"


@pytest.mark.skipif(not RECORDS, reason="no committed records")
def test_committed_records_keep_their_config_and_hash():
    for path in RECORDS:
        record = json.loads(path.read_text())
        cfg = RunConfig.from_dict(record["config"])
        assert cfg.to_dict() == record["config"], path
        assert json.dumps(cfg.to_dict()) == json.dumps(record["config"]), path  # same key order too
        assert config_hash(cfg) == path.parent.name, path


# ---------------------------------------------------------------------------------------
# A method with its own Options section


@dataclasses.dataclass
class ToyOptions(Config):
    mu: float = option("Proximal weight.", 0.01, ge=0)
    steps: int = option("Inner steps.", 1, ge=1)


@pytest.fixture
def toy_method():
    @register
    class Toy(FullAdapters):
        name = "toy_prox"
        label = "Toy"
        Options = ToyOptions

    yield Toy
    unregister("toy_prox")


def test_method_options_are_checked_and_kept(toy_method):
    cfg = RunConfig(method="toy_prox", method_options={"mu": 1})
    assert cfg.method_options == {"mu": 1.0} and type(cfg.method_options["mu"]) is float  # the keys given
    data = cfg.to_dict()
    assert data["method_options"] == {"mu": 1.0}
    assert RunConfig.from_dict(data) == cfg
    assert config_hash(cfg) != config_hash(RunConfig(method="toy_prox"))
    assert "method_options" not in RunConfig(method="toy_prox").to_dict()
    with pytest.raises(ValueError) as err:
        RunConfig(method="toy_prox", method_options={"mu": -1})
    _check_message(err, "ToyOptions.mu: must be >= 0, got -1.0")
    with pytest.raises(ValueError) as err:
        RunConfig.from_dict({"method": "toy_prox", "method_options": {"nu": 1}})
    _check_message(err, "ToyOptions: unknown key(s) ['nu']; allowed: ['mu', 'steps']")
    with pytest.raises(ValueError) as err:
        RunConfig(method="toy_prox", method_options={"steps": 1.5})
    _check_message(err, "ToyOptions.steps: expected int, got float 1.5")


def test_method_names_come_from_the_registry(toy_method):
    assert RunConfig(method="toy_prox").method == "toy_prox"
    unregister("toy_prox")
    with pytest.raises(ValueError, match=r"^RunConfig.method: 'toy_prox' is not one of \["):
        RunConfig(method="toy_prox")
    assert issubclass(toy_method, Method)


@dataclasses.dataclass
class Grown(Config):
    old: int = option("A field from the start.", 1)
    new: str = option("A field added later.", "a", added="2026-12")


def test_an_added_field_at_its_default_leaves_the_hash_alone():
    assert Grown().to_dict() == {"old": 1}                       # what an older config looked like
    assert Grown(new="b").to_dict() == {"old": 1, "new": "b"}     # set: it is part of the config
    assert Grown.from_dict({"old": 1}) == Grown() and Grown.from_dict(Grown(new="b").to_dict()).new == "b"
    with pytest.raises(TypeError, match="needs a plain default"):
        option("No default.", added="2026-12")
