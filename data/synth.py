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

Same seed and scale -> byte-identical files: every sample draws from its own RNG seeded by (seed, data set,
index), images are rendered without randomness outside that RNG, mp4s are written bit-exact.
"""
from __future__ import annotations

import argparse
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
from data.video import encode_mp4, format_timestamp

COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (230, 200, 30),
          "purple": (140, 60, 180), "orange": (240, 130, 30), "black": (20, 20, 20), "white": (250, 250, 250)}
SHAPES = ("circle", "square", "triangle")
NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
DIRECTIONS = {"left to right": (1, 0), "right to left": (-1, 0), "top to bottom": (0, 1), "bottom to top": (0, -1)}
# Samples per data set at --scale 1 (about 4 MB in total).
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


def needle_sample(rng: random.Random, size: int = 64, fps: int = 4) -> tuple[dict[str, bytes], str]:
    seconds = rng.randint(6, 12)
    n = fps * seconds
    np_rng = np.random.default_rng(rng.getrandbits(32))
    # Haystack: slowly drifting gray texture; the needle lasts one second so 2-fps sampling always sees it.
    base = np_rng.integers(60, 120, (size // 8, size // 8), dtype=np.uint8)
    frames = np.empty((n, size, size, 3), dtype=np.uint8)
    for i in range(n):
        tile = np.roll(base, i // fps, axis=1).repeat(8, 0).repeat(8, 1)
        frames[i] = tile[..., None]
    start = rng.randrange(0, n - fps + 1, fps)
    color, shape = rng.choice([c for c in COLORS if c != "black"]), rng.choice(SHAPES)
    for i in range(start, start + fps):
        img = Image.fromarray(frames[i])
        draw_shape(ImageDraw.Draw(img), shape, (8, 8, size - 8, size - 8), COLORS[color])
        frames[i] = np.asarray(img)
    middle = (start + (fps - 1) / 2) / fps
    qa = {"question": NEEDLE_QUESTION, "answer": f"A {color} {shape}.",
          "time": round(middle, 1)}
    meta = {"type": "video", "qa": [qa]}
    return {"mp4": encode_mp4(frames, fps), "json": json.dumps(meta).encode()}, qa["answer"]


GENERATORS: dict[str, tuple[str, Callable[[random.Random], tuple[dict[str, bytes], str]]]] = {
    "text": ("text", text_sample), "caption": ("caption", caption_sample), "ocr": ("interleaved", ocr_sample),
    "video": ("video", video_sample), "needle": ("video", needle_sample)}


def _samples(name: str, count: int, seed: int) -> Iterator[tuple[str, dict[str, bytes], str]]:
    _, make = GENERATORS[name]
    for i in range(count):
        members, text = make(_rng(seed, name, i))
        yield f"{name}{i:06d}", members, text


def _timestamp_texts() -> list[str]:
    """Timestamps as the encoder writes them, so the tokenizer learns their pieces."""
    return [format_timestamp(t / 10, style) for t in range(0, 1200, 7) for style in ("seconds", "hms")]


def make_corpus(out: str | os.PathLike, seed: int = 0, scale: float = 1.0, shards_per_set: int = 4,
                vocab_size: int = 2048) -> dict:
    """Write the corpus under `out` and return its manifest (also written to out/manifest.json)."""
    if scale <= 0:
        raise ValueError(f"--scale {scale} must be > 0")
    out = Path(out)
    texts: list[str] = _timestamp_texts()
    manifest: dict = {"seed": seed, "scale": scale, "tokenizer": "tokenizer.model", "datasets": {}}
    for name, (kind, _) in GENERATORS.items():
        # A whole number of samples per shard, so every data set has exactly shards_per_set shards (the
        # loader splits shards over ranks x workers).
        per_shard = max(1, round(BASE_COUNTS[name] * scale / shards_per_set))
        count = per_shard * shards_per_set
        with ShardWriter(out / name, max_samples=per_shard) as writer:
            for key, members, text in _samples(name, count, seed):
                writer.write(key, members)
                texts.append(text)
            shards = [os.path.relpath(p, out) for p in writer.shards]
        manifest["datasets"][name] = {"type": kind, "samples": count, "shards": shards}
    train_sentencepiece(texts, vocab_size, out / "tokenizer.model")
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
    args = parser.parse_args(argv)
    start = time.perf_counter()
    manifest = make_corpus(args.out, args.seed, args.scale, args.shards_per_set, args.vocab_size)
    total = sum(os.path.getsize(os.path.join(args.out, s)) for d in manifest["datasets"].values()
                for s in d["shards"])
    for name, d in manifest["datasets"].items():
        print(f"{name:8s} {d['type']:12s} {d['samples']:6d} samples in {len(d['shards'])} shards")
    print(f"wrote {args.out}: {total / 1e6:.1f} MB of shards + tokenizer.model in "
          f"{time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
