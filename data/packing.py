"""Best-fit packing of documents into `PackedBatch`es of exactly seq_len tokens, and per-document loss weights.

Packing: a buffer is filled until it holds `buffer_size` documents or `buffer_bytes` bytes of tensors, so it
never holds more than buffer_bytes plus one document (a few long-video documents weigh gigabytes; the byte
bound keeps a worker's memory bounded whatever the mix). The fill rule depends only on the buffered documents, so a buffer restored from
its documents' keys refills exactly as the uninterrupted run did. A sequence starts with the oldest document in the
buffer (so no document waits more than buffer_size sequences), then repeatedly takes the longest buffered
document that still fits the remaining space, refilling the buffer after each take; when nothing fits, the
rest is padding. Documents are never split across sequences: one longer than seq_len is cut at a text
boundary (before the vision_start of the span the limit falls in, so an image or a video frame group keeps
all its placeholder tokens, pixels and grid row) or dropped if no target would survive the cut.

Per-document padding (`document_multiple` m > 1): every document is followed by pad tokens up to a multiple
of m tokens, its cu_seqlens segment then being the padded document (the packer fits documents by their padded
length, so a sequence still holds exactly seq_len tokens). Transformer Engine's THD context parallelism cuts
every document into 2*cp chunks and needs m = 2*cp (train/parallel/context.py). The pads come after the
document's last token, so causal attention never lets a real token see them; they carry no target.

Loss weights: every supervised target of a document with N_s targets (in this sequence) gets
  sqrt -> 1/sqrt(N_s)    per_token -> 1    per_sample -> 1/N_s.
The trainer divides sum(w * ce) by sum(w) taken over the whole global batch (all data-parallel and
context-parallel ranks and micro-batches). That single normaliser turns the three weightings into their
textbook losses (per_token: mean over tokens; per_sample: mean over documents; sqrt: the Qwen3-VL
square-root-normalised loss sum_s sum_t l_t/sqrt(N_s) / sum_s sqrt(N_s)), and because it is global the loss
does not depend on how documents happen to be split across ranks, micro-batches or sequences.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from data.batch import IGNORE_INDEX, Document, PackedBatch, cat_optional


@dataclass(frozen=True)
class VisionTokens:
    """Special token ids (from the tokenizer) and the merge size that maps grids to placeholder counts."""

    vision_start: int = 3
    vision_end: int = 4
    image_pad: int = 5
    video_pad: int = 6
    spatial_merge_size: int = 2
    pad: int = 0

    @classmethod
    def from_tokenizer(cls, tok: Any, spatial_merge_size: int) -> "VisionTokens":
        """The ids of a data.tokenizer.Tokenizer (the defaults above are the project's sentencepiece ids)."""
        return cls(vision_start=tok.vision_start_id, vision_end=tok.vision_end_id, image_pad=tok.image_pad_id,
                   video_pad=tok.video_pad_id, spatial_merge_size=spatial_merge_size, pad=tok.pad_id)


def document_loss_weight(num_targets: int, mode: str) -> float:
    """Weight of each supervised target of a document with `num_targets` targets."""
    if num_targets <= 0:
        return 0.0
    if mode == "sqrt":
        return 1.0 / math.sqrt(num_targets)
    if mode == "per_token":
        return 1.0
    if mode == "per_sample":
        return 1.0 / num_targets
    raise ValueError(f"loss weighting {mode!r} is not one of sqrt, per_token, per_sample")


def num_targets(doc: Document) -> int:
    """Supervised targets: tokens predicted from an earlier token of the same document (index >= 1)."""
    return int(doc.target_mask[1:].sum())


def fit_document(doc: Document, seq_len: int, tokens: VisionTokens) -> Document | None:
    """`doc` if it fits; else its longest prefix <= seq_len that ends on a text boundary; None if that
    prefix would keep no supervised target."""
    n = len(doc)
    if n <= seq_len:
        return doc
    ids = doc.input_ids
    cut = seq_len
    starts = (ids[:cut] == tokens.vision_start).nonzero().flatten()
    if starts.numel():
        last = int(starts[-1])
        span_end = last + 1
        while span_end < n and int(ids[span_end]) in (tokens.image_pad, tokens.video_pad):
            span_end += 1
        if cut <= span_end:  # the limit falls inside [vision_start .. vision_end]: cut before the span
            cut = last
    if cut < 2 or not bool(doc.target_mask[1:cut].any()):
        return None
    return _prefix(doc, cut, tokens)


def _prefix(doc: Document, cut: int, tokens: VisionTokens) -> Document:
    ids = doc.input_ids[:cut]
    per_group = tokens.spatial_merge_size ** 2
    images, image_rows = _kept_items(doc.image_grid_thw, int((ids == tokens.image_pad).sum()), per_group, False)
    videos, video_rows = _kept_items(doc.video_grid_thw, int((ids == tokens.video_pad).sum()), per_group, True)
    return Document(
        key=doc.key, source=doc.source, input_ids=ids, position_ids=doc.position_ids[:, :cut],
        target_mask=doc.target_mask[:cut],
        pixel_values=None if images is None else doc.pixel_values[:image_rows],
        image_grid_thw=images,
        pixel_values_videos=None if videos is None else doc.pixel_values_videos[:video_rows],
        video_grid_thw=videos,
    )


def _kept_items(grid: torch.Tensor | None, kept_tokens: int, per_group: int,
                is_video: bool) -> tuple[torch.Tensor | None, int]:
    """Grid rows (a video's t shrunk to its whole kept frame groups) and pixel rows covering kept_tokens."""
    if grid is None or kept_tokens == 0:
        return None, 0
    rows, pixel_rows, left = [], 0, kept_tokens
    for t, h, w in grid.tolist():
        group_tokens = h * w // per_group
        groups = t if not is_video else min(t, left // group_tokens)
        if is_video and groups == 0 or left < groups * group_tokens:
            break
        rows.append([groups, h, w])
        pixel_rows += groups * h * w
        left -= groups * group_tokens
        if left == 0:
            break
    if left:
        raise ValueError(f"document cut leaves {left} placeholder tokens without a whole grid item")
    return torch.tensor(rows, dtype=grid.dtype), pixel_rows


def multiple_problem(seq_len: int, document_multiple: int) -> str | None:
    """Why documents cannot be padded to `document_multiple` in sequences of seq_len tokens (None: they can)."""
    if document_multiple < 1 or seq_len % document_multiple:
        return (f"seq_len={seq_len} is not a multiple of the per-document padding multiple {document_multiple} "
                f"(2 x parallel.cp with the per-document context-parallel split)")
    return None


def padded_length(num_tokens: int, multiple: int) -> int:
    """`num_tokens` rounded up to a multiple of `multiple` (what a document occupies in a sequence)."""
    return -(-num_tokens // multiple) * multiple


def _pad_segment(count: int, pad_id: int, first_position: int) -> dict[str, torch.Tensor]:
    """`count` pad tokens: no target, no weight, no data set (-1), text positions from first_position."""
    positions = torch.arange(first_position, first_position + count, dtype=torch.long).expand(3, count)
    return {"input_ids": torch.full((count,), pad_id, dtype=torch.long), "position_ids": positions,
            "labels": torch.full((count,), IGNORE_INDEX, dtype=torch.long), "loss_weights": torch.zeros(count),
            "source_ids": torch.full((count,), -1, dtype=torch.long)}


def _document_segment(d: Document, weighting: str) -> dict[str, torch.Tensor]:
    label = torch.full((len(d),), IGNORE_INDEX, dtype=torch.long)
    label[:-1] = torch.where(d.target_mask[1:], d.input_ids[1:], IGNORE_INDEX)
    return {"input_ids": d.input_ids.long(), "position_ids": d.position_ids.long(), "labels": label,
            "loss_weights": (label != IGNORE_INDEX).float() * document_loss_weight(num_targets(d), weighting),
            "source_ids": torch.full((len(d),), d.source, dtype=torch.long)}


def build_packed(docs: list[Document], seq_len: int, weighting: str, pad_id: int = 0,
                 document_multiple: int = 1) -> PackedBatch:
    """Concatenate documents (each padded to a multiple of document_multiple, total <= seq_len) and pad the
    tail, which becomes its own segment."""
    used = sum(padded_length(len(d), document_multiple) for d in docs)
    if used > seq_len:
        raise ValueError(f"documents hold {used} tokens, more than seq_len={seq_len}")
    segments, bounds = [], [0]
    for d in docs:
        segments.append(_document_segment(d, weighting))
        extra = padded_length(len(d), document_multiple) - len(d)
        if extra:  # positions continue the document's text positions
            segments.append(_pad_segment(extra, pad_id, int(d.position_ids.max()) + 1))
        bounds.append(bounds[-1] + len(d) + extra)
    if seq_len > used:
        segments.append(_pad_segment(seq_len - used, pad_id, 0))
        bounds.append(seq_len)
    cat = {key: torch.cat([s[key] for s in segments], dim=-1) for key in segments[0]}
    return PackedBatch(
        **cat, cu_seqlens=torch.tensor(bounds, dtype=torch.int32),
        pixel_values=cat_optional([d.pixel_values for d in docs]),
        image_grid_thw=cat_optional([d.image_grid_thw for d in docs]),
        pixel_values_videos=cat_optional([d.pixel_values_videos for d in docs]),
        video_grid_thw=cat_optional([d.video_grid_thw for d in docs]),
        doc_keys=[d.key for d in docs], num_pad=seq_len - sum(len(d) for d in docs),
    )


@dataclass
class BufferEntry:
    doc: Document
    tag: Any  # opaque to the packer: the loader stores the document's restore key here


class BestFitPacker:
    """Holds the buffer between sequences; `buffer` (in order) is all the state there is."""

    def __init__(self, seq_len: int, buffer_size: int, weighting: str, pad_id: int = 0,
                 buffer_bytes: int | None = None, document_multiple: int = 1) -> None:
        problem = multiple_problem(seq_len, document_multiple)
        if problem:
            raise ValueError(problem)
        self.seq_len, self.buffer_size, self.weighting, self.pad_id = seq_len, buffer_size, weighting, pad_id
        self.buffer_bytes, self.multiple = buffer_bytes, document_multiple
        self.buffer: list[BufferEntry] = []
        self._bytes = 0  # of the buffered documents, kept with every append and pop

    def full(self) -> bool:
        """No more documents now: buffer_size documents, or buffer_bytes bytes already held."""
        return len(self.buffer) >= self.buffer_size or (
            self.buffer_bytes is not None and bool(self.buffer) and self._bytes >= self.buffer_bytes)

    def add(self, entry: BufferEntry) -> None:
        if len(entry.doc) > self.seq_len:
            raise ValueError(f"document {entry.doc.key} has {len(entry.doc)} tokens > seq_len "
                             f"{self.seq_len}: pass it through fit_document first")
        self.buffer.append(entry)
        self._bytes += entry.doc.nbytes

    def _take(self, index: int) -> Document:
        doc = self.buffer.pop(index).doc
        self._bytes -= doc.nbytes
        return doc

    def next_sequence(self, pull: Callable[[], BufferEntry | None]) -> PackedBatch | None:
        """Pack one sequence, pulling documents (each <= seq_len) until the buffer is full or pull is dry.
        None once the buffer is empty and pull returns nothing."""
        self._fill(pull)
        if not self.buffer:
            return None
        chosen = [self._take(0)]
        room = self.seq_len - padded_length(len(chosen[0]), self.multiple)
        while room > 0:
            self._fill(pull)
            best = self._best_fit(room)
            if best is None:
                break
            chosen.append(self._take(best))
            room -= padded_length(len(chosen[-1]), self.multiple)
        return build_packed(chosen, self.seq_len, self.weighting, self.pad_id, self.multiple)

    def _fill(self, pull: Callable[[], BufferEntry | None]) -> None:
        while not self.full():
            entry = pull()
            if entry is None:
                return
            self.add(entry)

    def _best_fit(self, room: int) -> int | None:
        best, best_len = None, 0
        for i, entry in enumerate(self.buffer):
            n = padded_length(len(entry.doc), self.multiple)
            if best_len < n <= room:
                best, best_len = i, n
                if n == room:
                    break
        return best
