"""Per-file sizes and checksums of a checkpoint: recorded at save by the rank that wrote each file, checked at
load before anything is deserialised, and by hand with `python -m train.checkpoint verify DIR`.

Why per rank: on a cluster file system a rank's dirty pages live on its own node, so only the writer's fsync
makes its file durable, and only the writer can checksum it without reading it over the network. The writer
reads each file back once (page cache, right after writing), hashes it and fsyncs it in the same pass; the
manifest `{relative path: [size, digest]}` of every rank goes into meta.json. At load, rank r checks the files
saved by ranks r, r + W, r + 2W, ... (W = this run's world size), so every file is checked once whatever the
layout of the run that resumes.

The digest is xxh3-64 (xxhash; ~10x faster than crc32 from zlib, which is the fallback): the point is to catch
truncation and bit rot, not an adversary. Files the writer serialises itself (`save_hashed`) are hashed as the
bytes go out, so they are never read back, and torch.save's own per-record crc32 (a second checksum of the
same bytes, computed on the writer's CPU time) is turned off for them.
"""
from __future__ import annotations

import io
import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

try:
    import xxhash
except ImportError:  # pragma: no cover - xxhash is a declared dependency; crc32 keeps the format usable
    xxhash = None

CHUNK = 8 << 20
Manifest = dict[str, list[Any]]  # relative path -> [size in bytes, "algorithm:hexdigest"]


class _Digest:
    """A running digest (xxh3-64, or crc32 without xxhash) and byte count."""

    def __init__(self) -> None:
        self.hasher = xxhash.xxh3_64() if xxhash is not None else None
        self.crc, self.size = 0, 0

    def update(self, data: Any) -> None:
        self.size += memoryview(data).nbytes
        if self.hasher is not None:
            self.hasher.update(data)
        else:
            self.crc = zlib.crc32(data, self.crc)

    def result(self) -> str:
        return f"xxh3_64:{self.hasher.hexdigest()}" if self.hasher is not None else f"crc32:{self.crc:08x}"


@dataclass(frozen=True)
class WrittenFile:
    """A file whose size and digest were taken while it was written (and which was fsync'ed)."""

    path: Path
    size: int
    digest: str


class _HashingWriter(io.RawIOBase):
    """A write-only stream that hashes every byte on its way into `file` (torch.save writes sequentially)."""

    def __init__(self, file: Any) -> None:
        super().__init__()
        self.file, self.digest = file, _Digest()

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        self.digest.update(data)
        return self.file.write(data)


def save_hashed(obj: Any, path: Path) -> WrittenFile:
    """torch.save `obj` to `path`, hashing the bytes as they are written, then fsync: one pass over the data
    instead of write + read back. Loads like any torch.save file."""
    previous = torch.serialization.get_crc32_options()
    torch.serialization.set_crc32_options(False)  # the digest below covers every byte already
    try:
        with open(path, "wb") as f:
            stream = _HashingWriter(f)
            torch.save(obj, stream)
            f.flush()
            os.fsync(f.fileno())
    finally:
        torch.serialization.set_crc32_options(previous)
    return WrittenFile(path, stream.digest.size, stream.digest.result())


def file_digest(path: Path, sync: bool = False) -> tuple[int, str]:
    """(size, "algo:hex") of a file, read once in chunks; fsync it too when `sync` (the writer's pass)."""
    digest = _Digest()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
        if sync:
            os.fsync(f.fileno())
    return digest.size, digest.result()


def digest_files(root: Path, files: list[Path | WrittenFile], sync: bool = True) -> Manifest:
    """Manifest of `files` (under `root`): a WrittenFile as recorded, a path hashed and, by default, fsync'ed."""
    manifest: Manifest = {}
    for item in files:
        if isinstance(item, WrittenFile):
            size, digest, path = item.size, item.digest, item.path
        else:
            path = item
            size, digest = file_digest(path, sync=sync)
        manifest[path.relative_to(root).as_posix()] = [size, digest]
    return dict(sorted(manifest.items()))


def all_files(root: Path, exclude: set[str]) -> list[Path]:
    """Every regular file under `root` whose relative path is not in `exclude`."""
    return [p for p in root.rglob("*") if p.is_file() and p.relative_to(root).as_posix() not in exclude]


def check_file(root: Path, relative: str, expected: list[Any]) -> str | None:
    """None if the file has the recorded size and digest, else what is wrong with it (one phrase)."""
    path = root / relative
    size, digest = int(expected[0]), str(expected[1])
    try:
        actual = path.stat().st_size
    except FileNotFoundError:
        return f"{path}: missing"
    if actual != size:
        return f"{path}: {actual} bytes, {size} recorded ({'truncated' if actual < size else 'grown'})"
    algo = digest.split(":", 1)[0]
    if algo not in ("xxh3_64", "crc32") or (algo == "xxh3_64" and xxhash is None):
        return f"{path}: checksum algorithm {algo!r} not available here"
    if file_digest(path)[1] != digest:
        return f"{path}: checksum mismatch (content changed since it was written)"
    return None


def check_manifests(root: Path, manifests: list[Manifest], ranks: range | list[int]) -> str | None:
    """First problem among the files the given saving ranks wrote, or None when all verify."""
    for saved_rank in ranks:
        for relative, expected in sorted(manifests[saved_rank].items()):
            problem = check_file(root, relative, expected)
            if problem is not None:
                return problem
    return None


def my_share(num_saved: int, rank: int, world: int) -> range:
    """The saving ranks whose files this rank checks: rank, rank + world, ... (all of them, once)."""
    return range(rank, num_saved, world)
