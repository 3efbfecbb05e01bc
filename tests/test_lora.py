"""LoRA on the query and value projections: names, forward, detach, stacking and merge."""

import pytest
import torch

from chainfed_core.lora import (TARGETS, LoRALinear, attach, detach, lora_elements, lora_names, merged, stack,
                                target_weight_names)
from chainfed_core.tiny import tiny_backbone, tiny_batch
from chainfed_core.train import tensors_by_name


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("family", sorted(TARGETS))
def test_attach_keeps_the_weight_names_and_detach_restores_the_modules(family):
    bb = tiny_backbone(family, num_layers=2, seed=0)
    before = dict(bb.model.named_parameters())
    weights = tensors_by_name(bb, target_weight_names(bb))
    attach(bb, 4, 2.0, indices=[1], generator=torch.Generator().manual_seed(0))
    names = lora_names(bb, range(2))
    assert names == [f"layers.1.{path}.lora_{x}" for path in TARGETS[family] for x in "AB"]
    assert sum(t.numel() for t in tensors_by_name(bb, names).values()) == lora_elements(bb.config, 4)
    after = tensors_by_name(bb, target_weight_names(bb))              # the same Parameters, same names
    assert all(after[n] is weights[n] for n in weights)
    detach(bb)
    assert dict(bb.model.named_parameters()).keys() == before.keys()
    assert not any(isinstance(m, LoRALinear) for m in bb.model.modules())


def test_a_fresh_lora_is_the_identity_and_a_trained_one_adds_s_BA():
    bb = tiny_backbone("bert", num_layers=2, seed=0)
    batch = tiny_batch(4, 8)
    plain = bb.forward(batch)
    q = attach(bb, 3, 2.0, generator=torch.Generator().manual_seed(1))[0]
    assert torch.equal(bb.forward(batch), plain)                         # B = 0
    x = torch.randn(5, q.weight.shape[1])
    with torch.no_grad():
        q.lora_B.normal_(generator=torch.Generator().manual_seed(2))
    expected = x @ q.weight.T + q.bias + 2.0 * (x @ q.lora_A.T) @ q.lora_B.T
    torch.testing.assert_close(q(x), expected, rtol=0, atol=1e-6)


def test_stack_has_no_cross_terms_and_merge_is_W_plus_sBA():
    g = torch.Generator().manual_seed(0)
    factors = [(torch.randn(r, 6, generator=g), torch.randn(5, r, generator=g)) for r in (2, 4, 8)]
    p = [0.5, 0.3, 0.2]
    a, b = stack(factors, p)
    assert a.shape == (14, 6) and b.shape == (5, 14) and a.dtype == b.dtype == torch.float64
    direct = sum(w * B.double() @ A.double() for (A, B), w in zip(factors, p))
    assert (b @ a - direct).abs().max() < 1e-14
    w = torch.randn(5, 6, generator=g)
    assert torch.equal(merged(w, a, b, 2.0), (w.double() + 2.0 * (b @ a)).float())
