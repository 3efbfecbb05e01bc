"""What a reader sees: number formatting, readable tables, clean executed notebooks with their
figures, the report index, and provenance read once per process."""

import importlib.util
import json
import math
import re
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import numpy as np
import pandas as pd
import pytest

from chainfed_core import display, paper, records

REPO = Path(__file__).resolve().parent.parent


def _run_batch():
    spec = importlib.util.spec_from_file_location("run_batch", REPO / "scripts" / "run_batch.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("value, shown", [
    (0.83754, "0.838"), (70.93, "70.9"), (1234.5, "1,230"), (0.5, "0.500"), (0.9996, "1.00"),
    (99.96, "100"), (-3.14159, "-3.14"), (1e-5, "0.0000100"), (0.0, "0"), (12, "12"), (np.int64(30000), "30,000"),
    (np.float64(7.071391), "7.07"), (math.nan, "–"), (None, "–"), ("not found", "not found"), (True, "True"),
])
def test_sig_shows_three_significant_digits_without_exponent(value, shown):
    assert display.sig(value) == shown


def test_styled_renames_and_formats_the_view_only():
    df = pd.DataFrame({"method": ["ChainFed", "LP"], "accuracy": [70.931, 61.0], "note": ["", "not yet run"]})
    before = df.copy()
    page = display.styled(df, {"accuracy": "accuracy (%)"}, caption="Test accuracy", hide_index=True).to_html()
    assert "accuracy (%)" in page and "70.9<" in page and "61.0<" in page and "not yet run" in page
    assert "70.931" not in page and "<caption>Test accuracy</caption>" in page
    pd.testing.assert_frame_equal(df, before)


def test_runs_table_gives_units_and_hides_internals():
    df = pd.DataFrame({"variant": ["ChainFed"], "method": ["chainfed"], "run_id": ["abc"], "curve": [[(1, 0.5, 10)]],
                       "accuracy": [0.70931], "bytes_total": [3 * 2 ** 20], "wall_s": [1234.5],
                       "peak_memory_bytes": [2 ** 20], "peak memory (MB)": [1.0]})
    page = display.runs_table(df).to_html()
    for header in ("test accuracy (%)", "exchanged (MB)", "wall time (s)", "peak memory (MB)"):
        assert header in page
    assert ">70.9<" in page and ">3.00<" in page and ">1,230<" in page
    assert "run_id" not in page and "curve" not in page and ">chainfed<" not in page
    assert page.count("peak memory (MB)") == 1     # the notebook's own column wins over the raw bytes


def test_runs_table_says_a_label_every_run_shares_once():
    df = pd.DataFrame({"variant": ["ChainFed", "LP"], "model": ["tiny", "tiny"], "seed": [0, 0],
                       "partition": ["iid", "dirichlet"], "accuracy": [0.5, 0.6]})
    page = display.runs_table(df).to_html()
    assert "<caption>Every run: model tiny, seed 0</caption>" in page
    assert ">model<" not in page and ">seed<" not in page and ">dirichlet<" in page


def test_method_labels_come_from_the_registry():
    from chainfed_core.methods import get_method

    assert display.method_label("full_adapters") == get_method("full_adapters").label == "Full Adapters"
    assert display.method_label("W=3") == "W=3"


def test_without_stderr_keeps_results_and_errors():
    cell = nbformat.v4.new_code_cell("x")
    cell.outputs = [nbformat.v4.new_output("stream", name="stderr", text="\rgrid: 50%"),
                    nbformat.v4.new_output("stream", name="stdout", text="accuracy 0.8\n"),
                    nbformat.v4.new_output("display_data", data={"image/png": "iVBOR"}),
                    nbformat.v4.new_output("error", ename="ValueError", evalue="bad", traceback=[])]
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_markdown_cell("# t"), cell])
    kept = [o.get("name", o.output_type) for o in _run_batch().without_stderr(nb).cells[1].outputs]
    assert kept == ["stdout", "display_data", "error"]


def test_a_silent_cell_gets_a_line_that_it_still_runs(capsys):
    batch = _run_batch()
    cell = nbformat.v4.new_code_cell("# train\nrecords = run_everything()")
    with batch.CellProgress("nb", code_cells=3, heartbeat_s=0.3) as progress:
        progress.start(cell, 1)
        time.sleep(1.6)
        progress.finish(cell, 1)
        progress.stream(sys.stderr).write("a progress bar\n")
        time.sleep(0.5)                                  # no cell runs: no heartbeat
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == "[nb 0:00] cell 1/3: records = run_everything()"
    beats = [line for line in lines if "still running" in line]
    assert beats and re.search(r"cell 1/3 still running \(0:0\d\)$", beats[0]) and len(beats) <= 6
    assert lines[-1] == "a progress bar"


def test_code_version_is_read_once_at_import(monkeypatch):
    first = records.code_version()

    def no_git(*args, **kwargs):
        raise AssertionError("code_version ran git again")

    monkeypatch.setattr(subprocess, "run", no_git)
    assert records.code_version() == first


def test_code_version_is_dirty_for_code_not_for_outputs(tmp_path):
    """A rewritten summary or figure does not mark the code dirty; an edited module does."""
    def git(*args):
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=tmp_path,
                       check=True, capture_output=True)

    for path in ("results/a/summary.json", "figures/a.png", "chainfed_core/m.py"):
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text("0")
    git("init", "-q")
    git("add", ".")
    git("commit", "-qm", "init")
    clean = records._read_code_version(tmp_path)
    assert clean and not clean.endswith("+dirty")
    (tmp_path / "results/a/summary.json").write_text("1")
    (tmp_path / "figures/a.png").write_text("1")
    assert records._read_code_version(tmp_path) == clean
    (tmp_path / "chainfed_core/m.py").write_text("1")
    assert records._read_code_version(tmp_path) == clean + "+dirty"


def test_executed_report_has_its_figures_and_no_stderr(tmp_path, monkeypatch, capfd):
    """A result notebook run as `make report` runs it: figures inline even with MPLBACKEND=Agg
    in the environment, tables formatted, no stderr kept, progress on the terminal."""
    batch = _run_batch()
    monkeypatch.setenv("MPLBACKEND", "Agg")
    name = "table4_ablation"
    result = batch.execute(REPO / "notebooks" / f"{name}.ipynb", tmp_path / f"{name}.ipynb", {"profile": "quick"})
    assert result["error"] is None
    nb = nbformat.read(tmp_path / f"{name}.ipynb", as_version=4)
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert any("image/png" in o.get("data", {}) for o in outputs)
    assert not [o for o in outputs if o.output_type == "stream" and o.name == "stderr"]
    assert "text/markdown" in outputs[-1]["data"]          # ends on a sentence, not a raw dict
    page = (tmp_path / f"{name}.html").read_text()
    assert "<img" in page and "test accuracy (%)" in page
    terminal = capfd.readouterr().err
    assert re.search(rf"\[{name} \d+:\d\d\] cell 1/", terminal)        # the clock depends on the machine's load
    assert "grid (" in terminal and f"[{name}] done" in terminal

    index = batch.write_index([result], "quick", tmp_path, index=tmp_path / "report_quick.html").read_text()
    assert "Table 4" in index and f"{name}.html" in index and "not reported" in index
    assert "not found" not in index


def test_the_report_opens_with_the_claims_table(tmp_path):
    batch = _run_batch()
    # quick: its outputs are git-ignored (at cpu-full the notebook would rewrite a committed summary)
    result = batch.execute(REPO / "notebooks" / "claims.ipynb", tmp_path / "claims.ipynb", {"profile": "quick"})
    assert result["error"] is None and result["name"] == batch.CLAIMS
    index = batch.write_index([result], "quick", tmp_path, index=tmp_path / "report.html").read_text()
    assert 'class="dataframe claims"' in index
    for text in ("Table 1: ChainFed beats Full Adapters", "Peak memory: Full Adapters / ChainFed", "verdict"):
        assert text in index
    assert "reproduced" in index                    # the memory claims read the committed benchmark records


def test_a_baseline_no_device_holds_reads_as_the_papers_dash_on_the_claims_page(tmp_path):
    from chainfed_core import claims

    cell = {"model": "m", "dataset": "d", "partition": "iid", "seed": 0, "test_examples": 100}
    runs = [{**cell, "variant": "ChainFed", "status": "complete", "accuracy": 0.8},
            {**cell, "variant": "Full Adapters", "status": "complete", "accuracy": 0.7},
            {**cell, "variant": "C2A", "status": "could not run", "accuracy": None}]
    where = tmp_path / "results" / "table1_main_results" / "p"
    where.mkdir(parents=True)
    (where / "summary.json").write_text(json.dumps({"runs": runs}))
    rows = {r.claim: r for r in claims.table1_claims("p", repo=tmp_path)}
    assert rows["Table 1: ChainFed beats C2A"].ours.startswith("— (no device holds C2A")
    assert rows["Table 1: ChainFed beats C2A"].verdict == claims.NOT_RUN
    assert rows["Table 1: ChainFed beats FLoRA"].ours == claims.NOT_RUN          # no record at all
    assert rows["Table 1: ChainFed beats Full Adapters (average points, DistilBERT role)"].verdict != claims.NOT_RUN


def test_convergence_claims_pool_every_paired_run_with_a_range_over_seeds(tmp_path):
    """Speed-up and communication reduction come from Table 1's paired runs (one ratio per cell
    and seed): geometric mean, range at ± 2 SE of the log over seeds; a range across 1 is
    "not distinguishable", one wholly above 1 "reproduced"; without Table 1, Table 2's τ = 0.8."""
    import math

    import pandas as pd

    from chainfed_core import claims, tables

    def write(artefact, runs):
        where = tmp_path / "results" / artefact / "p"
        where.mkdir(parents=True)
        (where / "summary.json").write_text(json.dumps({"runs": runs}))

    def run(variant, seed, dataset, speedup, comm):
        return {"variant": variant, "model": "m", "dataset": dataset, "partition": "iid", "seed": seed,
                "status": "complete", "speedup": speedup, "comm_reduction": comm}

    write("table2_threshold", [run("tau=0.8", 0, "d", 4.0, 4.0)])
    rows = claims.convergence_claims("p", repo=tmp_path)
    assert rows[0].ours == "4.00x (1 seed, 1 run)" and rows[0].verdict == claims.UNCLEAR
    assert rows[0].record == "results/table2_threshold/p/summary.json"
    table1 = [run("ChainFed", s, d, sp, c) for s, d, sp, c in [(0, "a", 0.5, 3.0), (0, "b", 2.0, 3.0),
                                                                (1, "a", 1.2, 2.9), (1, "b", 1.0, 3.1),
                                                                (2, "a", 0.9, 3.0), (2, "b", 1.1, 3.0)]]
    write("table1_main_results", table1 + [run("Full Adapters", 0, "a", 1.0, 1.0)])
    ratio, _, seeds, n = tables.paired_ratio(pd.DataFrame(table1), "ChainFed", "speedup")
    per_seed = [0.0, math.log(1.2) / 2, (math.log(0.9) + math.log(1.1)) / 2]
    assert (seeds, n) == (3, 6) and math.isclose(ratio, math.exp(sum(per_seed) / 3))
    speed, comm = claims.convergence_claims("p", repo=tmp_path)
    assert speed.record == "results/table1_main_results/p/summary.json" and "(3 seeds, 6 runs)" in speed.ours
    assert speed.verdict == claims.UNCLEAR and comm.verdict == claims.REPRODUCED
    assert comm.ours.startswith("3.00x [")
