"""Context-parallel core attention for megatron-core without TransformerEngine (CPU, or GPUs without TE).

Drop-in for `core_attention` in a megatron layer spec (where TEDotProductAttention would go). Each CP rank
holds the query/key/value of its share of the sequence in megatron's load-balanced layout: the full
sequence is cut into 2*cp chunks and rank r holds chunks r and 2*cp-1-r (`get_batch_on_this_cp_rank`).

The module all-gathers K/V over the CP group (differentiable: the backward sums every rank's K/V gradient
and hands each rank its own slice) and attends its local query chunks against the gathered K/V. Packed
sequences: pass `PackedSeqParams(qkv_format="sbhd", cu_seqlens_q=<document boundaries of the full,
unsplit sequence>)`; a token then attends only to earlier tokens of its own document.

Memory: no L x L (or L/cp x L) mask or score tensor is built. Queries are processed per (local chunk,
document) piece, each against the keys from its document start up to its last query only: the keys before the
chunk unmasked, the diagonal block causally, both blockwise (blockwise_attention.py), merged by log-sum-exp.
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from megatron.core import parallel_state, tensor_parallel
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig

from train.backends.megatron.blockwise_attention import (DEFAULT_KEY_BLOCK, DEFAULT_QUERY_BLOCK,
                                                        blockwise_attention, merge_partials)
from train.device import on_group_device


class _GatherSequence(torch.autograd.Function):
    """All-gather along dim 0 in rank order; backward: reduce-scatter (gloo has it in torch 2.13)."""

    @staticmethod
    def forward(ctx: Any, local: Tensor, group: dist.ProcessGroup) -> Tensor:
        ctx.group = group
        local = on_group_device(local, group)
        parts = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, local, group=group)
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        # Every rank's queries produced gradient for every rank's K/V: sum over ranks, keep own slice.
        group = ctx.group
        grad = on_group_device(grad, group)
        out = torch.empty_like(grad.chunk(dist.get_world_size(group), dim=0)[dist.get_rank(group)])
        dist.reduce_scatter_tensor(out, grad, group=group)
        return out, None


def load_balanced_chunks(cp_rank: int, cp_size: int) -> tuple[int, ...]:
    """Indices of the 2*cp sequence chunks held by `cp_rank` (megatron's get_batch_on_this_cp_rank)."""
    if cp_size == 1:
        return (0,)
    return (cp_rank, 2 * cp_size - 1 - cp_rank)


def gather_sequence(local: Tensor, group: dist.ProcessGroup) -> Tensor:
    """Rebuild the full sequence (dim 0, global order) from every CP rank's load-balanced share."""
    cp_size = dist.get_world_size(group)
    if cp_size == 1:
        return local
    chunks = _GatherSequence.apply(local, group).chunk(2 * cp_size, dim=0)
    # Rank-ordered chunks are [r0: c0, c_last], [r1: c1, c_last-1], ...; put them back in sequence order.
    owner = {}
    for rank in range(cp_size):
        for slot, chunk_idx in enumerate(load_balanced_chunks(rank, cp_size)):
            owner[chunk_idx] = 2 * rank + slot
    return torch.cat([chunks[owner[i]] for i in range(2 * cp_size)], dim=0)


def document_bounds(packed_seq_params: PackedSeqParams | None, total_len: int) -> list[int]:
    """Document boundaries [0, ..., total_len] of the full sequence; one document when not packed."""
    if packed_seq_params is None or packed_seq_params.cu_seqlens_q is None:
        return [0, total_len]
    if packed_seq_params.qkv_format not in (None, "sbhd"):
        raise ValueError(f"ContextParallelAttention takes packed sequences as qkv_format='sbhd' with "
                         f"cu_seqlens over the full sequence, got qkv_format={packed_seq_params.qkv_format!r}")
    bounds = [int(x) for x in packed_seq_params.cu_seqlens_q.tolist()]
    if bounds[0] != 0 or bounds[-1] != total_len or any(b > c for b, c in zip(bounds, bounds[1:])):
        raise ValueError(f"cu_seqlens {bounds} must rise from 0 to the full sequence length {total_len}")
    return bounds


def _causal_piece(query: Tensor, key: Tensor, value: Tensor, scale: float, dropout_p: float,
                  query_block: int, key_block: int) -> Tensor:
    """Attention of the last nq positions of a key range onto that range (query i sees keys <= its own).

    query [nq, b, np, hn], key/value [nk, b, ng, hn] with nk >= nq; returns [nq, b, np, hn]. The keys before
    the first query are all visible (no mask) and the last nq keys form the causal diagonal block; the two
    partial results are merged exactly by their log-sum-exp. Both go through blockwise_attention, so no
    score or mask tensor larger than heads x query_block x key_block is ever allocated (an explicit
    bottom-right mask would be nq x nk: 16 GiB for a 262K-token document at CP=2).
    """
    nq, nk = query.shape[0], key.shape[0]
    if nq == nk:
        # Nothing before the chunk: torch's fused causal SDPA (4-D inputs, so its flash kernel, which keeps
        # memory linear in nq on CPU and CUDA) is exact and several times faster than the Python blocks.
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, dropout_p=dropout_p,
                                             enable_gqa=q.shape[1] != k.shape[1])
        return out.permute(2, 0, 1, 3)
    groups = key.shape[2]
    # [s, b, heads, hn] -> [b, groups, rep, s, hn]: query head h uses K/V group h // rep (megatron's GQA).
    q = query.permute(1, 2, 0, 3).unflatten(1, (groups, -1))
    k, v = (t.permute(1, 2, 0, 3) for t in (key, value))
    blocks = {"query_block": query_block, "key_block": key_block, "dropout_p": dropout_p}
    diagonal, diagonal_lse = blockwise_attention(q, k[:, :, nk - nq:], v[:, :, nk - nq:], scale, causal=True,
                                                 **blocks)
    before, before_lse = blockwise_attention(q, k[:, :, :nk - nq], v[:, :, :nk - nq], scale, causal=False,
                                             **blocks)
    out = merge_partials(before, before_lse, diagonal, diagonal_lse)
    return out.flatten(1, 2).permute(2, 0, 1, 3)


class ContextParallelAttention(MegatronModule):
    """Causal core attention with context parallelism over megatron's CP group (see module docstring)."""

    def __init__(self, config: TransformerConfig, layer_number: int, attn_mask_type: AttnMaskType,
                 attention_type: str, attention_dropout: float | None = None,
                 softmax_scale: float | None = None, cp_comm_type: str | None = None,
                 pg_collection: Any = None) -> None:
        super().__init__(config=config)
        if attn_mask_type != AttnMaskType.causal:
            raise ValueError(f"ContextParallelAttention supports causal self-attention only, got {attn_mask_type}")
        self.cp_group = getattr(pg_collection, "cp", None)
        if self.cp_group is None and parallel_state.model_parallel_is_initialized():
            self.cp_group = parallel_state.get_context_parallel_group()
        head_dim = config.kv_channels
        # apply_query_key_layer_scaling divides the scores by the layer number and multiplies them back
        # inside the fp16 softmax; in this fp32 SDPA path the two cancel, so only the base scale is used.
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(head_dim)
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout
        # Score-block shape of the blockwise attention: peak extra memory ~ 4 x heads x query x key block
        # floats per step (scores, probabilities and their gradients), whatever the sequence length.
        self.query_block, self.key_block = DEFAULT_QUERY_BLOCK, DEFAULT_KEY_BLOCK

    def forward(self, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
                attn_mask_type: AttnMaskType | None = None, attention_bias: Tensor | None = None,
                packed_seq_params: PackedSeqParams | None = None) -> Tensor:
        """query [sq, b, np, hn], key/value [sq, b, ng, hn] (local share) -> context [sq, b, np*hn]."""
        if attention_bias is not None or attention_mask is not None:
            # The mask is derived here (causal + cu_seqlens); a given one would be silently ignored.
            raise ValueError("ContextParallelAttention builds its own causal/document mask: pass "
                             "attention_mask=None and document boundaries via packed_seq_params")
        # No CP group (megatron's groups not initialised): plain single-rank attention.
        cp_size = dist.get_world_size(self.cp_group) if self.cp_group is not None else 1
        cp_rank = dist.get_rank(self.cp_group) if cp_size > 1 else 0
        if cp_size > 1:
            key, value = gather_sequence(key, self.cp_group), gather_sequence(value, self.cp_group)
        total_len = query.shape[0] * cp_size
        bounds = document_bounds(packed_seq_params, total_len)
        if len(bounds) > 2 and query.shape[1] != 1:
            raise ValueError(f"packed sequences need micro-batch size 1, got {query.shape[1]}")
        dropout_p = self.dropout_p if self.training else 0.0
        chunk_len = total_len // (2 * cp_size) if cp_size > 1 else total_len
        pieces = []
        for slot, chunk_idx in enumerate(load_balanced_chunks(cp_rank, cp_size)):
            start, end = chunk_idx * chunk_len, (chunk_idx + 1) * chunk_len
            local_start = slot * chunk_len
            for doc_start, doc_end in zip(bounds, bounds[1:]):
                q_start, q_end = max(start, doc_start), min(end, doc_end)
                if q_start >= q_end:
                    continue
                q = query[local_start + q_start - start: local_start + q_end - start]
                pieces.append(self._attend(q, key[doc_start:q_end], value[doc_start:q_end], dropout_p))
        context = torch.cat(pieces, dim=0)
        return context.reshape(context.shape[0], context.shape[1], -1)

    def _attend(self, query: Tensor, key: Tensor, value: Tensor, dropout_p: float) -> Tensor:
        if dropout_p > 0.0 and not self.config.sequence_parallel:
            # Same RNG discipline as megatron's DotProductAttention: TP ranks hold different heads.
            with tensor_parallel.get_cuda_rng_tracker().fork():
                return self._piece(query, key, value, dropout_p)
        return self._piece(query, key, value, dropout_p)

    def _piece(self, query: Tensor, key: Tensor, value: Tensor, dropout_p: float) -> Tensor:
        return _causal_piece(query, key, value, self.softmax_scale, dropout_p, self.query_block, self.key_block)
