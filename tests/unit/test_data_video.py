"""data.video: qwen-vl-utils frame sampling, token budget, HF patch layout, timestamps, bad mp4s."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import data.video as video
from data.errors import BadSample
from data.video import (VideoConfig, encode_mp4, format_timestamp, frame_indices, num_sampled_frames,
                        patch_timestamps, plan_frames, process_video)
from data.vision import ImageConfig, normalize_pixels, resize_normalize

IMG = ImageConfig(min_pixels=4 * 32 * 32, max_pixels=64 * 32 * 32)
SMALL = VideoConfig(min_pixels=2 * 32 * 32, max_pixels=16 * 32 * 32)


def _moving_square(n: int, h: int = 64, w: int = 96) -> np.ndarray:
    frames = np.full((n, h, w, 3), 30, dtype=np.uint8)
    for i in range(n):
        x = (i * 5) % (w - 16)
        frames[i, 20:36, x:x + 16] = (220, 40, 40)
    return frames


@pytest.mark.parametrize("total,fps,want", [
    (40, 10.0, 8),      # 4 s at 2 fps
    (10, 10.0, 4),      # 1 s -> 2 frames, raised to min_frames 4
    (3, 30.0, 2),       # fewer frames than min_frames: all it has, rounded down to even
    (1, 30.0, 2),       # a single frame still makes one temporal patch (repeated)
    (30 * 3600, 30.0, 768),  # 1 hour: max_frames
    (75, 25.0, 6),      # 3 s at 2 fps
])
def test_num_sampled_frames(total, fps, want):
    assert num_sampled_frames(total, fps, VideoConfig()) == want


def test_frame_indices_linspace_round():
    assert frame_indices(40, 8) == [0, 6, 11, 17, 22, 28, 33, 39]
    assert frame_indices(1, 2) == [0, 0]


def test_timestamps_and_formats():
    # Patch time = mean of its first and last frame time (index / native fps).
    assert patch_timestamps([0, 6, 11, 17], 10.0) == pytest.approx([0.3, 1.4])
    assert format_timestamp(0.3) == "<0.3 seconds>"
    assert format_timestamp(65.5, "hms") == "<00:01:05.5>"
    assert format_timestamp(3725.04, "hms") == "<01:02:05.0>"
    assert format_timestamp(59.96, "hms") == "<00:01:00.0>"  # carries instead of printing 60.0 seconds
    with pytest.raises(ValueError, match="'minutes'"):
        format_timestamp(1.0, "minutes")


def test_budget_holds_and_frames_shrink_as_videos_grow():
    for budget in (200, 1000, int(0.9 * 8192), int(0.9 * 262144)):
        for total in (30, 3000, 30 * 3600):
            n, h, w = plan_frames(total, 30.0, 1080, 1920, VideoConfig(), 32, budget)
            assert n % 2 == 0 and n <= 768
            assert n // 2 * (h // 32) * (w // 32) <= budget, (budget, total)
    sizes = [plan_frames(total, 30.0, 1080, 1920, VideoConfig(), 32, 7372)[1:] for total in (120, 1200, 6000)]
    areas = [h * w for h, w in sizes]
    assert areas[0] > areas[1] > areas[2]


def test_pixels_match_transformers_video_patchify_and_timestamps():
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

    data = encode_mp4(_moving_square(40), fps=10)
    clip = process_video(data, SMALL, IMG, budget_tokens=1000)
    assert clip.frame_indices == [0, 6, 11, 17, 22, 28, 33, 39]
    assert clip.timestamps == pytest.approx([0.3, 1.4, 2.5, 3.6])
    gt, gh, gw = clip.grid_thw[0].tolist()
    assert gt == 4 and gh * 16 * gw * 16 <= SMALL.max_pixels
    # Reference: the same decoded frames through the HF-equal image path, patchified by transformers' code.
    frames = video._open_reader(data).get_batch(clip.frame_indices).asnumpy()
    from PIL import Image
    stacked = torch.from_numpy(np.stack([resize_normalize(Image.fromarray(f), gh * 16, gw * 16, IMG)
                                         for f in frames]))[None]
    want, *grid = Qwen3VLVideoProcessor.patchify(None, stacked, patch_size=16, merge_size=2, temporal_patch_size=2)
    assert grid == [gt, gh, gw]
    assert clip.pixel_values.dtype == torch.uint8  # compact: the model's first op normalises
    assert torch.equal(normalize_pixels(clip.pixel_values, IMG.image_mean, IMG.image_std), want[0])


def test_long_video_decodes_only_the_frames_it_keeps(monkeypatch):
    data = encode_mp4(_moving_square(600, 32, 32), fps=30)  # 20 s -> 40 frames at 2 fps
    calls: list[int] = []
    real_open = video._open_reader

    class Recording:
        def __init__(self, payload: bytes) -> None:
            self.reader = real_open(payload)

        def __len__(self) -> int:
            return len(self.reader)

        def get_avg_fps(self) -> float:
            return self.reader.get_avg_fps()

        def get_batch(self, indices):
            calls.append(len(indices))
            return self.reader.get_batch(indices)

    monkeypatch.setattr(video, "_open_reader", Recording)
    one_token = VideoConfig(min_pixels=32 * 32, max_pixels=32 * 32)
    clip = process_video(data, one_token, IMG, budget_tokens=8)  # 1 token per patch -> 16 frames fit
    assert clip.grid_thw[0].tolist() == [8, 2, 2]
    assert calls == [1, 16]  # the size probe, then exactly the sampled frames
    calls.clear()
    capped = VideoConfig(min_pixels=32 * 32, max_pixels=32 * 32, max_frames=6)
    assert process_video(data, capped, IMG, budget_tokens=1000).grid_thw[0, 0] == 3
    assert calls == [1, 6]


def test_budget_too_small_for_one_patch_is_a_bad_sample():
    data = encode_mp4(_moving_square(8, 256, 256), fps=4)
    # 256x256 frames at the 16-token pixel floor still cost 16 tokens per temporal patch.
    with pytest.raises(BadSample, match=r"clip.mp4: video needs 16 tokens even at 2 frames"):
        process_video(data, VideoConfig(min_pixels=16 * 32 * 32, max_pixels=64 * 32 * 32), IMG, 8, "clip.mp4")


def test_undecodable_video_names_the_member():
    data = encode_mp4(_moving_square(8), fps=4)
    for bad in (b"not a video at all" * 10, data[: len(data) // 3]):
        with pytest.raises(BadSample, match="clip.mp4: undecodable video"):
            process_video(bad, SMALL, IMG, 1000, "clip.mp4")
