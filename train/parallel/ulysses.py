"""Ulysses (DeepSpeed-Ulysses) attention over a context-parallel group, for packed sequences.

Each CP rank holds a contiguous share of the sequence with all heads. One all-to-all turns that into the
whole sequence with 1/cp of the heads; the ordinary packed attention then runs on the full sequence with
the GLOBAL cu_seqlens (document boundaries are positions of the full sequence, so they stay exact however
the shares cut the documents); a second all-to-all brings the output back to the sequence share with all
heads. Same maths as one process; only the head dimension is distributed during attention.

GQA: when the KV heads cannot be divided among the ranks, K and V are expanded to one head per query head
first (more traffic, same result).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from train.device import on_group_device
from train.models.qwen3vl.attention import PackedAttention


def _all_to_all(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """out[j] = rank j's x[me] for x [cp, ...] (the chunks along dim 0 are exchanged)."""
    x = on_group_device(x, group)  # contiguous before empty_like, which would copy a view's permuted strides
    out = torch.empty_like(x)
    dist.all_to_all_single(out, x, group=group)
    return out


def _seq_to_heads(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """[n, H, D] (sequence share, all heads) -> [cp * n, H / cp, D] (full sequence, my heads)."""
    cp = dist.get_world_size(group)
    n, heads, dim = x.shape
    chunks = x.reshape(n, cp, heads // cp, dim).transpose(0, 1)  # chunk j = heads for rank j
    return _all_to_all(chunks, group).reshape(cp * n, heads // cp, dim)


def _heads_to_seq(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """Inverse of _seq_to_heads: [cp * n, h, D] -> [n, cp * h, D]."""
    cp = dist.get_world_size(group)
    total, heads, dim = x.shape
    chunks = x.reshape(cp, total // cp, heads, dim)  # chunk j = rank j's sequence share
    return _all_to_all(chunks, group).transpose(0, 1).reshape(total // cp, cp * heads, dim)


class _SeqToHeads(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):  # type: ignore[override]
        ctx.group = group
        return _seq_to_heads(x, group)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        return _heads_to_seq(grad, ctx.group), None


class _HeadsToSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):  # type: ignore[override]
        ctx.group = group
        return _heads_to_seq(x, group)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        return _seq_to_heads(grad, ctx.group), None


class UlyssesAttention(nn.Module):
    """core_attention(q, k, v, cu_seqlens, causal) for a contiguous sequence share: q [n, Hq, D], k/v
    [n, Hkv, D]; cu_seqlens are the boundaries of the FULL sequence (cp * n tokens)."""

    def __init__(self, group: dist.ProcessGroup, local: nn.Module | None = None) -> None:
        super().__init__()
        self.group = group
        self.cp = dist.get_world_size(group)
        self.local = local if local is not None else PackedAttention()

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                causal: bool) -> torch.Tensor:
        if q.shape[1] % self.cp:
            raise ValueError(f"Ulysses needs the attention heads ({q.shape[1]}) divisible by parallel.cp="
                             f"{self.cp} (model.text.num_attention_heads)")
        if k.shape[1] % self.cp:  # GQA with fewer KV heads than ranks: one KV head per query head
            repeat = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
        q, k, v = (_SeqToHeads.apply(t, self.group) for t in (q, k, v))
        out = self.local(q, k, v, cu_seqlens, causal)
        return _HeadsToSeq.apply(out, self.group)
