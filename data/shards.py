"""The tar sample reader and the per-source stream with its resumable cursor.

Shards are webdataset-style tars: consecutive members sharing a key (the member name up to the first dot of
its basename) form one sample, `{"__key__": key, "__url__": shard, "<ext>": bytes, ...}`. Where shards come
from (local files, `pipe:`, `http(s)://`, fsspec object stores, list files) and how they are opened is
`data.sources`; a gzip-compressed shard (`.tar.gz`, `.tgz`) is recognised by its magic bytes.

Missing data, decided here once:
- at start-up, a pattern that matches no file, or a plain path that does not exist, is a `DataError` naming
  the data set and the pattern (nothing expensive has happened yet, and a typo must not shrink the mix);
- during the run, a shard that disappeared, cannot be opened, is empty or is truncated is a `ShardError`
  that the stream counts as a bad shard and skips (the samples read before a truncation are kept); a shard
  whose source failed (`FetchError`: connection refused or cut, a pipe command that failed) is first opened
  again `data.fetch_retries` times with backoff, from the sample it stopped at.

A `SourceStream` reads one data set's share for one (data-parallel rank, loader worker) "slot". Its cursor
is a few integers (epoch, position in the slot's shard list, raw sample offset in the shard, samples
returned this epoch, the byte offset of that sample's header) so the state saved with a checkpoint is tiny
and exact; every sample it returns carries a restore key (source, shard index, raw offset) from which it can
be read again. Resuming inside a shard reopens it and goes to the saved sample: by seeking to its byte offset
where the source can seek (local and fsspec files), by reading through the samples before it on a stream
(pipe, HTTP, gzip). A state saved without the byte offset (4 integers) resumes by sample offset.
"""
from __future__ import annotations

import gzip
import random
import re
import tarfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from data.errors import DataError, FetchError, ShardError
from data.sources import FetchRetry, SequentialSource, close_source, list_shards, open_source

__all__ = ["ShardError", "FetchError", "list_shards", "iter_samples", "read_shard", "read_samples", "SourceStream"]
_NAME = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # key, extension: the webdataset convention
_GZIP_MAGIC = b"\x1f\x8b"
Sample = dict[str, object]
RestoreKey = tuple[int, int, int]  # (source, shard index in the data set's list, raw sample offset)


def iter_samples(path: str, start: int = 0, stride: int = 1, phase: int = 0) -> Iterator[tuple[int, Sample]]:
    """(raw index, sample) for every sample with index >= start and index % stride == phase.

    Skipped samples are not read where the source can seek (tarfile seeks over their data), so resuming deep
    into a local shard is cheap; on a stream they are read and dropped.
    """
    for index, sample, _ in read_shard(path, start, stride, phase):
        yield index, sample


def read_shard(path: str, start: int = 0, stride: int = 1, phase: int = 0,
               at_byte: int = 0) -> Iterator[tuple[int, Sample, int]]:
    """`iter_samples` with, for each sample, the byte offset where the next sample's first header starts.

    `at_byte` > 0 is such an offset yielded earlier for the sample `start`: a source that can seek (a local
    or fsspec file, not gzip) starts reading there, so a resume reads nothing before the saved sample; other
    sources ignore it and read from the start.
    """
    with _open_tar(path, at_byte) as (tar, complete, seeked):
        index, key, sample = (start - 1 if seeked else -1), None, {}
        for member in _members(tar, path):
            member_key, ext = _split_name(member.name)
            if member_key is None:
                continue
            if member_key != key:
                if key is not None and _wanted(index, start, stride, phase):
                    yield index, sample, member.offset
                index, key, sample = index + 1, member_key, {"__key__": member_key, "__url__": path}
            if _wanted(index, start, stride, phase):
                sample[ext] = _read_member(tar, member, path)
        if key is not None and _wanted(index, start, stride, phase):
            yield index, sample, tar.offset
        if index < 0:
            raise ShardError(path, "empty (no samples)")
        # tarfile ends silently when a shard is cut exactly at a header; a complete tar ends with two
        # zero blocks after the last member.
        if not complete():
            raise ShardError(path, f"truncated after sample {index} (no end-of-archive marker)")


@contextmanager
def _open_tar(path: str, at_byte: int = 0) -> Iterator[tuple[tarfile.TarFile, Callable[[], bool], bool]]:
    """The shard as a tarfile, a check that the archive was read to its end-of-archive marker, and whether
    reading starts at `at_byte` (the source can seek) rather than at the start."""
    source = open_source(path)
    try:
        try:
            opened = _tar_of(source, path, at_byte)
        except ShardError:
            raise
        except (tarfile.TarError, OSError, EOFError) as e:
            raise ShardError(path, f"not a readable tar: {e}") from None
        yield opened
    finally:
        close_source(source)


def _tar_of(source: Any, path: str, at_byte: int) -> tuple[tarfile.TarFile, Callable[[], bool], bool]:
    if _seekable(source):
        gzipped = source.read(len(_GZIP_MAGIC)) == _GZIP_MAGIC
        size = source.seek(0, 2)
        if not gzipped:  # random access: tarfile starts where it is and seeks over the members it skips
            source.seek(at_byte if 0 < at_byte <= size else 0)
            tar = tarfile.open(fileobj=source, mode="r:")
            return tar, lambda: size >= tar.offset + 2 * tarfile.BLOCKSIZE, 0 < at_byte <= size
        source.seek(0)
        raw = source
    else:
        raw = SequentialSource(source, path)
        gzipped = raw.peek(len(_GZIP_MAGIC)) == _GZIP_MAGIC
    counted = SequentialSource(gzip.GzipFile(fileobj=raw) if gzipped else raw, path)
    tar = tarfile.open(fileobj=counted, mode="r|")  # type: ignore[call-overload]
    # The end-of-archive block was read only if the stream delivered a full block past the last member.
    return tar, lambda: counted.count >= tar.offset + tarfile.BLOCKSIZE, False


def _seekable(source: object) -> bool:
    try:
        return bool(source.seekable())  # type: ignore[attr-defined]
    except (AttributeError, OSError, ValueError):
        return False


def _wanted(index: int, start: int, stride: int, phase: int) -> bool:
    return index >= start and index % stride == phase


def _members(tar: tarfile.TarFile, path: str) -> Iterator[tarfile.TarInfo]:
    while True:
        try:
            member = tar.next()
        except (tarfile.TarError, OSError, EOFError) as e:
            raise ShardError(path, f"truncated or corrupt: {e}") from None
        if member is None:
            return
        if member.isfile():
            yield member


def _read_member(tar: tarfile.TarFile, member: tarfile.TarInfo, path: str) -> bytes:
    try:
        handle = tar.extractfile(member)
        assert handle is not None  # regular files always have a handle
        return handle.read()
    except (tarfile.TarError, OSError, EOFError) as e:
        raise ShardError(path, f"truncated or corrupt in member {member.name!r}: {e}") from None


def _split_name(name: str) -> tuple[str | None, str]:
    match = _NAME.match(name)
    return (match.group(1), match.group(2)) if match else (None, "")


def slot_plan(num_shards: int, slot: int, num_slots: int) -> list[tuple[int, int, int]]:
    """The (shard, stride, phase) reads of one slot among `num_slots`, over shards 0..num_shards-1.

    With at least as many shards as slots, shards are dealt round-robin and read whole. With fewer, every
    shard is shared by the slots congruent to it modulo num_shards, each taking every k-th sample, so that
    across all slots every sample is read exactly once.
    """
    if num_shards >= num_slots:
        return [(shard, 1, 0) for shard in range(slot, num_shards, num_slots)]
    shard = slot % num_shards
    sharers = len(range(shard, num_slots, num_shards))
    return [(shard, sharers, slot // num_shards)]


@dataclass
class Cursor:
    epoch: int = 0
    position: int = 0  # index into this epoch's slot plan
    offset: int = 0  # next raw sample index in that shard
    returned: int = 0  # samples returned in this epoch (0 at the end of a pass = the data set is unreadable)
    byte: int = 0  # where sample `offset`'s first header starts in the shard (0: unknown, read from the start)


class SourceStream:
    """One data set's samples for one slot, epoch after epoch, with a shard order reshuffled per epoch."""

    def __init__(self, source: int, name: str, shards: list[str], slot: int, num_slots: int, seed: int,
                 max_epochs: int | None, on_bad_shard: Callable[[int, ShardError], None],
                 retry: FetchRetry = FetchRetry()) -> None:
        self.source, self.name, self.shards = source, name, shards
        self.slot, self.num_slots, self.seed, self.max_epochs = slot, num_slots, seed, max_epochs
        self.on_bad_shard, self.retry = on_bad_shard, retry
        self.cursor = Cursor()
        self._reader: Iterator[tuple[int, Sample, int]] | None = None
        self._failures = 0  # fetch failures of the current shard since it last delivered a sample

    @property
    def exhausted(self) -> bool:
        return self.max_epochs is not None and self.cursor.epoch >= self.max_epochs

    def state(self) -> list[int]:
        c = self.cursor
        return [c.epoch, c.position, c.offset, c.returned, c.byte]

    def load_state(self, state: list[int]) -> None:
        self.cursor = Cursor(*(int(v) for v in state))
        self._drop_reader()

    def _drop_reader(self) -> None:
        if self._reader is not None:
            self._reader.close()  # type: ignore[attr-defined]  # a generator: closes its source (pipe, socket)
        self._reader, self._failures = None, 0

    def plan(self, epoch: int) -> list[tuple[int, int, int]]:
        """This slot's reads in `epoch`: the shard order is a pure function of (seed, source, epoch)."""
        order = list(range(len(self.shards)))
        random.Random(f"{self.seed}/{self.source}/{epoch}").shuffle(order)
        return [(order[i], stride, phase) for i, stride, phase in slot_plan(len(order), self.slot, self.num_slots)]

    def next(self) -> tuple[RestoreKey, Sample] | None:
        """The next sample and its restore key, or None once max_epochs passes are done."""
        while not self.exhausted:
            plan = self.plan(self.cursor.epoch)
            if self.cursor.position >= len(plan):
                self._end_epoch()
                continue
            shard, stride, phase = plan[self.cursor.position]
            if self._reader is None:
                self._reader = read_shard(self.shards[shard], self.cursor.offset, stride, phase, self.cursor.byte)
            try:
                item = next(self._reader, None)
            except FetchError as e:
                self._reader = None
                if self._failures < self.retry.attempts:
                    self._failures += 1
                    self.retry.wait(self._failures, e)
                    continue  # reopen the shard at cursor.offset: what was returned is not read again
                self.on_bad_shard(self.source, e)
                item = None
            except ShardError as e:
                self.on_bad_shard(self.source, e)
                item = None
            if item is None:
                self._drop_reader()
                self.cursor.position, self.cursor.offset, self.cursor.byte = self.cursor.position + 1, 0, 0
                continue
            index, sample, next_byte = item
            self._failures = 0
            self.cursor.offset, self.cursor.byte = index + 1, next_byte
            self.cursor.returned += 1
            return (self.source, shard, index), sample
        return None

    def _end_epoch(self) -> None:
        if self.cursor.returned == 0:
            raise DataError(f"data set {self.name!r}: a full pass over its {len(self.shards)} shard(s) "
                            f"(slot {self.slot} of {self.num_slots}) returned no readable sample")
        self.cursor = Cursor(epoch=self.cursor.epoch + 1)


def read_samples(shards: list[list[str]], keys: list[RestoreKey],
                 retry: FetchRetry = FetchRetry()) -> list[Sample]:
    """Read samples again from their restore keys (rebuilding the packing buffer on resume), in `keys` order;
    `shards[source]` is a data set's shard list.

    Each shard is opened once for all its keys (a stream is read front to back only once), with the same
    retries as the stream; a sample that cannot be read again is a DataError."""
    wanted: dict[tuple[int, int], set[int]] = {}
    for source, shard, offset in keys:
        wanted.setdefault((source, shard), set()).add(offset)
    found: dict[RestoreKey, Sample] = {}
    for (source, shard), offsets in wanted.items():
        for index, sample in _read_offsets(shards[source][shard], offsets, retry):
            found[(source, shard, index)] = sample
    for source, shard, offset in keys:
        if (source, shard, offset) not in found:
            raise DataError(f"cannot restore sample {offset} of shard {shards[source][shard]!r}: the shard "
                            f"changed since the checkpoint was saved")
    return [found[key] for key in keys]


def _read_offsets(path: str, offsets: set[int], retry: FetchRetry) -> list[tuple[int, Sample]]:
    got: list[tuple[int, Sample]] = []
    attempt = 0
    while True:
        start = min(offsets - {index for index, _ in got}, default=None)
        if start is None:
            return got
        try:
            for index, sample in iter_samples(path, start=start):
                if index in offsets:
                    got.append((index, sample))
                if index >= max(offsets):
                    return got
            return got
        except FetchError as e:
            attempt += 1
            if attempt > retry.attempts:
                raise DataError(f"cannot restore samples of shard {path!r}: {e.reason}") from None
            retry.wait(attempt, e)
        except ShardError as e:
            raise DataError(f"cannot restore samples of shard {path!r}: {e.reason}") from None
