"""ChainFed as deployed, on real processes: a SuperLink with TLS and SuperNode authentication
(certificates and keys from scripts/make_certs.sh) and SuperNodes, each with its own data
file, streaming ChainFed from its layer store under a memory budget; all started and ended
by this test by process id."""

import json
import os
import subprocess
import time

import pytest
import torch

from chainfed_core.checkpoint import load_final_state
from chainfed_core.config import RunConfig
from chainfed_core.federated import run
from chainfed_core.flower import device
from chainfed_core.flower.loopback import BIN, ROOT, Federation, children, free_ports, vm_hwm
from chainfed_core.records import RECORD_FILE

from test_deploy import write_partitions

NODES = 3


def big_config() -> RunConfig:
    """96 BERT layers of width 1024 (a 3.0 GB float32 store); the window at the top of the chain
    (layers 92-94), so 92 frozen layers stream through each node once per round."""
    return RunConfig.from_dict({
        "method": "chainfed", "seed": 5, "model": {"name": "tiny-bert-L96-H1024"}, "adapter": {"bottleneck": 4},
        "chain": {"window": 2, "start_layer": 92},
        "data": {"dataset": "synthetic", "num_clients": NODES, "max_train_examples": 60, "max_test_examples": 8},
        "fed": {"rounds": 2, "clients_per_round": 2, "eval_every": 1, "memory_aware": False}})


BUDGET_GB = 0.85          # the ClientApps peaked at 0.76-0.77 GiB here (python + torch + flwr: 0.46)


@pytest.mark.slow
@pytest.mark.long
def test_streamed_chainfed_on_a_tls_federation_stays_in_budget_and_equals_the_simulator(tmp_path):
    started = time.time()
    cfg = big_config()
    store = device.build_store(cfg, 3, tmp_path / "store")
    store_bytes = sum(store.nbytes(k) for k in store.manifest["shards"])
    assert store_bytes >= 3 * BUDGET_GB * 2 ** 30
    paths = write_partitions(cfg, tmp_path)
    (tmp_path / "cfg.json").write_text(json.dumps(cfg.to_dict()))
    fed = Federation(tmp_path, NODES)
    out = tmp_path / "flower_out"
    try:
        fed.start([f"partition-id={k} num-partitions={NODES} data-path='{p}' layer-store='{tmp_path / 'store'}' "
                   f"memory-gb={BUDGET_GB} cache-dir='{tmp_path / f'cache{k}'}'" for k, p in enumerate(paths)])
        record = fed.run_app(ROOT / "flower_app", tmp_path / "cfg.json", out, timeout=900,
                             logs=("superlink", "supernode0"))
        supernode_hwm = [vm_hwm(fed.procs[f"supernode{k}"].pid) for k in range(NODES)]
    finally:
        fed.stop()
    clientapp_hwm = {int(c): v for c, v in record["client_peak_rss"].items()}
    flower = torch.load(out / "final_state.pt", weights_only=False)
    run(cfg, tmp_path / "sim", progress=False)
    sim = load_final_state(tmp_path / "sim")
    diff = max(float((flower[k] - sim[k]).abs().max()) for k in sim)
    print(f"store {store_bytes / 2 ** 30:.2f} GiB, budget {BUDGET_GB} GiB; ClientApp VmHWM (GiB) "
          f"{ {c: round(v / 2 ** 30, 3) for c, v in sorted(clientapp_hwm.items())} }; SuperNode VmHWM (GiB) "
          f"{[round(v / 2 ** 30, 3) for v in supernode_hwm]}; adapters max |flower - simulator| {diff:.2e}; "
          f"{time.time() - started:.0f} s")
    assert flower.keys() == sim.keys() and diff <= 1e-6
    assert not record["failures"] and sorted(clientapp_hwm) == sorted({c for m in record["history"] for c in m["trained"]})
    assert all(v < BUDGET_GB * 2 ** 30 for v in [*clientapp_hwm.values(), *supernode_hwm])


@pytest.mark.slow
@pytest.mark.long
def test_a_supernode_killed_mid_round_is_recorded_and_rejoins_when_restarted(tmp_path, monkeypatch):
    """kill -9 of SuperNode 2 (and its ClientApp) while it trains round 1: the round completes
    with the other nodes (after ``fed.client_timeout_s``, or at once when the SuperLink answers
    for the missing node) and records the failure, as it does each round until the node,
    started again with the same command (the same key, so the same node id), is back; then it
    trains again. The global adapters equal the simulator's with client 2 failing in the same rounds.
    Before the run, a SuperNode with a key the SuperLink never registered is refused."""
    cfg = RunConfig.from_dict({
        "method": "chainfed", "seed": 5, "model": {"name": "tiny-bert-L6"}, "adapter": {"bottleneck": 4},
        "chain": {"window": 2, "start_layer": 2},
        "data": {"dataset": "synthetic", "num_clients": NODES, "max_train_examples": 60, "max_test_examples": 16},
        "fed": {"rounds": 6, "clients_per_round": NODES, "eval_every": 1, "memory_aware": False,
                "client_timeout_s": 120}})
    paths = write_partitions(cfg, tmp_path)
    (tmp_path / "cfg.json").write_text(json.dumps(cfg.to_dict()))
    fed = Federation(tmp_path, NODES)
    out = tmp_path / "flower_out"
    configs = [f"partition-id={k} num-partitions={NODES} data-path='{p}'" for k, p in enumerate(paths)]
    try:
        fed.start(configs)
        # a SuperNode whose key the SuperLink never registered is refused and exits
        stranger = tmp_path / "stranger"
        subprocess.run(["ssh-keygen", "-q", "-t", "ecdsa", "-b", "384", "-N", "", "-f", stranger], check=True)
        intruder = fed.spawn("intruder", [BIN / "flower-supernode", "--root-certificates", fed.certs / "ca.crt",
                                          "--superlink", f"127.0.0.1:{fed.link}", "--auth-supernode-private-key",
                                          stranger, "--port", free_ports(1)[0], "--node-config", configs[0]])
        assert intruder.wait(timeout=120) != 0 and "Failed to activate SuperNode" in fed.log("intruder")
        flwr = subprocess.Popen([BIN / "flwr", "run", ROOT / "flower_app", "federation", "--run-config",
                                 f"config-file='{tmp_path / 'cfg.json'}' overrides='' out-dir='{out}'"],
                                env=fed.env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 600
        node = fed.procs["supernode2"]
        # node 2 has pulled round 1's train message (its second): its ClientApp is starting or training.
        # (A SuperNode always has a child, its SuperExec, so children alone do not say a job runs.)
        while time.time() < deadline and fed.log("supernode2").count("Receiving: train message") < 2:
            time.sleep(0.1)
        for pid in [node.pid, *children(node.pid)]:
            os.kill(pid, 9)
        node.wait()
        assert fed.log("supernode2").count("Receiving: train message") == 2, "node 2 never received round 1"
        assert fed.log("supernode2").count("Sending: train message") == 1, "node 2 replied before it was killed"
        k, tries = 2, 0
        while True:       # the SuperLink refuses the key until it has seen the old node go offline
            again = fed.spawn(f"supernode2-again{tries}", [
                BIN / "flower-supernode", "--root-certificates", fed.certs / "ca.crt", "--superlink",
                f"127.0.0.1:{fed.link}", "--auth-supernode-private-key", fed.certs / f"supernode_{k}",
                "--port", fed.node_ports[k], "--node-config", configs[k]])
            try:
                again.wait(timeout=30)         # exited: not activated yet
            except subprocess.TimeoutExpired:
                break                          # up and connected
            tries += 1
            assert tries < 20, fed.log(f"supernode2-again{tries - 1}")[-2000:]
        while time.time() < deadline + 300 and not (out / RECORD_FILE).exists():
            time.sleep(1)
        if not (out / RECORD_FILE).exists():
            print(fed.log("superlink")[-3000:], fed.log(f"supernode2-again{tries}")[-3000:], sep="\n----\n")
        assert (out / RECORD_FILE).exists()
        flwr.wait(timeout=60)
    finally:
        fed.stop()
    record = json.loads((out / RECORD_FILE).read_text())
    failed = [m["failed"] for m in record["history"]]
    back = next(r for r in range(2, len(failed)) if not failed[r])          # StopIteration: never back
    assert failed == [[]] + [[2]] * (back - 1) + [[]] * (len(failed) - back), failed
    assert all(m["trained"] == [0, 1, 2] for m in record["history"][back:])
    # no reply within the timeout, or the SuperLink's error reply once it sees the node gone
    assert {f["kind"] for f in record["failures"]} <= {"timeout", "error"} and record["failures"][0]["node"]
    from chainfed_core import federated
    update = federated.client_update
    lost = {(r, 2) for r in range(1, back)}

    def fails_where_the_node_was_gone(*args, **kwargs):
        if (args[6], args[7]) in lost:
            raise RuntimeError("killed")
        return update(*args, **kwargs)
    monkeypatch.setattr(federated, "client_update", fails_where_the_node_was_gone)
    run(cfg, tmp_path / "sim", progress=False)
    flower, sim = torch.load(out / "final_state.pt", weights_only=False), load_final_state(tmp_path / "sim")
    assert flower.keys() == sim.keys() and max(float((flower[k] - sim[k]).abs().max()) for k in sim) <= 1e-6
