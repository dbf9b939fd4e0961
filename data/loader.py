"""Distributed, exactly resumable streaming of a stage's data mix as `PackedBatch`es.

Who reads what: the loader takes the data-parallel rank and size (never the global rank), so the
tensor/context/pipeline peers of a rank compute identical batches. A stage's data is split into "streams"
(slots) when it starts: as many as (dp ranks x loader workers) then; every data set's shards are dealt to the
streams (sample-level striding when there are fewer shards than streams, see `data.shards.slot_plan`), so
within an epoch no sample is read twice or missed. Worker w of dp rank r serves streams p, p + P, p + 2P...
(p = r x W + w, P = ranks x workers now): one stream each in the layout the stage started with; several,
taking turns one batch each, after a resume on fewer ranks or workers (elastic resume). The streams' count
is world-independent state, as MosaicML Streaming's canonical partition is: a layout change only moves them.

What a stream does (`_WorkerStream`): document k comes from data set `SourceSchedule.source(k)` (a pure
function of seed, stream and k), whose `SourceStream` returns the next sample; the sample is encoded (bad
ones counted and skipped), cut to seq_len (`fit_document`) and handed to the stream's best-fit packer.

Exact resume: a stream's whole state is small and explicit: k, per-source cursors (epoch, shard position,
sample offset), the packing buffer as restore keys (source, shard, offset) that are re-read and re-encoded on
load, and counters. Each batch travels from its worker with its stream's state *after* producing it, and the
loader records it only when it hands the batch to the trainer, so `state_dict()` describes what the trainer
consumed, not what workers prefetched. torch's DataLoader takes batches from workers round-robin; on resume,
physical worker p plays logical worker (p + next_worker) % W and each worker's turn among its streams is
restored, so the order continues where it stopped. A state saved in another layout (the list of every saved
rank's state) resumes each stream where it was. A state whose mix fingerprint (data sets, shards, weights,
seq_len, seed, stream count...) differs from the loader's is refused with a DataError naming every
difference: a new stage starts a fresh state.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict
from typing import Any

from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from data.batch import Document, PackedBatch
from data.config import DataConfig
from data.errors import BadSample, DataError
from data.mixture import SourceSchedule, mixture_probabilities
from data.packing import BestFitPacker, BufferEntry, VisionTokens, fit_document, multiple_problem
from data.shards import RestoreKey, Sample, ShardError, SourceStream, list_shards, read_samples
from data.sources import FetchRetry
from data.transfer import ByValue

log = logging.getLogger(__name__)
EncodeFn = Callable[[Sample, str, int], Document]  # (webdataset sample, key, source) -> Document
STATE_VERSION = 2  # 2: per-stream states, resumable in another layout
STAT_NAMES = ("samples", "bad_samples", "bad_shards", "truncated", "dropped_too_long")


class _Stats:
    """Per-source counters of one worker and rate-limited warnings. The bad-fraction limit is global (every
    rank and worker): the trainer sums `StreamingLoader.stats()` over the ranks and applies
    `data.errors.over_limit`, so no worker stops the run on its own share."""

    def __init__(self, cfg: DataConfig, counts: dict[str, list[int]] | None = None) -> None:
        self.cfg = cfg
        num = len(cfg.datasets)
        self.counts = {name: list(counts[name]) if counts else [0] * num for name in STAT_NAMES}
        self._last_warning, self._suppressed = -float("inf"), 0

    def add(self, name: str, source: int) -> None:
        self.counts[name][source] += 1

    def bad(self, name: str, source: int, what: str) -> None:
        """Count a bad sample or shard and warn (rate-limited)."""
        self.add(name, source)
        now = time.monotonic()
        if now - self._last_warning >= self.cfg.warn_interval_s:
            more = f" ({self._suppressed} more since the last warning)" if self._suppressed else ""
            log.warning("skipping bad data in %r: %s%s", self.cfg.datasets[source].name, what, more)
            self._last_warning, self._suppressed = now, 0
        else:
            self._suppressed += 1


class _WorkerStream:
    """One data stream (a slot): mixture -> source streams -> encode -> fit -> best-fit packer."""

    def __init__(self, spec: "_Spec", slot: int, state: dict[str, Any] | None) -> None:
        self.spec, self.slot = spec, slot
        cfg = spec.cfg
        num_slots = spec.num_streams
        self.schedule = SourceSchedule(spec.probabilities, cfg.seed, slot)
        retry = FetchRetry(cfg.fetch_retries, cfg.fetch_backoff_s)
        self.streams = [SourceStream(i, d.name, spec.shards[i], slot, num_slots, cfg.seed, cfg.max_epochs,
                                     self._bad_shard, retry) for i, d in enumerate(cfg.datasets)]
        self.packer = BestFitPacker(spec.seq_len, cfg.packing_buffer, cfg.loss_weighting, spec.tokens.pad,
                                    cfg.buffer_bytes, spec.document_multiple)
        self.k, self.batches = 0, 0
        self.stats = _Stats(cfg)
        if state is not None:
            self._load(state)

    def state(self) -> dict[str, Any]:
        return {"k": self.k, "batches": self.batches, "streams": [s.state() for s in self.streams],
                "buffer": [list(e.tag) for e in self.packer.buffer], "stats": self.stats.counts}

    def _load(self, state: dict[str, Any]) -> None:
        self.k, self.batches = int(state["k"]), int(state["batches"])
        for stream, cursor in zip(self.streams, state["streams"]):
            stream.load_state(cursor)
        self.stats = _Stats(self.spec.cfg, state["stats"])
        keys: list[RestoreKey] = [(int(tag[0]), int(tag[1]), int(tag[2])) for tag in state["buffer"]]
        retry = FetchRetry(self.spec.cfg.fetch_retries, self.spec.cfg.fetch_backoff_s)
        for key, sample in zip(keys, read_samples(self.spec.shards, keys, retry)):
            try:
                doc = self.spec.encode(sample, _doc_key(sample), key[0])
            except BadSample as e:
                raise DataError(f"cannot restore buffered sample {_doc_key(sample)}: {e}") from None
            fitted = fit_document(doc, self.spec.seq_len, self.spec.tokens)
            if fitted is None:
                raise DataError(f"restored sample {_doc_key(sample)} no longer fits seq_len={self.spec.seq_len}")
            self.packer.add(BufferEntry(fitted, key))

    def __iter__(self) -> Iterator[tuple[PackedBatch, dict[str, Any]]]:
        while True:
            batch = self.packer.next_sequence(self._pull)
            if batch is None:
                return
            self.batches += 1
            yield batch, self.state()

    def _pull(self) -> BufferEntry | None:
        while not all(s.exhausted for s in self.streams):
            source = self.schedule.source(self.k)
            self.k += 1
            got = self.streams[source].next()
            if got is None:
                continue  # this data set finished its epochs; k still advances (pure schedule)
            key, sample = got
            doc = self._encode(sample, source)
            if doc is None:
                continue
            fitted = fit_document(doc, self.spec.seq_len, self.spec.tokens)
            if fitted is None:
                self.stats.add("dropped_too_long", source)
                continue
            if fitted is not doc:
                self.stats.add("truncated", source)
            return BufferEntry(fitted, key)
        return None

    def _encode(self, sample: Sample, source: int) -> Document | None:
        key = _doc_key(sample)
        try:
            doc = self.spec.encode(sample, key, source)
        except BadSample as e:
            self.stats.bad("bad_samples", source, f"{sample['__url__']} key {sample['__key__']!r}: {e.reason}")
            return None
        self.stats.add("samples", source)
        return doc

    def _bad_shard(self, source: int, error: ShardError) -> None:
        self.stats.bad("bad_shards", source, f"shard {error.path}: {error.reason}")


def _doc_key(sample: Sample) -> str:
    shard = os.path.basename(str(sample["__url__"]))
    for suffix in (".tar.gz", ".tgz", ".tar"):
        shard = shard.removesuffix(suffix)
    return f"{shard}/{sample['__key__']}"


class _Spec:
    """What every worker needs, fixed for the loader's lifetime (copied into worker processes)."""

    def __init__(self, cfg: DataConfig, encode: EncodeFn, seq_len: int, dp_rank: int, dp_size: int,
                 tokens: VisionTokens, document_multiple: int = 1) -> None:
        self.cfg, self.encode, self.seq_len, self.tokens = cfg, encode, seq_len, tokens
        self.dp_rank, self.dp_size, self.document_multiple = dp_rank, dp_size, document_multiple
        self.num_logical = max(1, cfg.num_workers)
        # Data streams of the stage: fixed when the stage starts (dp_size x workers then) and kept across
        # resumes in any layout; this rank's worker w serves streams physical_slot, + physical_slots, ...
        self.num_streams = dp_size * self.num_logical
        self.shards = [list_shards(d) for d in cfg.datasets]
        self.probabilities = mixture_probabilities([d.weight for d in cfg.datasets], cfg.temperature)

    def worker_streams(self, logical: int) -> list[int]:
        """The streams one of this rank's workers serves, in its round-robin order."""
        physical = self.dp_rank * self.num_logical + logical
        return list(range(physical, self.num_streams, self.dp_size * self.num_logical))


class _PackedDataset(IterableDataset):
    def __init__(self, spec: _Spec, states: dict[int, dict[str, Any]], rotation: int, turns: list[int]) -> None:
        self.spec, self.states, self.rotation, self.turns = spec, states, rotation, turns

    def __iter__(self) -> Iterator[tuple[PackedBatch | ByValue, int, int, dict[str, Any]]]:
        """(batch, logical worker, stream, stream state): the worker's streams take turns, one batch each."""
        info = get_worker_info()
        logical = ((info.id if info else 0) + self.rotation) % self.spec.num_logical
        slots = self.spec.worker_streams(logical)
        streams = [iter(_WorkerStream(self.spec, slot, self.states.get(slot))) for slot in slots]
        turn = self.turns[logical] % len(slots)
        while any(s is not None for s in streams):
            got = next(streams[turn], None) if streams[turn] is not None else None
            if got is None:
                streams[turn] = None
            else:  # out of a worker process, small tensors travel inside the message (data/transfer.py)
                yield ByValue(got[0]) if info else got[0], logical, slots[turn], got[1]
            turn = (turn + 1) % len(slots)


def _last_line(err: DataError) -> str:
    return str(err).rstrip().splitlines()[-1].removeprefix(f"{DataError.__module__}.DataError: ")


def _passthrough(item: Any) -> Any:
    return item


class StreamingLoader:
    """Iterable of PackedBatch for one data-parallel rank, with `state_dict()` / `load_state_dict()`."""

    def __init__(self, cfg: DataConfig, encode: EncodeFn, seq_len: int, *, dp_rank: int = 0, dp_size: int = 1,
                 tokens: VisionTokens = VisionTokens(), document_multiple: int = 1) -> None:
        """document_multiple: every packed document is padded to a multiple of it (data/packing.py); the
        training side asks for it (the per-document context-parallel split). It may change between a save
        and a resume: every document is still read exactly once, only the packing after it differs."""
        cfg.validate()
        if seq_len < 2:
            raise DataError(f"seq_len={seq_len} must be >= 2")
        if not 0 <= dp_rank < dp_size:
            raise DataError(f"dp_rank={dp_rank} is not in [0, dp_size={dp_size})")
        problem = multiple_problem(seq_len, document_multiple)
        if problem:  # here, not first in a worker process's packer
            raise DataError(problem)
        self.spec = _Spec(cfg, encode, seq_len, dp_rank, dp_size, tokens, document_multiple)  # lists shards
        self._streams: dict[int, dict[str, Any]] = {}  # stream -> its state after its last consumed batch
        self._turns = [0] * self.spec.num_logical  # per worker: which of its streams hands out the next batch
        self._batches = 0
        self._next_worker = 0

    @property
    def batches_yielded(self) -> int:
        return self._batches

    def fingerprint(self) -> dict[str, Any]:
        """Everything that decides which batches come out; a saved state only fits an identical one."""
        spec, cfg = self.spec, self.spec.cfg
        shard_names = [[os.path.basename(p) for p in shards] for shards in spec.shards]
        return {
            "datasets": [d.name for d in cfg.datasets],
            "weights": [d.weight for d in cfg.datasets],
            "shards": [hashlib.sha1("\n".join(names).encode()).hexdigest()[:16] for names in shard_names],
            "temperature": cfg.temperature, "seq_len": spec.seq_len, "seed": cfg.seed,
            "loss_weighting": cfg.loss_weighting, "packing_buffer": cfg.packing_buffer,
            "buffer_bytes": cfg.buffer_bytes, "max_epochs": cfg.max_epochs, "streams": spec.num_streams,
            "tokens": asdict(spec.tokens),
        }

    def layout(self) -> dict[str, int]:
        return {"dp_rank": self.spec.dp_rank, "dp_size": self.spec.dp_size, "num_workers": self.spec.num_logical}

    def state_dict(self) -> dict[str, Any]:
        """What the trainer has consumed: plain ints, lists and strings (no tensors, no pickles). The state of
        every stream this rank serves, so any layout can resume it (see load_state_dict)."""
        return {"version": STATE_VERSION, "mix": self.fingerprint(), "layout": self.layout(),
                "batches": self._batches, "next_worker": self._next_worker, "turns": list(self._turns),
                "streams": {str(slot): dict(state) for slot, state in sorted(self._streams.items())}}

    def load_state_dict(self, state: dict[str, Any] | list[dict[str, Any]]) -> None:
        """Resume from this rank's own state (same layout), or from the states of every rank of a run in
        another layout (a list: other data-parallel size or worker count). The stage's streams continue
        where they were, each from its own cursors, mixture position and packing buffer, whichever rank
        and worker now serves it: over the epoch every sample of every data set is read exactly once."""
        states = state if isinstance(state, list) else [state]
        for one in states:
            if one.get("version") != STATE_VERSION:
                raise DataError(f"data loader state version {one.get('version')!r} is not {STATE_VERSION}")
        saved_streams = int(states[0]["mix"].get("streams", -1))
        self.spec.num_streams = max(1, saved_streams)
        now = self.fingerprint()
        diffs = [f"{k}: state {states[0]['mix'].get(k)!r}, now {v!r}" for k, v in now.items()
                 if states[0]["mix"].get(k) != v]
        if diffs:
            self.spec.num_streams = self.spec.dp_size * self.spec.num_logical
            raise DataError("data loader state does not fit this data mix (a new mix needs a fresh state, i.e. "
                            "a new stage); differs in " + "; ".join(diffs))
        physical = self.spec.dp_size * self.spec.num_logical
        if physical > self.spec.num_streams:
            raise DataError(f"this stage's data was split into {self.spec.num_streams} streams when it started; "
                            f"{self.spec.dp_size} data-parallel ranks x {self.spec.num_logical} workers = {physical} "
                            f"cannot share them: resume with at most {self.spec.num_streams}")
        mine = {slot for logical in range(self.spec.num_logical) for slot in self.spec.worker_streams(logical)}
        self._streams = {int(slot): dict(s) for one in states for slot, s in one["streams"].items()
                         if int(slot) in mine}  # only the streams this rank serves now: its counters, its saves
        same_layout = len(states) == 1 and states[0].get("layout") == self.layout()
        if same_layout:
            self._batches, self._next_worker = int(states[0]["batches"]), int(states[0]["next_worker"])
            self._turns = [int(t) for t in states[0]["turns"]]
        else:  # batches per rank so far (the global count over the new number of ranks); a fresh rotation
            ranks = {json.dumps(one.get("layout"), sort_keys=True): one for one in states}
            total = sum(int(one["batches"]) for one in ranks.values())
            self._batches, self._next_worker = total // self.spec.dp_size, 0
            self._turns = [0] * self.spec.num_logical

    def stats(self) -> dict[str, dict[str, int]]:
        """Counters per data set (samples, bad samples/shards, cut and dropped documents) for logging,
        summed over the workers as of the last consumed batch."""
        totals = {d.name: dict.fromkeys(STAT_NAMES, 0) for d in self.spec.cfg.datasets}
        for stream in self._streams.values():
            for stat, values in stream.get("stats", {}).items():
                for d, value in zip(self.spec.cfg.datasets, values):
                    totals[d.name][stat] += value
        return totals

    def __iter__(self) -> Iterator[PackedBatch]:
        dataset = _PackedDataset(self.spec, dict(self._streams), self._next_worker, list(self._turns))
        cfg = self.spec.cfg
        items: Any = iter(dataset)
        if cfg.num_workers > 0:
            items = DataLoader(dataset, batch_size=None, num_workers=cfg.num_workers, collate_fn=_passthrough,
                               prefetch_factor=cfg.prefetch_factor)
        try:
            for batch, logical, slot, state in items:
                # Record before handing the batch over: once the trainer holds it, it counts as consumed.
                self._streams[slot] = state
                self._turns[logical] = self.spec.worker_streams(logical).index(slot) + 1
                self._batches += 1
                self._next_worker = (logical + 1) % self.spec.num_logical
                yield batch
        except DataError as err:  # from a worker process, torch puts the worker's traceback in the message
            raise DataError(_last_line(err)) from None
