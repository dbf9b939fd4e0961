"""Raw data -> shards: `python -m data.build SRC OUT [--tokenizer tok.model] [--max-samples-per-shard N]`.

SRC is either
- a folder: files are grouped into samples by key (path relative to SRC up to the first dot of the file
  name), so `a.jpg` + `a.json` is a caption sample, `b.txt` a text sample, `c.json` + `c.page1.png` an
  interleaved document, `d.mp4` + `d.json` a video sample (docs/data.md has the JSON of each type); or
- a JSONL manifest, one sample per line, media paths relative to the manifest:
    {"text": "..."}
    {"image": "img/a.jpg", "caption": "...", "prompt": "..."}
    {"video": "vid/a.mp4", "caption": "..."}   or   {"video": ..., "qa": [{"question", "answer", "time"}]}
    {"type": "interleaved", "content": [{"text": "..."}, {"image": "pages/1.png"}, ...]}
  with an optional "key" (default: the line number).

Every sample is checked with data.shard_format.parse_sample before it is written; bad ones are reported
and skipped (or stop the build with --strict). With --tokenizer, every sample is also encoded
(data.encode, Qwen3-VL default resolution, --seq-len budget) and the summary counts tokens per type.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections import Counter, defaultdict
from collections.abc import Iterator
from pathlib import Path

from tqdm import tqdm

from data.errors import BadSample
from data.shard_format import ShardWriter, member_kind, parse_sample

# (key, members), or (key, BadSample) for a manifest line that cannot become a sample.
RawSample = tuple[str, "dict[str, bytes] | BadSample"]
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")


def folder_samples(src: Path) -> Iterator[RawSample]:
    """Samples of a folder, in sorted key order; members keyed by extension as webdataset reads them."""
    groups: dict[str, dict[str, Path]] = defaultdict(dict)
    for path in sorted(p for p in src.rglob("*") if p.is_file() and not p.name.startswith(".")):
        rel = path.relative_to(src)
        stem, _, ext = rel.name.partition(".")
        if not ext:
            raise ValueError(f"{path}: a sample file needs an extension (KEY.ext)")
        key = "_".join(_UNSAFE.sub("_", part) for part in (*rel.parent.parts, stem))
        if ext in groups[key]:
            raise ValueError(f"{path}: sample key {key!r} already has a member {ext!r} "
                             f"({groups[key][ext]}); rename one of them")
        groups[key][ext] = path
    for key in sorted(groups):
        yield key, {ext: p.read_bytes() for ext, p in sorted(groups[key].items())}


def manifest_samples(manifest: Path) -> Iterator[RawSample]:
    """Samples of a JSONL manifest; media files are read relative to the manifest's folder."""
    with open(manifest, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if line.strip():
                yield _manifest_line(line, f"{line_no:08d}", manifest.parent, f"{manifest}:{line_no}")


def _manifest_line(line: str, default_key: str, base: Path, where: str) -> RawSample:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        return default_key, BadSample(f"malformed JSON ({e})", where)
    if not isinstance(record, dict):
        return default_key, BadSample("line is not a JSON object", where)
    key = _UNSAFE.sub("_", str(record.pop("key", default_key)))
    try:
        return key, _manifest_members(record, base, where)
    except BadSample as e:
        return key, e


def _manifest_members(record: dict, base: Path, where: str) -> dict[str, bytes]:
    if set(record) == {"text"}:
        return {"txt": str(record["text"]).encode()}
    members: dict[str, bytes] = {}
    for kind in ("image", "video"):
        if kind in record:
            path = record.pop(kind)
            members[_ext(path, where)] = _read(base, path, where)
            record.setdefault("type", "caption" if kind == "image" else "video")
    for i, item in enumerate(record.get("content", []) if record.get("type") == "interleaved" else []):
        for kind in ("image", "video"):
            if isinstance(item, dict) and kind in item:
                name = f"{kind}{i}.{_ext(item[kind], where)}"
                members[name] = _read(base, item[kind], where)
                item[kind] = name  # the shard names members, not paths
    members["json"] = json.dumps(record, ensure_ascii=False, sort_keys=True).encode()
    return members


def _ext(path: object, where: str) -> str:
    ext = str(path).rsplit(".", 1)[-1].lower()
    if "." not in str(path) or member_kind(ext) is None:
        raise BadSample(f"{path!r} is not an image or mp4 file name", where)
    return ext


def _read(base: Path, rel: object, where: str) -> bytes:
    path = base / str(rel)
    if not path.is_file():
        raise BadSample(f"media file {path} does not exist", where)
    return path.read_bytes()


class Summary:
    """Samples, bad samples and (with a tokenizer) text and vision tokens per sample type."""

    def __init__(self) -> None:
        self.samples: Counter[str] = Counter()
        self.tokens: Counter[str] = Counter()
        self.vision_tokens: Counter[str] = Counter()
        self.bad: list[str] = []

    def add(self, kind: str, doc=None, vision_ids: tuple[int, ...] = ()) -> None:
        self.samples[kind] += 1
        if doc is not None:
            self.tokens[kind] += len(doc)
            self.vision_tokens[kind] += sum(int((doc.input_ids == i).sum()) for i in vision_ids)

    def lines(self, with_tokens: bool) -> list[str]:
        head = f"{'type':12s} {'samples':>8s}" + (f" {'tokens':>10s} {'vision':>10s}" if with_tokens else "")
        rows = [head]
        for kind in sorted(self.samples):
            row = f"{kind:12s} {self.samples[kind]:8d}"
            if with_tokens:
                row += f" {self.tokens[kind]:10d} {self.vision_tokens[kind]:10d}"
            rows.append(row)
        rows.append(f"{'bad':12s} {len(self.bad):8d}")
        return rows


def build(src: str | os.PathLike, out: str | os.PathLike, max_samples: int = 10_000, max_bytes: int = 1 << 30,
          tokenizer: str | None = None, seq_len: int = 8192, strict: bool = False,
          progress: bool = True) -> Summary:
    src = Path(src)
    if src.is_dir():
        samples = folder_samples(src)
    elif src.is_file():
        samples = manifest_samples(src)
    else:
        raise FileNotFoundError(f"source {src} is neither a folder nor a JSONL manifest")
    encoder = None
    if tokenizer:
        from data.encode import DocumentEncoder
        from data.tokenizer import Tokenizer

        encoder = DocumentEncoder(Tokenizer.load(tokenizer), seq_len=seq_len)
        vision_ids = (encoder.tok.image_pad_id, encoder.tok.video_pad_id)
    summary = Summary()
    with ShardWriter(out, max_samples, max_bytes) as writer:
        for key, members in tqdm(samples, desc=f"build {out}", unit="sample", disable=not progress):
            if isinstance(members, BadSample):
                _bad(summary, str(members), strict)
                continue
            try:
                kind, _ = parse_sample(members)
                doc = encoder.encode(members, key, 0) if encoder else None
            except BadSample as e:
                _bad(summary, f"{key}: {e.reason}", strict)
                continue
            writer.write(key, members)
            summary.add(kind, doc, vision_ids if encoder else ())
    return summary


def _bad(summary: Summary, message: str, strict: bool) -> None:
    if strict:
        raise BadSample(message)
    summary.bad.append(message)
    print(f"skipped {message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data.build", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", help="a folder of sample files or a JSONL manifest")
    parser.add_argument("out", help="output folder for shard-000000.tar, ...")
    parser.add_argument("--max-samples-per-shard", type=int, default=10_000)
    parser.add_argument("--max-shard-bytes", type=int, default=1 << 30)
    parser.add_argument("--tokenizer", help="count tokens per type with this tokenizer (encodes every sample)")
    parser.add_argument("--seq-len", type=int, default=8192, help="vision budget for --tokenizer counts")
    parser.add_argument("--strict", action="store_true", help="stop at the first bad sample")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    try:
        summary = build(args.src, args.out, args.max_samples_per_shard, args.max_shard_bytes, args.tokenizer,
                        args.seq_len, args.strict, not args.no_progress)
    except (BadSample, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print("\n".join(summary.lines(args.tokenizer is not None)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
