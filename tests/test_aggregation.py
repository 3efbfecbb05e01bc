"""FedAvg of the window and payload accounting, with exact expectations."""

import numpy as np
import pytest
import torch

from chainfed_core import aggregation
from chainfed_core.aggregation import fedavg, merge, stale_names, state_bytes


def test_fedavg_equals_weighted_mean_exactly():
    a = {"adapters.2.up.weight": torch.tensor([[1.0, 2.0], [3.0, 4.0]]), "head.classifier.bias": torch.tensor([0.5])}
    b = {"adapters.2.up.weight": torch.tensor([[5.0, 6.0], [7.0, 8.0]]), "head.classifier.bias": torch.tensor([1.5])}
    c = {"adapters.2.up.weight": torch.tensor([[-1.0, 0.0], [1.0, 0.0]]), "head.classifier.bias": torch.tensor([-0.5])}
    out = fedavg([(a, 1), (b, 3), (c, 4)])
    # (1*a + 3*b + 4*c) / 8
    assert torch.equal(out["adapters.2.up.weight"], torch.tensor([[1.5, 2.5], [3.5, 3.5]]))
    assert torch.equal(out["head.classifier.bias"], torch.tensor([0.375]))
    assert out["adapters.2.up.weight"].dtype == torch.float32


def test_fedavg_single_update_is_identity_and_random_matches_float64_mean():
    g = torch.Generator().manual_seed(0)
    states = [{"w": torch.randn(7, 5, generator=g)} for _ in range(5)]
    counts = [3, 1, 8, 2, 5]
    assert torch.equal(fedavg([(states[0], 9)])["w"], states[0]["w"])
    expected = sum(s["w"].double() * n for s, n in zip(states, counts)) / sum(counts)
    assert torch.equal(fedavg(list(zip(states, counts)))["w"], expected.float())


def test_packed_and_per_tensor_torch_paths_of_fedavg_agree_bitwise():
    g = torch.Generator().manual_seed(1)
    counts = [4, 1, 3, 7]
    weights = np.array(counts) / sum(counts)
    shapes = {"s": (), "one": (1,), "v": (9,), "m": (4, 33), "h": (2, 3)}
    states = [{n: torch.randn(shape, generator=g) for n, shape in shapes.items()} for _ in counts]
    for state in states:
        state["h"] = state["h"].to(torch.float16)                 # dtypes are kept per tensor
    got = fedavg(list(zip(states, counts)))                          # CPU, numpy dtypes: packed
    for name, shape in shapes.items():
        want = aggregation._weighted_mean_torch([s[name] for s in states], weights)
        assert got[name].dtype == states[0][name].dtype and got[name].shape == torch.Size(shape)
        assert torch.equal(got[name], want), name
    bf16 = [{"w": s["m"].to(torch.bfloat16)} for s in states]     # numpy lacks bfloat16: the torch path
    out = fedavg(list(zip(bf16, counts)))["w"]
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, aggregation._weighted_mean_torch([s["w"] for s in bf16], weights))


def test_fedavg_rejects_mismatched_or_empty_updates():
    with pytest.raises(ValueError, match="at least one"):
        fedavg([])
    with pytest.raises(ValueError, match="different tensors"):
        fedavg([({"a": torch.zeros(1)}, 1), ({"b": torch.zeros(1)}, 1)])
    with pytest.raises(ValueError, match="positive sample count"):
        fedavg([({"a": torch.zeros(1)}, 0)])


def test_state_bytes_merge_and_stale_names():
    state = {"a": torch.zeros(3, 4), "b": torch.zeros(5, dtype=torch.float16)}
    assert state_bytes(state) == 3 * 4 * 4 + 5 * 2
    merged = merge(state, {"a": torch.ones(3, 4)})
    assert torch.equal(merged["a"], torch.ones(3, 4)) and merged["b"] is state["b"]
    with pytest.raises(KeyError):
        merge(state, {"c": torch.ones(1)})
    versions = {"a": 3, "b": -1, "c": 5}
    assert stale_names(["a", "b", "c"], versions, last_sync=-1) == ["a", "c"]
    assert stale_names(["a", "b", "c"], versions, last_sync=3) == ["a", "c"]    # got round 3's state before its update
    assert stale_names(["a", "b", "c"], versions, last_sync=4) == ["c"]


def test_pack_copies_into_one_buffer_read_only_and_pickles_once():
    import pickle

    from chainfed_core.aggregation import PackedState, pack

    source = {"a": torch.arange(6.0).view(2, 3).requires_grad_(), "b": torch.tensor(7.0), "c": torch.ones(4)}
    state = pack(source)
    assert isinstance(state, PackedState) and list(state) == ["a", "b", "c"]
    assert all(torch.equal(state[k], source[k].detach()) and not state[k].requires_grad for k in source)
    assert state.flat.numel() == 11 and state_bytes(state) == 44 == state_bytes(dict(state))
    assert all(t.untyped_storage().data_ptr() == state.flat.untyped_storage().data_ptr() for t in state.values())
    source["c"].add_(1)                                           # a copy: the source moves on alone
    assert torch.equal(state["c"], torch.ones(4))
    with pytest.raises(TypeError, match="read-only"):
        state["a"] = torch.zeros(2, 3)
    with pytest.raises(TypeError, match="read-only"):
        state.pop("a")
    blob = pickle.dumps(state)
    assert len(blob) < len(pickle.dumps(dict(state)))             # the buffer once, not once per view
    back = pickle.loads(blob)
    assert isinstance(back, PackedState) and all(torch.equal(back[k], state[k]) for k in state)
    mixed = pack({"a": torch.ones(2), "h": torch.ones(2, dtype=torch.float16)})
    assert type(mixed) is dict and mixed["h"].dtype == torch.float16


def test_fedavg_by_tensor_averages_each_tensor_over_its_senders():
    a = {"x": torch.tensor([1.0, 2.0]), "y": torch.tensor([4.0])}
    b = {"x": torch.tensor([3.0, 6.0])}
    c = {"y": torch.tensor([8.0]), "z": torch.tensor([1.5])}
    out = aggregation.fedavg_by_tensor([(a, 1), (b, 3), (c, 1)])
    assert list(out) == ["x", "y", "z"]
    assert torch.equal(out["x"], torch.tensor([2.5, 5.0]))      # (1*a + 3*b) / 4
    assert torch.equal(out["y"], torch.tensor([6.0]))           # (a + c) / 2
    assert torch.equal(out["z"], torch.tensor([1.5]))           # c alone
