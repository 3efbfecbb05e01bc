"""scripts/gpu_profile.py: the gpu profile's plan, its parallel batch within a budget, the
notebooks rendered on the records; end to end at the quick profile's size on the CPU."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import torch

from chainfed_core import experiments as ex
from chainfed_core import rounds
from chainfed_core.federated import run
from chainfed_core.records import RECORD_FILE

from runtime_checks import without_timing

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "gpu_profile.py"


def load_script():
    spec = importlib.util.spec_from_file_location("gpu_profile", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_tiny_batch_runs_with_two_workers_renders_and_resumes(tmp_path):
    """A copy of the code (so its records, reports and figures land in tmp_path, not in the
    repo): the Table 2 grid of the quick profile, 2 workers, rendered, packed; then the same
    command finds everything recorded."""
    for part in ("chainfed_core", "scripts", "notebooks"):
        shutil.copytree(ROOT / part, tmp_path / part, ignore=shutil.ignore_patterns("__pycache__", ".ipynb_checkpoints"))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    command = [sys.executable, str(tmp_path / "scripts" / "gpu_profile.py"), "--tiny", "--workers", "2",
               "--notebooks", "table2_threshold", "--budget-s", "300", "--out", str(tmp_path / "out")]
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = done.stdout
    assert "quick: 8 runs for table2_threshold; 0 recorded, 8 to run" in out
    assert "runs: 8 of 8 recorded, 0 left" in out and "the notebooks trained 0 runs the plan did not hold" in out
    records = list((tmp_path / "results" / "runs" / "quick").glob(f"*/{RECORD_FILE}"))
    assert len(records) == 8
    for name in ("table2_threshold", "claims"):
        assert (tmp_path / "reports" / "quick" / f"{name}.html").exists()
    assert (tmp_path / "reports" / "report_quick.html").exists()
    with tarfile.open(tmp_path / "out" / "quick.tar.gz") as archive:
        names = archive.getnames()
    assert sum(n.endswith(RECORD_FILE) for n in names) == 8 and "reports/report_quick.html" in names
    assert not any(n.endswith("checkpoint.pkl") for n in names)
    again = subprocess.run(command[:-2] + ["--no-render"], cwd=tmp_path, env=env, capture_output=True, text=True,
                           timeout=120)
    assert again.returncode == 0 and "8 recorded, 0 to run" in again.stdout, again.stdout + again.stderr


def test_a_run_stopped_at_its_deadline_resumes_to_the_uninterrupted_record(tmp_path, monkeypatch, one_thread):
    (cell,) = ex.grid("quick", ["ChainFed"], partitions=["iid"], overrides={"fed": {"rounds": 4}})
    whole = run(cell.config, tmp_path / "whole", progress=False)
    clock = iter([0.0, 0.0] + [1e12] * 10)         # two rounds start before the deadline, then it has passed

    class Clock:                                   # the round loop's clock; its timings as they are
        perf_counter = staticmethod(time.perf_counter)
        time = staticmethod(lambda: next(clock))
    monkeypatch.setattr(rounds, "time", Clock)
    stopped = run(cell.config, tmp_path / "stopped", progress=False, deadline=1.0)
    assert stopped == {"status": "stopped", "round": 2}
    assert not (tmp_path / "stopped" / RECORD_FILE).exists()
    monkeypatch.undo()
    resumed = run(cell.config, tmp_path / "stopped", progress=False)
    assert without_timing(resumed["history"]) == without_timing(whole["history"])


def test_the_gpu_full_profile_is_the_papers_protocol():
    p = ex.profile("gpu-full")
    (cell,) = ex.grid("gpu-full", ["ChainFed"], models=["minilm-l6"], datasets=["sarcasm"], partitions=["iid"], seeds=[0])
    c = cell.config
    assert (c.data.num_clients, c.fed.clients_per_round, c.fed.memory_aware, c.fed.fewer_eligible) == (100, 15, True, True)
    assert (c.train.optimizer, c.train.batch_size, c.train.local_epochs, c.model.max_length) == ("sgd", 8, 1, 256)
    assert (c.fed.stop_patience, c.fed.stop_tolerance, c.data.max_train_examples) == (5, 0.005, None)
    assert (c.chain.gpo_lambda, c.chain.foat_tau, c.train.device) == (0.2, 0.8, "cuda")
    assert p["seeds"] == [0, 1, 2, 3, 4] and p["threads"] == 1
    (bound,) = ex.grid("gpu-full", ["Full Adapters"], models=["minilm-l6"], datasets=["sarcasm"], partitions=["iid"],
                       seeds=[0])
    assert bound.config.fed.memory_aware is False            # the bounds run unconstrained


def test_the_plan_runs_each_run_once_seed_by_seed():
    gp = load_script()
    runs, by_artefact = gp.plan("quick", list(gp.ARTEFACTS))
    ids = [r.run_id for r in runs]
    assert len(ids) == len(set(ids)) == len({r.run_id for rs in by_artefact.values() for r in rs})
    assert [r.variant for r in runs[:2]] == ["ChainFed", "ChainFed"]          # the comparison that matters first
    assert [r.seed for r in runs] == sorted(r.seed for r in runs)


def test_the_estimate_adds_up_kernels_flops_and_rounds():
    """Exact arithmetic on a made-up cost record: K clients a round, each client's measured round
    scaled by its steps, an evaluation every eval_every rounds."""
    gp = load_script()
    (cell,) = ex.grid("quick", ["Full Adapters"], partitions=["iid"])
    cfg = cell.config
    measured = {"kernels": 100, "flops": 1e9, "cpu_s": 1.0, "steps": 2, "examples": 16}
    cost = {"datasets": {"synthetic": {"train": 4 * 8 * cfg.data.num_clients, "test": 64}},
            "models": {cell.model: {"client_round": {"Full Adapters": measured, "C2A": {"could_not_run": "no device"}},
                                    "evaluation": {"kernels": 10, "flops": 1e8, "cpu_s": 0.1, "examples": 32}}},
            "overhead": {"seconds_per_operator": 1e-4}}
    per_round = cfg.fed.clients_per_round * 100 * (4 / 2) + 10 * (64 / 32) / cfg.fed.eval_every
    assert gp.run_cost(cell, cost)["kernels_high"] == pytest.approx(per_round * cfg.fed.rounds)
    (c2a,) = ex.grid("quick", ["C2A"], partitions=["iid"])
    assert gp.run_cost(c2a, cost) == {}
    e = gp.estimate([cell], cost, workers=1)
    kernels = per_round * cfg.fed.rounds
    assert e["high/this_cpu_host"] == pytest.approx(max(kernels * 1e-4, kernels * gp.GPU_S_PER_KERNEL,
                                                        gp.run_cost(cell, cost)["flops_high"] / gp.FLOPS_PER_S))


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is here")
def test_the_gpu_profile_refuses_to_start_without_cuda(capsys):
    gp = load_script()
    assert gp.main(["--notebooks", "table4_ablation"]) == 2
    assert "train.device 'cuda', but torch" in capsys.readouterr().err


def test_a_cuda_throughput_record_replaces_the_stated_constants(tmp_path, monkeypatch):
    gp = load_script()
    record = {"device": "cuda:0 (NVIDIA H200)", "shapes": {"minilm-l6": {"runs": [
        {"workers": 1, "s_per_kernel": 3e-5}, {"workers": 12, "s_per_kernel": 4e-6}, {"workers": 16, "s_per_kernel": 1e-6}]}}}
    path = tmp_path / "gpu_throughput.json"
    path.write_text(json.dumps(record))
    monkeypatch.setattr(gp, "THROUGHPUT_RECORD", path)
    assert gp.measured_s_per_kernel(12) == (4e-6, "cuda:0 (NVIDIA H200), 12 workers, gpu_throughput.json")
    path.write_text(json.dumps({**record, "device": "cpu"}))             # a CPU record says nothing of the GPU
    assert gp.measured_s_per_kernel(12) is None


def test_a_round_going_at_the_hard_deadline_is_abandoned_and_the_run_resumes_bitwise(tmp_path, one_thread):
    spec = importlib.util.spec_from_file_location("run_profile", ROOT / "scripts" / "run_profile.py")
    run_profile = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run_profile)
    (cell,) = ex.grid("quick", ["Full Adapters"], partitions=["iid"], overrides={"fed": {"rounds": 60}})
    whole = ex.ensure_run(cell.config, tmp_path / "b")      # first: every lazy import done before the alarm
    _, _, status = run_profile._one(cell, str(tmp_path / "a"), 1, time.time() + 600, time.time() + 1.5)
    assert status == "interrupted" and not (tmp_path / "a" / cell.run_id / RECORD_FILE).exists()
    resumed = ex.ensure_run(cell.config, tmp_path / "a")
    assert without_timing(resumed["history"]) == without_timing(whole["history"])


def test_the_plan_holds_the_instruction_tuning_notebooks_runs_with_their_suites():
    """Table 3's, Figure 10's and App. F.2's runs are the configs their notebooks ask for, each once
    (Figure 10's shared point and F.2's SmolLM2 runs are Table 3's), with the suites each scores."""
    from chainfed_core import instruct_sensitivity as sens
    from chainfed_core import instruct_table as it

    gp = load_script()
    names = ["table3_instruction_tuning", "fig11_case_study", "fig10_llm_sensitivity", "appF2_generalization"]
    runs, by_artefact = gp.plan("quick", names)
    table3 = {ex.config_hash(it.run_config("quick", v)) for v in it.VARIANTS}
    assert {r.run_id for r in by_artefact["table3_instruction_tuning"]} == table3
    assert {r.run_id for r in by_artefact["fig11_case_study"]} == table3
    fig10 = {ex.config_hash(c) for k in sens.SWEEPS for _, c in sens.sweep_runs("quick", k)}
    f2 = {ex.config_hash(c) for _, c in sens.f2_runs("quick")}
    assert {r.run_id for r in by_artefact["fig10_llm_sensitivity"]} == fig10
    assert len(fig10) == 5                                               # λ and τ share the point 0.2 / 0.8
    assert {r.run_id for r in by_artefact["appF2_generalization"]} == f2 and len(f2) == 6
    assert len(runs) == len(table3 | fig10 | f2) == 6 + 4 + 4          # the shared point and SmolLM2's F.2 runs once
    assert all(r.evals == it.profile("quick")["evals"] for r in runs if r.run_id in table3)
    assert all(r.evals == sens.profile("quick")["evals"] and r.dataset == "alpaca" for r in runs)


def test_a_worker_runs_an_instruction_run_and_scores_its_suites(tmp_path, one_thread):
    spec = importlib.util.spec_from_file_location("run_profile", ROOT / "scripts" / "run_profile.py")
    run_profile = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run_profile)
    gp = load_script()
    cell = next(r for r in gp.plan("quick", ["table3_instruction_tuning"])[0] if r.variant == "Full Adapters")
    run_id, _, status = run_profile._one(cell, str(tmp_path), 1)
    record = json.loads((tmp_path / run_id / RECORD_FILE).read_text())
    assert status == "complete" and record["final_eval"]["evals"] == cell.evals == {"mmlu": 8}
    assert record["final_eval"]["mmlu"]["n"] == 8
