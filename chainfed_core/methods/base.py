"""What a federated fine-tuning method is, and the registry that lists them.

A method is one small class registered under its name (after PEFT's tuners and Flower
baselines). In one place it says:

- its own hyper-parameters (``Options``, a config section; ChainFed's is ``RunConfig.chain``),
- which layers are frozen / training / idle at round r (:meth:`Method.plan_at`, :meth:`Method.plan`),
- what it exchanges (:meth:`Method.exchanged_names`: every tensor it trains at some round), and
  how a global state reaches the model (:meth:`Method.initial_state`, :meth:`Method.load_state`),
- the client update (:meth:`Method.client_update`; by default the shared loop ``train.train_local``),
- the server's aggregation (:meth:`Method.aggregate`; FedAvg by default),
- its peak memory on a device (:meth:`Method.peak_bytes`), which decides who may take part.

The registry (:func:`register`, :func:`get_method`, :func:`method_names`) is the one list:
config validation, memory-aware selection, the experiment grid, tables and the Flower apps
read it. Adding a method is one new module with a registered subclass (see the README,
"Adding a method").
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from ..schedule import TrainPlan

if TYPE_CHECKING:     # the registry itself imports no torch: a command line checks names in milliseconds
    import torch

    from ..backbone import Backbone
    from ..train import LocalResult
    from ..config import RunConfig
    from ..memory_model import MemoryEstimate

_REGISTRY: dict[str, type["Method"]] = {}


def register(cls: type["Method"]) -> type["Method"]:
    """Class decorator: list ``cls`` under ``cls.name`` (a name may be registered once)."""
    if not getattr(cls, "name", None) or not getattr(cls, "label", None):
        raise TypeError(f"{cls.__name__} needs class attributes 'name' and 'label' to be registered")
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"method {cls.name!r} is already registered by {_REGISTRY[cls.name].__qualname__}")
    _REGISTRY[cls.name] = cls
    return cls


def unregister(name: str) -> None:
    """Remove a method from the registry (tests that register a toy method)."""
    _REGISTRY.pop(name, None)


def method_names() -> list[str]:
    return list(_REGISTRY)


def get_method(name: str) -> type["Method"]:
    """The registered method class of ``name``; ``ValueError`` naming the allowed ones."""
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(f"RunConfig.method: {name!r} is not one of {method_names()}") from None


def plan_for(method: str, num_layers: int, stage=None, lam: float = 0.0, train_head: bool = True) -> TrainPlan:
    """The plan of a registered method at a chain stage (``stage`` matters to ChainFed only)."""
    return get_method(method).plan_at(num_layers, stage, lam, train_head)


class Method:
    """Base class: a method that trains a fixed plan every round and averages it by FedAvg."""

    name: ClassVar[str]                      # the registry key, ``RunConfig.method``
    label: ClassVar[str]                     # how tables and figures name it
    adapters: ClassVar[bool] = False         # bottleneck adapters injected into every layer
    # What a fixed-plan method trains in every layer: "nothing" (forward only), "adapters" or
    # "weights" (the layers' own); ``trains_head``: whether the head trains too.
    trains: ClassVar[str] = "adapters"
    trains_head: ClassVar[bool] = True
    uses_chain: ClassVar[bool] = False       # reads RunConfig.chain (window, FOAT, GPO)
    Options: ClassVar[type | None] = None    # a config section of its own (``RunConfig.method_options``)
    memory_shape: ClassVar[str] = "full_adapters"   # the analytic model's name for its training step
    # Named settings for the experiment grid: label -> partial RunConfig overrides.
    variants: ClassVar[dict[str, dict]] = {}

    def __init__(self, config: "RunConfig", num_layers: int, family: str):
        self.config = config
        self.num_layers = num_layers
        self.family = family
        Options = type(self).Options
        self.options = Options.from_dict(config.method_options) if Options is not None else None
        # What the method's server side keeps between rounds (search state, seed pools, ...):
        # plain picklable values, checkpointed with the server so a restart resumes bitwise.
        self.state: dict[str, Any] = {}
        # The server's global tensors of the round in progress (set by the server before its
        # downlinks and before :meth:`aggregate`; read-only): methods whose clients send
        # gradients step from it.
        self.global_state: dict[str, "torch.Tensor"] = {}

    # -- what trains when
    @classmethod
    def plan_at(cls, num_layers: int, stage=None, lam: float = 0.0, train_head: bool = True) -> TrainPlan:
        """Frozen / training / idle layers; a pure function of the model's depth (and, for
        chain methods, the stage). The default is the fixed plan that :attr:`trains` names."""
        L, head = num_layers, train_head and cls.trains_head
        if cls.trains == "nothing":
            return TrainPlan(range(0, L), range(L, L), range(L, L), train_head=head)
        return TrainPlan(range(0, 0), range(0, L), range(L, L), train_head=head, train_base=cls.trains == "weights")

    def plan(self, round_index: int, start_layer: int, window: int) -> TrainPlan:
        """The plan of round ``round_index`` (``start_layer``, ``window``: the server's chain)."""
        return self.plan_at(self.num_layers)

    def widest_plan(self) -> TrainPlan:
        """A plan covering every tensor the method trains at some round."""
        return self.plan_at(self.num_layers)

    def client_plan(self, round_index: int, client: int, plan: TrainPlan, capacity_bytes: float) -> TrainPlan:
        """The plan one client trains this round (default: the round's plan). Methods that give
        clients different layers (by their memory, or at random) override it; the server sends
        each client its own plan, and the round counts each client's bytes by it."""
        return plan

    def client_window(self, round_index: int, client: int, plan: TrainPlan,
                      window: dict[str, "torch.Tensor"]) -> dict[str, "torch.Tensor"]:
        """What ``client`` is sent to train ``plan`` (default: ``window``, the global values of
        the plan's tensors). A method that keeps several versions of what it trains on the
        server (FedAdapter's trial groups) sends each client its own; the round counts each
        client's bytes by what this returns."""
        return window

    # -- the model
    def prepare(self, backbone: "Backbone") -> None:
        """Add what the method trains to a freshly built, seeded backbone."""
        import torch

        if self.adapters:
            torch.manual_seed(self.config.seed)
            backbone.add_adapters(self.config.adapter)

    def exchanged_names(self, backbone: "Backbone") -> list[str]:
        """Every tensor the method can train at some round: the global state the server keeps."""
        from ..train import trainable_names
        return trainable_names(backbone, self.widest_plan())

    def initial_state(self, backbone: "Backbone") -> dict[str, "torch.Tensor"]:
        """The global state at round 0, read from a freshly built, seeded backbone; every
        party (server, Flower node) builds it itself. Default: copies of the exchanged tensors."""
        from ..train import get_state
        return get_state(backbone, self.exchanged_names(backbone))

    def load_state(self, backbone: "Backbone", state: dict[str, "torch.Tensor"],
                   tensors: dict[str, "torch.Tensor"] | None = None) -> None:
        """Put (part of) a global state into the backbone. Default: copy its tensors in
        (``tensors``: their ``tensors_by_name``, if known). A method whose global state is not
        the model's own tensors (FedKSeed's seed scalars) rebuilds the model from it here."""
        from ..train import set_state
        set_state(backbone, state, tensors)

    # -- the chain (ChainFed overrides these)
    def initial_start_layer(self) -> int | None:
        """The chain's start layer before any profiling; None asks for FOAT."""
        return 0

    def choose_window(self, capacities, peak) -> int:
        """The window W, given device capacities (bytes) and ``peak(method, w)`` in bytes."""
        return self.config.chain.window

    def held_window(self, start_layer: int, window: int) -> int:
        """The most layers of the window a client holds once the chain starts at ``start_layer``:
        ``window`` by default; ChainFed's is clipped to the layers left after the start."""
        return window

    def min_rounds(self, start_layer: int, window: int) -> int:
        """Rounds before the convergence rule (``fed.stop_patience``) may stop the run: none by
        default; ChainFed's schedule must first cover its chain."""
        return 0

    # -- one client, the server
    def client_update(self, backbone: "Backbone", dataset, plan: TrainPlan, *, seed: int,
                      pad_id: int = 0) -> "LocalResult":
        """Train the plan's tensors on one client's data (the shared explicit loop)."""
        from ..train import train_local
        return train_local(backbone, dataset, plan, self.config.train, seed=seed, pad_id=pad_id)

    def aggregate(self, updates: list[tuple[dict[str, "torch.Tensor"], int]], *, round_index: int = 0,
                  clients: list[int] | None = None) -> dict[str, "torch.Tensor"]:
        """The new global values of the updated tensors, from each client's (state, examples)
        in client order (``clients``: their ids). Default: FedAvg weighted by examples."""
        from ..aggregation import fedavg
        return fedavg(updates)

    # -- memory
    @classmethod
    def peak_bytes(cls, hf_config: Any, window: int, *, batch_size: int, seq_len: int, bottleneck: int,
                   optimizer: str, dtype: str) -> "MemoryEstimate":
        """Peak memory of one client's training step as the method is deployed."""
        from ..memory_model import peak_training_bytes
        return peak_training_bytes(hf_config, cls.memory_shape, 1, batch_size=batch_size, seq_len=seq_len,
                                   dtype=dtype, bottleneck=bottleneck, optimizer=optimizer)
