"""3-D (t, h, w) position ids for interleaved MRoPE.

Text tokens carry the same running index on all three axes. A vision item (an image, or one temporal patch
group of a video) carries its grid indices (t, h/merge, w/merge) offset by the position of the token that
precedes it, and the next text token continues from the item's max + 1. Video time is carried by the text
timestamps, so every video frame group is its own item with t = 0 (its grid row is split per temporal patch).
Packed sequences restart positions at 0 for every document (segment of `cu_seqlens`).

data/ computes these once per document; the model only recomputes them when called without position ids
(HF-style inference), through the same function. The module lives in data/ because it is part of the
PackedBatch contract: the model imports it from here (data/ imports nothing from train/).
"""
from __future__ import annotations

import torch


def split_video_grids(video_grid_thw: torch.Tensor | None) -> torch.Tensor | None:
    """One row per temporal patch group with t = 1: how the LLM sequence lays out a video's frames."""
    if video_grid_thw is None or video_grid_thw.numel() == 0:
        return video_grid_thw
    rows = torch.repeat_interleave(video_grid_thw, video_grid_thw[:, 0], dim=0).clone()
    rows[:, 0] = 1
    return rows


def document_position_ids(
    input_ids: torch.Tensor,
    image_grid_thw: torch.Tensor | None,
    video_grid_thw: torch.Tensor | None,
    *,
    image_token_id: int,
    video_token_id: int,
    spatial_merge_size: int,
    start: int = 0,
) -> torch.Tensor:
    """Position ids [3, n] of one document. `video_grid_thw` is per video (not yet split per frame)."""
    return _positions(input_ids, _grid_queue(image_grid_thw), _grid_queue(split_video_grids(video_grid_thw)),
                      image_token_id, video_token_id, spatial_merge_size, start)


def packed_position_ids(
    input_ids: torch.Tensor,
    cu_seqlens: torch.Tensor | None,
    image_grid_thw: torch.Tensor | None,
    video_grid_thw: torch.Tensor | None,
    *,
    image_token_id: int,
    video_token_id: int,
    spatial_merge_size: int,
) -> torch.Tensor:
    """Position ids [3, L] of a packed sequence: positions restart at 0 at every cu_seqlens boundary."""
    bounds = [0, input_ids.numel()] if cu_seqlens is None else [int(b) for b in cu_seqlens]
    images, videos = _grid_queue(image_grid_thw), _grid_queue(split_video_grids(video_grid_thw))
    parts = [
        _positions(input_ids[lo:hi], images, videos, image_token_id, video_token_id, spatial_merge_size, 0)
        for lo, hi in zip(bounds[:-1], bounds[1:])
    ]
    for name, queue in (("image", images), ("video frame group", videos)):
        if queue:
            raise ValueError(f"{len(queue)} {name} grid(s) left over: more grids than placeholder spans")
    return torch.cat(parts, dim=1) if parts else input_ids.new_zeros(3, 0)


def _grid_queue(grid_thw: torch.Tensor | None) -> list[tuple[int, int, int]]:
    if grid_thw is None:
        return []
    return [tuple(int(v) for v in row) for row in grid_thw.tolist()]  # type: ignore[misc]


def _positions(input_ids, images, videos, image_token_id, video_token_id, merge, start) -> torch.Tensor:
    n = input_ids.numel()
    out = torch.empty(3, n, dtype=torch.long)
    ids = input_ids.tolist()
    pos, i = start, 0
    while i < n:
        tok = ids[i]
        if tok != image_token_id and tok != video_token_id:
            j = i
            while j < n and ids[j] != image_token_id and ids[j] != video_token_id:
                j += 1
            out[:, i:j] = torch.arange(pos, pos + j - i)
            pos += j - i
            i = j
            continue
        queue, kind = (images, "image") if tok == image_token_id else (videos, "video frame group")
        if not queue:
            raise ValueError(f"vision placeholder at token {i} has no {kind} grid left")
        t, h, w = queue.pop(0)
        gh, gw = h // merge, w // merge
        count = t * gh * gw
        if i + count > n or any(x != tok for x in ids[i:i + count]):
            raise ValueError(f"{kind} grid {(t, h, w)} needs {count} placeholder tokens at token {i}, "
                             f"found fewer")
        tt = torch.arange(t).repeat_interleave(gh * gw)
        hh = torch.arange(gh).repeat_interleave(gw).repeat(t)
        ww = torch.arange(gw).repeat(t * gh)
        out[:, i:i + count] = torch.stack([tt, hh, ww]) + pos
        pos += max(t, gh, gw)
        i += count
    return out
