"""Shard listing, the tar sample reader, and the per-source stream with its resumable cursor.

Shards are webdataset-style tars: consecutive members sharing a key (the member name up to the first dot of
its basename) form one sample, `{"__key__": key, "__url__": shard, "<ext>": bytes, ...}`.

Missing data, decided here once:
- at start-up, a pattern that matches no file, or a plain path that does not exist, is a `DataError` naming
  the data set and the pattern (nothing expensive has happened yet, and a typo must not shrink the mix);
- during the run, a shard that disappeared, cannot be opened, is empty or is truncated is a `ShardError`
  that the stream counts as a bad shard and skips (the samples read before a truncation are kept).

A `SourceStream` reads one data set's share for one (data-parallel rank, loader worker) "slot". Its cursor
is three integers (epoch, position in the slot's shard list, raw sample offset in the shard) so the state
saved with a checkpoint is tiny and exact; every sample it returns carries a restore key
(source, shard index, raw offset) from which it can be read again.
"""
from __future__ import annotations

import glob
import os
import random
import re
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from braceexpand import braceexpand

from data.config import DatasetConfig
from data.errors import DataError

_NAME = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # key, extension: the webdataset convention
Sample = dict[str, object]
RestoreKey = tuple[int, int, int]  # (source, shard index in the data set's list, raw sample offset)


class ShardError(Exception):
    """A shard cannot be (fully) read. Counted and skipped by the stream, never fatal on its own."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


def list_shards(dataset: DatasetConfig) -> list[str]:
    """The data set's shard files in config order (globs sorted). Raises DataError on an unmatched pattern."""
    found: list[str] = []
    for pattern in dataset.shards:
        for expanded in braceexpand(pattern):
            if glob.has_magic(expanded):
                matches = sorted(glob.glob(expanded))
                if not matches:
                    raise DataError(f"data set {dataset.name!r}: shard pattern {expanded!r} matches no file")
                found.extend(matches)
            elif os.path.isfile(expanded):
                found.append(expanded)
            else:
                raise DataError(f"data set {dataset.name!r}: shard {expanded!r} does not exist")
    return list(dict.fromkeys(found))  # a shard listed twice would be read twice per epoch


def iter_samples(path: str, start: int = 0, stride: int = 1, phase: int = 0) -> Iterator[tuple[int, Sample]]:
    """(raw index, sample) for every sample with index >= start and index % stride == phase.

    Skipped samples are not read (tarfile seeks over their data), so resuming deep into a shard is cheap.
    """
    try:
        tar = tarfile.open(path, mode="r:")
    except FileNotFoundError:
        raise ShardError(path, "missing (deleted or moved after start-up)") from None
    except (tarfile.TarError, OSError) as e:
        raise ShardError(path, f"not a readable tar: {e}") from None
    with tar:
        index, key, sample = -1, None, {}
        for member in _members(tar, path):
            member_key, ext = _split_name(member.name)
            if member_key is None:
                continue
            if member_key != key:
                if key is not None and _wanted(index, start, stride, phase):
                    yield index, sample
                index, key, sample = index + 1, member_key, {"__key__": member_key, "__url__": path}
            if _wanted(index, start, stride, phase):
                sample[ext] = _read_member(tar, member, path)
        if key is not None and _wanted(index, start, stride, phase):
            yield index, sample
        if index < 0:
            raise ShardError(path, "empty (no samples)")
        # tarfile ends silently when a file is cut exactly at a header; a complete tar ends with two
        # zero blocks after the last member.
        if os.path.getsize(path) < tar.offset + 2 * tarfile.BLOCKSIZE:
            raise ShardError(path, f"truncated after sample {index} (no end-of-archive marker)")


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


class SourceStream:
    """One data set's samples for one slot, epoch after epoch, with a shard order reshuffled per epoch."""

    def __init__(self, source: int, name: str, shards: list[str], slot: int, num_slots: int, seed: int,
                 max_epochs: int | None, on_bad_shard: Callable[[int, ShardError], None]) -> None:
        self.source, self.name, self.shards = source, name, shards
        self.slot, self.num_slots, self.seed, self.max_epochs = slot, num_slots, seed, max_epochs
        self.on_bad_shard = on_bad_shard
        self.cursor = Cursor()
        self._reader: Iterator[tuple[int, Sample]] | None = None

    @property
    def exhausted(self) -> bool:
        return self.max_epochs is not None and self.cursor.epoch >= self.max_epochs

    def state(self) -> list[int]:
        c = self.cursor
        return [c.epoch, c.position, c.offset, c.returned]

    def load_state(self, state: list[int]) -> None:
        self.cursor = Cursor(*(int(v) for v in state))
        self._reader = None

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
                self._reader = iter_samples(self.shards[shard], self.cursor.offset, stride, phase)
            try:
                item = next(self._reader, None)
            except ShardError as e:
                self.on_bad_shard(self.source, e)
                item = None
            if item is None:
                self.cursor.position, self.cursor.offset, self._reader = self.cursor.position + 1, 0, None
                continue
            index, sample = item
            self.cursor.offset = index + 1
            self.cursor.returned += 1
            return (self.source, shard, index), sample
        return None

    def _end_epoch(self) -> None:
        if self.cursor.returned == 0:
            raise DataError(f"data set {self.name!r}: a full pass over its {len(self.shards)} shard(s) "
                            f"(slot {self.slot} of {self.num_slots}) returned no readable sample")
        self.cursor = Cursor(epoch=self.cursor.epoch + 1)


def read_sample(shards: list[str], key: RestoreKey) -> Sample:
    """Read one sample again from its restore key (rebuilding the packing buffer on resume)."""
    _, shard, offset = key
    try:
        for index, sample in iter_samples(shards[shard], start=offset, stride=1, phase=0):
            if index == offset:
                return sample
            break
    except ShardError as e:
        raise DataError(f"cannot restore sample {offset} of shard {shards[shard]!r}: {e.reason}") from None
    raise DataError(f"cannot restore sample {offset} of shard {shards[shard]!r}: the shard changed since "
                    f"the checkpoint was saved")
