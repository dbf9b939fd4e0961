"""Context-parallel shares of one packed sequence: which positions each CP rank holds, and what it holds.

Every per-token tensor is split consistently by the same positions:

  inputs_embeds [L, H], position_ids [3, L] (MRoPE positions of the WHOLE sequence, split with it),
  visual_mask [L], DeepStack features (one row per visual token: the rows of the visual tokens in the share),
  labels, loss_weights, source_ids [L].

The embeddings of a share are built by train/parallel/vision_shard.py (vision tower sharded by item over
the CP group, features exchanged to the rank whose share holds their placeholders); a vision span may
straddle the boundary between two ranks' shares, each rank then gets exactly its part of the span.

cu_seqlens stays global: attention (Ulysses all-to-all, or all-gather K/V) sees the full sequence again and
applies the document boundaries there.

Three layouts:
- contiguous: rank r holds tokens [r*L/cp, (r+1)*L/cp); what Ulysses needs, its attention cost is the same
  on every rank;
- load-balanced ("sequence"): the whole sequence is cut into 2*cp chunks and rank r holds chunks r and
  2*cp-1-r, which balances causal attention for all-gather / ring context parallelism on Megatron-core;
- per document ("document"): EVERY document of the packed sequence is cut into 2*cp chunks and rank r holds
  chunks r and 2*cp-1-r of each (Transformer Engine's THD context parallelism: thd_get_partitioned_indices).
  Each document's length must be a multiple of 2*cp: the packer pads every document to one
  (data/packing.py, `document_multiple`), and the cu_seqlens are those padded boundaries.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from data.batch import PackedBatch


def shard_index(seq_len: int, cp_size: int, cp_rank: int, load_balanced: bool = False) -> torch.Tensor:
    """Positions of the full sequence held by `cp_rank`, ascending. Raises naming the sizes when seq_len
    cannot be cut evenly (2*cp chunks for the load-balanced layout)."""
    pieces = 2 * cp_size if load_balanced else cp_size
    if seq_len % pieces:
        raise ValueError(f"sequence length {seq_len} is not divisible by {pieces} "
                         f"({'2 x ' if load_balanced else ''}parallel.cp={cp_size})")
    if not 0 <= cp_rank < cp_size:
        raise ValueError(f"cp_rank={cp_rank} outside the context-parallel group of size {cp_size}")
    size = seq_len // pieces
    if not load_balanced:
        return torch.arange(cp_rank * size, (cp_rank + 1) * size)
    mirror = pieces - 1 - cp_rank
    return torch.cat([torch.arange(cp_rank * size, (cp_rank + 1) * size),
                      torch.arange(mirror * size, (mirror + 1) * size)])


def document_shard_index(cu_seqlens: torch.Tensor, cp_size: int, cp_rank: int) -> torch.Tensor:
    """Positions held by `cp_rank` in the per-document layout, ascending: chunks r and 2*cp-1-r of every
    document [cu[i], cu[i+1]). Raises naming the document when its length is not a multiple of 2*cp."""
    if not 0 <= cp_rank < cp_size:
        raise ValueError(f"cp_rank={cp_rank} outside the context-parallel group of size {cp_size}")
    bounds = [int(b) for b in cu_seqlens.tolist()]
    pieces = 2 * cp_size
    runs = []
    for doc, (start, end) in enumerate(zip(bounds, bounds[1:])):
        if (end - start) % pieces:
            raise ValueError(f"document {doc} of the packed sequence has {end - start} tokens, not a multiple "
                             f"of 2 x parallel.cp = {pieces}: the per-document context-parallel split needs "
                             f"documents padded to it (the loader's document_multiple)")
        size = (end - start) // pieces
        for chunk in (cp_rank, pieces - 1 - cp_rank):
            runs.append(torch.arange(start + chunk * size, start + (chunk + 1) * size))
    return torch.cat(runs) if runs else torch.zeros(0, dtype=torch.long)


def context_shares(layout: str, cu_seqlens: torch.Tensor, seq_len: int, cp_size: int) -> list[torch.Tensor]:
    """Positions held by every CP rank in `layout` ("sequence": load-balanced over the whole sequence,
    "document": per document), the same list on every rank."""
    if layout == "document":
        return [document_shard_index(cu_seqlens, cp_size, r) for r in range(cp_size)]
    if layout == "sequence":
        return [shard_index(seq_len, cp_size, r, load_balanced=True) for r in range(cp_size)]
    raise ValueError(f"context-parallel layout {layout!r} is not one of sequence, document")


@dataclass
class ContextShard:
    """One CP rank's share of a packed sequence, ready for `model.decode` and the loss."""

    index: torch.Tensor  # [n] positions of the full sequence, ascending
    inputs_embeds: torch.Tensor  # [n, H]
    position_ids: torch.Tensor  # [3, n]
    visual_mask: torch.Tensor  # [n] bool
    deepstack: list[torch.Tensor]  # each [visual tokens in the share, H], in sequence order
    labels: torch.Tensor  # [n]
    loss_weights: torch.Tensor  # [n]
    source_ids: torch.Tensor  # [n]
    cu_seqlens: torch.Tensor  # global document boundaries (unchanged)


def split_tokens(batch: PackedBatch,
                 index: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(labels, loss_weights, source_ids) of a share (None: the whole sequence) without embedding anything:
    what the global loss normaliser needs before the forward passes."""
    if index is None:
        return batch.labels, batch.loss_weights, batch.source_ids
    index = index.to(batch.labels.device)  # shard_index builds it on the host; index_select needs one device
    return (batch.labels.index_select(0, index), batch.loss_weights.index_select(0, index),
            batch.source_ids.index_select(0, index))
