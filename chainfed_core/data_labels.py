"""Labels: raw label values (numbers or names, from any file) to class ids ``0..K-1`` with class names.

:func:`label_key` normalizes a raw value (``3``, ``3.0`` and ``"3"`` are one label),
:func:`label_map` infers the class ids and names from the distinct values of every split,
and :func:`encode_labels` writes the ids as a ``ClassLabel`` feature, from which
:func:`label_names` and :func:`labels_of` read them back.
"""

from __future__ import annotations

import math
import re
from typing import TYPE_CHECKING, Any

import numpy as np

from .data_files import DataError, Layout

if TYPE_CHECKING:  # imported where data is read: checking a name must not pay for it
    import datasets as hfds


def label_key(value: Any) -> int | str | None:
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


def raw_values(ds: hfds.Dataset, where: Any) -> set:
    """Distinct normalized raw labels of a split; a missing label is an error."""
    keys = {label_key(v) for v in ds.unique("label")}
    if None in keys:
        raise DataError(f"{where}: some rows have no label")
    return keys


def label_map(values: dict[str, set], num_classes: int | None, layout: Layout | None,
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


def encode_labels(ds: hfds.Dataset, mapping: dict[int | str, int], names: list[str]) -> hfds.Dataset:
    """Replace raw labels by class ids, typed as a ClassLabel that carries the class names."""
    import datasets as hfds

    features = hfds.Features({"text": hfds.Value("string"), "label": hfds.ClassLabel(names=names)})
    return ds.map(lambda b: {"label": [mapping[label_key(v)] for v in b["label"]]}, batched=True, features=features)


def label_names(dsd: hfds.DatasetDict | hfds.Dataset) -> list[str]:
    """Class names in id order, read from the ``label`` ClassLabel feature."""
    import datasets as hfds

    ds = dsd["train"] if isinstance(dsd, hfds.DatasetDict) else dsd
    return list(ds.features["label"].names)


def labels_of(ds: hfds.Dataset) -> np.ndarray:
    """The ``label`` column as an int64 array, read through Arrow (row iteration is slow in datasets 4)."""
    return np.asarray(ds.with_format("arrow")["label"], dtype=np.int64)
