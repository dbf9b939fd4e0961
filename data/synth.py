"""The deterministic demo corpus: `python -m data.synth --out DIR [--seed S] [--scale X]`.

Writes, in seconds, a few MB of shards a tiny model can learn from (the structure is simple and regular, so
the loss falls within a few hundred steps):

  DIR/text/     sentences about shapes, counting and sums ("2 plus 3 is 5.")
  DIR/caption/  rendered shapes and digits (.jpg) captioned with what was drawn
  DIR/ocr/      rendered text pages (.png), 1-2 pages per interleaved document, each followed by its text
  DIR/video/    short mp4s of a shape moving in one direction, captioned with the motion
  DIR/needle/   haystack mp4s with a one-second "needle" (a large shape) at a random time, a question and
                an answer timestamped at the needle's middle
  DIR/tokenizer.model  sentencepiece model (vocab 2048, the project's fixed special ids)
  DIR/manifest.json    data sets, sample counts, shards

`--preset needle` (and `needle_small`) writes the corpus of the needle miniature's position pipeline instead
(configs/pipeline/needle_position.yaml): captions, and haystacks of three length ranges answered at the
needle's middle; `--preset needle_clips` the same with each haystack a clip of a 144 s video (docs/eval.md);
`--preset needle_read` (the needle miniature, configs/pipeline/needle.yaml) those clips, a quarter of the
short ones cut at the video's start, and DIR/stamp_text/ and DIR/stamp_text_long/: needle clips of 4-30 s
and 30-144 s written in words.

Same seed and scale -> byte-identical files: every sample draws from its own RNG seeded by (seed, data set,
index), images are rendered without randomness outside that RNG, mp4s are written bit-exact.
"""
from __future__ import annotations

import argparse
import functools
import io
import json
import math
import os
import random
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from data.shard_format import ShardWriter
from data.tokenizer import train_sentencepiece
from data.video import VideoConfig, encode_mp4, format_timestamp, frame_indices, num_sampled_frames, patch_timestamps

COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (230, 200, 30),
          "purple": (140, 60, 180), "orange": (240, 130, 30), "black": (20, 20, 20), "white": (250, 250, 250)}
SHAPES = ("circle", "square", "triangle")
NEEDLE_COLORS = tuple(c for c in COLORS if c != "black")  # black is too close to the haystack
NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
DIRECTIONS = {"left to right": (1, 0), "right to left": (-1, 0), "top to bottom": (0, 1), "bottom to top": (0, -1)}
BASE_COUNTS = {"text": 1000, "caption": 400, "ocr": 120, "video": 60, "needle": 60}


def _rng(seed: int, name: str, index: int) -> random.Random:
    return random.Random(f"{seed}/{name}/{index}")  # str seeds hash with sha512: stable across runs


def _sentence(rng: random.Random) -> str:
    kind = rng.randrange(3)
    if kind == 0:
        c1, c2 = rng.sample(sorted(COLORS), 2)
        s1, s2 = rng.choice(SHAPES), rng.choice(SHAPES)
        rel = rng.choice(("left of", "right of", "above", "below"))
        return f"The {c1} {s1} is {rel} the {c2} {s2}."
    if kind == 1:
        a, b = rng.randrange(10), rng.randrange(10)
        return f"{a} plus {b} is {a + b}."
    start = rng.randrange(6)
    return "Counting: " + " ".join(NUMBERS[start:start + 5]) + "."


def text_sample(rng: random.Random) -> tuple[dict[str, bytes], str]:
    text = " ".join(_sentence(rng) for _ in range(rng.randint(4, 12)))
    return {"txt": text.encode()}, text


NEEDLE_QUESTION = "When does a colored shape appear, and what is it?"  # also asked by train.eval vniah

def draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int], color) -> None:
    x0, y0, x1, y1 = box
    if shape == "circle":
        draw.ellipse(box, fill=color)
    elif shape == "square":
        draw.rectangle(box, fill=color)
    else:
        draw.polygon([((x0 + x1) // 2, y0), (x1, y1), (x0, y1)], fill=color)


def caption_sample(rng: random.Random) -> tuple[dict[str, bytes], str]:
    w, h = rng.choice((64, 96, 128)), rng.choice((64, 96, 128))
    img = Image.new("RGB", (w, h), (235, 235, 225))
    draw = ImageDraw.Draw(img)
    color, shape = rng.choice([c for c in COLORS if c != "white"]), rng.choice(SHAPES)
    side = "left" if rng.random() < 0.5 else "right"
    size = min(w, h) // 2
    x0 = 4 if side == "left" else w - size - 4
    y0 = (h - size) // 2
    draw_shape(draw, shape, (x0, y0, x0 + size, y0 + size), COLORS[color])
    digit = rng.randrange(10)
    dx = w - 24 if side == "left" else 8
    draw.text((dx, h // 2 - 10), str(digit), fill=(0, 0, 0), font=ImageFont.load_default(size=20))
    caption = f"A {color} {shape} on the {side} and the digit {digit}."
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return {"jpg": buf.getvalue(), "json": json.dumps({"type": "caption", "caption": caption}).encode()}, caption


def _page(text: str, width: int = 192, line_height: int = 16) -> bytes:
    font = ImageFont.load_default(size=12)
    words, lines, line = text.split(), [], ""
    for word in words:  # greedy wrap to the page width
        trial = f"{line} {word}".strip()
        if line and font.getlength(trial) > width - 16:
            lines.append(line)
            trial = word
        line = trial
    lines.append(line)
    height = max(64, 32 * math.ceil((len(lines) * line_height + 16) / 32))
    img = Image.new("L", (width, height), 255)
    draw = ImageDraw.Draw(img)
    for i, ln in enumerate(lines):
        draw.text((8, 8 + i * line_height), ln, fill=0, font=font)
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def ocr_sample(rng: random.Random) -> tuple[dict[str, bytes], str]:
    members: dict[str, bytes] = {}
    content, texts = [], []
    for page in range(1, rng.randint(1, 2) + 1):
        text = " ".join(_sentence(rng) for _ in range(rng.randint(2, 5)))
        members[f"page{page}.png"] = _page(text)
        content += [{"image": f"page{page}.png"}, {"text": text + "\n"}]
        texts.append(text)
    members["json"] = json.dumps({"type": "interleaved", "content": content}).encode()
    return members, "\n".join(texts)


def _frames_background(n: int, size: int, shade: int) -> np.ndarray:
    return np.full((n, size, size, 3), shade, dtype=np.uint8)


def video_sample(rng: random.Random, size: int = 64, fps: int = 8) -> tuple[dict[str, bytes], str]:
    n = fps * rng.randint(2, 4)
    color, shape = rng.choice([c for c in COLORS if c not in ("white", "black")]), rng.choice(SHAPES)
    direction = rng.choice(sorted(DIRECTIONS))
    dx, dy = DIRECTIONS[direction]
    frames = _frames_background(n, size, 40)
    s = size // 4
    for i in range(n):
        travel = int((size - s) * i / max(1, n - 1))
        x = travel if dx > 0 else size - s - travel if dx < 0 else (size - s) // 2
        y = travel if dy > 0 else size - s - travel if dy < 0 else (size - s) // 2
        img = Image.fromarray(frames[i])
        draw_shape(ImageDraw.Draw(img), shape, (x, y, x + s, y + s), COLORS[color])
        frames[i] = np.asarray(img)
    caption = f"A {color} {shape} moves from {direction}."
    meta = {"type": "video", "caption": caption}
    return {"mp4": encode_mp4(frames, fps), "json": json.dumps(meta).encode()}, caption


def haystack_frames(base: np.ndarray, indices: list[int] | range, fps: float) -> np.ndarray:
    """The needle haystack at frames `indices`: a gray texture (`base`, one value per 8x8 tile) that shifts by
    one tile per second. uint8 [len(indices), 8 * rows, 8 * cols, 3]."""
    out = np.empty((len(indices), base.shape[0] * 8, base.shape[1] * 8, 3), dtype=np.uint8)
    for k, i in enumerate(indices):
        out[k] = np.roll(base, int(i // fps), axis=1).repeat(8, 0).repeat(8, 1)[..., None]
    return out


def draw_needle(frame: np.ndarray, color: str, shape: str) -> np.ndarray:
    """The needle over the frame's centre square with a 1/8 margin (8 px on 64 px frames)."""
    h, w = frame.shape[:2]
    side = min(h, w)
    margin = side // 8
    x0, y0 = (w - side) // 2 + margin, (h - side) // 2 + margin
    img = Image.fromarray(np.ascontiguousarray(frame))
    draw_shape(ImageDraw.Draw(img), shape, (x0, y0, x0 + side - 2 * margin, y0 + side - 2 * margin), COLORS[color])
    return np.asarray(img)


def needle_span(total: int, fps: float, depth: float, indices: list[int], needle_seconds: float) -> tuple[int, int]:
    """(first frame, frame count) of a needle at `depth` (0 start .. 1 end) of a `total`-frame video. It lasts
    needle_seconds, or as long as the largest gap between the sampled `indices` when sampling is sparser, so
    a sampled frame always shows it."""
    gap = max((b - a for a, b in zip(indices, indices[1:])), default=1)
    count = min(total, max(round(needle_seconds * fps), gap, 1))
    return round(depth * (total - count)), count


def _sampled_frames(n: int, fps: float, sample_fps: float) -> list[int]:
    """The frames of an n-frame video the encoder reads at `sample_fps` (no frame limit)."""
    return frame_indices(n, num_sampled_frames(n, fps, VideoConfig(fps=sample_fps, max_frames=1 << 20)))


def _clip_start(rng: random.Random, source_seconds: int, seconds: int, from_start: float) -> int:
    """Where a clip of `seconds` starts in a video of `source_seconds`: 0 with probability from_start (the draw
    is skipped when from_start is 0, so the clip corpora of before keep their bytes), else uniform."""
    if from_start and rng.random() < from_start:
        return 0
    return rng.randint(0, max(0, source_seconds - seconds))


def needle_sample(rng: random.Random, size: int = 64, fps: int = 4, seconds: tuple[int, int] = (6, 12),
                  sample_fps: float = 2.0, needle_seconds: float = 1.0, source_seconds: int = 0,
                  answer: str = "middle", from_start: float = 0.0) -> tuple[dict[str, bytes], str]:
    """A haystack of `seconds` (inclusive range) with a needle at a uniform depth, placed as train.eval vniah
    places it for sampling at `sample_fps` (the encoder's video.fps).

    source_seconds > 0: the haystack is a clip cut at a uniform start from a video that long, and its json
    says so ("start"), so the encoder writes the frame timestamps in the source video's time: where the
    needle sits in the sequence then no longer tells its time, only the timestamp text before it does.
    from_start: the share of those clips cut at the source's start (timestamps from 0, as the eval's).
    answer: "middle" answers at the needle's middle; "patch" at the timestamp the encoder writes before the
    temporal patch that shows it (at sample_fps), so the answer's time can be copied from the input."""
    n = fps * rng.randint(*seconds)
    base = np.random.default_rng(rng.getrandbits(32)).integers(60, 120, (size // 8, size // 8), dtype=np.uint8)
    frames = haystack_frames(base, range(n), fps)
    sampled = _sampled_frames(n, fps, sample_fps)
    start, count = needle_span(n, fps, rng.random(), sampled, needle_seconds)
    color, shape = rng.choice(NEEDLE_COLORS), rng.choice(SHAPES)
    for i in range(start, start + count):
        frames[i] = draw_needle(frames[i], color, shape)
    clip_start = _clip_start(rng, source_seconds, n // fps, from_start) if source_seconds else 0
    if answer == "patch":
        first = next(k for k, i in enumerate(sampled) if start <= i < start + count)
        time = clip_start + patch_timestamps(sampled, fps)[first // 2]
    elif answer == "middle":
        time = clip_start + round((start + (count - 1) / 2) / fps, 1)
    else:
        raise ValueError(f"answer={answer!r} is not 'middle' or 'patch'")
    qa = {"question": NEEDLE_QUESTION, "answer": f"A {color} {shape}.", "time": time}
    meta = {"type": "video", "qa": [qa], **({"start": clip_start} if source_seconds else {})}
    return {"mp4": encode_mp4(frames, fps), "json": json.dumps(meta).encode()}, qa["answer"]


# The needle pipeline's haystacks (configs/pipeline/needle.yaml), sampled at train.eval vniah's 1 fps: short
# ones for the short stages, long ones up to what the last stage's sequence holds.
NEEDLE_SECONDS = {"needle_short": (4, 30), "needle_mid": (30, 70), "needle_long": (70, 144)}
# `--preset needle_clips`: each haystack is a clip of a 144 s video (the longest haystack) whose timestamps
# start where the clip does, answered with the timestamp before the needle's patch, so its time can only be
# read, not inferred from the position (docs/eval.md: the tiny model learns to read it only after a
# language-model stage, --preset needle_read).
CLIP_SOURCE_SECONDS = 144

HAYSTACK_WORDS = ("gray", "dim", "dark", "pale")
# needle_read's short clips and stamp texts: a quarter start at 0, so single-digit timestamps (the first
# seconds of every eval haystack) are as common in training as in the eval, not 1 clip in 14.
READ_FROM_START = 0.25


def stamp_text_sample(rng: random.Random, seconds: tuple[int, int] = (4, 30), fps: int = 4,
                      source_seconds: int = CLIP_SOURCE_SECONDS,
                      from_start: float = READ_FROM_START) -> tuple[dict[str, bytes], str]:
    """A needle clip written in words: the timestamps the encoder writes for a `needle_sample` clip at 1 fps,
    each followed by two words standing for its patch (haystack words, or the needle's color and shape), then
    the needle question, answered at the needle patch's timestamp. Text only and a few dozen tokens, so a
    stage can show the language model many of them: reading the time off the stamp before the needle is the
    copy a pretrained LLM brings to Qwen3-VL's recipe, and the tiny model of the needle miniature does not."""
    n = fps * rng.randint(*seconds)
    sampled = _sampled_frames(n, fps, 1.0)
    clip_start = _clip_start(rng, source_seconds, n // fps, from_start)
    stamps = [clip_start + t for t in patch_timestamps(sampled, fps)]
    needle, color, shape = rng.randrange(len(stamps)), rng.choice(NEEDLE_COLORS), rng.choice(SHAPES)
    content = []
    for k, t in enumerate(stamps):
        words = f"{color} {shape}" if k == needle else " ".join(rng.choice(HAYSTACK_WORDS) for _ in range(2))
        content += [{"text": format_timestamp(t), "learn": False}, {"text": words, "learn": False}]
    answer = f"{format_timestamp(stamps[needle])} A {color} {shape}.\n"
    content += [{"text": NEEDLE_QUESTION + "\n", "learn": False}, {"text": answer}]
    text = " ".join(item["text"] for item in content)
    return {"json": json.dumps({"type": "interleaved", "content": content}).encode()}, text


GENERATORS: dict[str, tuple[str, Callable[[random.Random], tuple[dict[str, bytes], str]]]] = {
    "text": ("text", text_sample), "caption": ("caption", caption_sample), "ocr": ("interleaved", ocr_sample),
    "video": ("video", video_sample), "needle": ("video", needle_sample),
    "stamp_text": ("interleaved", stamp_text_sample),
    "stamp_text_long": ("interleaved", functools.partial(stamp_text_sample, seconds=(30, 144))),
    **{name: ("video", functools.partial(needle_sample, seconds=seconds, sample_fps=1.0))
       for name, seconds in NEEDLE_SECONDS.items()},
    **{f"{name}_clips": ("video", functools.partial(needle_sample, seconds=seconds, sample_fps=1.0,
                                                    source_seconds=CLIP_SOURCE_SECONDS, answer="patch"))
       for name, seconds in NEEDLE_SECONDS.items()},
    "needle_short_read": ("video", functools.partial(needle_sample, seconds=NEEDLE_SECONDS["needle_short"],
                                                     sample_fps=1.0, source_seconds=CLIP_SOURCE_SECONDS,
                                                     answer="patch", from_start=READ_FROM_START))}
# Samples per data set at --scale 1: the demo corpus (about 4 MB), the needle-heavy one, and a small needle
# corpus for quick checks (tests/e2e/test_needle.py): enough captions and short haystacks for the first two
# stages to learn to find the needle, few of the long haystacks that take most of the build time.
NEEDLE_COUNTS = {"caption": 400, "needle_short": 800, "needle_mid": 400, "needle_long": 400}
PRESETS = {"demo": BASE_COUNTS, "needle": NEEDLE_COUNTS, "needle_clips": NEEDLE_COUNTS,
           "needle_read": {**NEEDLE_COUNTS, "stamp_text": 8000, "stamp_text_long": 2000},
           "needle_small": {"caption": 100, "needle_short": 200, "needle_mid": 20, "needle_long": 20}}


# Presets that write a data set with another generator than the one of its name: needle_clips and needle_read
# write clip haystacks under the needle set names, so configs/data/needle.yaml reads every needle corpus.
PRESET_GENERATORS = {"needle_clips": {name: f"{name}_clips" for name in NEEDLE_SECONDS},
                     "needle_read": {**{name: f"{name}_clips" for name in NEEDLE_SECONDS},
                                     "needle_short": "needle_short_read"}}


def _generator(preset: str, name: str) -> tuple[str, Callable[[random.Random], tuple[dict[str, bytes], str]]]:
    """The generator of data set `name` in corpus `preset`."""
    return GENERATORS[PRESET_GENERATORS.get(preset, {}).get(name, name)]


def _samples(name: str, count: int, seed: int, preset: str = "demo") -> Iterator[tuple[str, dict[str, bytes], str]]:
    _, make = _generator(preset, name)
    for i in range(count):
        members, text = make(_rng(seed, name, i))
        yield f"{name}{i:06d}", members, text


def _timestamp_texts() -> list[str]:
    """Timestamps as the encoder writes them, so the tokenizer learns their pieces."""
    return [format_timestamp(t / 10, style) for t in range(0, 4000, 7) for style in ("seconds", "hms")]


def make_corpus(out: str | os.PathLike, seed: int = 0, scale: float = 1.0, shards_per_set: int = 4,
                vocab_size: int = 2048, preset: str = "demo", whole_numbers: int = 0) -> dict:
    """Write the corpus `preset` under `out` and return its manifest (also written to out/manifest.json).
    whole_numbers = N: the tokenizer keeps each whole number below N as one piece (data.tokenizer)."""
    if scale <= 0:
        raise ValueError(f"--scale {scale} must be > 0")
    if preset not in PRESETS:
        raise ValueError(f"--preset {preset!r} is not one of {sorted(PRESETS)}")
    out = Path(out)
    texts: list[str] = _timestamp_texts()
    manifest: dict = {"seed": seed, "scale": scale, "preset": preset, "tokenizer": "tokenizer.model",
                      "datasets": {}}
    for name, base_count in PRESETS[preset].items():
        kind = _generator(preset, name)[0]
        # A whole number of samples per shard, so every data set has exactly shards_per_set shards (the
        # loader splits shards over ranks x workers).
        per_shard = max(1, round(base_count * scale / shards_per_set))
        count = per_shard * shards_per_set
        with ShardWriter(out / name, max_samples=per_shard) as writer:
            for key, members, text in _samples(name, count, seed, preset):
                writer.write(key, members)
                texts.append(text)
            shards = [os.path.relpath(p, out) for p in writer.shards]
        manifest["datasets"][name] = {"type": kind, "samples": count, "shards": shards}
    train_sentencepiece(texts, vocab_size, out / "tokenizer.model", whole_numbers=whole_numbers)
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return manifest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data.synth", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scale", type=float, default=1.0, help="multiplies every data set's sample count")
    parser.add_argument("--shards-per-set", type=int, default=4)
    parser.add_argument("--vocab-size", type=int, default=2048)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="demo",
                        help="demo: every data set; needle: captions + short and long needle haystacks; "
                             "needle_small: the same with a quarter of the captions and short haystacks and "
                             "1/20 of the long ones; needle_clips: needle with the haystacks as clips of a 144 s "
                             "video (timestamps from the clip's start, answers at the needle patch's stamp); "
                             "needle_read: needle_clips plus needle clips written in words (stamp_text)")
    parser.add_argument("--whole-numbers", type=int, default=0, metavar="N",
                        help="tokenize each whole number below N as one piece (default: digits one by one)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    manifest = make_corpus(args.out, args.seed, args.scale, args.shards_per_set, args.vocab_size, args.preset,
                           args.whole_numbers)
    total = sum(os.path.getsize(os.path.join(args.out, s)) for d in manifest["datasets"].values()
                for s in d["shards"])
    for name, d in manifest["datasets"].items():
        print(f"{name:12s} {d['type']:12s} {d['samples']:6d} samples in {len(d['shards'])} shards")
    print(f"wrote {args.out}: {total / 1e6:.1f} MB of shards + tokenizer.model in "
          f"{time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
