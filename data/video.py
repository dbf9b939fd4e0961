"""Videos -> Qwen3-VL pixel patches with per-temporal-patch timestamps (decord).

Sampling follows Qwen's reader (qwen-vl-utils): n = duration * fps frames, clamped to [min_frames,
max_frames] and to the frames the video has, rounded down to even; indices linspace(0, total-1, n).round().
Frame size: each frame gets at most max(min(max_pixels, budget_tokens * f^2 * 2 / n), 1.05 * min_pixels)
pixels (f = patch * merge = 32), so longer videos get smaller frames and the video fits its token budget.
When even the smallest frames would not fit, fewer frames are sampled: a video never costs more than its
budget, and only the sampled frames are ever decoded (decord get_batch on those indices).

Time is carried by text: before each temporal patch (2 frames) the encoder writes a timestamp, the mean
of the patch's first and last frame time (frame index / native fps). Two styles:
  "seconds": `<12.5 seconds>` (Qwen3-VL's format)        "hms": `<00:00:12.5>` (hh:mm:ss.s)
"""
from __future__ import annotations

import io
import math
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from data.errors import BadSample, DataError
from data.vision import ImageConfig, finish_pixels, patchify, resize_rgb, smart_resize

TIMESTAMP_FORMATS = ("seconds", "hms")


@dataclass
class VideoConfig:
    """How videos become patches. Defaults: Qwen3-VL / qwen-vl-utils (pixels are per frame)."""

    fps: float = 2.0
    min_frames: int = 4
    max_frames: int = 768
    min_pixels: int = 128 * 32 * 32  # per frame: at least 128 LLM tokens per temporal patch
    max_pixels: int = 768 * 32 * 32  # per frame: at most 768 LLM tokens per temporal patch
    timestamp_format: str = "seconds"
    # Write `<t seconds>` before each temporal patch (Qwen3-VL). False is an ablation (docs/eval.md): frames
    # carry no time text; answers keep theirs, so the model must tell time from the frames' order alone.
    frame_timestamps: bool = True

    def validate(self, prefix: str = "data.video") -> None:
        if not self.fps > 0:
            raise DataError(f"{prefix}.fps={self.fps} must be > 0")
        if not 2 <= self.min_frames <= self.max_frames:
            raise DataError(f"{prefix}.min_frames={self.min_frames} and {prefix}.max_frames={self.max_frames} "
                            f"must satisfy 2 <= min_frames <= max_frames")
        if not 0 < self.min_pixels <= self.max_pixels:
            raise DataError(f"{prefix}.min_pixels={self.min_pixels} must be in (0, {prefix}.max_pixels="
                            f"{self.max_pixels}]")
        if self.timestamp_format not in TIMESTAMP_FORMATS:
            raise DataError(f"{prefix}.timestamp_format={self.timestamp_format!r} is not one of "
                            f"{TIMESTAMP_FORMATS}")


@dataclass
class VideoClip:
    """A processed video: patches, grid (T/2, gh, gw) and one timestamp (seconds) per temporal patch."""

    pixel_values: torch.Tensor  # [T/2 * gh * gw, C * 2 * ps * ps], uint8 or float32 (ImageConfig.pixel_dtype)
    grid_thw: torch.Tensor  # [1, 3]
    timestamps: list[float]
    frame_indices: list[int]
    video_fps: float
    total_frames: int


def num_sampled_frames(total_frames: int, video_fps: float, cfg: VideoConfig, tps: int = 2) -> int:
    """qwen-vl-utils' smart_nframes: fps sampling, clamped to [min, max] and to the video, rounded to even."""
    min_frames = math.ceil(cfg.min_frames / tps) * tps
    max_frames = math.floor(min(cfg.max_frames, total_frames) / tps) * tps
    n = total_frames / video_fps * cfg.fps
    n = min(max(n, min_frames), max_frames, total_frames)
    # A video shorter than one temporal patch still gives one (its frame repeated).
    return max(tps, math.floor(n / tps) * tps)


def frame_indices(total_frames: int, n: int) -> list[int]:
    return np.linspace(0, total_frames - 1, n).round().astype(int).tolist()


def frame_size(height: int, width: int, n: int, cfg: VideoConfig, factor: int, budget_tokens: int,
               tps: int = 2) -> tuple[int, int]:
    """Resized frame (height, width) for n frames under a budget of `budget_tokens` LLM tokens."""
    per_frame = min(cfg.max_pixels, budget_tokens * factor * factor * tps // n)
    per_frame = max(per_frame, int(cfg.min_pixels * 1.05))
    return smart_resize(height, width, factor, cfg.min_pixels, per_frame)


def plan_frames(total_frames: int, video_fps: float, height: int, width: int, cfg: VideoConfig, factor: int,
                budget_tokens: int, tps: int = 2) -> tuple[int, int, int]:
    """(frames, height, width) that fit `budget_tokens`: fewer frames when even the smallest ones do not."""
    n = num_sampled_frames(total_frames, video_fps, cfg, tps)
    while True:
        h, w = frame_size(height, width, n, cfg, factor, budget_tokens, tps)
        tokens = n // tps * (h // factor) * (w // factor)
        if tokens <= budget_tokens:
            return n, h, w
        if n <= tps:
            raise BadSample(f"video needs {tokens} tokens even at {n} frames of {w}x{h}, over its budget of "
                            f"{budget_tokens} tokens")
        # Tokens scale with n at the pixel floor: jump to the count that fits, at least one patch fewer.
        n = max(tps, min(n - tps, math.floor(n * budget_tokens / tokens / tps) * tps))


def patch_timestamps(indices: list[int], video_fps: float, tps: int = 2) -> list[float]:
    """Per temporal patch: mean of its first and last frame time (as transformers' Qwen3-VL processor)."""
    times = [i / video_fps for i in indices]
    return [(times[k] + times[k + tps - 1]) / 2 for k in range(0, len(times) - tps + 1, tps)]


def format_timestamp(seconds: float, style: str = "seconds") -> str:
    """`<12.5 seconds>` or `<00:00:12.5>` (hours:minutes:seconds, tenths)."""
    if style == "seconds":
        return f"<{seconds:.1f} seconds>"
    if style == "hms":
        tenths = round(seconds * 10)  # round once, then split, so 59.96 s reads 00:01:00.0, not 00:00:60.0
        h, rest = divmod(tenths, 36000)
        m, s10 = divmod(rest, 600)
        return f"<{h:02d}:{m:02d}:{s10 // 10:02d}.{s10 % 10}>"
    raise ValueError(f"timestamp format {style!r} is not one of {TIMESTAMP_FORMATS}")


def encode_mp4(frames: np.ndarray, fps: int, codec: str = "mpeg4", quality: int = 4) -> bytes:
    """Frames [N, H, W, 3] uint8 (H, W even) -> mp4 bytes, written with PyAV (tests and the demo corpus).

    mpeg4 with a fixed quantiser keeps the bytes reproducible (same frames -> same file); libx264 also works.
    """
    import av

    n, h, w, _ = frames.shape
    if h % 2 or w % 2:
        raise ValueError(f"frame size {w}x{h} must be even for yuv420p")
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4", options={"fflags": "+bitexact"}) as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.codec_context.options = {"qscale": str(quality), "flags": "+bitexact"}
        stream.codec_context.qmax = stream.codec_context.qmin = quality
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")))
        container.mux(stream.encode())
    return buf.getvalue()


def _open_reader(data: bytes):
    import decord

    return decord.VideoReader(io.BytesIO(data), num_threads=1)


def process_video(data: bytes, cfg: VideoConfig, image_cfg: ImageConfig, budget_tokens: int,
                  member: str = "mp4") -> VideoClip:
    """Decode the sampled frames of an mp4 and patchify them; BadSample naming `member` if it cannot."""
    tps = image_cfg.temporal_patch_size
    try:
        reader = _open_reader(data)
        total = len(reader)
        video_fps = float(reader.get_avg_fps()) or 24.0  # transformers' default when fps is unknown
        if total < 1:
            raise BadSample(f"{member}: video has no frames")
        height, width = reader.get_batch([0]).shape[1:3]
        n, h, w = plan_frames(total, video_fps, height, width, cfg, image_cfg.factor, budget_tokens, tps)
        indices = frame_indices(total, n)
        frames = reader.get_batch(indices).asnumpy()
    except BadSample as e:
        raise BadSample(e.reason if e.reason.startswith(member) else f"{member}: {e.reason}") from e
    except (RuntimeError, ValueError, IndexError) as e:  # decord raises DECORDError (a RuntimeError)
        raise BadSample(f"{member}: undecodable video ({type(e).__name__}: {str(e)[:120]})") from e
    resized = np.stack([resize_rgb(Image.fromarray(f), h, w) for f in frames])
    pixels, grid = patchify(resized, image_cfg)
    return VideoClip(finish_pixels(pixels, image_cfg), torch.tensor([grid], dtype=torch.long), patch_timestamps(indices, video_fps, tps),
                     indices, video_fps, total)
