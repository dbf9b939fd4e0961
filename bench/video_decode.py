"""Video decode cost: budgeted sampling (decode only the sampled frames) vs decoding every frame.

Ours: data.video.process_video on a long clip (fps 2 sampling, 8K-token budget): decord get_batch on the
sampled indices only, then resize + normalize + patchify.
Baseline, same run and same clip: a reader that decodes every frame with decord, then keeps the same
sampled frames and processes them the same way. Time and the decoded-frame memory are compared: the
memory ratio is what keeps one huge video from exhausting a worker (recipe failure modes 7/8); the time
ratio depends on the keyframe interval (a sampled frame costs a decode from its keyframe).

Prints `RESULT video_decode_speedup <v>`, `RESULT video_decode_frame_memory_ratio <v>` and appends to
bench/RESULTS.md.
Usage: python bench/video_decode.py [--seconds-of-video 120]
"""
from __future__ import annotations

import argparse
import datetime
import io
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import decord  # noqa: E402
import numpy as np  # noqa: E402

from bench.packing import MACHINE, append_results  # noqa: E402
from PIL import Image  # noqa: E402

from data.video import VideoConfig, encode_mp4, process_video  # noqa: E402
from data.vision import ImageConfig, patchify, resize_normalize  # noqa: E402

FPS, SIDE = 30, 256


def make_clip(seconds: int) -> bytes:
    """A moving bar on a gradient, SIDE x SIDE at FPS, mpeg4."""
    n = seconds * FPS
    base = np.linspace(0, 200, SIDE, dtype=np.uint8)[None, :, None].repeat(SIDE, 0).repeat(3, 2)
    frames = np.broadcast_to(base, (n, SIDE, SIDE, 3)).copy()
    for i in range(n):
        x = (i * 3) % (SIDE - 16)
        frames[i, :, x:x + 16] = 255
    return encode_mp4(frames, FPS)


def best_of(fn, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds-of-video", type=int, default=120)
    args = parser.parse_args()
    data = make_clip(args.seconds_of_video)
    cfg, image_cfg, budget = VideoConfig(), ImageConfig(), int(0.9 * 8192)
    clip = process_video(data, cfg, image_cfg, budget)
    ours = best_of(lambda: process_video(data, cfg, image_cfg, budget))

    _, h, w = clip.grid_thw[0].tolist()

    def decode_all_then_sample() -> None:
        reader = decord.VideoReader(io.BytesIO(data), num_threads=1)
        frames = reader.get_batch(list(range(len(reader)))).asnumpy()[clip.frame_indices]
        patchify(np.stack([resize_normalize(Image.fromarray(f), h * 16, w * 16, image_cfg) for f in frames]),
                 image_cfg)

    baseline = best_of(decode_all_then_sample)
    frames, tokens = len(clip.frame_indices), int(clip.grid_thw.prod()) // 4
    print(f"{clip.total_frames} frames ({args.seconds_of_video} s at {FPS} fps, {SIDE}x{SIDE}): sampled {frames} "
          f"frames -> {tokens} tokens in {ours:.3f} s; decoding all frames first: {baseline:.3f} s")
    speedup, memory_ratio = baseline / ours, clip.total_frames / frames
    print(f"RESULT video_decode_s {ours:.4f}")
    print(f"RESULT video_decode_all_frames_s {baseline:.4f}")
    print(f"RESULT video_decode_speedup {speedup:.2f}")
    print(f"RESULT video_decode_frame_memory_ratio {memory_ratio:.1f}")
    append_results([f"## bench/video_decode.py — {datetime.date.today().isoformat()}, {MACHINE}", "",
                    f"A {args.seconds_of_video} s {SIDE}x{SIDE} {FPS} fps mp4 (keyframe every 12 frames), 8K-token "
                    f"budget: process_video (fps 2 -> {frames} frames, {tokens} tokens) vs decoding all "
                    f"{clip.total_frames} frames then processing the same sampled ones; best of 3, shared machine.",
                    "", f"- video_decode_s: {ours:.4f}", f"- video_decode_all_frames_s: {baseline:.4f}",
                    f"- video_decode_speedup: {speedup:.2f}",
                    f"- video_decode_frame_memory_ratio: {memory_ratio:.1f} (decoded frames held, all / sampled)"])


if __name__ == "__main__":
    main()
