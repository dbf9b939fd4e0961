"""Writing a stage's checkpoints: atomic, verified and, by default, asynchronous.

A save has three parts (`Checkpointer`):
1. snapshot, on the training thread, every rank (collective): rank 0 makes `checkpoints/.step_N.tmp`, the
   backend copies its state to host memory and plans its files (`Backend.save_async`,
   train/backends/snapshot.py), the RNG and loader state are serialised. The step loop then goes on.
2. write, on a background thread per rank: the backend's files and `rank_NNNNN.json`, each read back once,
   hashed and fsync-ed by the rank that wrote it (train/checkpoint_files.py); no collectives.
3. publish, on the training thread once every rank's writer is done (`poll()` after every step, or `wait()`):
   the backend's collective finalize, the manifests gathered, then rank 0 writes meta.json, fsyncs the
   directories, renames the temp dir into place, replaces `latest` (write temp, fsync, os.replace) and retires
   checkpoints beyond keep_last (renamed hidden at once, deleted on a thread after an asynchronous save).
So `latest` only ever names a checkpoint whose every file is on disk; a crash (kill -9) at any point leaves
the previous checkpoint and `latest` as they were. A save waits for the previous one; a stop (preemption,
the last step) waits for the pending one. A write that fails on any rank raises CheckpointError on every
rank at the publish, naming the directory and the cause, with `latest` untouched.
"""
from __future__ import annotations

import json
import os
import shutil
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from launch.signals import any_rank_flag
from train.backends.snapshot import PendingWrite
from train.checkpoint import (
    LATEST, META, StageDir, all_gather_object, latest_kept, model_fingerprint, rank, rank_file_name, rng_state, world_size,
)
from train.checkpoint_files import Manifest, all_files, digest_files
from train.config.model import ModelConfig
from train.models.native_io import CheckpointError, fsync_path

LOW_DISK_BYTES = 1 << 20  # a failed write with less free space than this was the disk filling up


@dataclass
class _InFlight:
    """One save between its snapshot and its publish."""

    step: int
    tmp: Path
    final: Path
    meta: dict[str, Any]
    pending: PendingWrite
    rank_state: str
    manifest: Manifest = field(default_factory=dict)
    failure: BaseException | None = None
    thread: threading.Thread | None = None

    def write(self) -> None:
        """The writer thread: this rank's files from the snapshot, then hash + fsync each of them."""
        _yield_cpu_to_training()
        try:
            written = self.pending.write()
            rank_file = self.tmp / rank_file_name(rank())
            rank_file.write_text(self.rank_state)
            # Only the writer's fsync makes its node's pages durable on a cluster file system.
            self.manifest = digest_files(self.tmp, [rank_file, *written])
        except Exception as err:  # reported to every rank at the publish
            self.failure = err


def _yield_cpu_to_training() -> None:
    """Lowest CPU priority for the calling (writer) thread: where cores are scarce (CPU training, busy data
    workers) serialising and hashing the snapshot takes the cycles the training thread leaves, instead of
    slowing its steps; the write just takes longer. Linux sets niceness per thread (tid); elsewhere a no-op."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
    except (AttributeError, OSError):
        pass


class Checkpointer:
    """Saves of one stage; every rank makes the same calls in the same order (they are collective)."""

    def __init__(self, stage_dir: StageDir, model_cfg: ModelConfig, keep_last: int,
                 asynchronous: bool = True) -> None:
        self.stage_dir, self.model_cfg, self.keep_last = stage_dir, model_cfg, keep_last
        self.asynchronous = asynchronous
        self._in_flight: _InFlight | None = None
        self._deleter: threading.Thread | None = None

    @property
    def pending(self) -> bool:
        return self._in_flight is not None

    def save(self, step: int, backend: Any, loader_state: dict[str, Any], meta: dict[str, Any]) -> Path:
        """Snapshot the state after `step` and start writing it (returns once written when not asynchronous).
        `meta` (JSON) goes into meta.json with the step, the world size and the model fingerprint."""
        self.wait()
        final = self.stage_dir.step_dir(step)
        tmp = final.with_name(f".{final.name}.tmp")

        def make_tmp() -> None:
            shutil.rmtree(tmp, ignore_errors=True)  # leftover of a crashed save
            tmp.mkdir(parents=True)

        _agree_on_write(make_tmp if rank() == 0 else None, tmp, self.stage_dir)
        snapshot: list[PendingWrite] = []
        _agree_on_write(lambda: snapshot.append(_snapshot(backend, tmp)), tmp, self.stage_dir)
        full_meta = {**meta, "step": step, "world_size": world_size(), "model": model_fingerprint(self.model_cfg)}
        job = _InFlight(step, tmp, final, full_meta, snapshot[0],
                        json.dumps({"rng": rng_state(), "loader": loader_state}) + "\n")
        job.thread = threading.Thread(target=job.write, name=f"checkpoint-writer-{step}", daemon=True)
        job.thread.start()
        self._in_flight = job
        if not self.asynchronous:
            self.wait()
        return final

    def poll(self) -> Path | None:
        """Publish the pending save if every rank's writer has finished (collective while one is pending;
        call it after every step). Returns the published checkpoint, else None."""
        job = self._in_flight
        if job is None or any_rank_flag(job.thread.is_alive()):
            return None
        return self._publish()

    def wait(self) -> Path | None:
        """Block until the pending save (if any) is written and published, and retired checkpoints deleted."""
        published = None
        if self._in_flight is not None:
            self._in_flight.thread.join()
            published = self._publish()
        if self._deleter is not None:
            self._deleter.join()
            self._deleter = None
        return published

    def _publish(self) -> Path:
        job, self._in_flight = self._in_flight, None
        _agree(job.failure, job.tmp, self.stage_dir)
        _agree_on_write(job.pending.finalize, job.tmp, self.stage_dir)
        gathered = all_gather_object(job.manifest)
        retired: list[Path] = []  # checkpoints beyond keep_last, hidden by publish(), deleted below

        def publish() -> None:
            files = [dict(m) for m in gathered]
            claimed = {name for rank_files in files for name in rank_files}
            files[0].update(digest_files(job.tmp, all_files(job.tmp, claimed | {META})))  # e.g. common files
            (job.tmp / META).write_text(json.dumps({**job.meta, "files": files}, indent=1, sort_keys=True) + "\n")
            _fsync_dirs(job.tmp)
            _replace_dir(job.tmp, job.final)
            _write_latest(self.stage_dir.checkpoints, job.final.name)
            retired.extend(_retire(self.stage_dir, self.keep_last, keep=job.final))

        _agree_on_write(publish if rank() == 0 else None, job.tmp, self.stage_dir)
        self._start_deleting(retired)
        return job.final

    def _start_deleting(self, paths: list[Path]) -> None:
        """Delete retired checkpoints: inline for a synchronous save; for an asynchronous one on a thread
        (unlinking a large checkpoint's files is most of a publish's time) joined by the next wait()."""
        if not paths:
            return
        if not self.asynchronous:
            _delete(paths)
            return
        self._deleter = threading.Thread(target=_delete, args=(paths,), name="checkpoint-delete", daemon=True)
        self._deleter.start()


def save_checkpoint(stage_dir: StageDir, step: int, backend: Any, loader_state: dict[str, Any],
                    model_cfg: ModelConfig, meta: dict[str, Any], keep_last: int) -> Path:
    """One synchronous save (collective); returns the checkpoint directory."""
    return Checkpointer(stage_dir, model_cfg, keep_last, asynchronous=False).save(step, backend, loader_state, meta)


def _snapshot(backend: Any, directory: Path) -> PendingWrite:
    """The backend's snapshot; a backend with only `save` writes now and leaves its files to rank 0's hash."""
    save_async = getattr(backend, "save_async", None)
    if save_async is not None:
        return save_async(directory)
    backend.save(directory)
    return PendingWrite(write=list)


def _agree_on_write(write: Callable[[], Any] | None, tmp: Path, stage_dir: StageDir) -> None:
    """Run `write` (None: nothing on this rank), then agree over all ranks whether every write worked, so
    that a failure on one rank stops all of them at the same point instead of leaving the others waiting in
    the next collective."""
    failure: BaseException | None = None
    if write is not None:
        try:
            write()
        except (OSError, RuntimeError) as err:
            failure = err
    _agree(failure, tmp, stage_dir)


def _agree(failure: BaseException | None, tmp: Path, stage_dir: StageDir) -> None:
    """CheckpointError on every rank if any rank failed. torch.save on a full disk raises a RuntimeError from
    its zip writer ("unexpected pos 576 vs 534") that names neither the file nor the disk: hence the cause is
    worked out here."""
    if any_rank_flag(failure is not None):
        cause = _write_failure_cause(failure, tmp) if failure is not None else "it failed on another rank"
        raise CheckpointError(f"cannot write checkpoint {tmp}: {cause}; {latest_kept(stage_dir.checkpoints)}")


def _write_failure_cause(err: BaseException, path: Path) -> str:
    if isinstance(err, OSError) and err.strerror:
        return err.strerror
    existing = next((p for p in (path, *path.parents) if p.exists()), Path("/"))
    free = shutil.disk_usage(existing).free
    if free < LOW_DISK_BYTES:
        return f"no space left on the device ({free // 1024} KiB free)"
    if not os.access(existing, os.W_OK):
        return "the directory is not writable"
    return f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"


def _replace_dir(tmp: Path, final: Path) -> None:
    """Rename `tmp` onto `final`. An existing `final` (same step, written by a run that crashed before it
    moved `latest`) is moved aside first and removed only after the new one is in place."""
    old = final.with_name(f".{final.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    fsync_path(final.parent)
    shutil.rmtree(old, ignore_errors=True)


def _write_latest(directory: Path, name: str) -> None:
    tmp = directory / f".{LATEST}.tmp"
    with open(tmp, "w") as f:
        f.write(name + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, directory / LATEST)
    fsync_path(directory)


def _retire(stage_dir: StageDir, keep_last: int, keep: Path) -> list[Path]:
    """Hide all but the newest `keep_last` checkpoints (never the one `latest` names) by renaming them to
    `.step_N.deleting` (one rename each: at once invisible to listings and resumes), and return every such
    hidden directory, including leftovers of a run that died while deleting, for `_delete`."""
    others = [p for p in stage_dir.list_checkpoints() if p != keep]
    for path in others[: max(0, len(others) - (keep_last - 1))]:
        path.rename(path.with_name(f".{path.name}.deleting"))
    return sorted(stage_dir.checkpoints.glob(".step_*.deleting"))


def _delete(paths: list[Path]) -> None:
    for path in paths:
        shutil.rmtree(path, ignore_errors=True)


def _fsync_dirs(directory: Path) -> None:
    """fsync the directory entries (the files were fsync'ed by the ranks that wrote them)."""
    for path in sorted(p for p in directory.rglob("*") if p.is_dir()):
        fsync_path(path)
    fsync_path(directory)
