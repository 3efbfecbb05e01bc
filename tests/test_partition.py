"""Client partitions: coverage, determinism, Dirichlet skew against alpha, errors, histograms."""

import matplotlib

matplotlib.use("Agg")

import datasets as hfds  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from chainfed_core.data import labels_of  # noqa: E402
from chainfed_core.partition import (client_indices, label_histogram, label_skew, partition,  # noqa: E402
                                     plot_label_histograms)


def _dataset(n=2000, k=4, seed=0) -> hfds.Dataset:
    """``n`` examples with an ``idx`` column (to track rows) and imbalanced labels over ``k`` classes."""
    rng = np.random.default_rng(seed)
    labels = rng.choice(k, size=n, p=np.arange(1, k + 1) / np.arange(1, k + 1).sum())
    features = hfds.Features({"idx": hfds.Value("int64"), "text": hfds.Value("string"),
                              "label": hfds.ClassLabel(names=[f"c{i}" for i in range(k)])})
    return hfds.Dataset.from_dict({"idx": list(range(n)), "text": [f"t{i}" for i in range(n)],
                                   "label": labels.tolist()}, features=features)


def _rows(parts) -> list[list[int]]:
    return [p["idx"][:] for p in parts]


@pytest.mark.parametrize("scheme", ["iid", "dirichlet"])
def test_every_example_lands_on_exactly_one_client(scheme):
    ds = _dataset()
    parts = partition(ds, 10, scheme=scheme, alpha=0.5, seed=0)
    assert len(parts) == 10
    rows = sorted(i for r in _rows(parts) for i in r)
    assert rows == list(range(len(ds)))
    assert min(len(p) for p in parts) >= 2
    assert all(p.features == ds.features for p in parts)


def test_iid_clients_are_equal_sized_and_shuffled():
    parts = partition(_dataset(n=1000), 10, scheme="iid", seed=0)
    assert [len(p) for p in parts] == [100] * 10
    assert _rows(parts)[0] != list(range(100))  # not the first rows in order
    assert label_skew(label_histogram(parts, 4)) < 0.1


@pytest.mark.parametrize("scheme", ["iid", "dirichlet"])
def test_same_seed_same_split_other_seed_other_split(scheme):
    ds = _dataset()
    a, b, c = (partition(ds, 8, scheme=scheme, alpha=0.5, seed=s) for s in (0, 0, 1))
    assert _rows(a) == _rows(b)
    assert _rows(a) != _rows(c)


def test_dirichlet_skew_grows_as_alpha_falls():
    ds = _dataset(n=4000)
    skew = {alpha: np.mean([label_skew(label_histogram(partition(ds, 10, scheme="dirichlet", alpha=alpha,
                                                                 seed=s), 4)) for s in range(3)])
            for alpha in (100.0, 1.0, 0.1)}
    assert skew[100.0] < 0.1 < skew[1.0] < skew[0.1]
    assert skew[0.1] > 0.4


def test_partition_keeps_the_output_format():
    ds = _dataset(n=200).with_format("torch", columns=["label"])
    for scheme in ("iid", "dirichlet"):
        part = partition(ds, 4, scheme=scheme, alpha=1.0, seed=0)[0]
        assert part.format["type"] == "torch" and part.format["columns"] == ["label"]


def test_self_balancing_is_passed_through():
    ds = _dataset(n=2000)
    sizes = [len(p) for p in partition(ds, 10, scheme="dirichlet", alpha=0.3, self_balancing=True, seed=0)]
    assert sum(sizes) == 2000 and max(sizes) < 2000 / 10 * 3


@pytest.mark.parametrize("kwargs, field", [
    ({"alpha": 0.0, "scheme": "dirichlet"}, "alpha"),
    ({"alpha": -1.0, "scheme": "dirichlet"}, "alpha"),
    ({"num_clients": 0}, "num_clients"),
    ({"num_clients": 51}, "num_clients"),
    ({"scheme": "pathological"}, "scheme"),
    ({"min_partition_size": 6, "num_clients": 10}, "min_partition_size"),  # iid: 5 per client
])
def test_bad_arguments_name_the_field(kwargs, field):
    args = {"num_clients": 5, **kwargs}
    with pytest.raises(ValueError, match=rf"^{field}:"):
        partition(_dataset(n=50), args.pop("num_clients"), **args)


def test_unreachable_min_partition_size_explains_itself():
    with pytest.raises(ValueError) as err:
        partition(_dataset(n=300), 30, scheme="dirichlet", alpha=0.05, min_partition_size=8, seed=0)
    message = str(err.value)
    assert "alpha=0.05" in message and "num_clients=30" in message and "min_partition_size=8" in message


def test_missing_label_column():
    ds = hfds.Dataset.from_dict({"text": ["a", "b", "c"]})
    with pytest.raises(ValueError, match=r"^dataset: needs a 'label' column"):
        partition(ds, 2)


def test_label_histogram_and_skew_exact():
    counts = label_histogram([np.array([0, 0, 1]), np.array([2, 2]), np.array([], dtype=int)], 3)
    assert counts.tolist() == [[2, 1, 0], [0, 0, 2], [0, 0, 0]]
    assert label_skew(np.array([[5, 5], [10, 10]])) == 0.0
    assert label_skew(np.array([[10, 0], [0, 10]])) == pytest.approx(0.5)
    assert label_skew(np.array([[3, 1], [1, 3], [0, 0]])) == pytest.approx(0.25)  # empty client ignored
    with pytest.raises(ValueError, match="num_classes"):
        label_histogram([np.array([0, 3])], 3)


def test_label_histogram_of_datasets_matches_labels():
    parts = partition(_dataset(n=400), 4, scheme="dirichlet", alpha=0.5, seed=2)
    counts = label_histogram(parts, 4)
    assert counts.shape == (4, 4) and counts.sum() == 400
    assert counts[1].tolist() == np.bincount(labels_of(parts[1]), minlength=4).tolist()


def test_plot_label_histograms_returns_figure():
    import matplotlib.pyplot as plt

    parts = partition(_dataset(n=400), 5, scheme="dirichlet", alpha=0.5, seed=0)
    fig = plot_label_histograms(parts)
    ax = fig.axes[0]
    assert len(ax.patches) == 5 * 4  # one bar per client and class
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["c0", "c1", "c2", "c3"]
    assert sum(p.get_height() for p in ax.patches) == 400
    plt.close(fig)

    fig, ax = plt.subplots()
    assert plot_label_histograms(label_histogram(parts, 4), ax=ax, label_names=list("abcd")) is fig
    plt.close(fig)


@pytest.mark.slow
def test_real_data_dirichlet_split():
    from chainfed_core.data import load_dataset

    train = load_dataset("sarcasm")["train"]
    parts = partition(train, 20, scheme="dirichlet", alpha=0.5, seed=0)
    counts = label_histogram(parts, 2)
    assert counts.sum() == len(train) == 22891
    assert counts.sum(axis=1).min() >= 2
    assert label_skew(counts) > label_skew(label_histogram(partition(train, 20, seed=0), 2))


def test_client_indices_match_flwr_datasets_partitioners():
    from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner

    from chainfed_core.partition import client_indices

    data = hfds.Dataset.from_dict({"label": (np.arange(103) % 4).tolist(), "_row": list(range(103))})
    iid = client_indices(data, 7, scheme="iid", seed=3)
    ref = IidPartitioner(num_partitions=7)
    ref.dataset = data.shuffle(seed=3)
    for k in range(7):
        assert iid.indices(k).tolist() == ref.load_partition(k)["_row"]
    dirichlet = client_indices(data, 5, scheme="dirichlet", alpha=0.5, min_partition_size=2, seed=3)
    ref = DirichletPartitioner(num_partitions=5, partition_by="label", alpha=0.5, min_partition_size=2,
                               self_balancing=False, shuffle=True, seed=3)
    ref.dataset = data
    for k in range(5):
        assert sorted(dirichlet.indices(k).tolist()) == sorted(ref.load_partition(k)["_row"])
    assert sorted(np.concatenate([iid.indices(k) for k in range(7)]).tolist()) == list(range(103))


def test_dirichlet_redraws_past_flwr_datasets_ten_attempts():
    from flwr_datasets.partitioner import DirichletPartitioner

    data = _dataset(n=200)
    # seed 11: flwr-datasets' own 10 draws leave a client below 2 examples
    with pytest.raises(ValueError, match="max number of attempts"):
        ref = DirichletPartitioner(num_partitions=20, partition_by="label", alpha=0.5, min_partition_size=2,
                                   shuffle=True, seed=11)
        ref.dataset = hfds.Dataset.from_dict({"label": list(data["label"])})
        ref.load_partition(0)
    split = client_indices(data, 20, scheme="dirichlet", alpha=0.5, min_partition_size=2, seed=11)
    assert split.sizes().min() >= 2 and split.sizes().sum() == 200
    again = client_indices(data, 20, scheme="dirichlet", alpha=0.5, min_partition_size=2, seed=11)
    assert np.array_equal(split.order, again.order)          # the redraws are seeded too
