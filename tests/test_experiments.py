"""Experiment grids: stable hashing, variant fields, run-only-what-is-missing, tables."""

import json
import math
import re

import pandas as pd
import pytest

from chainfed_core import experiments as ex
from chainfed_core.config import RunConfig
from chainfed_core.records import RECORD_FILE


def test_config_hash_is_stable_and_order_free():
    a = RunConfig.from_dict({"method": "chainfed", "chain": {"window": 3}})
    b = RunConfig.from_dict({"chain": {"window": 3}, "method": "chainfed"})
    assert ex.config_hash(a) == ex.config_hash(b) == ex.config_hash(a.to_dict())
    assert len(ex.config_hash(a)) == 12
    assert ex.config_hash(a) != ex.config_hash(a.replace(seed=1))
    # The hash of a config survives a JSON round trip (what record.json stores).
    assert ex.config_hash(json.loads(json.dumps(a.to_dict()))) == ex.config_hash(a)


def test_ablation_variants_set_the_right_fields():
    runs = {r.variant: r.config for r in ex.grid("quick", ["ChainFed", "w/o DLCT", "w/o GPO", "w/o FOAT"],
                                                  partitions=["iid"])}
    full = runs["ChainFed"]
    assert full.method == "chainfed" and full.chain.window == 2
    assert runs["w/o DLCT"].chain.window == 1
    assert runs["w/o GPO"].chain.gpo_lambda == 0.0
    assert runs["w/o FOAT"].chain.foat_tau == 1.0
    # Each ablation changes exactly one field of the full method.
    for name, field, value in [("w/o DLCT", "window", 1), ("w/o GPO", "gpo_lambda", 0.0), ("w/o FOAT", "foat_tau", 1.0)]:
        assert runs[name] == full.replace(chain=full.chain.replace(**{field: value}))


def test_baseline_variants_map_to_methods():
    methods = {r.variant: r.config.method for r in ex.grid("quick", ["No-FT", "LP", "FFT", "Full Adapters"],
                                                           partitions=["iid"])}
    assert methods == {"No-FT": "no_ft", "LP": "linear_probe", "FFT": "fft", "Full Adapters": "full_adapters"}


def test_grid_covers_every_cell_and_rounds_follow_the_chain():
    runs = ex.grid("quick", ["ChainFed", "FFT"], seeds=[0, 1])
    assert len(runs) == 2 * 1 * 1 * 2 * 2
    assert len({r.run_id for r in runs}) == len(runs)
    p = ex.profile("quick")
    assert all(r.config.fed.rounds == p["base"]["chain"]["passes"] * 6 for r in runs)   # tiny-bert-L6
    assert ex.grid("quick", ["ChainFed"], overrides={"fed": {"rounds": 2}})[0].config.fed.rounds == 2


def test_explicit_defaults_let_sweeps_reuse_chainfed():
    base = ex.grid("quick", ["ChainFed"], partitions=["iid"])[0]
    for v in [ex.chainfed("tau=0.9", foat_tau=0.9), ex.chainfed("lambda=0.1", gpo_lambda=0.1),
              ex.chainfed("W=2", window=2)]:
        assert ex.grid("quick", [v], partitions=["iid"])[0].run_id == base.run_id


def test_unknown_names_are_rejected():
    with pytest.raises(ValueError, match="profile"):
        ex.profile("huge")
    with pytest.raises(ValueError, match="variant"):
        ex.grid("quick", ["FedProx"])


def test_run_grid_runs_only_what_is_missing(tmp_path, capsys):
    calls = []

    def fake_run(config, folder, progress=False):
        calls.append(ex.config_hash(config))
        history = [{"round": r, "bytes_up": 10, "bytes_down": 5, "bytes_down_context": 0,
                    "test_accuracy": 0.5 + 0.1 * r} for r in range(config.fed.rounds)]
        record = {"config": config.to_dict(), "history": history, "window": config.chain.window, "start_layer": 0}
        folder.mkdir(parents=True, exist_ok=True)
        (folder / RECORD_FILE).write_text(json.dumps(record))
        return record

    runs = ex.grid("quick", ["ChainFed", "Full Adapters"], partitions=["iid"], overrides={"fed": {"rounds": 3}})
    df = ex.run_grid(runs[:1], tmp_path, progress=False, runner=fake_run)
    assert len(calls) == 1 and (tmp_path / runs[0].run_id / RECORD_FILE).exists()
    df = ex.run_grid(runs, tmp_path, progress=False, runner=fake_run, run_missing=False)
    assert len(calls) == 1 and list(df["variant"]) == ["ChainFed"]         # the missing run left out, not trained
    assert "not run yet (run_missing=False): Full Adapters x 1" in capsys.readouterr().out
    df = ex.run_grid(runs, tmp_path, progress=False, runner=fake_run)
    assert calls == [runs[0].run_id, runs[1].run_id]          # the first run was reused
    assert list(df["variant"]) == ["ChainFed", "Full Adapters"]
    assert df["accuracy"].tolist() == pytest.approx([0.7, 0.7])
    assert df["bytes_total"].tolist() == [45, 45]
    ex.run_grid(runs, tmp_path, progress=False, runner=fake_run)
    assert len(calls) == 2


def test_record_with_a_different_config_is_refused(tmp_path):
    run = ex.grid("quick", ["ChainFed"], partitions=["iid"])[0]
    folder = tmp_path / run.run_id
    folder.mkdir()
    (folder / RECORD_FILE).write_text(json.dumps({"config": run.config.replace(seed=7).to_dict()}))
    with pytest.raises(ValueError, match="different config"):
        ex.ensure_run(run.config, tmp_path, runner=lambda *a, **k: pytest.fail("must not run"))


def test_real_run_then_reuse(tmp_path):
    """A real tiny federated run: the second call reads record.json instead of training."""
    runs = ex.grid("quick", ["ChainFed"], partitions=["iid"], overrides={"fed": {"rounds": 2}})
    first = ex.run_grid(runs, tmp_path, progress=False)
    assert 0.0 <= first["accuracy"][0] <= 1.0 and first["rounds"][0] == 2
    second = ex.run_grid(runs, tmp_path, progress=False,
                         runner=lambda *a, **k: pytest.fail("an existing run must be reused"))
    pd.testing.assert_frame_equal(first, second)


def test_accuracy_table_marks_unimplemented_baselines():
    df = pd.DataFrame([{"model": "m", "dataset": "d", "partition": "iid", "variant": v, "accuracy": a, "seed": 0}
                       for v, a in [("ChainFed", 0.8), ("FFT", 0.9)]])
    assert ex.missing_baselines() == []            # every baseline of the paper's Table 1 is registered
    table = ex.accuracy_table(df, ["FFT", "ChainFed"], not_implemented=["FedProx"])
    assert table.loc[("m", "d", "iid"), "ChainFed"] == 80.0
    assert list(table.columns) == ["FFT", "ChainFed", "FedProx"] and table["FedProx"].iloc[0] == ex.NOT_YET_RUN


def test_summary_keeps_numbers_only(tmp_path):
    table = pd.DataFrame({"ChainFed": [80.0], "C2A": [ex.NOT_YET_RUN]}, index=["sarcasm"]).astype(object)
    summary = ex.write_summary(tmp_path / "s.json", table, profile_name="quick", artefact="t")
    assert summary["metrics"] == {"sarcasm/ChainFed": 80.0}
    assert json.loads((tmp_path / "s.json").read_text())["metrics"] == summary["metrics"]


def test_peak_memory_orders_methods():
    cfgs = {r.variant: r.config for r in ex.grid("quick", ["ChainFed", "Full Adapters", "FFT", "LP"],
                                                 partitions=["iid"])}
    mem = {k: ex.peak_memory_bytes(c) for k, c in cfgs.items()}
    assert mem["ChainFed"] < mem["Full Adapters"] < mem["FFT"] and mem["LP"] < mem["Full Adapters"]
    chain = cfgs["ChainFed"]
    assert ex.peak_memory_bytes(chain, 2) < ex.peak_memory_bytes(chain, 4)



def test_the_cpu_profile_follows_the_papers_protocol():
    runs = {r.variant: r.config for r in ex.grid("cpu", ["ChainFed", "FedRA", "LP", *ex.BOUNDS], datasets=["sarcasm"],
                                                 partitions=["iid"], seeds=[0])}
    for name, cfg in runs.items():
        bound = name in ex.BOUNDS
        assert cfg.fed.memory_aware is not bound and (cfg.fed.memory_scale is None) is not bound, name
        assert (cfg.fed.clients_per_round, cfg.data.num_clients, cfg.fed.stop_patience) == (15, 100, 5)
        assert cfg.data.max_train_examples == 6000 and cfg.data.max_test_examples == 2000
    assert (runs["ChainFed"].chain.gpo_lambda, runs["ChainFed"].chain.foat_tau) == (0.2, 0.8)   # DistilBERT's, D.3


def _run_profile_script():
    """scripts/run_profile.py as a module."""
    import importlib.util

    path = ex.Path(__file__).resolve().parent.parent / "scripts" / "run_profile.py"
    spec = importlib.util.spec_from_file_location("run_profile", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


def test_run_profile_lists_what_is_left_and_refuses_unknown_variants(capsys):
    script = _run_profile_script()
    assert script.main(["--profile", "quick", "--variants", "LP", "ChainFed", "--dry-run"]) == 0
    out = capsys.readouterr().out.splitlines()
    head = re.fullmatch(r"quick: 4 runs, (\d) recorded, (\d) to run", out[0])      # both partitions of each
    assert head and int(head[1]) + int(head[2]) == 4 and len(out) == 1 + int(head[2])   # one line per run left
    with pytest.raises(SystemExit):
        script.main(["--profile", "quick", "--variants", "Chainfed"])
    assert "variant: 'Chainfed' is not one of" in capsys.readouterr().err


def test_run_profile_takes_a_notebooks_runs_by_artefact_name(capsys):
    from chainfed_core.profile_plan import plan

    script = _run_profile_script()
    args = script.argparse.Namespace(profile="cpu", artefacts=["table2_threshold", "table4_ablation"],
                                     datasets=None, partitions=None, seeds=None)
    runs = script.ordered_runs(args)
    assert [r.run_id for r in runs] == [r.run_id for r in plan("cpu", args.artefacts)[0]]
    assert "w/o DLCT" in [r.variant for r in runs] and "tau=0.9" in [r.variant for r in runs]
    assert script.ordered_runs(script.argparse.Namespace(**{**vars(args), "seeds": [1]})) == []
    with pytest.raises(SystemExit):
        script.main(["--profile", "cpu", "--artefacts", "table9"])
    assert "--artefacts: ['table9'] not among" in capsys.readouterr().err
    with pytest.raises(SystemExit):                  # one selection or the other
        script.main(["--profile", "cpu", "--artefacts", "table2_threshold", "--variants", "LP"])
