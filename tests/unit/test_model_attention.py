"""PackedAttention equals attention with an explicit block-diagonal (causal) mask, for GQA and plain heads,
in values and gradients, without ever building that mask itself."""
from __future__ import annotations

import math

import pytest
import torch

from train.models.qwen3vl.attention import PackedAttention


def _masked_reference(q, k, v, cu_seqlens, causal):
    """Textbook attention over the whole sequence with an L x L mask (the thing PackedAttention avoids)."""
    n, hq, d = q.shape
    k = k.repeat_interleave(hq // k.shape[1], dim=1)
    v = v.repeat_interleave(hq // v.shape[1], dim=1)
    doc = torch.repeat_interleave(torch.arange(len(cu_seqlens) - 1), cu_seqlens[1:] - cu_seqlens[:-1])
    allowed = doc[:, None] == doc[None, :]
    if causal:
        allowed &= torch.ones(n, n, dtype=torch.bool).tril()
    scores = torch.einsum("ihd,jhd->hij", q, k) / math.sqrt(d)
    weights = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
    return torch.einsum("hij,jhd->ihd", weights, v)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("heads", [(4, 2), (2, 2)], ids=["gqa", "mha"])
def test_packed_attention_equals_block_diagonal_mask(causal, heads):
    torch.manual_seed(0)
    hq, hkv = heads
    cu = torch.tensor([0, 5, 6, 19, 32], dtype=torch.int32)
    q = torch.randn(32, hq, 8, requires_grad=True)
    k = torch.randn(32, hkv, 8, requires_grad=True)
    v = torch.randn(32, hkv, 8, requires_grad=True)
    out = PackedAttention()(q, k, v, cu, causal)
    ref = _masked_reference(q, k, v, cu, causal)
    assert torch.allclose(out, ref, atol=1e-5)
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    ref_grads = torch.autograd.grad(ref.square().sum(), (q, k, v))
    for g, r in zip(grads, ref_grads):
        assert torch.allclose(g, r, atol=1e-4)


def test_cu_seqlens_must_cover_the_sequence():
    q = torch.randn(10, 2, 8)
    with pytest.raises(ValueError, match="cu_seqlens covers 8 tokens but q has 10"):
        PackedAttention()(q, q, q, torch.tensor([0, 8]), True)
