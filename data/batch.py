"""The contract between data/ and train/.

`Document` is one processed sample (tokenized text with its vision placeholders, pixels and positions);
`data.packing` turns a stream of documents into `PackedBatch`es of exactly `seq_len` tokens. The trainer and
every backend consume `PackedBatch` as is: nothing downstream re-derives what it carries.

Conventions:
- Vision tensors follow transformers' Qwen3-VL layout: `pixel_values` [num_patches, C * T * ps * ps] in the
  patch order of its image processor, `grid_thw` [num_items, 3] in patch units (before the 2x2 merge).
  Pixels are uint8 (resized values, normalised by the model's first op on the device) or float32 (already
  normalised: data.encode.image.pixel_dtype=float32, or HF-processor output); the model accepts both.
- `position_ids` are interleaved-MRoPE (t, h, w) indices that restart at 0 for every document.
- `labels[i]` is the token to predict at position i (the next token of the same document), `loss_weights[i]`
  its weight (0 where nothing is predicted: document ends, vision placeholders, prompts, padding). The loss
  is sum(w * ce) / sum(w) with both sums taken over the whole global batch, which makes per-token (w=1),
  per-sample (w=1/N_s) and square-root (w=1/sqrt(N_s)) normalisation one formula.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

import torch

IGNORE_INDEX = -100


@dataclass
class Document:
    """One processed sample before packing. All token tensors have length n."""

    key: str  # "<shard>/<sample key>", unique in a data set; used for dedup checks and error messages
    source: int  # index of the data set in the stage's mixture
    input_ids: torch.Tensor  # [n] int64
    position_ids: torch.Tensor  # [3, n] int64, starting at 0
    target_mask: torch.Tensor  # [n] bool: token i is predicted from tokens < i (text the model learns)
    pixel_values: torch.Tensor | None = None  # images, [P, C*T*ps*ps]
    image_grid_thw: torch.Tensor | None = None  # [num_images, 3]
    pixel_values_videos: torch.Tensor | None = None  # videos, [P, C*T*ps*ps]
    video_grid_thw: torch.Tensor | None = None  # [num_videos, 3]

    def __len__(self) -> int:
        return int(self.input_ids.numel())

    @property
    def nbytes(self) -> int:
        """Bytes of its tensors: what the document costs in a packing buffer and in a batch."""
        return sum(t.numel() * t.element_size() for t in (
            self.input_ids, self.position_ids, self.target_mask, self.pixel_values, self.image_grid_thw,
            self.pixel_values_videos, self.video_grid_thw) if t is not None)


@dataclass
class PackedBatch:
    """One packed sequence of seq_len tokens holding several documents (and a trailing pad segment)."""

    input_ids: torch.Tensor  # [L] int64
    position_ids: torch.Tensor  # [3, L] int64, restarting per document
    cu_seqlens: torch.Tensor  # [D + 1] int32, document (+ its own padding) boundaries; the pad tail is a segment
    labels: torch.Tensor  # [L] int64, IGNORE_INDEX where nothing is predicted
    loss_weights: torch.Tensor  # [L] float32
    source_ids: torch.Tensor  # [L] int64, mixture index per token (-1 for padding)
    pixel_values: torch.Tensor | None = None
    image_grid_thw: torch.Tensor | None = None
    pixel_values_videos: torch.Tensor | None = None
    video_grid_thw: torch.Tensor | None = None
    # keys of the documents in this sequence, in order; "" for a pad tail that is not the last segment
    # (a batch joined by `concat_batches`), so index d is segment d's key
    doc_keys: list[str] = field(default_factory=list)
    num_pad: int = 0  # padding tokens: the tail segment plus any per-document padding (packing.py)

    @property
    def seq_len(self) -> int:
        return int(self.input_ids.numel())

    @property
    def has_vision(self) -> bool:
        return self.pixel_values is not None or self.pixel_values_videos is not None

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "PackedBatch":
        moved: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            moved[f.name] = value.to(device, non_blocking=non_blocking) if torch.is_tensor(value) else value
        return PackedBatch(**moved)


def cat_optional(parts: list[torch.Tensor | None]) -> torch.Tensor | None:
    """torch.cat of the tensors that exist (None when none does): documents without pixels have None."""
    present = [p for p in parts if p is not None]
    return torch.cat(present) if present else None


def concat_batches(batches: list[PackedBatch]) -> PackedBatch:
    """The packed sequences one after another as ONE packed sequence (for a forward pass over several).

    Attention, positions and the loss are per document and its weights are already per token, so the
    joined batch gives the same loss and gradients as its parts run one by one; each part's pad tail stays a
    segment of its own."""
    if len(batches) == 1:
        return batches[0]
    offsets = [0]
    for b in batches:
        offsets.append(offsets[-1] + b.seq_len)
    keys: list[str] = []
    for b in batches[:-1]:
        keys += b.doc_keys + [""] * (b.cu_seqlens.numel() - 1 - len(b.doc_keys))
    return PackedBatch(
        input_ids=torch.cat([b.input_ids for b in batches]),
        position_ids=torch.cat([b.position_ids for b in batches], dim=-1),
        cu_seqlens=torch.cat([batches[0].cu_seqlens[:1]] + [b.cu_seqlens[1:] + off
                                                               for b, off in zip(batches, offsets)]),
        labels=torch.cat([b.labels for b in batches]),
        loss_weights=torch.cat([b.loss_weights for b in batches]),
        source_ids=torch.cat([b.source_ids for b in batches]),
        pixel_values=cat_optional([b.pixel_values for b in batches]),
        image_grid_thw=cat_optional([b.image_grid_thw for b in batches]),
        pixel_values_videos=cat_optional([b.pixel_values_videos for b in batches]),
        video_grid_thw=cat_optional([b.video_grid_thw for b in batches]),
        doc_keys=keys + batches[-1].doc_keys,
        num_pad=sum(b.num_pad for b in batches),
    )
