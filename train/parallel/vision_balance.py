"""Vision work balanced across the data-parallel ranks of a step, by exchanging whole micro-batches.

Why: every micro-batch holds seq_len tokens, so the decoder's work is the same on every rank, but the vision
tower's is not: a rank whose micro-batches carry more image/video patches than its peers' makes every rank
wait at the gradient reduction. Each rank's loader fills its micro-batches independently, so one step's
vision cost per rank can differ several-fold.

What: before a step, the DP ranks share the ViT cost of their micro-batches (a few floats), every rank
computes the same deterministic assignment of the step's DP x GA micro-batches to ranks (GA each, so the
token count stays equal), and the micro-batches that change rank are sent point to point. The loss is
normalised by sums over the whole global batch, so which rank trains which micro-batch does not change the
step's math; loader state is untouched (each rank still consumed exactly its own batches), so exact resume
is unchanged. TP / CP / PP peers of a rank hold the same batches and compute the same plan, each in its own
DP group.

ViT cost of one frame of n patches (per layer, up to a constant): 24 d^2 n for the linear layers and
4 d n^2 for attention (d = the tower's hidden size), i.e. n + n^2 / (6 d) in units of patches.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from data.batch import PackedBatch
from train.device import comm_tensor, comm_zeros


def vit_cost(batch: PackedBatch, hidden_size: int) -> float:
    """Patches plus per-frame attention cost (in patch units) of one micro-batch's vision items."""
    grids = [g for g, p in ((batch.image_grid_thw, batch.pixel_values),
                            (batch.video_grid_thw, batch.pixel_values_videos)) if p is not None and g is not None]
    if not grids:
        return 0.0
    rows = torch.cat(grids).to(torch.float64)
    frames, per_frame = rows[:, 0], rows[:, 1] * rows[:, 2]
    return float((frames * per_frame).sum() + (frames * per_frame ** 2).sum() / (6 * hidden_size))


def plan_balanced(costs: list[list[float]]) -> list[list[tuple[int, int]]]:
    """costs[r][i]: ViT cost of micro-batch i of DP rank r (the same count on every rank). For each rank, the
    (source rank, index) of the micro-batches it trains: as many as before, max rank cost near the mean.

    Greedy largest-first onto the least loaded rank with room, then swaps between the most loaded rank and
    any other while they lower the maximum; finally the bins are labelled with ranks so that as many
    micro-batches as possible stay where they are (less traffic). Deterministic (ties by rank, index)."""
    ranks, per_rank = len(costs), len(costs[0]) if costs else 0
    if any(len(c) != per_rank for c in costs):
        raise ValueError(f"every DP rank needs the same number of micro-batches, got {[len(c) for c in costs]}")
    items = sorted(((costs[r][i], r, i) for r in range(ranks) for i in range(per_rank)),
                   key=lambda x: (-x[0], x[1], x[2]))
    bins: list[list[tuple[float, int, int]]] = [[] for _ in range(ranks)]
    loads = [0.0] * ranks
    for item in items:
        target = min((b for b in range(ranks) if len(bins[b]) < per_rank), key=lambda b: (loads[b], b))
        bins[target].append(item)
        loads[target] += item[0]
    _swap_down(bins, loads)
    return [[(r, i) for _, r, i in sorted(b, key=lambda x: (x[1], x[2]))] for b in _label_bins(bins)]


def _swap_down(bins: list[list[tuple[float, int, int]]], loads: list[float], max_rounds: int = 1000) -> None:
    """Swap one micro-batch of the most loaded rank with a lighter one of any other rank while that lowers
    the pair's maximum (the best such swap each round)."""
    for _ in range(max_rounds):
        hi = max(range(len(bins)), key=lambda b: (loads[b], -b))
        best, best_max = None, loads[hi]
        for other in range(len(bins)):
            for a, x in enumerate(bins[hi]):
                for b, y in enumerate(bins[other]):
                    delta = x[0] - y[0]
                    new_max = max(loads[hi] - delta, loads[other] + delta)
                    if other != hi and delta > 0 and new_max < best_max - 1e-9:
                        best, best_max = (other, a, b, delta), new_max
        if best is None:
            return
        other, a, b, delta = best
        bins[hi][a], bins[other][b] = bins[other][b], bins[hi][a]
        loads[hi] -= delta
        loads[other] += delta


def _label_bins(bins: list[list[tuple[float, int, int]]]) -> list[list[tuple[float, int, int]]]:
    """Order the bins so that bin r goes to a rank owning many of its items (greedy by overlap)."""
    ranks = len(bins)
    overlap = sorted(((sum(1 for _, r, _ in bins[b] if r == rank), b, rank) for b in range(ranks)
                      for rank in range(ranks)), key=lambda x: (-x[0], x[1], x[2]))
    bin_of: dict[int, int] = {}
    taken: set[int] = set()
    for _, b, rank in overlap:
        if rank not in bin_of and b not in taken:
            bin_of[rank] = b
            taken.add(b)
    return [bins[bin_of[rank]] for rank in range(ranks)]


def max_over_mean(loads: list[float]) -> float:
    """Straggler factor of one step: the slowest rank's vision cost over the average (1.0 when no vision)."""
    mean = sum(loads) / len(loads)
    return max(loads) / mean if mean > 0 else 1.0


def balance_micro_batches(micro: list[PackedBatch], hidden_size: int,
                          group: dist.ProcessGroup | None) -> list[PackedBatch]:
    """This rank's micro-batches after the balanced exchange within its data-parallel `group` (collective:
    every rank of the group calls it with the same number of micro-batches). Identity without a group."""
    if group is None or dist.get_world_size(group) == 1:
        return micro
    size, rank = dist.get_world_size(group), dist.get_rank(group)
    local = comm_tensor([vit_cost(b, hidden_size) for b in micro], dtype=torch.float64, group=group)
    gathered = [comm_zeros(len(micro), torch.float64, group=group) for _ in range(size)]
    dist.all_gather(gathered, local, group=group)
    plan = plan_balanced([g.cpu().tolist() for g in gathered])
    # One global order of the transfers (by source, index): every rank runs its own sends and receives in
    # that order, so each blocking pair meets without deadlock.
    transfers = sorted((src, idx, dst) for dst, items in enumerate(plan) for src, idx in items if src != dst)
    received: dict[tuple[int, int], PackedBatch] = {}
    for src, idx, dst in transfers:
        if rank == src:
            dist.send_object_list([micro[idx]], dst=dist.get_global_rank(group, dst), group=group)
        elif rank == dst:
            box: list[object] = [None]
            dist.recv_object_list(box, src=dist.get_global_rank(group, src), group=group)
            received[(src, idx)] = box[0]  # type: ignore[assignment]
    return [micro[idx] if src == rank else received[(src, idx)] for src, idx in plan[rank]]
