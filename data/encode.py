"""Raw shard samples -> `Document`s: tokens with vision placeholders, pixels, grids, MRoPE positions, targets.

Layout of a document (Qwen3-VL's processor layout, without a chat template: this is pretraining):
  image:  <|vision_start|> <|image_pad|> x (gh*gw/4) <|vision_end|>
  video:  per temporal patch: `<t seconds>` <|vision_start|> <|video_pad|> x (gh*gw/4) <|vision_end|>
  text:   its tokens; the document ends with <|endoftext|>.

Targets (`target_mask[i]`: token i is a training target, predicted from tokens < i):
  learned: plain text, captions, interleaved text, answers (with their timestamp), the final <|endoftext|>.
  context only: prompts and questions (the sample gives them; the model should not be trained to produce
  them), every vision token (start, pads, end) and the video timestamps (fixed by the frame times), and
  the document's first token (nothing precedes it).

Budget: the vision items of a document share `vision_fraction * seq_len` tokens equally; an image gets at
most its share of pixels (never below min_pixels), a video its share of frames x pixels (data.video), so
the vision spans of a document always fit one sequence. Documents are returned whole even when their text
makes them longer than seq_len: data.packing.fit_document cuts them at a text boundary, never inside a
vision span.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from data.batch import Document
from data.errors import BadSample, DataError
from data.shard_format import Part, parse_sample
from data.tokenizer import Tokenizer
from data.video import VideoConfig, format_timestamp, process_video
from data.vision import ImageConfig, decode_image, process_image
from data.positions import document_position_ids


@dataclass
class EncodeConfig:
    image: ImageConfig = field(default_factory=ImageConfig)
    video: VideoConfig = field(default_factory=VideoConfig)
    # Share of seq_len that all vision tokens of one document may take (the rest: text and timestamps).
    vision_fraction: float = 0.9
    # Train on prompts and questions too (off: they are context only).
    learn_prompts: bool = False

    def validate(self, prefix: str = "data.encode") -> None:
        self.image.validate(f"{prefix}.image")
        self.video.validate(f"{prefix}.video")
        if not 0 < self.vision_fraction <= 1:
            raise DataError(f"{prefix}.vision_fraction={self.vision_fraction} must be in (0, 1]")
        if self.video.min_pixels < self.image.factor ** 2:
            raise DataError(f"{prefix}.video.min_pixels={self.video.min_pixels} is below one token "
                            f"({self.image.factor}x{self.image.factor} pixels)")


class _Builder:
    """Accumulates one document's tokens, targets and vision tensors."""

    def __init__(self) -> None:
        self.ids: list[int] = []
        self.target: list[bool] = []
        self.images: list[torch.Tensor] = []
        self.image_grids: list[torch.Tensor] = []
        self.videos: list[torch.Tensor] = []
        self.video_grids: list[torch.Tensor] = []

    def add(self, ids: list[int], learn: bool) -> None:
        self.ids.extend(ids)
        self.target.extend([learn] * len(ids))


class DocumentEncoder:
    """Turns one shard sample ({ext: bytes}) into a Document; raises BadSample when it cannot."""

    def __init__(self, tokenizer: Tokenizer, cfg: EncodeConfig | None = None, seq_len: int = 8192) -> None:
        self.tok = tokenizer
        self.cfg = cfg or EncodeConfig()
        self.cfg.validate()
        if seq_len < 16:
            raise DataError(f"seq_len={seq_len} must be >= 16")
        self.seq_len = seq_len
        self.merge = self.cfg.image.merge_size
        self._vision_ids = {tokenizer.vision_start_id, tokenizer.vision_end_id, tokenizer.image_pad_id,
                            tokenizer.video_pad_id}

    def encode(self, sample: dict[str, bytes], key: str, source: int) -> Document:
        try:
            _, parts = parse_sample(sample)
            return self._encode_parts(parts, sample, key, source)
        except BadSample as e:
            raise BadSample(e.reason, key) from e

    def _encode_parts(self, parts: list[Part], sample: dict[str, bytes], key: str, source: int) -> Document:
        n_vision = sum(p.kind != "text" for p in parts)
        budget = int(self.cfg.vision_fraction * self.seq_len) // max(1, n_vision)
        b = _Builder()
        for part in parts:
            if part.kind == "text":
                self._add_text(b, part)
            elif part.kind == "image":
                self._add_image(b, sample[part.member], part.member, budget)
            else:
                self._add_video(b, sample[part.member], part.member, budget, part.start)
        b.add([self.tok.eos_id], True)
        b.target[0] = False
        return self._document(b, key, source)

    def _add_text(self, b: _Builder, part: Part) -> None:
        text = part.text
        if part.time is not None:
            text = f"{format_timestamp(part.time, self.cfg.video.timestamp_format)} {text}"
        ids = self.tok.encode(text)
        if self._vision_ids.intersection(ids):
            # A literal "<|image_pad|>" in text would desynchronise placeholders and pixels.
            raise BadSample("text contains a vision special token")
        b.add(ids, part.learn or self.cfg.learn_prompts)

    def _add_image(self, b: _Builder, data: bytes, member: str, budget_tokens: int) -> None:
        img = decode_image(data, member)
        pixels, grid = process_image(img, self.cfg.image, max_pixels=budget_tokens * self.cfg.image.factor ** 2)
        b.images.append(pixels)
        b.image_grids.append(grid)
        b.add(self._vision_span(self.tok.image_pad_id, grid[0, 1] * grid[0, 2]), False)

    def _add_video(self, b: _Builder, data: bytes, member: str, budget_tokens: int, start: float = 0.0) -> None:
        clip = process_video(data, self.cfg.video, self.cfg.image, budget_tokens, member)
        b.videos.append(clip.pixel_values)
        b.video_grids.append(clip.grid_thw)
        per_patch = clip.grid_thw[0, 1] * clip.grid_thw[0, 2]
        for t in clip.timestamps:
            if self.cfg.video.frame_timestamps:  # a clip cut from a longer video keeps that video's clock
                b.add(self.tok.encode(format_timestamp(start + t, self.cfg.video.timestamp_format)), False)
            b.add(self._vision_span(self.tok.video_pad_id, per_patch), False)

    def _vision_span(self, pad_id: int, patches: torch.Tensor | int) -> list[int]:
        return [self.tok.vision_start_id] + [pad_id] * (int(patches) // self.merge ** 2) + [self.tok.vision_end_id]

    def _document(self, b: _Builder, key: str, source: int) -> Document:
        input_ids = torch.tensor(b.ids, dtype=torch.long)
        image_grid = torch.cat(b.image_grids) if b.image_grids else None
        video_grid = torch.cat(b.video_grids) if b.video_grids else None
        positions = document_position_ids(input_ids, image_grid, video_grid, image_token_id=self.tok.image_pad_id,
                                          video_token_id=self.tok.video_pad_id, spatial_merge_size=self.merge)
        return Document(key=key, source=source, input_ids=input_ids, position_ids=positions,
                        target_mask=torch.tensor(b.target, dtype=torch.bool),
                        pixel_values=torch.cat(b.images) if b.images else None, image_grid_thw=image_grid,
                        pixel_values_videos=torch.cat(b.videos) if b.videos else None,
                        video_grid_thw=video_grid)
