"""Needle videos: a haystack (synthetic, or a user's video read with decord), a needle shown for a while at
depth d, the frames the data pipeline would sample from it, and the prompt in the demo corpus' format.

Sampling is data/video.py's: `plan_frames` (fps, frame limits and the visual-token budget), `frame_indices`
and `patch_timestamps`; frames are resized/normalised/patchified by data/vision.py. Only the sampled frames
are ever produced or decoded, so a 2-hour haystack costs what its sampled frames cost, and no mp4 has to be
written. `process_video` (the training path) does the same from mp4 bytes; tests check both agree.

The needle is the demo corpus' (data/synth.py `needle_sample`): a large colored shape over the haystack,
asked about with the same question, answered as `<t seconds> A <color> <shape>.` with t the middle of the
needle's interval.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from PIL import Image

from data.synth import NEEDLE_COLORS, NEEDLE_QUESTION, SHAPES, draw_needle, haystack_frames, needle_span
from data.tokenizer import Tokenizer
from data.video import VideoClip, VideoConfig, format_timestamp, frame_indices, patch_timestamps, plan_frames
from data.vision import ImageConfig, patchify, resize_normalize

NUM_CHOICES = len(NEEDLE_COLORS) * len(SHAPES)


class Haystack(Protocol):
    fps: float
    total: int  # frames
    height: int
    width: int

    def frames(self, indices: list[int]) -> np.ndarray:
        """uint8 [len(indices), height, width, 3]."""


class SyntheticHaystack:
    """The demo corpus' haystack: a gray texture that shifts by one tile per second, of any duration."""

    def __init__(self, seconds: float, fps: float, size: int, seed: int) -> None:
        self.fps, self.total, self.height, self.width = fps, max(1, round(seconds * fps)), size, size
        rng = np.random.default_rng(seed)
        self._base = rng.integers(60, 120, (size // 8, size // 8), dtype=np.uint8)

    def frames(self, indices: list[int]) -> np.ndarray:
        return haystack_frames(self._base, indices, self.fps)


class VideoFileHaystack:
    """The first `seconds` of a video file at its own frame rate; a shorter video loops."""

    def __init__(self, path: str, seconds: float) -> None:
        import decord

        self._reader = decord.VideoReader(path, num_threads=1)
        self._length = len(self._reader)
        if self._length < 1:
            raise ValueError(f"{path}: video has no frames")
        self.fps = float(self._reader.get_avg_fps()) or 24.0
        self.total = max(1, round(seconds * self.fps))
        self.height, self.width = self._reader.get_batch([0]).shape[1:3]

    def frames(self, indices: list[int]) -> np.ndarray:
        return self._reader.get_batch([i % self._length for i in indices]).asnumpy()


@dataclass(frozen=True)
class Needle:
    color: str
    shape: str
    start: int  # first source frame showing the needle
    count: int  # frames showing it

    def time(self, fps: float) -> float:
        """The answer's time: the middle of the needle's interval (as data/synth.py)."""
        return (self.start + (self.count - 1) / 2) / fps

    @property
    def answer(self) -> str:
        return f"A {self.color} {self.shape}."


class NeedleVideo:
    """A haystack with the needle drawn on frames [start, start + count)."""

    def __init__(self, haystack: Haystack, needle: Needle) -> None:
        self.haystack, self.needle = haystack, needle
        self.fps, self.total = haystack.fps, haystack.total
        self.height, self.width = haystack.height, haystack.width

    def frames(self, indices: list[int]) -> np.ndarray:
        out = self.haystack.frames(indices)
        lo, hi = self.needle.start, self.needle.start + self.needle.count
        for k, i in enumerate(indices):
            if lo <= i < hi:
                out[k] = draw_needle(out[k], self.needle.color, self.needle.shape)
        return out


def sampling_plan(video: Haystack, vcfg: VideoConfig, icfg: ImageConfig, budget: int) -> tuple[list[int], int, int]:
    """(sampled frame indices, frame height, width) of the data pipeline for this video and budget."""
    n, h, w = plan_frames(video.total, video.fps, video.height, video.width, vcfg, icfg.factor, budget,
                          icfg.temporal_patch_size)
    return frame_indices(video.total, n), h, w


def place_needle(total: int, fps: float, depth: float, indices: list[int], needle_seconds: float,
                 rng: random.Random) -> Needle:
    """A random needle at `depth` of the video, placed as the needle corpus places it (data.synth.needle_span):
    needle_seconds long, or longer when sampled frames are further apart, so a sampled frame shows it."""
    start, count = needle_span(total, fps, depth, indices, needle_seconds)
    return Needle(rng.choice(NEEDLE_COLORS), rng.choice(SHAPES), start, count)


def sample_clip(video: Haystack, indices: list[int], height: int, width: int, icfg: ImageConfig) -> VideoClip:
    """The sampled frames as patches with per-temporal-patch timestamps (the layout process_video returns)."""
    frames = video.frames(indices)
    normalized = np.stack([resize_normalize(Image.fromarray(f), height, width, icfg) for f in frames])
    pixels, grid = patchify(normalized, icfg)
    return VideoClip(pixels, torch.tensor([grid], dtype=torch.long),
                     patch_timestamps(indices, video.fps, icfg.temporal_patch_size), indices, video.fps,
                     video.total)


def prompt_ids(tok: Tokenizer, clip: VideoClip, merge: int, timestamp_format: str,
               frame_timestamps: bool = True) -> list[int]:
    """The document prefix data/encode.py writes for a needle sample, up to where the answer starts:
    per temporal patch `<t seconds>` + vision span, then the question and its newline."""
    per_patch = int(clip.grid_thw[0, 1] * clip.grid_thw[0, 2]) // merge ** 2
    ids: list[int] = []
    for t in clip.timestamps:
        if frame_timestamps:
            ids += tok.encode(format_timestamp(t, timestamp_format))
        ids += [tok.vision_start_id] + [tok.video_pad_id] * per_patch + [tok.vision_end_id]
    return ids + tok.encode(NEEDLE_QUESTION + "\n")


def needle_rng(seed: int, length: float, depth: float, trial: int) -> random.Random:
    return random.Random(f"{seed}/{length}/{depth}/{trial}")  # str seeds are stable across runs


def chance_accuracy() -> float:
    """A uniform guess over the needle's (color, shape) choices."""
    return 1.0 / NUM_CHOICES


def sampled_needle_frames(clip: VideoClip, needle: Needle) -> list[int]:
    """Positions (in the sampled frames) that show the needle."""
    return [k for k, i in enumerate(clip.frame_indices) if needle.start <= i < needle.start + needle.count]


def needle_patch_times(clip: VideoClip, needle: Needle, tps: int) -> list[float]:
    """Timestamps of the temporal patches that contain a needle frame (what the model reads next to it)."""
    return sorted({clip.timestamps[k // tps] for k in sampled_needle_frames(clip, needle)})

