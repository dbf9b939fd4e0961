"""ContextParallelAttention's single-rank path and its input checks (the CP=2 path: tests/dist)."""
from __future__ import annotations

import pytest
import torch

megatron = pytest.importorskip("megatron.core")

from megatron.core.packed_seq_params import PackedSeqParams  # noqa: E402
from megatron.core.transformer.enums import AttnMaskType  # noqa: E402
from megatron.core.transformer.transformer_config import TransformerConfig  # noqa: E402

from train.backends.megatron.cp_attention import (ContextParallelAttention, document_bounds,  # noqa: E402
                                                  load_balanced_chunks)


def make_attention() -> ContextParallelAttention:
    config = TransformerConfig(num_layers=1, hidden_size=16, num_attention_heads=4, num_query_groups=2,
                               attention_dropout=0.0)
    return ContextParallelAttention(config, 1, AttnMaskType.causal, "self")


def test_documents_do_not_see_each_other():
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(12, 1, h, 4, generator=gen) for h in (4, 2, 2))
    packed = PackedSeqParams(qkv_format="sbhd", cu_seqlens_q=torch.tensor([0, 5, 12]))
    out = make_attention()(q, k, v, None, packed_seq_params=packed)
    # Each document alone through the same module: identical, so nothing leaked across the boundary.
    first = make_attention()(q[:5], k[:5], v[:5], None)
    second = make_attention()(q[5:], k[5:], v[5:], None)
    assert out.shape == (12, 1, 16)
    torch.testing.assert_close(out, torch.cat([first, second]), rtol=0, atol=1e-6)
    # ...and differs from attending across it.
    assert (out[5:] - make_attention()(q, k, v, None)[5:]).abs().max() > 1e-3


def test_load_balanced_chunks_follow_megatron_split():
    assert load_balanced_chunks(0, 2) == (0, 3) and load_balanced_chunks(1, 2) == (1, 2)
    assert load_balanced_chunks(1, 4) == (1, 6) and load_balanced_chunks(0, 1) == (0,)


def test_bad_document_bounds_are_rejected():
    with pytest.raises(ValueError, match="must rise from 0 to the full sequence length 8"):
        document_bounds(PackedSeqParams(qkv_format="sbhd", cu_seqlens_q=torch.tensor([0, 5, 7])), 8)
    with pytest.raises(ValueError, match="qkv_format='sbhd'"):
        document_bounds(PackedSeqParams(qkv_format="thd", cu_seqlens_q=torch.tensor([0, 8])), 8)
    assert document_bounds(None, 8) == [0, 8]


def emulate_cp_rank(monkeypatch, rank: int, size: int, full: dict[str, torch.Tensor]) -> None:
    """Pretend to be `rank` of a CP group of `size`: the K/V all-gather returns the full sequence."""
    from train.backends.megatron import cp_attention

    monkeypatch.setattr(cp_attention.dist, "get_world_size", lambda group=None: size)
    monkeypatch.setattr(cp_attention.dist, "get_rank", lambda group=None: rank)
    gathered = iter([full["k"], full["v"]])  # forward gathers K, then V
    monkeypatch.setattr(cp_attention, "gather_sequence", lambda local, group: next(gathered))


def local_share(tensor: torch.Tensor, rank: int, size: int) -> torch.Tensor:
    chunks = tensor.chunk(2 * size)
    return torch.cat([chunks[i] for i in load_balanced_chunks(rank, size)])


@pytest.mark.parametrize("rank", range(4))
def test_each_rank_of_cp4_computes_its_chunks_of_the_full_attention(monkeypatch, rank):
    gen = torch.Generator().manual_seed(1)
    full = {n: torch.randn(32, 1, h, 4, generator=gen) for n, h in (("q", 4), ("k", 2), ("v", 2))}
    packed = PackedSeqParams(qkv_format="sbhd", cu_seqlens_q=torch.tensor([0, 3, 13, 14, 32]))
    expected = make_attention()(full["q"], full["k"], full["v"], None, packed_seq_params=packed)
    attn = make_attention()
    attn.cp_group = object()  # any non-None group: sizes come from the patched dist calls
    emulate_cp_rank(monkeypatch, rank, 4, full)
    share = {n: local_share(t, rank, 4) for n, t in full.items()}
    out = attn(share["q"], share["k"], share["v"], None, packed_seq_params=packed)
    torch.testing.assert_close(out, local_share(expected, rank, 4), rtol=0, atol=1e-6)


def test_gather_sequence_restores_global_order_for_cp4(monkeypatch):
    from train.backends.megatron import cp_attention

    full = torch.arange(16.0).reshape(16, 1)
    monkeypatch.setattr(cp_attention.dist, "get_world_size", lambda group=None: 4)
    # The all-gather concatenates the ranks' shares in rank order.
    monkeypatch.setattr(cp_attention._GatherSequence, "apply",
                        lambda local, group: torch.cat([local_share(full, r, 4) for r in range(4)]))
    assert torch.equal(cp_attention.gather_sequence(local_share(full, 0, 4), None), full)
