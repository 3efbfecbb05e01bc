"""The in-process federated simulator: bytes, exact resume after kill -9, faults, bad configs."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from datasets import Dataset

from chainfed_core.config import RunConfig
from chainfed_core.checkpoint import CHECKPOINT_FILE, METRICS_FILE, load_final_state, read_checkpoint
from chainfed_core.federated import run
from chainfed_core.methods import get_method
from chainfed_core.population import LARGEST_DEVICE_GB, device_capacity_gb
from chainfed_core.rounds import AllClientsFailed
from chainfed_core.seeding import injected_failure, sample_clients
from chainfed_core.task import build_task, seq_len
from chainfed_core.train import evaluate, get_state
from chainfed_core.partition import client_indices
from chainfed_core.records import RECORD_FILE, load_records

from runtime_checks import without_timing

ROOT = Path(__file__).resolve().parent.parent


def tiny_config(**fed) -> dict:
    return {"method": "chainfed", "seed": 3, "model": {"name": "tiny-bert"}, "adapter": {"bottleneck": 4},
            "chain": {"window": 2, "start_layer": 1},
            "data": {"dataset": "synthetic", "num_clients": 20, "max_train_examples": 200, "max_test_examples": 32},
            "fed": {"rounds": 3, "clients_per_round": 3, "eval_every": 2, "memory_aware": False, **fed}}


def test_pure_functions_of_seed_and_client():
    a = device_capacity_gb(0, np.arange(1000), "paper")
    assert set(np.unique(a)) <= {4.0, 6.0, 8.0, 12.0}
    assert np.array_equal(device_capacity_gb(0, [17, 999], "paper"), a[[17, 999]])   # lazy: by id alone
    u = device_capacity_gb(1, np.arange(1000), "uniform")
    assert u.min() >= 4 and u.max() < 12
    assert sample_clients(5, 2, np.arange(50), 7) == sample_clients(5, 2, np.arange(50), 7)
    data = Dataset.from_dict({"label": np.repeat(np.arange(3), 40).tolist()})
    for scheme in ("iid", "dirichlet"):
        p = client_indices(data, 10, scheme=scheme, alpha=0.5, min_partition_size=2, seed=0)
        assert sorted(np.concatenate([p.indices(k) for k in range(10)]).tolist()) == list(range(120))
        assert p.sizes().min() >= 2


def test_only_window_tensors_travel_and_bytes_are_counted(tmp_path):
    cfg = RunConfig.from_dict(tiny_config())
    record = run(cfg, tmp_path, progress=False)
    hidden, bottleneck, labels = 32, 4, 3
    adapter = hidden * bottleneck + bottleneck + bottleneck * hidden + hidden
    head = (hidden * hidden + hidden) + (hidden * labels + labels)       # bert.pooler + classifier
    for m in record["history"]:
        begin, end = m["window"]
        assert end - begin == 2
        per_client = 4 * ((end - begin) * adapter + head)
        assert m["bytes_up"] == per_client * len(m["trained"])
        assert m["bytes_down"] == per_client * len(m["clients"])
    # start layer 1, W = 2, L = 4: windows [1, 3), [2, 4), [2, 4); adapter 0 never trains, keeps
    # its seeded initial value and is never sent; every tensor that was in a window moved
    final = load_final_state(tmp_path)
    initial_backbone = build_task(cfg).make_backbone()
    initial = get_state(initial_backbone, final)
    assert [m["window"] for m in record["history"]] == [[1, 3], [2, 4], [2, 4]]
    # context: the adapters outside the window changed since the client last received the state
    # (a client synced at round s got it before round s was aggregated)
    version, synced = {k: -1 for k in range(4)}, {}
    for m in record["history"]:
        begin, end = m["window"]
        stale = [sum(1 for k in range(4) if not begin <= k < end and version[k] >= max(synced.get(c, -1), 0))
                 for c in m["clients"]]
        assert m["bytes_down_context"] == 4 * adapter * sum(stale)
        synced.update({c: m["round"] for c in m["clients"]})
        version.update({k: m["round"] for k in range(begin, end)})
    assert record["history"][1]["bytes_down_context"] > 0
    for name in final:
        assert torch.equal(final[name], initial[name]) == name.startswith("adapters.0."), name
    lines = (tmp_path / METRICS_FILE).read_text().splitlines()
    assert len(lines) == 3 and "test_accuracy" in json.loads(lines[-1])
    frame = load_records(tmp_path)
    assert frame.loc[0, "config.fed.rounds"] == 3 and len(frame.loc[0, "history"]) == 3


def test_kill_9_and_restart_is_bitwise_identical(tmp_path):
    overrides = tiny_config(rounds=6, eval_every=2)
    cfg_file = tmp_path / "cfg.json"
    cfg_file.write_text(json.dumps(overrides))
    reference = run(RunConfig.from_dict(overrides), tmp_path / "ref", progress=False)

    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "chainfed_core.federated", "--config", str(cfg_file), "--out", str(out),
           "--no-progress"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        metrics = out / METRICS_FILE
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 2:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / RECORD_FILE).exists()

    subprocess.run(cmd, env=env, cwd=ROOT, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    resumed = json.loads((out / RECORD_FILE).read_text())
    assert without_timing(resumed["history"]) == without_timing(reference["history"])
    a, b = load_final_state(out), load_final_state(tmp_path / "ref")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert len((out / METRICS_FILE).read_text().splitlines()) == 6


def test_failed_checkpoint_write_names_the_round_and_a_restart_resumes(tmp_path, monkeypatch):
    import errno
    from chainfed_core import checkpoint

    config = RunConfig.from_dict(tiny_config(rounds=4))
    reference = run(config, tmp_path / "ref", progress=False)
    real_write, writes = checkpoint.atomic_write_bytes, []

    def disk_full_after_two(path, data):
        writes.append(path)
        if len(writes) > 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_write(path, data)

    monkeypatch.setattr(checkpoint, "atomic_write_bytes", disk_full_after_two)
    with pytest.raises(OSError, match=r"checkpoint after round 2 not written .*previous checkpoint is intact"):
        run(config, tmp_path / "full", progress=False)
    assert read_checkpoint(tmp_path / "full" / CHECKPOINT_FILE)["round"] == 2
    monkeypatch.undo()
    resumed = run(config, tmp_path / "full", progress=False)
    assert without_timing(resumed["history"]) == without_timing(reference["history"])
    a, b = load_final_state(tmp_path / "full"), load_final_state(tmp_path / "ref")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert len((tmp_path / "full" / METRICS_FILE).read_text().splitlines()) == 4


def test_injected_failures_are_dropped_and_recorded(tmp_path):
    cfg = RunConfig.from_dict(tiny_config(rounds=4, clients_per_round=5, failure_rate=0.3))
    record = run(cfg, tmp_path, progress=False)
    expected = [(r, c) for m in record["history"] for r, c in [(m["round"], c) for c in m["clients"]]
                if injected_failure(cfg.seed, r, c, 0.3)]
    assert expected, "the seed should inject some failures"
    assert [(f["round"], f["client"]) for f in record["failures"]] == expected
    assert all(f["kind"] == "injected" for f in record["failures"])
    for m in record["history"]:
        assert sorted(m["trained"] + m["failed"]) == m["clients"]
    assert len(record["history"]) == 4


def test_no_ft_exchanges_nothing_and_runs(tmp_path):
    cfg = RunConfig.from_dict({**tiny_config(rounds=2), "method": "no_ft"})
    record = run(cfg, tmp_path, progress=False)
    assert [m["bytes_up"] for m in record["history"]] == [0, 0]
    task = build_task(cfg)                        # nothing trained: the fresh model's accuracy
    assert record["final"]["test_accuracy"] == evaluate(task.make_backbone(), task.test)["accuracy"]


def test_a_round_where_every_client_fails_stops_the_run_after_its_record(tmp_path):
    cfg = RunConfig.from_dict(tiny_config(rounds=3, failure_rate=0.99))
    with pytest.raises(AllClientsFailed, match="round 0: every selected client failed"):
        run(cfg, tmp_path / "one", progress=False)
    record = json.loads((tmp_path / "one" / RECORD_FILE).read_text())
    assert record["status"] == "failed" and len(record["history"]) == 1
    assert len(record["failures"]) == cfg.fed.clients_per_round
    assert len((tmp_path / "one" / METRICS_FILE).read_text().splitlines()) == 1
    # fault injection may ask for more all-failed rounds before the run stops
    record = run(cfg, tmp_path / "more", progress=False, max_failed_rounds=4)
    assert all(m["skipped"] and not m["trained"] for m in record["history"])
    assert len(record["failures"]) == 3 * cfg.fed.clients_per_round and "status" not in record
    with pytest.raises(AllClientsFailed):
        run(RunConfig.from_dict(tiny_config(rounds=1, client_timeout_s=1e-9)), tmp_path / "t", progress=False)
    timeouts = json.loads((tmp_path / "t" / RECORD_FILE).read_text())
    assert {f["kind"] for f in timeouts["failures"]} == {"timeout"} and timeouts["history"][0]["skipped"]


def test_a_second_run_on_the_same_folder_fails_at_once(tmp_path):
    import filelock

    with filelock.FileLock(tmp_path / ".lock"):       # as a run in another process holds it
        started = time.perf_counter()
        with pytest.raises(RuntimeError, match="being written by another run"):
            run(RunConfig.from_dict(tiny_config(rounds=1)), tmp_path, progress=False)
        assert time.perf_counter() - started < 1.0
    assert not (tmp_path / METRICS_FILE).exists()


def test_memory_aware_sampling_and_window_from_memory(tmp_path):
    cfg = RunConfig.from_dict({**tiny_config(memory_aware=True, rounds=1), "method": "full_adapters"})
    record = run(cfg, tmp_path / "e2e", progress=False)
    caps = device_capacity_gb(cfg.seed, np.arange(20), "paper")
    assert record["eligible_clients"] == int((caps >= record["need_gb"]).sum()) < 20
    assert all(caps[c] >= record["need_gb"] for c in record["history"][0]["clients"])
    cfg = RunConfig.from_dict(tiny_config(memory_aware=True, rounds=1, window_from_memory=True))
    record = run(cfg, tmp_path / "chain", progress=False)
    task = build_task(cfg)
    bb = task.make_backbone()

    def peak(method, w):
        return get_method(method).peak_bytes(bb.config, w, batch_size=8, seq_len=seq_len(task.train),
                                             bottleneck=4, optimizer="sgd", dtype="float32").total
    capacity = caps * peak("full_adapters", 4) / LARGEST_DEVICE_GB
    smallest = capacity[capacity >= peak("chainfed", 1)].min()
    expected = max(w for w in range(1, 5) if peak("chainfed", w) <= smallest)
    assert record["window"] == expected
    assert record["need_gb"] == peak("chainfed", expected) / (peak("full_adapters", 4) / LARGEST_DEVICE_GB)


@pytest.mark.parametrize("change, message", [
    ({"fed": {"clients_per_round": 19, "memory_aware": True}}, "FedConfig.clients_per_round"),
    ({"fed": {"memory_scale": 1.0}}, "no client can fit"),
    ({"data": {"partition": "dirichlet", "alpha": 0.0}}, "DataConfig.alpha"),
    ({"fed": {"rounds": 0}}, "FedConfig.rounds"),
])
def test_bad_configs_fail_before_training(tmp_path, change, message):
    data = tiny_config()
    for section, values in change.items():
        data[section] = {**data[section], **values}
    with pytest.raises(ValueError, match=message):
        run(RunConfig.from_dict(data), tmp_path, progress=False)
    assert not (tmp_path / CHECKPOINT_FILE).exists()


def test_resume_refuses_a_different_config(tmp_path):
    run(RunConfig.from_dict(tiny_config(rounds=1)), tmp_path, progress=False)
    with pytest.raises(ValueError, match="different config"):
        run(RunConfig.from_dict(tiny_config(rounds=2, clients_per_round=2)), tmp_path, progress=False)
    metrics = tmp_path / METRICS_FILE
    metrics.write_text("")                              # the record the checkpoint stands for, lost
    with pytest.raises(ValueError, match="at round 1 but the metrics record has 0 rounds"):
        run(RunConfig.from_dict(tiny_config(rounds=1)), tmp_path, progress=False)


def test_record_carries_the_data_provenance(tmp_path):
    record = run(RunConfig.from_dict(tiny_config(rounds=1)), tmp_path, progress=False)
    task = build_task(RunConfig.from_dict(tiny_config(rounds=1)))
    labels = {split: np.bincount(ds["label"], minlength=3).tolist() for split, ds in
              (("train", task.train), ("test", task.test))}
    assert record["data"]["classes"] == ["0", "1", "2"]
    assert {s: list(c.values()) for s, c in record["data"]["counts"].items()} == labels
    assert sum(labels["train"]) == 200 and sum(labels["test"]) == 32
