"""Local data files: where a folder keeps its splits, how each file is read, which columns hold text and label.

The paper's four datasets are distributed as CSV / JSON / JSONL / Parquet files, some of
them headerless CSV; :data:`LAYOUTS` names each one's classes and, for headerless CSV, its
columns. :func:`split_files` finds the ``train`` / ``test`` files of a file or folder
without reading them, :func:`read_files` reads one split through
``datasets.load_dataset`` (so the Arrow cache makes a second read fast), and
:func:`read_local_split` reduces it to ``text`` and the raw ``label`` value. Turning raw
label values into class ids is :mod:`chainfed_core.data_labels`' job.

:class:`DataError` is the one error of the data modules; :mod:`chainfed_core.data`
re-exports it.
"""

from __future__ import annotations

import bz2
import gzip
import itertools
import lzma
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from .assets import cache_dir

if TYPE_CHECKING:  # imported where data is read: checking a name must not pay for it
    import datasets as hfds


class DataError(ValueError):
    """A dataset name, file, column or label value is not usable; the message says which."""


# ---------------------------------------------------------------------------------------
# Layouts of the paper's datasets, and the conventions of local files


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


def _normalize_column(name: str) -> str:
    """``"Class Index"`` -> ``"class_index"``: lower case, runs of other characters become ``_``."""
    return re.sub(r"[^0-9a-z]+", "_", str(name).strip().lower()).strip("_")


def _builder_for(path: Path) -> str | None:
    """datasets builder for a file by its suffix (a trailing .gz/.bz2/.xz is looked through)."""
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in COMPRESSIONS:
        suffixes = suffixes[:-1]
    return FILE_BUILDERS.get(suffixes[-1]) if suffixes else None


def _root_cause(err: BaseException) -> str:
    """The innermost exception message of a chain (datasets wraps parser errors)."""
    while err.__cause__ is not None or err.__context__ is not None:
        err = err.__cause__ or err.__context__
    return f"{type(err).__name__}: {err}"


# ---------------------------------------------------------------------------------------
# Finding the files of each split (no data read)


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


def split_files(path: Path) -> dict[str, list[Path]]:
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


def _check_has_rows(path: Path, layout: Layout | None) -> None:
    """DataError if a text file holds no data rows (empty, or a CSV header alone)."""
    if _builder_for(path) == "parquet":
        return
    lines = _first_lines(path, 2)
    if not lines:
        raise DataError(f"{path}: the file is empty")
    if len(lines) == 1 and _builder_for(path) == "csv" and not _is_headerless(path, layout):
        raise DataError(f"{path}: only a header line ({lines[0].strip()[:80]}), no examples")


# ---------------------------------------------------------------------------------------
# Reading one split and reducing it to text and raw label


def read_files(builder: str, files: list[Path], **kwargs: Any) -> hfds.Dataset:
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


def text_and_raw_label(raw: hfds.Dataset, examples: Callable, where: Any) -> hfds.Dataset:
    """Reduce a raw split to ``text`` (stripped, non-empty) and the raw ``label`` value."""
    try:
        ds = raw.map(_stripped, fn_kwargs={"examples": examples}, batched=True, remove_columns=raw.column_names)
    except (KeyError, TypeError, AttributeError) as err:
        raise DataError(f"{where}: unexpected record structure: {_root_cause(err)}") from err
    return ds.filter(lambda b: [bool(t) for t in b["text"]], batched=True)


def read_local_split(files: list[Path], layout: Layout | None, where: Any) -> hfds.Dataset:
    """The ``files`` of one split as ``text`` and raw ``label``, columns found by name (or by ``layout``).

    ``where`` names the split's files in messages. Empty files, a CSV header alone and a
    split whose texts are all empty are DataErrors.
    """
    for f in files:
        _check_has_rows(f, layout)
    kwargs: dict[str, Any] = {}
    if _is_headerless(files[0], layout):
        kwargs = {"column_names": list(layout.csv_columns), "header": None}
    raw = read_files(_builder_for(files[0]), files, **kwargs)
    renames = {c: _normalize_column(c) for c in raw.column_names if _normalize_column(c) != c}
    raw = raw.rename_columns(renames) if renames else raw
    ds = text_and_raw_label(raw, _columns_examples(raw.column_names, where), where)
    if len(ds) == 0:
        raise DataError(f"{where}: no example has a non-empty text")
    return ds
