"""Blockwise attention that returns its log-sum-exp, with an exact, recomputing backward (flash-style).

Why it exists: ContextParallelAttention splits each (query chunk, document) piece into the keys before the
chunk (all visible, no mask) and the diagonal block (causal), and merges the two partial results with their
log-sum-exp. Torch's CPU SDPA does not return the log-sum-exp, and plain autograd through a blockwise loop
would save every score block, i.e. the nq x nk scores again. This function keeps only the output and the
log-sum-exp ([.., nq] rows) and rebuilds each score block in the backward, so no tensor larger than
(heads x query_block x key_block) exists at any time and saved memory is linear in the sequence length.

Layout: q [b, groups, rep, nq, d] (GQA: `rep` query heads share one K/V group), k/v [b, groups, nk, d].
Causal means nq == nk and query i sees keys <= i (the diagonal block); otherwise every key is visible.
"""
from __future__ import annotations

from typing import Any, Iterator

import torch
from torch import Tensor

DEFAULT_QUERY_BLOCK = 1024
DEFAULT_KEY_BLOCK = 1024


def _upcast(tensor: Tensor) -> Tensor:
    """Softmax statistics and accumulators in at least fp32 (bf16/fp16 inputs would lose the merge)."""
    return tensor.to(torch.promote_types(tensor.dtype, torch.float32))


def _blocks(length: int, block: int) -> Iterator[tuple[int, int, int]]:
    for index, start in enumerate(range(0, length, block)):
        yield index, start, min(start + block, length)


def _causal_keep(q_start: int, q_end: int, k_start: int, k_end: int, device: torch.device) -> Tensor | None:
    """Block-local causal mask (True = visible), or None when the whole block is visible."""
    if k_end - 1 <= q_start:
        return None
    rows = torch.arange(q_start, q_end, device=device)[:, None]
    return torch.arange(k_start, k_end, device=device)[None, :] <= rows


def _dropout_keep(shape: torch.Size, dropout_p: float, seed: int, device: torch.device,
                  dtype: torch.dtype) -> Tensor:
    """Scaled keep mask of one score block, regenerated bit-identically in the backward from `seed`."""
    gen = torch.Generator(device=device).manual_seed(seed)
    return (torch.rand(shape, generator=gen, device=device) >= dropout_p).to(dtype) / (1.0 - dropout_p)


class _Geometry:
    """Block iteration shared by forward and backward, so both visit exactly the same score blocks."""

    def __init__(self, nq: int, nk: int, causal: bool, query_block: int, key_block: int) -> None:
        if causal and nq != nk:
            raise ValueError(f"causal blockwise attention needs nq == nk (the diagonal block), got {nq}, {nk}")
        self.nq, self.nk, self.causal = nq, nk, causal
        self.query_block, self.key_block = query_block, key_block
        self.key_blocks = -(-nk // key_block)

    def key_ranges(self, q_end: int) -> Iterator[tuple[int, int, int]]:
        # Causal: key blocks entirely after the last query of the block are invisible, so never computed.
        return _blocks(q_end if self.causal else self.nk, self.key_block)


def _scores(q_blk: Tensor, k_blk: Tensor, scale: float, keep: Tensor | None) -> Tensor:
    """[b, g, rep, m, d] x [b, g, n, d] -> scaled scores [b, g, rep, m, n], invisible entries -inf."""
    scores = torch.matmul(q_blk, k_blk.unsqueeze(2).transpose(-1, -2)) * scale
    if keep is not None:
        scores = scores.masked_fill(~keep, float("-inf"))
    return scores


class BlockwiseAttention(torch.autograd.Function):
    """(out, lse) = attention(q, k, v) computed block by block; see the module docstring."""

    @staticmethod
    def forward(ctx: Any, q: Tensor, k: Tensor, v: Tensor, scale: float, causal: bool, query_block: int,
                key_block: int, dropout_p: float, seed: int) -> tuple[Tensor, Tensor]:
        geo = _Geometry(q.shape[3], k.shape[2], causal, query_block, key_block)
        qf, kf, vf = (_upcast(t) for t in (q, k, v))
        out = torch.empty_like(qf)
        lse = qf.new_empty(q.shape[:4])
        for qi, qs, qe in _blocks(geo.nq, query_block):
            q_blk = qf[:, :, :, qs:qe]
            row_max = q_blk.new_full(q_blk.shape[:4], float("-inf"))
            row_sum = q_blk.new_zeros(q_blk.shape[:4])
            acc = torch.zeros_like(q_blk)
            for ki, ks, ke in geo.key_ranges(qe):
                keep = _causal_keep(qs, qe, ks, ke, q.device) if causal else None
                scores = _scores(q_blk, kf[:, :, ks:ke], scale, keep)
                # Online softmax: the first key block holds key 0, visible to every row, so row_max is
                # finite from then on and fully masked rows of later blocks contribute exp(-inf) = 0.
                new_max = torch.maximum(row_max, scores.amax(dim=-1))
                probs = torch.exp(scores - new_max.unsqueeze(-1))
                correction = torch.exp(row_max - new_max)
                row_sum = row_sum * correction + probs.sum(dim=-1)
                if dropout_p > 0.0:
                    probs = probs * _dropout_keep(probs.shape, dropout_p, seed + qi * geo.key_blocks + ki,
                                                  q.device, qf.dtype)
                acc = acc * correction.unsqueeze(-1) + torch.matmul(probs, vf[:, :, ks:ke].unsqueeze(2))
                row_max = new_max
            out[:, :, :, qs:qe] = acc / row_sum.unsqueeze(-1)
            lse[:, :, :, qs:qe] = row_max + torch.log(row_sum)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.geometry, ctx.scale, ctx.dropout_p, ctx.seed = geo, scale, dropout_p, seed
        return out.to(q.dtype), lse

    @staticmethod
    def backward(ctx: Any, d_out: Tensor | None, d_lse: Tensor | None) -> tuple[Tensor | None, ...]:
        q, k, v, out, lse = ctx.saved_tensors
        geo, scale, dropout_p = ctx.geometry, ctx.scale, ctx.dropout_p
        qf, kf, vf = (_upcast(t) for t in (q, k, v))
        d_out = torch.zeros_like(out) if d_out is None else d_out.to(out.dtype)
        d_lse = torch.zeros_like(lse) if d_lse is None else d_lse.to(lse.dtype)
        # d(out_i)/d(s_ij) contracts to p_ij (dp_ij - <d_out_i, out_i>); d(lse_i)/d(s_ij) = p_ij.
        row_term = (d_out * out).sum(dim=-1) - d_lse
        dq, dk, dv = torch.zeros_like(qf), torch.zeros_like(kf), torch.zeros_like(vf)
        for qi, qs, qe in _blocks(geo.nq, geo.query_block):
            q_blk, do_blk = qf[:, :, :, qs:qe], d_out[:, :, :, qs:qe]
            for ki, ks, ke in geo.key_ranges(qe):
                keep = _causal_keep(qs, qe, ks, ke, q.device) if geo.causal else None
                k_blk, v_blk = kf[:, :, ks:ke].unsqueeze(2), vf[:, :, ks:ke].unsqueeze(2)
                probs = torch.exp(_scores(q_blk, kf[:, :, ks:ke], scale, keep) - lse[:, :, :, qs:qe, None])
                d_probs = torch.matmul(do_blk, v_blk.transpose(-1, -2))
                if dropout_p > 0.0:
                    drop = _dropout_keep(probs.shape, dropout_p, ctx.seed + qi * geo.key_blocks + ki, q.device,
                                         qf.dtype)
                    d_probs = d_probs * drop
                    dv[:, :, ks:ke] += torch.matmul((probs * drop).transpose(-1, -2), do_blk).sum(dim=2)
                else:
                    dv[:, :, ks:ke] += torch.matmul(probs.transpose(-1, -2), do_blk).sum(dim=2)
                d_scores = probs * (d_probs - row_term[:, :, :, qs:qe, None]) * scale
                dq[:, :, :, qs:qe] += torch.matmul(d_scores, k_blk)
                dk[:, :, ks:ke] += torch.matmul(d_scores.transpose(-1, -2), q_blk).sum(dim=2)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None, None, None


def blockwise_attention(q: Tensor, k: Tensor, v: Tensor, scale: float, causal: bool,
                        query_block: int = DEFAULT_QUERY_BLOCK, key_block: int = DEFAULT_KEY_BLOCK,
                        dropout_p: float = 0.0) -> tuple[Tensor, Tensor]:
    """(out [b, g, rep, nq, d] in q's dtype, lse [b, g, rep, nq] in >= fp32); see BlockwiseAttention."""
    # Dropout masks come from a seed drawn off the ambient RNG (so megatron's RNG forks still govern them).
    seed = int(torch.randint(0, 2**62, (1,))) if dropout_p > 0.0 else 0
    return BlockwiseAttention.apply(q, k, v, scale, causal, query_block, key_block, dropout_p, seed)


def merge_partials(out_a: Tensor, lse_a: Tensor, out_b: Tensor, lse_b: Tensor) -> Tensor:
    """Exact softmax over the union of two disjoint key sets from each set's output and log-sum-exp."""
    lse = torch.logaddexp(lse_a, lse_b)
    weight_a = torch.exp(lse_a - lse).unsqueeze(-1).to(out_a.dtype)
    weight_b = torch.exp(lse_b - lse).unsqueeze(-1).to(out_b.dtype)
    return weight_a * out_a + weight_b * out_b
