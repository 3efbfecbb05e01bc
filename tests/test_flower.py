"""`flwr run` on a local SuperLink with SuperNodes (loopback) matches the in-process simulator."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from chainfed_core.config import RunConfig
from chainfed_core.checkpoint import load_final_state
from chainfed_core.federated import run
from chainfed_core.flower.loopback import free_ports, wait_for_port
from chainfed_core.records import RECORD_FILE

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
NODES = 3


def config() -> dict:
    return {"method": "chainfed", "seed": 5, "model": {"name": "tiny-bert"}, "adapter": {"bottleneck": 4},
            "chain": {"window": 2},
            "data": {"dataset": "synthetic", "num_clients": NODES, "max_train_examples": 60, "max_test_examples": 16},
            "fed": {"rounds": 2, "clients_per_round": 2, "eval_every": 1, "memory_aware": False}}


@pytest.mark.slow
def test_flwr_run_on_loopback_matches_simulator(tmp_path):
    started = time.time()
    cfg_file = tmp_path / "cfg.json"
    cfg_file.write_text(json.dumps(config()))
    home = tmp_path / "flwr_home"
    home.mkdir()
    link, *node_ports = free_ports(1 + NODES)     # Flower 1.41: one HTTP port serves every SuperLink API
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "loopback"\n\n[superlink.loopback]\n'
        f'address = "127.0.0.1:{link}"\ninsecure = true\n')
    env = {**os.environ, "FLWR_HOME": str(home), "PYTHONPATH": str(ROOT), "FLWR_DISABLE_UPDATE_CHECK": "1",
           "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    logs = tmp_path / "logs"
    logs.mkdir()
    procs = []

    def spawn(name, args):
        out = open(logs / f"{name}.log", "w")
        procs.append(subprocess.Popen(args, env=env, cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT))

    try:
        spawn("superlink", [BIN / "flower-superlink", "--insecure", "--host", "127.0.0.1", "--port", str(link),
                            "--database", str(tmp_path / "state.db")])
        wait_for_port(link)
        for k, port in enumerate(node_ports):
            spawn(f"supernode{k}", [BIN / "flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{link}",
                                    "--port", str(port),
                                    "--node-config", f"partition-id={k} num-partitions={NODES}"])
        out = tmp_path / "flower_out"
        flwr = subprocess.run([BIN / "flwr", "run", str(ROOT / "flower_app"), "loopback", "--stream",
                               "--run-config", f"config-file='{cfg_file}' out-dir='{out}'"],
                              env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
        deadline = time.time() + 300
        while flwr.returncode == 0 and not (out / RECORD_FILE).exists() and time.time() < deadline:
            time.sleep(1)
        if not (out / RECORD_FILE).exists():
            print(flwr.stdout[-3000:], flwr.stderr[-3000:], (logs / "superlink.log").read_text()[-5000:],
                  (logs / "supernode0.log").read_text()[-5000:], sep="\n----\n")
        assert (out / RECORD_FILE).exists()
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()

    flower = torch.load(out / "final_state.pt", weights_only=False)
    sim_record = run(RunConfig.from_dict(config()), tmp_path / "sim", progress=False)
    sim = load_final_state(tmp_path / "sim")
    assert flower.keys() == sim.keys()
    assert max(float((flower[k] - sim[k]).abs().max()) for k in sim) <= 1e-6
    flower_record = json.loads((out / RECORD_FILE).read_text())
    assert [m["clients"] for m in flower_record["history"]] == [m["clients"] for m in sim_record["history"]]
    assert [m["bytes_up"] for m in flower_record["history"]] == [m["bytes_up"] for m in sim_record["history"]]
    print(f"flower loopback test took {time.time() - started:.0f} s")


@pytest.mark.slow
def test_flwr_run_on_ray_simulation_engine_matches_simulator(tmp_path):
    """`flwr run` against the managed local SuperLink: Flower's simulation engine (Ray) with
    virtual SuperNodes that get ``partition-id``/``num-partitions`` from the engine."""
    import psutil

    started = time.time()
    cfg_file = tmp_path / "cfg.json"
    cfg_file.write_text(json.dumps(config()))
    home = tmp_path / "flwr_home"
    home.mkdir()
    (home / "config.toml").write_text('[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = ":local:"\n')
    env = {**os.environ, "FLWR_HOME": str(home), "PYTHONPATH": str(ROOT), "FLWR_DISABLE_UPDATE_CHECK": "1",
           "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    out = tmp_path / "ray_out"
    try:
        flwr = subprocess.run([BIN / "flwr", "run", str(ROOT / "flower_app"), "--stream",
                               "--federation-config", f"num-supernodes={NODES}",
                               "--run-config", f"config-file='{cfg_file}' out-dir='{out}'"],
                              env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
        if not (out / RECORD_FILE).exists():
            print(flwr.stdout[-5000:], flwr.stderr[-5000:], sep="\n----\n")
        assert flwr.returncode == 0 and (out / RECORD_FILE).exists()
        assert "Starting Flower Simulation" in flwr.stdout + flwr.stderr
    finally:
        # the managed SuperLink outlives `flwr run`: end the one this test started (its files are in home)
        for proc in psutil.process_iter(["pid", "cmdline"]):
            if any(str(home) in part for part in (proc.info["cmdline"] or [])):
                proc.kill()

    flower = torch.load(out / "final_state.pt", weights_only=False)
    run(RunConfig.from_dict(config()), tmp_path / "sim", progress=False)
    sim = load_final_state(tmp_path / "sim")
    assert flower.keys() == sim.keys()
    assert max(float((flower[k] - sim[k]).abs().max()) for k in sim) <= 1e-6
    assert json.loads((out / RECORD_FILE).read_text())["runtime"] == "flower"
    print(f"flower ray simulation test took {time.time() - started:.0f} s")
