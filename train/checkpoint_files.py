"""Per-file sizes and checksums of a checkpoint: recorded at save by the rank that wrote each file, checked at
load before anything is deserialised, and by hand with `python -m train.checkpoint verify DIR`.

Why per rank: on a cluster file system a rank's dirty pages live on its own node, so only the writer's fsync
makes its file durable, and only the writer can checksum it without reading it over the network. The writer
reads each file back once (page cache, right after writing), hashes it and fsyncs it in the same pass; the
manifest `{relative path: [size, digest]}` of every rank goes into meta.json. At load, rank r checks the files
saved by ranks r, r + W, r + 2W, ... (W = this run's world size), so every file is checked once whatever the
layout of the run that resumes.

The digest is xxh3-64 (xxhash; ~10x faster than crc32 from zlib, which is the fallback): the point is to catch
truncation and bit rot, not an adversary.
"""
from __future__ import annotations

import os
import zlib
from pathlib import Path
from typing import Any

try:
    import xxhash
except ImportError:  # pragma: no cover - xxhash is a declared dependency; crc32 keeps the format usable
    xxhash = None

CHUNK = 8 << 20
Manifest = dict[str, list[Any]]  # relative path -> [size in bytes, "algorithm:hexdigest"]


def file_digest(path: Path, sync: bool = False) -> tuple[int, str]:
    """(size, "algo:hex") of a file, read once in chunks; fsync it too when `sync` (the writer's pass)."""
    hasher = xxhash.xxh3_64() if xxhash is not None else None
    crc, size = 0, 0
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            size += len(chunk)
            if hasher is not None:
                hasher.update(chunk)
            else:
                crc = zlib.crc32(chunk, crc)
        if sync:
            os.fsync(f.fileno())
    return size, f"xxh3_64:{hasher.hexdigest()}" if hasher is not None else f"crc32:{crc:08x}"


def digest_files(root: Path, paths: list[Path], sync: bool = True) -> Manifest:
    """Manifest of `paths` (files under `root`), each hashed and, by default, fsync'ed."""
    manifest: Manifest = {}
    for path in sorted(set(paths)):
        size, digest = file_digest(path, sync=sync)
        manifest[path.relative_to(root).as_posix()] = [size, digest]
    return manifest


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
