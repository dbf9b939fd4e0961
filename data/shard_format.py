"""The shard format: what a sample in a `.tar` shard holds, how it is parsed, and how shards are written.

A shard is a WebDataset tar: the members of one sample share a key (`KEY.ext`, the key being the name up
to its first dot) and are read as a dict {ext: bytes}. Four sample types (docs/data.md has examples):

- text:        KEY.txt                                   (or KEY.json {"type": "text", "text": ...})
- caption:     KEY.jpg|jpeg|png|webp + KEY.json {"caption": str, "prompt": str (optional)}
- interleaved: KEY.json {"type": "interleaved", "content": [{"text": str, "learn": bool (opt.)},
               {"image": "page1.png"}, {"video": "clip.mp4"}, ...]} + the members it names (KEY.page1.png)
- video:       KEY.mp4 + KEY.json {"caption": str} or {"qa": [{"question": str, "answer": str,
               "time": seconds (optional, rendered as a timestamp before the answer)}], "prompt": opt.,
               "start": seconds (optional: the clip's start in the video it was cut from; its frame
               timestamps are written in that video's time, and answer times are given in it too)}
  An interleaved {"video": ...} item takes the same optional "start".

`parse_sample` turns a sample into an ordered list of parts (text / image / video) and raises BadSample
naming the member for anything malformed; data.encode turns the parts into tokens and pixels.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

from data.errors import BadSample

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
VIDEO_EXTS = ("mp4",)
SAMPLE_TYPES = ("text", "caption", "interleaved", "video")
SHARD_PATTERN = "shard-%06d.tar"


@dataclass(frozen=True)
class Part:
    """One piece of a document, in reading order."""

    kind: str  # "text" | "image" | "video"
    text: str = ""  # kind == "text"
    member: str = ""  # kind == "image" / "video": the sample member (extension key) holding the bytes
    learn: bool = True  # text only: is it a training target (captions, answers) or context (prompts)?
    time: float | None = None  # text only: a timestamp (seconds) rendered before the text
    start: float = 0.0  # video only: the clip's start (seconds) in its source video, added to frame times


def member_kind(member: str) -> str | None:
    ext = member.rsplit(".", 1)[-1].lower()
    return "image" if ext in IMAGE_EXTS else "video" if ext in VIDEO_EXTS else None


def parse_sample(sample: dict[str, bytes]) -> tuple[str, list[Part]]:
    """(sample type, parts). Keys starting with "_" (webdataset's __key__, __url__) are ignored."""
    members = {k: v for k, v in sample.items() if not k.startswith("_")}
    if not members:
        raise BadSample("sample has no members")
    if "json" not in members:
        if set(members) == {"txt"}:
            return "text", [Part("text", text=_utf8(members["txt"], "txt"))]
        lonely = sorted(m for m in members if member_kind(m))
        if lonely:
            raise BadSample(f"member {lonely[0]} has no .json pair")
        raise BadSample(f"unknown sample type: members {sorted(members)}")
    meta = _load_json(members["json"])
    kind = meta.get("type") or _infer_type(members)
    if kind == "text":
        return kind, [Part("text", text=_field(meta, "text", str))]
    if kind == "caption":
        return kind, _caption_parts(meta, members)
    if kind == "interleaved":
        return kind, _interleaved_parts(meta, members)
    if kind == "video":
        return kind, _video_parts(meta, members)
    raise BadSample(f"json: unknown sample type {kind!r} (expected one of {SAMPLE_TYPES})")


def _infer_type(members: dict[str, bytes]) -> str:
    kinds = {member_kind(m) for m in members}
    if "video" in kinds:
        return "video"
    if "image" in kinds:
        return "caption"
    raise BadSample(f"json: no \"type\" and no image/video member to infer it from (members {sorted(members)})")


def _media_and_prompt(meta: dict, members: dict[str, bytes], kind: str) -> list[Part]:
    """The one image/video member of a caption or video sample, then its optional (unlearned) prompt."""
    found = sorted(m for m in members if member_kind(m) == kind)
    if len(found) != 1:
        raise BadSample(f"{kind} sample needs exactly one {kind} member, has {found or 'none'}")
    parts = [Part(kind, member=found[0], start=_clip_start(meta, "start") if kind == "video" else 0.0)]
    if "prompt" in meta:
        parts.append(Part("text", text=_field(meta, "prompt", str), learn=False))
    return parts


def _caption_parts(meta: dict, members: dict[str, bytes]) -> list[Part]:
    return _media_and_prompt(meta, members, "image") + [Part("text", text=_field(meta, "caption", str))]


def _interleaved_parts(meta: dict, members: dict[str, bytes]) -> list[Part]:
    content = _field(meta, "content", list)
    parts: list[Part] = []
    for i, item in enumerate(content):
        if not isinstance(item, dict) or len(set(item) & {"text", "image", "video"}) != 1:
            raise BadSample(f"json: content[{i}] must have exactly one of text/image/video, got {item!r:.80}")
        if "text" in item:
            parts.append(Part("text", text=_field(item, "text", str, f"content[{i}].text"),
                              learn=bool(item.get("learn", True))))
            continue
        kind = "image" if "image" in item else "video"
        member = _field(item, kind, str, f"content[{i}].{kind}")
        if member not in members:
            raise BadSample(f"json: content[{i}] names member {member}, which the sample does not have")
        if member_kind(member) != kind:
            raise BadSample(f"json: content[{i}].{kind}={member!r} is not a {kind} file name")
        parts.append(Part(kind, member=member,
                          start=_clip_start(item, f"content[{i}].start") if kind == "video" else 0.0))
    if not parts:
        raise BadSample("json: interleaved content is empty")
    return parts


def _video_parts(meta: dict, members: dict[str, bytes]) -> list[Part]:
    parts = _media_and_prompt(meta, members, "video")
    if "qa" in meta:
        for i, qa in enumerate(_field(meta, "qa", list)):
            if not isinstance(qa, dict):
                raise BadSample(f"json: qa[{i}] is not an object")
            time = qa.get("time")
            if time is not None and (not isinstance(time, (int, float)) or time < 0):
                raise BadSample(f"json: qa[{i}].time={time!r} is not a non-negative number of seconds")
            parts.append(Part("text", text=_field(qa, "question", str, f"qa[{i}].question") + "\n", learn=False))
            parts.append(Part("text", text=_field(qa, "answer", str, f"qa[{i}].answer") + "\n",
                              time=None if time is None else float(time)))
        return parts
    parts.append(Part("text", text=_field(meta, "caption", str)))
    return parts


def _clip_start(obj: dict, where: str) -> float:
    start = obj.get("start", 0.0)
    if isinstance(start, bool) or not isinstance(start, (int, float)) or not 0 <= start < float("inf"):
        raise BadSample(f"json: {where}={start!r} is not a non-negative number of seconds")
    return float(start)


def _utf8(data: bytes, member: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadSample(f"{member}: not UTF-8 ({e})") from e


def _load_json(data: bytes) -> dict:
    try:
        meta = json.loads(_utf8(data, "json"))
    except json.JSONDecodeError as e:
        raise BadSample(f"json: malformed ({e})") from e
    if not isinstance(meta, dict):
        raise BadSample(f"json: expected an object, got {type(meta).__name__}")
    return meta


def _field(obj: dict, key: str, kind: type, where: str | None = None):
    where = where or key
    if key not in obj:
        raise BadSample(f"json: missing key {where!r}")
    value = obj[key]
    if not isinstance(value, kind):
        raise BadSample(f"json: {where} is {type(value).__name__}, expected {kind.__name__}")
    return value


class ShardWriter:
    """Writes samples ({ext: bytes} plus "__key__") into OUT/shard-000000.tar, ... reproducibly.

    A new shard starts once the current one has `max_samples` samples or `max_bytes` payload bytes (a shard
    may pass max_bytes by its last sample). Members are written sorted with mtime 0, owner root, mode 0444,
    so the same samples give byte-identical shards.
    """

    def __init__(self, out_dir: str | os.PathLike, max_samples: int = 10_000, max_bytes: int = 1 << 30) -> None:
        import webdataset as wds

        if max_samples < 1 or max_bytes < 1:
            raise ValueError(f"max_samples={max_samples} and max_bytes={max_bytes} must be >= 1")
        os.makedirs(out_dir, exist_ok=True)
        self.out_dir = str(out_dir)
        self._writer = wds.ShardWriter(os.path.join(self.out_dir, SHARD_PATTERN), maxcount=max_samples,
                                       maxsize=max_bytes, verbose=0, encoder=False, mtime=0.0,
                                       user="root", group="root", mode=0o444)
        self.samples = 0
        self._keys: set[str] = set()

    def write(self, key: str, members: dict[str, bytes]) -> None:
        if not key or "." in key or "/" in key:
            raise ValueError(f"sample key {key!r} must be non-empty without '.' or '/'")
        if key in self._keys:
            raise ValueError(f"sample key {key!r} written twice to {self.out_dir}")
        for ext, data in members.items():
            if not isinstance(data, bytes):
                raise ValueError(f"sample {key}: member {ext} is {type(data).__name__}, expected bytes")
        self._keys.add(key)
        self._writer.write({"__key__": key, **members})
        self.samples += 1

    @property
    def shards(self) -> list[str]:
        return sorted(os.path.join(self.out_dir, f) for f in os.listdir(self.out_dir) if f.endswith(".tar"))

    def close(self) -> None:
        self._writer.close()

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
