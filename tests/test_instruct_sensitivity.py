"""Figure 10's sweeps and Appendix F.2's runs (chainfed_core.instruct_sensitivity): configs that
differ from Table 3's only where they should, the shared point's hash, bad sweep input refused
before anything runs, "not run" rows, and the cpu estimate's arithmetic."""

import json
import math

import pytest

from chainfed_core import experiments as ex
from chainfed_core import instruct_cost as cost
from chainfed_core import instruct_sensitivity as sens
from chainfed_core import instruct_table as it

PROFILES = ("quick", "cpu", "gpu-full")


def _leaves(d: dict, prefix=()) -> dict:
    out = {}
    for k, v in d.items():
        out.update(_leaves(v, prefix + (k,)) if isinstance(v, dict) else {prefix + (k,): v})
    return out


def _changed(a, b) -> set:
    la, lb = _leaves(a.to_dict()), _leaves(b.to_dict())
    return {k for k in la.keys() | lb.keys() if la.get(k) != lb.get(k)}


@pytest.mark.parametrize("profile", PROFILES)
@pytest.mark.parametrize("sweep", ["lambda", "tau"])
def test_sweep_points_differ_only_in_the_swept_field(profile, sweep):
    base, field = sens.base_config(profile), sens.SWEEPS[sweep]
    configs = sens.sweep_configs(profile, sweep)
    assert list(configs) == list(sens.PROFILES[profile][sweep])
    for value, cfg in configs.items():
        assert getattr(cfg.chain, field) == value
        assert _changed(cfg, base) <= {("chain", field)}
    assert len({ex.config_hash(c) for c in configs.values()}) == len(configs)


@pytest.mark.parametrize("profile", PROFILES)
def test_shared_point_is_table3_w2_run(profile):
    w2 = ex.config_hash(it.run_config(profile, "ChainFed W=2"))
    assert ex.config_hash(sens.sweep_configs(profile, "lambda", [0.2])[0.2]) == w2
    assert ex.config_hash(sens.sweep_configs(profile, "tau", [0.8])[0.8]) == w2
    f2 = {(lab["decoder"], lab["variant"]): ex.config_hash(cfg) for lab, cfg in sens.f2_runs(profile)}
    assert f2[("smollm2-135m", "ChainFed W=2")] == w2
    assert f2[("smollm2-135m", "Full Adapters")] == ex.config_hash(it.run_config(profile, "Full Adapters"))
    assert len(set(f2.values())) == len(f2)


def test_cpu_shared_point_is_the_committed_record():
    assert ex.config_hash(sens.base_config("cpu")) == "6c798bfa3f87"     # Table 3's cpu ChainFed W = 2


@pytest.mark.parametrize("profile", PROFILES)
def test_f2_decoders_differ_only_in_model_rounds_and_steps(profile):
    for lab, cfg in sens.f2_runs(profile):
        table3 = it.run_config(sens.PROFILES[profile]["table3"], lab["variant"])
        allowed = {("model", "name"), ("fed", "rounds"), ("fed", "eval_every"), ("train", "local_steps")}
        assert _changed(cfg, table3) <= allowed
        assert (cfg.model.name == table3.model.name) == (lab["decoder"] == "smollm2-135m")


@pytest.mark.parametrize("sweep, bad, field", [
    ("lambda", [0.2, -0.1], "ChainConfig.gpo_lambda"), ("lambda", [1.5], "ChainConfig.gpo_lambda"),
    ("tau", [0.8, 0.0], "ChainConfig.foat_tau"), ("tau", [1.2], "ChainConfig.foat_tau"),
    ("tau", [float("nan")], "ChainConfig.foat_tau"), ("lambda", ["0.2"], "ChainConfig.gpo_lambda"),
    ("lambda", [], "ChainConfig.gpo_lambda"), ("tau", [0.8, 0.8], "ChainConfig.foat_tau")])
def test_bad_sweep_input_names_the_field_before_any_run(monkeypatch, tmp_path, sweep, bad, field):
    def no_run(*args, **kwargs):
        raise AssertionError("a run started")
    monkeypatch.setattr(ex, "ensure_run", no_run)
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        sens.frame_of("quick", sens.sweep_runs("quick", sweep, bad), tmp_path)
    assert not any(tmp_path.iterdir())


def test_unknown_sweep_profile_decoder_refused():
    with pytest.raises(ValueError, match="sweep"):
        sens.sweep_configs("quick", "window")
    with pytest.raises(ValueError, match="profile"):
        sens.profile("cpu-huge")
    with pytest.raises(ValueError, match="decoder"):
        sens.decoder_config("cpu", "llama2-7b", "Full Adapters")


def test_missing_asset_is_not_run_with_its_reason(tmp_path):
    cfg = sens.derived(sens.base_config("quick"), model={"name": "no-such-decoder-0b"})
    out = sens.outcome(cfg, tmp_path, {"mmlu": 8})
    assert out["status"] == sens.NOT_RUN and out["record"] is None
    assert out["reason"].startswith("AssetError:") and "no-such-decoder-0b" in out["reason"]
    row = sens.row(cfg, out, decoder="x")
    assert math.isnan(row["MMLU"]) and row["status"] == sens.NOT_RUN
    assert not any(tmp_path.iterdir())


def test_run_missing_false_reads_only(monkeypatch, tmp_path):
    monkeypatch.setattr(ex, "ensure_run", lambda *a, **k: pytest.fail("ran"))
    frame = sens.frame_of("cpu", sens.f2_runs("cpu"), tmp_path, run_missing=False)
    assert (frame["status"] == sens.NOT_RUN).all() and frame["reason"].str.contains("run_missing=False").all()
    table = sens.f2_table(frame)
    assert list(table.index) == list(sens.DECODERS) and table["gain"].isna().all()


def _record(tmp_path, cfg, evals, **extra):
    folder = tmp_path / ex.config_hash(cfg)
    folder.mkdir()
    record = {"config": cfg.to_dict(), "history": [{"test_loss": 2.0}], "start_layer": 1, "wall_s": 9.0,
              "final_eval": {"evals": evals, "mmlu": {"subject_average": 0.3, "micro_accuracy": 0.25,
                                                      "predictions": [[i, 0, 0] for i in range(8)]}}, **extra}
    (folder / "record.json").write_text(json.dumps(record))
    return record


def test_a_record_that_scored_more_is_reused_one_that_scored_less_refused(tmp_path):
    cfg = sens.base_config("quick")
    _record(tmp_path, cfg, {"mmlu": 8, "crass": None})
    out = sens.outcome(cfg, tmp_path, {"mmlu": 8})
    row = sens.row(cfg, out, **{"lambda": 0.2})
    assert (row["MMLU"], row["MMLU micro"], row["questions"], row["held-out loss"]) == (30.0, 25.0, 8, 2.0)
    with pytest.raises(ValueError, match="scored"):
        sens.outcome(cfg, tmp_path, {"mmlu": None})


def test_start_layers_from_foat_scores():
    record = {"foat_scores": [0.78, 0.63, 0.06, 0.9]}
    assert sens.start_layers(record, [0.6, 0.7, 0.8, 1.0]) == {0.6: 2, 0.7: 1, 0.8: 0, 1.0: 0}
    assert sens.start_layers(None, [0.8]) == {0.8: None}


def test_best_and_shape_skip_runs_not_done():
    import pandas as pd
    frame = pd.DataFrame({"lambda": [0.0, 0.2, 0.5], "MMLU": [24.0, 26.0, math.nan],
                          "held-out loss": [2.0, 1.5, math.nan], "status": ["done", "done", sens.NOT_RUN]})
    assert sens.best(frame, "lambda", "MMLU") == 0.2
    assert sens.best(frame, "lambda", "held-out loss", lowest=True) == 0.2
    assert sens.best(frame.assign(MMLU=[26.0, 26.0, 1.0]), "lambda", "MMLU") == "0, 0.2 (tied)"
    empty = frame.assign(status=sens.NOT_RUN)
    shape = sens.fig10_shape(frame, empty.rename(columns={"lambda": "tau"}))
    assert shape.loc["ours, by MMLU", "best λ"] == 0.2 and shape.loc["ours, by MMLU", "best τ"] == sens.TOO_FEW
    assert sens.best(frame.assign(status=["done", sens.NOT_RUN, sens.NOT_RUN]), "lambda", "MMLU") is None
    assert list(shape.loc["paper (LLaMA2-7B, Figure 10)"]) == [0.2, 0.8]


def test_f2_paper_gains():
    paper = sens.f2_paper()["ChainFed − Full Adapters (MMLU pts)"]
    assert (paper["TinyLLaMA"], paper["LLaMA3.2-3B"], paper["LLaMA2-7B"]) == (1.66, 4.73, 1.49)


def test_axis_limits_do_not_magnify_a_small_difference():
    low, high = sens.axis_limits([25.0, 25.35], min_span=7.0)
    assert high - low >= 7.0 and low < 25.0 < 25.35 < high
    assert sens.axis_limits([1.0, 9.0], min_span=2.0) == pytest.approx((0.6, 9.4))
    assert sens.axis_limits([12.5], min_span=250.0, bounds=(0.0, 100.0)) == (0.0, 100.0)
    low, high = sens.axis_limits([1.0, 2.0], min_span=7.0, bounds=(0.0, 100.0))
    assert low == 0.0 and high == pytest.approx(7.7)     # 1 +- 3.35 around 1.5, shifted up by 2.35


def test_estimate_seconds_scales_the_base_record():
    cfg = sens.decoder_config("cpu", "qwen2.5-coder-0.5b", "ChainFed W=2")   # 23 rounds of 3 steps
    base = {"config": it.run_config("cpu", "ChainFed W=2").to_dict(), "wall_s": 1000.0,
            "history": [{"seconds_train": 10.0}] * 29,
            "final_eval": {"evals": {}, "mmlu": {"seconds": 100.0, "predictions": [[0, 0, 0]] * 282},
                           "crass": {"seconds": 50.0}}}
    measured = {"ratio_to_base": {"qwen2.5-coder-0.5b": {"chainfed": 4.0, "full_adapters": 3.0, "forward": 2.0}}}
    # train 290 s x 23/29 rounds x 3/10 steps x 4; the rest (1000 - 290 - 150) x 2; MMLU 100 x 2
    expected = 290 * 23 / 29 * 0.3 * 4 + 560 * 2 + 200
    assert cost.estimate_seconds(cfg, base, measured) == pytest.approx(expected)
    assert cost.estimate_seconds(cfg, base, measured, 141) == pytest.approx(expected - 100)
    with pytest.raises(ValueError, match="ModelConfig.name"):
        cost.estimate_seconds(sens.base_config("quick"), base, measured)


def test_a_gemma3_decoder_runs(tmp_path):
    cfg = sens.derived(it.run_config("quick", "Full Adapters"), model={"name": "tiny-gemma3-L4-H32"},
                       fed={"rounds": 1, "eval_every": 1}, train={"local_steps": 1})
    out = sens.outcome(cfg, tmp_path, {"mmlu": 2})
    assert out["status"] == "done" and out["record"]["final_eval"]["mmlu"]["micro_accuracy"] is not None


def test_f2_table_and_claim_from_rows():
    import pandas as pd
    rows = [{"decoder": "a", "model": "a", "variant": v, "MMLU": m, "MMLU micro": m, "questions": 282, "status": "done",
             "reason": ""} for v, m in (("Full Adapters", 24.0), ("ChainFed W=2", 25.5))]
    rows += [{"decoder": "b", "model": "b", "variant": v, "MMLU": math.nan, "MMLU micro": math.nan, "questions": math.nan,
              "status": sens.NOT_RUN, "reason": "AssetError: no b"} for v in sens.F2_VARIANTS]
    table = sens.f2_table(pd.DataFrame(rows))
    assert table.loc["a", "gain"] == pytest.approx(1.5) and table.loc["a", "one question (pts)"] == pytest.approx(100 / 282)
    assert math.isnan(table.loc["b", "gain"]) and table.loc["b", "not run"] == "AssetError: no b"
    claim = sens.f2_claim(table)
    assert "a: ChainFed W=2 25.50 vs Full Adapters 24.00 (+1.50 points, holds" in claim
    assert "b: not run (AssetError: no b)" in claim


def test_panels_that_share_a_y_axis_keep_every_panels_points_in_view():
    """Figure 10's λ and τ panels share y: the τ panel drawn last must not crop the λ panel's points."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    lam = pd.DataFrame({"lambda": [0.0, 0.5, 1.0], "held-out loss": [4.71, 4.85, 4.97], "status": ["done"] * 3})
    tau = pd.DataFrame({"tau": [0.8], "held-out loss": [4.77], "status": ["done"]})
    fig, (left, right) = plt.subplots(1, 2, sharey="row")
    sens.plot_sweep(left, lam, "lambda", "held-out loss", min_span=0.1, xlabel="λ")
    sens.plot_sweep(right, tau, "tau", "held-out loss", min_span=0.1, xlabel="τ")
    low, high = left.get_ylim()
    plt.close(fig)
    assert low < 4.71 and high > 4.97
