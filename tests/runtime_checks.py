"""What every method's tests check the same way: the run on the Flower apps (in this process)
equals the simulator's bitwise, and a run killed with SIGKILL resumes bitwise."""

import json
import multiprocessing
import os
import signal
import sys
import time

import torch
from flwr.app import Context, RecordDict

from chainfed_core.checkpoint import METRICS_FILE, load_final_state
from chainfed_core.config import RunConfig
from chainfed_core.federated import run
from chainfed_core.records import RECORD_FILE


def without_timing(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in m.items() if not k.startswith("seconds")} for m in history]


def assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------- Flower, in this process
class InProcessGrid:
    """The part of Flower's ``Grid`` the ServerApp uses, delivering messages straight to the
    ClientApp of N in-process nodes (each with its own Context, as SuperNodes have)."""

    def __init__(self, num_nodes: int):
        from chainfed_core.flower.client_app import app
        self.app = app
        self.contexts = {100 + k: Context(run_id=1, node_id=100 + k, state=RecordDict(), run_config={},
                                          node_config={"partition-id": k, "num-partitions": num_nodes})
                         for k in range(num_nodes)}

    def get_node_ids(self):
        return list(self.contexts)

    def send_and_receive(self, messages, timeout=None):
        for m in messages:               # as Flower's grid does when it pushes a message
            m.metadata.__dict__["_message_id"] = m.object_id
        return [self.app(m, self.contexts[m.metadata.dst_node_id]) for m in messages]


def run_flower_in_process(cfg: RunConfig, out) -> dict:
    from flwr.supercore.task_identity import TaskIdentity

    from chainfed_core.flower import server_app
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 1
    (out.parent / "cfg.json").write_text(json.dumps(cfg.to_dict()))
    context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={
        "config-file": str(out.parent / "cfg.json"), "overrides": "", "out-dir": str(out)})
    server_app.main(InProcessGrid(cfg.data.num_clients), context)
    return json.loads((out / RECORD_FILE).read_text())


def assert_flower_equals_simulator(cfg: RunConfig, tmp_path) -> tuple[dict, dict]:
    """Run ``cfg`` in the simulator and on the in-process Flower apps: the final global states
    are bitwise equal and the metrics lines identical but for timing. Returns (sim, flower) records."""
    sim = run(cfg, tmp_path / "sim", progress=False)
    flower = run_flower_in_process(cfg, tmp_path / "flower")
    assert_same_state(torch.load(tmp_path / "flower" / "final_state.pt", weights_only=False),
                      load_final_state(tmp_path / "sim"))
    assert without_timing(flower["history"]) == without_timing(sim["history"])
    return sim, flower


# ---------------------------------------------------------------- kill -9 and resume
def _run_quietly(cfg: RunConfig, out) -> None:
    sys.stdout = sys.stderr = open(os.devnull, "w")
    torch.set_num_threads(1)           # the parent's OpenMP pool does not survive the fork
    run(cfg, out, progress=False)


def fork_and_kill(target, args: tuple, out, after_rounds: int, timeout_s: float = 60) -> None:
    """Run ``target(*args)`` in a forked copy of this process (no second start-up of torch) and
    kill it with SIGKILL once ``out``'s metrics file holds ``after_rounds`` lines; it must still
    be running then, and it must have left no record."""
    proc = multiprocessing.get_context("fork").Process(target=target, args=args)
    proc.start()
    deadline = time.time() + timeout_s
    while time.time() < deadline and proc.is_alive():
        metrics = out / METRICS_FILE
        if metrics.exists() and len(metrics.read_text().splitlines()) >= after_rounds:
            break
        time.sleep(0.01)
    assert proc.is_alive(), "the run ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.join()
    assert not (out / RECORD_FILE).exists()


def assert_kill_9_resumes_bitwise(cfg: RunConfig, tmp_path, after_rounds: int = 2):
    """A forked copy of this process (no second start-up of torch) runs ``cfg`` and is killed
    with SIGKILL once ``after_rounds`` metrics lines are on disk; rerunning resumes from the
    checkpoint and ends bitwise equal to an uninterrupted run. Returns (killed, reference) folders."""
    reference = run(cfg, tmp_path / "ref", progress=False)
    out = tmp_path / "killed"
    fork_and_kill(_run_quietly, (cfg, out), out, after_rounds)
    resumed = run(cfg, out, progress=False)
    assert without_timing(resumed["history"]) == without_timing(reference["history"])
    assert_same_state(load_final_state(out), load_final_state(tmp_path / "ref"))
    return out, tmp_path / "ref"
