"""Context-parallel core attention for megatron-core without TransformerEngine (CPU, or GPUs without TE).

Drop-in for `core_attention` in a megatron layer spec (where TEDotProductAttention would go). Each CP rank
holds the query/key/value of its share of the sequence in one of two layouts (train/parallel/context.py),
told by the packed params megatron passes on:
- qkv_format "sbhd" (or no packed params): megatron's load-balanced split of the whole sequence (2*cp
  chunks, rank r holding chunks r and 2*cp-1-r, `get_batch_on_this_cp_rank`), cu_seqlens_q the document
  boundaries of the full, unsplit sequence;
- qkv_format "thd" (query [t, heads, hn]): Transformer Engine's per-document split (every document in 2*cp
  chunks), the boundaries from cu_seqlens_q_padded. This is the layout TE's THD context parallelism reads,
  so a CPU run of it exercises the same split, padding and megatron THD rotary code as a TE run.

The module all-gathers K/V over the CP group (differentiable: the backward sums every rank's K/V gradient
and hands each rank its own slice), puts them back in sequence order, and attends its local queries against
them; a token attends only to earlier tokens of its own document.

Memory: no L x L (or L/cp x L) mask or score tensor is built. Queries are processed per run of consecutive
local positions within one document, each against the keys from its document start up to its last query
only: the keys before the run unmasked, the diagonal block causally, both blockwise
(blockwise_attention.py), merged by log-sum-exp.
"""
from __future__ import annotations

import functools
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
from train.parallel.context import context_shares


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


def context_layout(packed_seq_params: PackedSeqParams | None, total_len: int) -> tuple[str, list[int]]:
    """(CP layout, document boundaries [0, ..., total_len] of the full sequence) the packed params describe:
    sbhd (or none: one document) is the whole-sequence load-balanced split, thd the per-document one (TE's
    THD layout, boundaries from the padded cu_seqlens)."""
    if packed_seq_params is None or packed_seq_params.cu_seqlens_q is None:
        return "sequence", [0, total_len]
    fmt = packed_seq_params.qkv_format
    if fmt in (None, "sbhd"):
        layout, cu = "sequence", packed_seq_params.cu_seqlens_q
    elif fmt == "thd":
        padded = packed_seq_params.cu_seqlens_q_padded
        layout, cu = "document", packed_seq_params.cu_seqlens_q if padded is None else padded
    else:
        raise ValueError(f"ContextParallelAttention reads qkv_format 'sbhd' (whole-sequence split) or 'thd' "
                         f"(per-document split), got {fmt!r}")
    bounds = [int(x) for x in cu.tolist()]
    if bounds[0] != 0 or bounds[-1] != total_len or any(b > c for b, c in zip(bounds, bounds[1:])):
        raise ValueError(f"cu_seqlens {bounds} must rise from 0 to the full sequence length {total_len}")
    return layout, bounds


def sequence_order(shares: list[Tensor]) -> Tensor:
    """The rows of the rank-ordered concatenation of `shares` (the positions each CP rank holds,
    context_shares) that put it back in sequence order."""
    return torch.argsort(torch.cat(shares))


def gather_sequence(local: Tensor, group: dist.ProcessGroup, order: Tensor) -> Tensor:
    """Rebuild the full sequence (dim 0, global order) from every CP rank's share (`order`: sequence_order)."""
    gathered = _GatherSequence.apply(local, group)  # rank order: share 0, share 1, ...
    return gathered.index_select(0, order.to(gathered.device))


@functools.lru_cache(maxsize=8)
def rank_plan(layout: str, bounds: tuple[int, ...], total_len: int, cp_size: int,
              cp_rank: int) -> tuple[Tensor | None, list[tuple[int, int, int, int]]]:
    """(sequence_order of the CP shares, None without CP; this rank's query_runs): the same for every layer
    of a forward, so each layer after the first finds it here instead of recomputing the shares."""
    if cp_size == 1:
        return None, query_runs(torch.arange(total_len), list(bounds))
    shares = context_shares(layout, torch.tensor(bounds), total_len, cp_size)
    return sequence_order(shares), query_runs(shares[cp_rank], list(bounds))


def query_runs(index: Tensor, bounds: list[int]) -> list[tuple[int, int, int, int]]:
    """(first local row, document start, first position, end position) of every run of consecutive
    positions of `index` (ascending) inside one document: the pieces a rank's queries are attended in
    (about two per document and rank). Found with tensor ops: a share holds up to seq_len / cp positions."""
    if index.numel() == 0:
        return []
    edges = torch.tensor(bounds)
    doc = torch.searchsorted(edges, index, right=True) - 1
    new_run = torch.ones(index.numel(), dtype=torch.bool)
    new_run[1:] = (index[1:] != index[:-1] + 1) | (doc[1:] != doc[:-1])
    rows = new_run.nonzero().squeeze(1).tolist()
    ends = rows[1:] + [index.numel()]
    return [(row, bounds[int(doc[row])], int(index[row]), int(index[end - 1]) + 1) for row, end in zip(rows, ends)]


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
        thd = query.dim() == 3  # THD: [t, heads, hn], one packed sequence (megatron squeezed the batch)
        if thd:
            query, key, value = query[:, None], key[:, None], value[:, None]
        # No CP group (megatron's groups not initialised): plain single-rank attention.
        cp_size = dist.get_world_size(self.cp_group) if self.cp_group is not None else 1
        total_len = query.shape[0] * cp_size
        layout, bounds = context_layout(packed_seq_params, total_len)
        if len(bounds) > 2 and query.shape[1] != 1:
            raise ValueError(f"packed sequences need micro-batch size 1, got {query.shape[1]}")
        cp_rank = dist.get_rank(self.cp_group) if cp_size > 1 else 0
        order, runs = rank_plan(layout, tuple(bounds), total_len, cp_size, cp_rank)
        if order is not None:
            key, value = gather_sequence(key, self.cp_group, order), gather_sequence(value, self.cp_group, order)
        dropout_p = self.dropout_p if self.training else 0.0
        pieces = []
        for row, doc_start, start, end in runs:
            q = query[row: row + end - start]
            pieces.append(self._attend(q, key[doc_start:end], value[doc_start:end], dropout_p))
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
