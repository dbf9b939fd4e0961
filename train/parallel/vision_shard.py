"""Context-parallel embedding of one packed sequence with the vision work sharded across the CP group.

Running the vision tower, the token embeddings and the DeepStack features on the whole sequence on every
CP rank (then keeping a share) does not shrink with CP. Here each CP rank:

  1. runs the vision tower on ITS units only: a unit is one frame group of an image or video (one temporal
     patch: the ViT attends within a frame and interpolates positions per frame, so a frame's features do
     not depend on the other frames of its item); units are dealt to ranks by patch count (largest first,
     to the least-loaded rank, ties to the lower rank: deterministic, the same plan on every rank);
  2. sends every feature row (merged token + its DeepStack rows, packed side by side) to the ONE rank whose
     token share holds that row's placeholder, with one all-to-all whose backward is the reverse all-to-all:
     each row's gradient goes back to the rank that computed it (every row has exactly one consumer, so
     nothing is summed);
  3. embeds only its own tokens and places the received rows at its visual positions.

ZeRO-3: every rank calls the tower exactly once per micro-batch (on the dummy image when it has no unit, its
output then sent to nobody) and always takes part in the exchange, even with zero rows, so every rank builds
the same graph (tower -> exchange -> embeddings -> DeepStack after the same decoder layers) and gathers
parameters in the same order in forward and backward (see Qwen3VLModel.embed for the text-only case).
MRoPE positions are those of the whole sequence (precomputed in the batch), split with it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from data.batch import PackedBatch
from train.device import on_group_device
from train.models.qwen3vl.vision_inputs import (check_placeholder_counts, concat_vision_inputs,
                                                dummy_vision_input, visual_positions)
from train.parallel.context import ContextShard, split_tokens


def frame_units(grid_thw: torch.Tensor | None) -> torch.Tensor:
    """One [1, h, w] grid row per frame group of every item, in tower-input order: [units, 3]."""
    if grid_thw is None:
        return torch.zeros(0, 3, dtype=torch.long)
    grid = grid_thw.cpu().long()
    frames = torch.repeat_interleave(grid[:, 1:], grid[:, 0], dim=0)
    return torch.cat([torch.ones(frames.shape[0], 1, dtype=torch.long), frames], dim=1)


def assign_units(patches: list[int], cp_size: int) -> list[int]:
    """Owner rank of every unit: largest first, each to the least-loaded rank (ties: lower rank)."""
    load = [0] * cp_size
    owner = [0] * len(patches)
    for unit in sorted(range(len(patches)), key=lambda u: (-patches[u], u)):
        rank = min(range(cp_size), key=lambda r: (load[r], r))
        owner[unit] = rank
        load[rank] += patches[unit]
    return owner


@dataclass
class ExchangePlan:
    """Who computes which units and where every feature row goes; identical on every rank."""

    my_units: torch.Tensor  # [k] units this rank runs through the tower, in tower-input order
    send_rows: torch.Tensor  # rows of this rank's tower output to send, grouped by destination rank
    send_splits: list[int]  # rows sent to each rank
    recv_splits: list[int]  # rows received from each rank
    recv_order: torch.Tensor  # received row -> position among this rank's visual tokens (share order)


def exchange_plan(row_of_position: torch.Tensor, units_rows: torch.Tensor, owner: torch.Tensor,
                  shares: list[torch.Tensor], rank: int) -> ExchangePlan:
    """row_of_position [L]: global feature row at each position (-1 off the visual tokens); units_rows
    [units]: feature rows per unit (global rows are the units' rows in unit order); owner [units]."""
    row_owner = torch.repeat_interleave(owner, units_rows)
    # Row of each global feature within its owner's tower output (the owner runs its units in order).
    local_start = torch.zeros_like(units_rows)
    for r in range(len(shares)):
        mine = owner == r
        local_start[mine] = torch.cumsum(units_rows[mine], 0) - units_rows[mine]
    row_local = torch.arange(int(units_rows.sum())) - torch.repeat_interleave(
        torch.cumsum(units_rows, 0) - units_rows - local_start, units_rows)
    needed = [row_of_position[share][row_of_position[share] >= 0] for share in shares]  # share order
    send = [needed[r][row_owner[needed[r]] == rank] for r in range(len(shares))]
    mine_needed = row_owner[needed[rank]]
    from_each = [torch.nonzero(mine_needed == s).squeeze(1) for s in range(len(shares))]
    return ExchangePlan(my_units=torch.nonzero(owner == rank).squeeze(1),
                        send_rows=row_local[torch.cat(send)], send_splits=[len(s) for s in send],
                        recv_splits=[len(f) for f in from_each], recv_order=torch.cat(from_each))


class _ExchangeRows(torch.autograd.Function):
    """All-to-all of rows with uneven splits; backward sends each row's gradient back to its sender."""

    @staticmethod
    def forward(ctx, rows, send_splits, recv_splits, group):  # type: ignore[override]
        ctx.splits, ctx.group = (send_splits, recv_splits), group
        rows = on_group_device(rows, group)
        out = rows.new_empty(sum(recv_splits), rows.shape[1])
        dist.all_to_all_single(out, rows, recv_splits, send_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        send_splits, recv_splits = ctx.splits
        grad = on_group_device(grad, ctx.group)
        out = grad.new_empty(sum(send_splits), grad.shape[1])
        dist.all_to_all_single(out, grad, send_splits, recv_splits, group=ctx.group)
        return out, None, None, None


def embed_context_share(model, batch: PackedBatch, shares: list[torch.Tensor],
                        group: dist.ProcessGroup) -> ContextShard:
    """This CP rank's share of the embedded sequence. `model` has cfg, visual and
    language_model.embed_tokens (Qwen3VLModel, or a view of another backend's modules); shares[r] are
    the positions rank r of `group` holds (shard_index), the same list on every rank."""
    cfg, rank = model.cfg, dist.get_rank(group)
    if len(shares) != dist.get_world_size(group):
        raise ValueError(f"{len(shares)} token shares for a context-parallel group of {dist.get_world_size(group)}")
    input_ids = batch.input_ids
    check_placeholder_counts(input_ids, batch.cu_seqlens, batch.image_grid_thw, batch.video_grid_thw, cfg,
                             batch.doc_keys)
    index = shares[rank].to(input_ids.device)
    embeds = model.language_model.embed_tokens(input_ids.index_select(0, index))
    pixels, grid = concat_vision_inputs(batch.pixel_values, batch.image_grid_thw, batch.pixel_values_videos,
                                        batch.video_grid_thw)
    merge = cfg.vision.spatial_merge_size ** 2
    units = frame_units(grid)
    units_patches = units.prod(-1)
    image_units = len(frame_units(batch.image_grid_thw if batch.pixel_values is not None else None))
    mask, positions, rows = visual_positions(input_ids.cpu(), cfg.image_token_id, cfg.video_token_id,
                                             int(units_patches[:image_units].sum()) // merge)
    row_of_position = torch.full((batch.seq_len,), -1, dtype=torch.long).index_put_((positions,), rows)
    owner = torch.tensor(assign_units(units_patches.tolist(), len(shares)), dtype=torch.long)
    plan = exchange_plan(row_of_position, units_patches // merge, owner, [s.cpu() for s in shares], rank)
    if len(plan.my_units):
        starts = torch.cumsum(units_patches, 0) - units_patches
        patch_index = torch.cat([torch.arange(int(starts[u]), int(starts[u] + units_patches[u]))
                                 for u in plan.my_units.tolist()]).to(pixels.device)
        merged, deepstack = model.visual(pixels.index_select(0, patch_index), units[plan.my_units].to(grid.device))
    else:  # no unit for this rank: the tower still runs once (ZeRO-3), its rows are sent to nobody
        merged, deepstack = model.visual(*dummy_vision_input(cfg, embeds.device, embeds.dtype))
    features = torch.cat([merged, *deepstack], dim=1)  # one exchange for the merged and DeepStack rows
    device = features.device
    received = _ExchangeRows.apply(features.index_select(0, plan.send_rows.to(device)), plan.send_splits,
                                   plan.recv_splits, group)
    in_share_order = received.index_select(0, torch.argsort(plan.recv_order).to(device)).to(embeds.dtype)
    hidden = embeds.shape[1]
    local_mask = mask.to(input_ids.device).index_select(0, index)
    embeds = embeds.index_put((local_mask.nonzero().squeeze(1),), in_share_order[:, :hidden])
    labels, loss_weights, source_ids = split_tokens(batch, index.to(batch.labels.device))
    return ContextShard(
        index=index, inputs_embeds=embeds, position_ids=batch.position_ids.index_select(1, index.to(
            batch.position_ids.device)).to(embeds.device), visual_mask=local_mask,
        deepstack=[in_share_order[:, hidden * (i + 1):hidden * (i + 2)] for i in range(len(deepstack))],
        labels=labels.to(embeds.device), loss_weights=loss_weights.to(embeds.device),
        source_ids=source_ids.to(embeds.device), cu_seqlens=batch.cu_seqlens.to(embeds.device))
