"""Device placement (``train.device``): the engine computes where the config says, states travel on the CPU.

No GPU is needed here: "auto" is the CPU on this machine and must give the CPU's bits, and the
audit below checks, for every method, what a misplaced tensor would break on a GPU: every
batch stream of a client or of the evaluation names the model's device, every module runs on
inputs and weights of that device, every state a client sends back is on the CPU, and no
tensor our code makes inside a round is left to the default (CPU) device without saying so.
On a machine with CUDA the same audit runs on "cuda" too.
"""

import contextlib
import os
import sys
from pathlib import Path

import pytest
import torch
from torch.overrides import TorchFunctionMode

from chainfed_core import experiments as ex
from chainfed_core import rounds, train
from chainfed_core.backbone import resolve_device
from chainfed_core.config import RunConfig
from chainfed_core.federated import run


def without_timing(history: list[dict]) -> list[dict]:
    """Metrics lines without their seconds (runtime_checks has the same, but imports flwr, which the
    GPU machine this file also runs on does not have)."""
    return [{k: v for k, v in m.items() if not k.startswith("seconds")} for m in history]


CORE = str(Path(train.__file__).resolve().parent)
TORCH = str(Path(torch.__file__).resolve().parent)
# Tensors our code makes on the CPU on purpose: a batch's rows are gathered (population.ClientRows)
# and collated there and then moved (train.batches), the shuffling order is drawn there (the same batches on every device), the
# states a client sends back are there (train.cpu_state). Elsewhere a CPU tensor says device="cpu".
CPU_BY_DESIGN = {("population.py", "__getitem__"), ("train.py", "collate"), ("train.py", "_lm_labels"), ("train.py", "batches"),
                 ("train.py", "cpu_state")}
FACTORIES = {torch.zeros, torch.ones, torch.full, torch.empty, torch.tensor, torch.as_tensor, torch.arange,
             torch.randn, torch.rand, torch.randint, torch.randperm, torch.eye, torch.linspace}
METHODS = ["ChainFed", "ChainFed (stage head)", "Full Adapters", "LP", "FFT", "No-FT", "FedAdapter", "C2A",
           "FwdLLM", "FLoRA", "FedRA", "FedKSeed"]
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def tiny(variant: str, device: str, rounds_: int = 2) -> RunConfig:
    """A quick-profile run of ``variant`` for two rounds on ``device``."""
    (cell,) = ex.grid("quick", [variant], partitions=["iid"],
                      overrides={"train": {"device": device}, "fed": {"rounds": rounds_},
                                 "data": {"max_train_examples": 48, "max_test_examples": 16}})
    return cell.config


class Audit(TorchFunctionMode):
    """Records what would be on the wrong device: tensors our code makes without naming a device
    (outside :data:`CPU_BY_DESIGN`), module inputs and weights off ``device``, batch streams
    without a device, client states off the CPU."""

    def __init__(self, device: torch.device):
        super().__init__()
        self.device, self.problems, self.modules_seen, self.batches_seen = device, [], 0, 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in FACTORIES and "device" not in kwargs:
            frame = sys._getframe(1)
            while frame is not None and frame.f_code.co_filename.startswith(TORCH):
                frame = frame.f_back             # torch's own wrappers: the caller is the first frame past them
            if frame is not None and frame.f_code.co_filename.startswith(CORE):
                where = (os.path.basename(frame.f_code.co_filename), frame.f_code.co_name)
                if where not in CPU_BY_DESIGN:
                    self.problems.append(f"{func.__name__} without device= at {where[0]}:{frame.f_lineno} "
                                         f"({where[1]})")
        return func(*args, **kwargs)

    def pre_hook(self, module, args, kwargs):
        self.modules_seen += 1
        tensors = [t for t in (*args, *kwargs.values()) if torch.is_tensor(t)]
        tensors += list(module.parameters(recurse=False)) + list(module.buffers(recurse=False))
        for t in tensors:
            if t.device != self.device:
                self.problems.append(f"{type(module).__name__} ran with a tensor on {t.device}, not {self.device}")

    def batches(self, original):
        def checked(*args, **kwargs):
            if kwargs.get("device") is None:
                frame = sys._getframe(1)
                self.problems.append(f"batches() without device at {os.path.basename(frame.f_code.co_filename)}:"
                                     f"{frame.f_lineno}")
            for batch in original(*args, **kwargs):
                self.batches_seen += 1
                yield batch
        return checked

    def scoped(self, original, *, client: bool = False):
        """``original`` (a client's update, FOAT profile or the evaluation) with the audit on inside
        it: the server's own work (aggregation, its CPU state) is not the client's device's."""
        def checked(*args, **kwargs):
            with self:
                result = original(*args, **kwargs)
            off = [n for n, t in result.state.items() if t.device.type != "cpu"] if client else []
            if off:
                self.problems.append(f"a client sent {off[:3]} off the CPU")
            return result
        return checked


@contextlib.contextmanager
def audited(monkeypatch, device: torch.device):
    """An :class:`Audit` over every round of the runs in the block: the model's modules get its
    hook as the backbone is built (``Backbone.to``, called once the run has built it)."""
    audit, handles = Audit(device), []
    to = train.Backbone.to

    def hooked_to(backbone, target):
        out = to(backbone, target)
        handles.extend(m.register_forward_pre_hook(audit.pre_hook, with_kwargs=True) for m in backbone.model.modules())
        return out
    monkeypatch.setattr(train.Backbone, "to", hooked_to)
    monkeypatch.setattr(train, "batches", audit.batches(train.batches))
    monkeypatch.setattr(rounds, "batches", audit.batches(rounds.batches))
    monkeypatch.setattr("chainfed_core.federated.client_update", audit.scoped(rounds.client_update, client=True))
    monkeypatch.setattr("chainfed_core.federated.client_profile", audit.scoped(rounds.client_profile))
    monkeypatch.setattr(rounds, "evaluate_model", audit.scoped(rounds.evaluate_model))
    try:
        yield audit
    finally:
        for h in handles:
            h.remove()


def test_auto_on_a_machine_without_cuda_is_the_cpu_bit_for_bit(tmp_path, one_thread):
    explicit = run(tiny("ChainFed", "cpu"), tmp_path / "cpu", progress=False)
    auto = run(tiny("ChainFed", "auto"), tmp_path / "auto", progress=False)
    if torch.cuda.is_available():
        assert auto["device"].startswith("cuda")
        pytest.skip("CUDA here: 'auto' is the GPU, whose float results differ from the CPU's")
    assert "device" not in auto and "device" not in explicit          # CPU records keep their keys
    assert without_timing(auto["history"]) == without_timing(explicit["history"])
    assert auto["final"]["test_accuracy"] == explicit["final"]["test_accuracy"]


def test_the_device_field_keeps_every_hash_and_refuses_what_is_not_there():
    assert "device" not in RunConfig().to_dict()["train"]             # at its default: left out of the hash
    assert RunConfig.from_dict({"train": {"device": "auto"}}).to_dict()["train"]["device"] == "auto"
    with pytest.raises(ValueError, match="TrainConfig.device"):
        RunConfig.from_dict({"train": {"device": "tpu"}})
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="TrainConfig.device: 'cuda', but torch sees no CUDA device"):
            resolve_device("cuda")
        with pytest.raises(ValueError, match="TrainConfig.device"):    # at the run's start, before any work
            run(tiny("ChainFed", "cuda"), "/nonexistent/never-written", progress=False)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("variant", METHODS)
def test_every_tensor_of_a_round_follows_the_device(variant, device, tmp_path, monkeypatch, one_thread):
    config = tiny(variant, device, rounds_=1 if variant == "FedKSeed" else 2)
    with audited(monkeypatch, resolve_device(device)) as audit:
        record = run(config, tmp_path, progress=False)
    assert record["history"] and audit.batches_seen > 0
    assert audit.modules_seen > 0                 # the hooks saw the model run: the check is not vacuous
    assert not audit.problems, "\n".join(dict.fromkeys(audit.problems))


def test_the_audit_catches_a_misplaced_tensor(monkeypatch):
    """The audit itself: a module whose input is on another device than its weights is reported."""
    audit = Audit(torch.device("cpu"))
    layer = torch.nn.Linear(2, 2)
    with torch.device("meta"):
        audit.pre_hook(layer, (torch.empty(1, 2),), {})
    assert audit.problems == ["Linear ran with a tensor on meta, not cpu"]


@pytest.mark.parametrize("device", DEVICES)
def test_an_instruction_run_and_its_benchmarks_follow_the_device(device, tmp_path, monkeypatch, one_thread):
    """Table 3's quick ChainFed run under the audit, its final evaluation included: the scorers'
    one-pass letters, multi-token choices and greedy answers make their tensors on the model's device."""
    from chainfed_core import instruct_runs, instruct_table, llm_eval

    def probe(backbone, tokenizer, limit):
        letters = llm_eval.choice_loglikelihoods(backbone, tokenizer, "Answer:", ["A", "B"])   # one token each
        words = llm_eval.choice_loglikelihoods(backbone, tokenizer, "Answer:", [" yes", " no"])
        return {"n": 4, "logliks": letters + words, "answer": llm_eval.generate_answer(backbone, tokenizer, "Say:", 3)}

    records = [{"instruction": f"Add {a} and 3.", "input": "", "output": f"It is {a + 3}."} for a in range(24)]
    monkeypatch.setattr(instruct_runs, "alpaca_records", lambda asset: records)
    monkeypatch.setitem(instruct_runs.SCORERS, "mmlu", probe)
    cfg = instruct_table.run_config("quick", "ChainFed W=2").to_dict()
    cfg["train"]["device"], cfg["fed"]["rounds"] = device, 1
    cfg = RunConfig.from_dict(cfg)
    with audited(monkeypatch, resolve_device(device)) as audit:
        monkeypatch.setattr(instruct_runs, "final_evaluation", audit.scoped(instruct_runs.final_evaluation))
        record = run(cfg, tmp_path, progress=False, task=instruct_runs.build_instruct_task(cfg, {"mmlu": 4}))
    assert len(record["final_eval"]["mmlu"]["logliks"]) == 4 and audit.batches_seen > 0 and audit.modules_seen > 0
    assert not audit.problems, "\n".join(dict.fromkeys(audit.problems))
    assert instruct_table.run_config("gpu-full", "ChainFed W=2").train.device == "cuda"
    assert "device" not in instruct_table.run_config("cpu", "ChainFed W=2").to_dict()["train"]   # hashes kept
