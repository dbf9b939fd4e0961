"""Bookkeeping between vision placeholders in the token sequence and the vision tower's outputs.

The vision tower is called once per step on images and videos concatenated (images first); these helpers
check that every placeholder span has exactly its features, name the offending sample when not, map the
tower's rows onto the placeholder positions in sequence order, and build the dummy input that keeps the
tower in the graph of a text-only step (ZeRO-3 gathers its parameters on every rank, every step).
"""
from __future__ import annotations

import torch

from train.config.model import ModelConfig


def features_per_item(grid_thw: torch.Tensor | None, merge: int) -> list[int]:
    """Merged tokens of every image or video: t * h * w / merge^2."""
    if grid_thw is None:
        return []
    return [int(n) for n in (grid_thw.prod(-1) // (merge * merge)).tolist()]


def _document_name(d: int, lo: int, hi: int, doc_keys: list[str] | None) -> str:
    where = f"document {d} (tokens {lo}..{hi})"
    if doc_keys is not None and d < len(doc_keys) and doc_keys[d]:
        return f"sample {doc_keys[d]!r}, {where}"
    return where


def check_placeholder_counts(
    input_ids: torch.Tensor,
    cu_seqlens: torch.Tensor | None,
    image_grid_thw: torch.Tensor | None,
    video_grid_thw: torch.Tensor | None,
    cfg: ModelConfig,
    doc_keys: list[str] | None = None,
) -> None:
    """Raise ValueError naming the sample (doc key, else document index and token range) and both counts
    when a document's image/video placeholder tokens differ from the features its grids produce.
    Items are consumed in order, document by document, the same way the features are scattered."""
    bounds = [0, input_ids.numel()] if cu_seqlens is None else [int(b) for b in cu_seqlens]
    docs = list(zip(bounds[:-1], bounds[1:]))
    merge = cfg.vision.spatial_merge_size
    for kind, token_id, grid in (("image", cfg.image_token_id, image_grid_thw),
                                 ("video", cfg.video_token_id, video_grid_thw)):
        queue = features_per_item(grid, merge)
        counts = (input_ids == token_id).long()
        for d, (lo, hi) in enumerate(docs):
            tokens = int(counts[lo:hi].sum())
            features = 0
            while queue and features < tokens:
                features += queue.pop(0)
            if queue and d == len(docs) - 1:
                features += sum(queue)  # items left over belong to no placeholder: blame the last document
                queue = []
            if tokens != features:
                raise ValueError(f"{_document_name(d, lo, hi, doc_keys)}: {tokens} {kind} placeholder tokens "
                                 f"but {features} {kind} features from {kind}_grid_thw")


def visual_positions(input_ids: torch.Tensor, image_token_id: int, video_token_id: int,
                     num_image_features: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(visual_mask [L] bool, visual token indices [Nvis], row of the tower output feeding each of them).

    The tower's output holds all image rows then all video rows; visual tokens in sequence order take the
    next image row or the next video row depending on their placeholder id."""
    is_image = input_ids == image_token_id
    mask = is_image | (input_ids == video_token_id)
    index = mask.nonzero().squeeze(1)
    image_among_visual = is_image[index]
    image_row = torch.cumsum(image_among_visual.long(), 0) - 1
    video_row = torch.cumsum((~image_among_visual).long(), 0) - 1 + num_image_features
    return mask, index, torch.where(image_among_visual, image_row, video_row)


def concat_vision_inputs(
    pixel_values: torch.Tensor | None, image_grid_thw: torch.Tensor | None,
    pixel_values_videos: torch.Tensor | None, video_grid_thw: torch.Tensor | None,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Images then videos, as one tower input (pixels [P, D], grid [items, 3]); (None, None) if neither."""
    pixels = [p for p in (pixel_values, pixel_values_videos) if p is not None]
    grids = [g for g, p in ((image_grid_thw, pixel_values), (video_grid_thw, pixel_values_videos))
             if p is not None]
    if len(grids) != len(pixels) or any(g is None for g in grids):
        raise ValueError("pixel_values / pixel_values_videos given without image_grid_thw / video_grid_thw")
    if not pixels:
        return None, None
    return torch.cat(pixels), torch.cat(grids)


def dummy_vision_input(cfg: ModelConfig, device: torch.device,
                       dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The smallest valid tower input: one image of merge x merge patches (one merged token), all zeros."""
    v = cfg.vision
    patch_dim = v.in_channels * v.temporal_patch_size * v.patch_size * v.patch_size
    pixels = torch.zeros(v.spatial_merge_size ** 2, patch_dim, device=device, dtype=dtype)
    grid = torch.tensor([[1, v.spatial_merge_size, v.spatial_merge_size]], device=device)
    return pixels, grid
