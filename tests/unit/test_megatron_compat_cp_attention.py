"""ContextParallelAttention's single-rank path and its input checks (the CP=2 path: tests/dist)."""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

megatron = pytest.importorskip("megatron.core")

from megatron.core.packed_seq_params import PackedSeqParams  # noqa: E402
from megatron.core.transformer.enums import AttnMaskType  # noqa: E402
from megatron.core.transformer.transformer_config import TransformerConfig  # noqa: E402

from train.backends.megatron.cp_attention import (ContextParallelAttention, context_layout,  # noqa: E402
                                                  query_runs)
from train.parallel.context import context_shares, document_shard_index, shard_index  # noqa: E402


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


def test_query_runs_cut_a_share_at_gaps_and_document_starts():
    index = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 24, 25, 26, 27, 28, 29, 30, 31])  # CP=2 rank 0 of 32
    assert query_runs(index, [0, 3, 17, 18, 32]) == [(0, 0, 0, 3), (3, 3, 3, 8), (8, 18, 24, 32)]
    assert query_runs(torch.zeros(0, dtype=torch.long), [0, 8]) == []


def test_packed_params_tell_the_layout_and_bad_bounds_are_rejected():
    with pytest.raises(ValueError, match="must rise from 0 to the full sequence length 8"):
        context_layout(PackedSeqParams(qkv_format="sbhd", cu_seqlens_q=torch.tensor([0, 5, 7])), 8)
    with pytest.raises(ValueError, match="got 'bshd'"):
        context_layout(PackedSeqParams(qkv_format="bshd", cu_seqlens_q=torch.tensor([0, 8])), 8)
    assert context_layout(None, 8) == ("sequence", [0, 8])
    thd = PackedSeqParams(qkv_format="thd", cu_seqlens_q=torch.tensor([0, 3, 8]),
                          cu_seqlens_q_padded=torch.tensor([0, 4, 8]))
    assert context_layout(thd, 8) == ("document", [0, 4, 8])  # TE's padded boundaries


def emulate_cp_rank(monkeypatch, rank: int, size: int, full: dict[str, torch.Tensor]) -> None:
    """Pretend to be `rank` of a CP group of `size`: the K/V all-gather returns the full sequence."""
    from train.backends.megatron import cp_attention

    monkeypatch.setattr(cp_attention.dist, "get_world_size", lambda group=None: size)
    monkeypatch.setattr(cp_attention.dist, "get_rank", lambda group=None: rank)
    gathered = iter([full["k"], full["v"]])  # forward gathers K, then V
    monkeypatch.setattr(cp_attention, "gather_sequence", lambda local, group, order: next(gathered))


def local_share(tensor: torch.Tensor, rank: int, size: int) -> torch.Tensor:
    """Megatron's load-balanced share of the whole sequence (dim 0)."""
    return tensor.index_select(0, shard_index(tensor.shape[0], size, rank, load_balanced=True))


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


@pytest.mark.parametrize("rank", range(4))
def test_each_rank_of_cp4_split_per_document_computes_its_rows(monkeypatch, rank):
    """TE's THD layout: [t, heads, hn] inputs, every document in 8 chunks, boundaries from the padded
    cu_seqlens."""
    gen = torch.Generator().manual_seed(5)
    full = {n: torch.randn(64, 1, h, 4, generator=gen) for n, h in (("q", 4), ("k", 2), ("v", 2))}
    cu = torch.tensor([0, 16, 16, 56, 64])
    sbhd = PackedSeqParams(qkv_format="sbhd", cu_seqlens_q=cu)
    expected = make_attention()(full["q"], full["k"], full["v"], None, packed_seq_params=sbhd)
    attn = make_attention()
    attn.cp_group = object()
    emulate_cp_rank(monkeypatch, rank, 4, full)
    index = document_shard_index(cu, 4, rank)
    thd = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_q_padded=cu)
    out = attn(*(full[n].index_select(0, index)[:, 0] for n in ("q", "k", "v")), None, packed_seq_params=thd)
    torch.testing.assert_close(out, expected.index_select(0, index), rtol=0, atol=1e-6)


@pytest.mark.parametrize("layout", ["sequence", "document"])
def test_gather_sequence_restores_global_order_for_cp4(monkeypatch, layout):
    from train.backends.megatron import cp_attention

    full = torch.arange(32.0).reshape(32, 1)
    shares = context_shares(layout, torch.tensor([0, 8, 24, 32]), 32, 4)
    # The all-gather concatenates the ranks' shares in rank order.
    monkeypatch.setattr(cp_attention._GatherSequence, "apply",
                        lambda local, group: torch.cat([full.index_select(0, s) for s in shares]))
    order = cp_attention.sequence_order(shares)
    assert torch.equal(cp_attention.gather_sequence(full.index_select(0, shares[0]), None, order), full)


def run_emulated_cp(monkeypatch, full: dict[str, torch.Tensor], size: int, packed, block: tuple[int, int]) -> list[torch.Tensor]:
    """Each CP rank's output on its share; gradients flow back into the full q/k/v tensors."""
    outputs = []
    for rank in range(size):
        attn = make_attention()
        attn.cp_group = object()
        attn.query_block, attn.key_block = block
        emulate_cp_rank(monkeypatch, rank, size, full)
        share = {n: local_share(full[n], rank, size) for n in ("q", "k", "v")}
        outputs.append(attn(share["q"], share["k"], share["v"], None, packed_seq_params=packed))
    return outputs


@pytest.mark.parametrize("bounds", [[0, 192], [0, 7, 150, 192]], ids=["one document", "packed"])
def test_long_document_across_cp_chunks_matches_reference_outputs_and_grads(monkeypatch, bounds):
    from train.models.qwen3vl.attention import PackedAttention

    gen = torch.Generator().manual_seed(2)
    full = {n: torch.randn(192, 1, h, 4, generator=gen, requires_grad=True) for n, h in (("q", 4), ("k", 2),
                                                                                          ("v", 2))}
    weights = torch.randn(192, 1, 16, generator=gen)  # a non-uniform upstream gradient
    cu_seqlens = torch.tensor(bounds)
    reference = PackedAttention()(*(full[n][:, 0] for n in ("q", "k", "v")), cu_seqlens, True).reshape(192, 1, 16)
    ref_grads = torch.autograd.grad((reference * weights).sum(), [full[n] for n in ("q", "k", "v")])
    # CP=2 chunks are 48 tokens; blocks of 5 queries x 7 keys cut every piece into many ragged blocks.
    packed = PackedSeqParams(qkv_format="sbhd", cu_seqlens_q=cu_seqlens)
    outputs = run_emulated_cp(monkeypatch, full, 2, packed, (5, 7))
    loss = sum((out * local_share(weights, rank, 2)).sum() for rank, out in enumerate(outputs))
    grads = torch.autograd.grad(loss, [full[n] for n in ("q", "k", "v")])
    for rank, out in enumerate(outputs):
        torch.testing.assert_close(out, local_share(reference.detach(), rank, 2), rtol=0, atol=1e-5)
    for name, grad, ref in zip("qkv", grads, ref_grads):
        torch.testing.assert_close(grad, ref, rtol=0, atol=1e-5, msg=f"d{name}")


class LargestTensor(TorchDispatchMode):
    """Records the element count of the largest tensor any op returns (forward and backward)."""

    def __init__(self) -> None:
        super().__init__()
        self.numel, self.op = 0, None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        for tensor in (result if isinstance(result, (tuple, list)) else [result]):
            if isinstance(tensor, torch.Tensor) and tensor.numel() > self.numel:
                self.numel, self.op = tensor.numel(), func
        return result


def test_largest_tensor_of_a_chunk_crossing_document_stays_linear_times_block(monkeypatch):
    length, heads, head_dim, block = 2048, 4, 8, 64
    gen = torch.Generator().manual_seed(4)
    full = {n: torch.randn(length, 1, h, head_dim, generator=gen, requires_grad=True)
            for n, h in (("q", heads), ("k", 2), ("v", 2))}
    largest = LargestTensor()
    with largest:
        # CP=2, one document: every chunk but the first attends keys before it (up to 1536 of them).
        sum(out.sum() for out in run_emulated_cp(monkeypatch, full, 2, None, (block, block))).backward()
    linear = length * heads * head_dim  # the full K/V, outputs and gradients
    score_block = heads * block * block
    # A mask of the last chunk's 512 queries x 2048 keys alone would be 1M elements (x heads for scores).
    assert largest.numel <= max(linear, score_block), (largest.numel, largest.op)
    assert full["q"].grad is not None and full["k"].grad.abs().sum() > 0


@pytest.mark.parametrize("causal,dropout_p", [(True, 0.0), (False, 0.0), (True, 0.3)])
def test_blockwise_backward_is_exact_for_output_and_logsumexp(causal, dropout_p):
    from train.backends.megatron.blockwise_attention import BlockwiseAttention

    gen = torch.Generator().manual_seed(5)
    q = torch.randn(1, 2, 2, 9, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(1, 2, 9, 3, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(2))

    def both(q, k, v):
        # Blocks of 4 x 2: the backward regenerates every score block (and dropout mask) from the seed.
        out, lse = BlockwiseAttention.apply(q, k, v, 0.7, causal, 4, 2, dropout_p, 11)
        return out, lse

    assert torch.autograd.gradcheck(both, (q, k, v))
