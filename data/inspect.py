"""Look into shards: `python -m data.inspect SHARDS... [--show 3] [--tokenizer tok.model] [--seq-len N]`.

Prints the number of samples per type (and bad samples with their reason), then the first --show samples:
their members, the parts of the document (text, image size, video frames/fps/size) and, with --tokenizer,
the encoded document as text with each run of vision placeholders shown as `<|image_pad|>x64`.
"""
from __future__ import annotations

import argparse
import io
import sys
from collections import Counter

from data.config import DatasetConfig
from data.errors import BadSample, DataError
from data.shard_format import Part, parse_sample
from data.shards import ShardError, iter_samples, list_shards


def describe_part(part: Part, sample: dict[str, bytes]) -> str:
    if part.kind == "text":
        role = "target" if part.learn else "context"
        time = f" @{part.time:.1f}s" if part.time is not None else ""
        return f"text ({role}{time}): {part.text[:120]!r}"
    data = sample[part.member]
    if part.kind == "image":
        from PIL import Image

        try:
            img = Image.open(io.BytesIO(data))
            return f"image {part.member}: {img.format} {img.width}x{img.height} {img.mode}, {len(data)} bytes"
        except OSError as e:
            return f"image {part.member}: undecodable ({e})"
    try:
        import decord

        reader = decord.VideoReader(io.BytesIO(data), num_threads=1)
        h, w = reader.get_batch([0]).shape[1:3]
        fps = reader.get_avg_fps()
        return (f"video {part.member}: {len(reader)} frames at {fps:.2f} fps ({len(reader) / fps:.1f} s), "
                f"{w}x{h}, {len(data)} bytes")
    except RuntimeError as e:
        return f"video {part.member}: undecodable ({str(e)[:80]})"


def render_ids(ids: list[int], tok) -> str:
    """Decoded document text with each run of vision placeholders collapsed to `<|image_pad|>xN`."""
    pads = {tok.image_pad_id: "<|image_pad|>", tok.video_pad_id: "<|video_pad|>"}
    out, run_id, run = [], None, 0
    for i in ids + [-1]:
        if i == run_id:
            run += 1
            continue
        if run_id is not None:
            out.append(f"{pads[run_id]}x{run}")
            run_id, run = None, 0
        if i in pads:
            run_id, run = i, 1
        elif i >= 0:
            out.append(tok.decode([i]))
    return "".join(out)


def inspect(patterns: list[str], show: int = 3, tokenizer: str | None = None, seq_len: int = 8192,
            out=sys.stdout) -> Counter:
    """Print the report; returns the counts per sample type ("bad" for bad samples, "bad shard" too)."""
    paths = sorted({p for pat in patterns for p in _expand(pat)})
    encoder = None
    if tokenizer:
        from data.encode import DocumentEncoder
        from data.tokenizer import Tokenizer

        encoder = DocumentEncoder(Tokenizer.load(tokenizer), seq_len=seq_len)
    counts: Counter = Counter()
    shown = 0
    for path in paths:
        try:
            for _, sample in iter_samples(path):
                kind = _one(sample, encoder, counts, show_it=shown < show, out=out)
                shown += kind is not None
        except ShardError as e:
            counts["bad shard"] += 1
            print(f"bad shard {e.path}: {e.reason}", file=out)
    print(f"{len(paths)} shard(s), {sum(v for k, v in counts.items() if not k.startswith('bad'))} samples",
          file=out)
    for kind, n in sorted(counts.items()):
        print(f"  {kind:12s} {n:8d}", file=out)
    return counts


def _expand(pattern: str) -> list[str]:
    """The shard URLs of a pattern as the loader lists them (globs, brace ranges, pipe:, http(s)://, s3://,
    @list files); one that lists nothing is kept, to be reported as a bad shard when read."""
    try:
        return list_shards(DatasetConfig("inspect", [pattern]))
    except DataError:
        return [pattern]


def _one(sample: dict, encoder, counts: Counter, show_it: bool, out) -> str | None:
    key = f"{sample['__url__']}:{sample['__key__']}"
    members = {k: v for k, v in sample.items() if not k.startswith("_")}
    try:
        kind, parts = parse_sample(members)
        # Decoding pixels is the slow part: only the samples shown are encoded.
        doc = encoder.encode(members, key, 0) if encoder and show_it else None
    except BadSample as e:
        counts["bad"] += 1
        print(f"bad sample {key}: {e.reason}", file=out)
        return None
    counts[kind] += 1
    if not show_it:
        return None
    sizes = ", ".join(f"{ext} ({len(v)} B)" for ext, v in sorted(members.items()))
    print(f"--- {key} [{kind}] members: {sizes}", file=out)
    for part in parts:
        print(f"    {describe_part(part, members)}", file=out)
    if doc is not None:
        targets = int(doc.target_mask.sum())
        print(f"    {len(doc)} tokens, {targets} targets: {render_ids(doc.input_ids.tolist(), encoder.tok)!r}",
              file=out)
    return kind


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data.inspect", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("shards", nargs="+", help="shards as data sets name them: paths, globs, brace ranges, "
                        "pipe:CMD, http(s)://, s3://, @list.txt")
    parser.add_argument("--show", type=int, default=3, help="how many samples to print in full")
    parser.add_argument("--tokenizer", help="also encode the shown samples and print their tokens")
    parser.add_argument("--seq-len", type=int, default=8192)
    args = parser.parse_args(argv)
    try:
        counts = inspect(args.shards, args.show, args.tokenizer, args.seq_len)
    except (ValueError, OSError) as e:  # a bad --tokenizer
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 1 if counts.get("bad shard") else 0


if __name__ == "__main__":
    sys.exit(main())
