"""Client partitions of a labelled dataset: IID or label-Dirichlet, through flwr-datasets.

:func:`partition` returns one ``datasets.Dataset`` per client (a row selection of the
input, so no data is copied). The same seed gives the same split. The Dirichlet scheme
draws each class's share of clients from Dir(alpha): small alpha gives clients few,
dominant classes; large alpha approaches IID. :func:`label_skew` measures how far the
clients' label distributions lie from the global one, and :func:`plot_label_histograms`
draws them.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Sequence

import datasets as hfds
import numpy as np
from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner

from .data import labels_of

SCHEMES = ("iid", "dirichlet")


def _check(dataset: hfds.Dataset, num_clients: int, scheme: str, alpha: float, min_partition_size: int) -> None:
    """Reject bad arguments with a ValueError naming the field."""
    if scheme not in SCHEMES:
        raise ValueError(f"scheme: {scheme!r} is not one of {list(SCHEMES)}")
    if num_clients < 1:
        raise ValueError(f"num_clients: must be >= 1, got {num_clients}")
    if num_clients > len(dataset):
        raise ValueError(f"num_clients: {num_clients} clients but only {len(dataset)} examples")
    if scheme == "dirichlet" and not alpha > 0:
        raise ValueError(f"alpha: the Dirichlet concentration must be > 0, got {alpha}")
    if min_partition_size < 0:
        raise ValueError(f"min_partition_size: must be >= 0, got {min_partition_size}")
    if "label" not in dataset.column_names:
        raise ValueError(f"dataset: needs a 'label' column, has {dataset.column_names}")


@dataclass
class ClientIndices:
    """Client k holds rows ``order[offsets[k]:offsets[k+1]]``: one array for all N clients,
    so a population of 10,000 clients costs one index per example, not one object per client."""
    order: np.ndarray
    offsets: np.ndarray

    @property
    def num_clients(self) -> int:
        return len(self.offsets) - 1

    def indices(self, client_id: int) -> np.ndarray:
        return self.order[self.offsets[client_id]:self.offsets[client_id + 1]]

    def sizes(self) -> np.ndarray:
        return np.diff(self.offsets)


DIRICHLET_REDRAWS = 20   # rounds of flwr-datasets' 10 draws before a Dirichlet split is declared impossible


def client_indices(dataset: hfds.Dataset, num_clients: int, *, scheme: str = "iid", alpha: float = 0.5,
                   min_partition_size: int = 2, self_balancing: bool = False, seed: int = 0) -> ClientIndices:
    """Which rows of ``dataset`` each of ``num_clients`` clients holds.

    ``iid``: a seeded shuffle cut into equal contiguous shards (``IidPartitioner``).
    ``dirichlet``: per class, client shares drawn from Dir(``alpha``) (``DirichletPartitioner``
    on ``label``), redrawn until every client has ``min_partition_size`` examples;
    ``self_balancing`` stops giving examples to clients already above the average size.
    The partitioner sees the label column alone, never the texts.
    Raises ValueError naming the field when the arguments cannot give such a split.
    """
    _check(dataset, num_clients, scheme, alpha, min_partition_size)
    labels = labels_of(dataset)
    if scheme == "iid":
        smallest = len(dataset) // num_clients
        if smallest < min_partition_size:
            raise ValueError(f"min_partition_size: {len(dataset)} examples over {num_clients} clients give "
                             f"{smallest} per client, below min_partition_size={min_partition_size}")
        # IidPartitioner over dataset.shuffle(seed): the same seeded permutation cut into
        # contiguous shards (tests check the equality), computed without N row selections.
        parts = np.array_split(np.random.default_rng(seed).permutation(len(labels)), num_clients)
    else:
        label_column = hfds.Dataset.from_dict({"label": labels})
        # flwr-datasets gives up after 10 draws; more rounds of 10 follow with derived seeds
        # (the first round uses ``seed`` itself, so a split it finds is flwr-datasets' own).
        for redraw in range(DIRICHLET_REDRAWS):
            partitioner = DirichletPartitioner(
                num_partitions=num_clients, partition_by="label", alpha=float(alpha),
                min_partition_size=min_partition_size, self_balancing=self_balancing, shuffle=True,
                seed=seed if redraw == 0 else int(np.random.default_rng([seed, redraw]).integers(2 ** 31)))
            partitioner.dataset = label_column
            try:
                with warnings.catch_warnings():
                    warnings.filterwarnings("ignore", message="The specified min_partition_size")
                    partitioner.load_partition(0)    # draws the whole split once
                break
            except ValueError as err:
                failure = err
        else:
            raise ValueError(
                f"min_partition_size: no Dirichlet split of {len(dataset)} examples over num_clients={num_clients} "
                f"with alpha={alpha} gave every client at least min_partition_size={min_partition_size} examples "
                f"in {DIRICHLET_REDRAWS} x 10 draws ({failure}); raise alpha, or lower num_clients or "
                f"min_partition_size") from failure
        # flwr-datasets 0.6.1 keeps the drawn split here; reading it avoids N row selections.
        parts = [np.asarray(partitioner._partition_id_to_indices[i]) for i in range(num_clients)]
    sizes = np.array([len(p) for p in parts], dtype=np.int64)
    order = np.concatenate(parts).astype(np.int64) if parts else np.empty(0, dtype=np.int64)
    return ClientIndices(order, np.concatenate([[0], np.cumsum(sizes)]))


def partition(dataset: hfds.Dataset, num_clients: int, *, scheme: str = "iid", alpha: float = 0.5,
              min_partition_size: int = 2, self_balancing: bool = False, seed: int = 0) -> list[hfds.Dataset]:
    """Split ``dataset`` into ``num_clients`` client datasets (row selections; see :func:`client_indices`)."""
    split = client_indices(dataset, num_clients, scheme=scheme, alpha=alpha, min_partition_size=min_partition_size,
                           self_balancing=self_balancing, seed=seed)
    return [dataset.select(split.indices(k)) for k in range(num_clients)]


def label_histogram(parts: Sequence[hfds.Dataset] | Sequence[np.ndarray], num_classes: int) -> np.ndarray:
    """Counts of each class per client: an int array of shape (N clients, K classes).

    ``parts`` are client datasets or arrays of their labels.
    """
    rows = []
    for part in parts:
        labels = labels_of(part) if isinstance(part, hfds.Dataset) else np.asarray(part, dtype=np.int64)
        if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
            raise ValueError(f"num_classes: labels {labels.min()}..{labels.max()} exceed num_classes={num_classes}")
        rows.append(np.bincount(labels, minlength=num_classes))
    return np.stack(rows) if rows else np.zeros((0, num_classes), dtype=np.int64)  # (N, K)


def label_skew(counts: np.ndarray) -> float:
    """Mean total-variation distance between each client's label distribution and the pooled one.

    0 for identical distributions; approaches 1 - (share of the client's class) as clients
    hold single classes. Clients without examples are left out.
    """
    counts = np.asarray(counts, dtype=float)  # (N, K)
    counts = counts[counts.sum(axis=1) > 0]
    if counts.size == 0:
        return 0.0
    pooled = counts.sum(axis=0) / counts.sum()  # (K,)
    clients = counts / counts.sum(axis=1, keepdims=True)  # (N, K)
    return float(0.5 * np.abs(clients - pooled).sum(axis=1).mean())


def plot_label_histograms(parts_or_counts: Sequence[hfds.Dataset] | np.ndarray, ax=None,
                          label_names: Sequence[str] | None = None):
    """Stacked bars of class counts per client; returns the matplotlib figure.

    Accepts client datasets (class names are read from their ``label`` feature) or an
    (N, K) count array from :func:`label_histogram`.
    """
    import matplotlib.pyplot as plt
    import seaborn as sns

    if isinstance(parts_or_counts, np.ndarray):
        counts = parts_or_counts
    else:
        feature = parts_or_counts[0].features["label"]
        names = getattr(feature, "names", None)
        label_names = label_names or names
        k = len(names) if names else int(max(labels_of(p).max(initial=0) for p in parts_or_counts)) + 1
        counts = label_histogram(parts_or_counts, k)
    n, k = counts.shape
    label_names = list(label_names) if label_names else [str(c) for c in range(k)]
    if ax is None:
        _, ax = plt.subplots(figsize=(max(4.0, 0.35 * n + 2), 3.2))
    colors = sns.color_palette("tab10" if k <= 10 else "husl", k)
    bottom = np.zeros(n)
    for c in range(k):
        ax.bar(np.arange(n), counts[:, c], bottom=bottom, color=colors[c], label=label_names[c], width=0.85)
        bottom += counts[:, c]
    ax.set_xlabel("client")
    ax.set_ylabel("examples")
    ax.set_xticks(np.arange(n))
    ax.set_title(f"label distribution per client (skew {label_skew(counts):.2f})")
    ax.legend(title="class", fontsize="small", bbox_to_anchor=(1.01, 1), loc="upper left")
    ax.figure.tight_layout()
    return ax.figure
