"""Preemption: a signal only sets a flag; the training loop asks `should_stop(step)` and all ranks agree.

SLURM warns a job before its time limit or a preemption with a signal (SIGUSR1 forwarded by the batch
shell, see slurm/pretrain.sbatch) and ends a step with SIGTERM. The handler never saves or exits itself:
it may run in the middle of a collective or a checkpoint write. The loop polls instead, and the poll is a
collective so every rank stops after the same step even when only one rank was signalled.
"""
from __future__ import annotations

import os
import signal
from dataclasses import dataclass
from types import FrameType
from typing import Iterable, Mapping

import torch
import torch.distributed as dist

from train.device import comm_tensor

DEFAULT_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


class PreemptionHandler:
    """Installs handlers for `signals`; `should_stop(step)` is collective when a process group is up.

    Every rank must call `should_stop` with the same step sequence: the agreement all_reduce runs on the
    steps where `step % check_every == 0`, and once stop is agreed it stays agreed.
    """

    def __init__(self, signals: Iterable[signal.Signals] = DEFAULT_SIGNALS, check_every: int = 1) -> None:
        if check_every < 1:
            raise ValueError(f"check_every={check_every} must be at least 1")
        self.signals = tuple(signals)
        self.check_every = check_every
        self.received: int | None = None
        self._agreed = False
        self._previous: dict[int, object] = {}

    def install(self) -> "PreemptionHandler":
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._on_signal)
        return self

    def uninstall(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        # Only record: acting here could interrupt a collective or a half-written checkpoint.
        self.received = signum

    @property
    def signalled(self) -> bool:
        """This rank's own flag, without asking the others."""
        return self.received is not None

    def should_stop(self, step: int) -> bool:
        """True when any rank has been signalled, decided identically on every rank."""
        if self._agreed:
            return True
        if step % self.check_every != 0:
            return False
        self._agreed = any_rank_flag(self.signalled)
        return self._agreed


REQUEUE_FILE_VAR = "LONGVL_REQUEUE_FILE"


def request_requeue(environ: Mapping[str, str] | None = None) -> None:
    """Tell slurm/pretrain.sbatch that this run stopped early on a signal and wants to be requeued: it
    creates the file named by $LONGVL_REQUEUE_FILE (set by the batch script; nothing without it). A run that
    finished its last step exits 0 without it, so a signal that came too late does not requeue a done job."""
    path = (os.environ if environ is None else environ).get(REQUEUE_FILE_VAR)
    if path:
        with open(path, "w") as f:
            f.write("preempted\n")
            f.flush()
            os.fsync(f.fileno())


def any_rank_flag(flag: bool) -> bool:
    """Logical OR of `flag` over all ranks (one 1-element all_reduce; local value without a group)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return flag
    value = comm_tensor([1 if flag else 0], dtype=torch.int32)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


@dataclass(frozen=True)
class SlurmJobInfo:
    """What a run needs to know about its SLURM job to log and to decide on resume. The requeue itself is
    done by the batch shell (`scontrol requeue`), which outlives the tasks."""

    job_id: int | None
    restart_count: int
    requeue_allowed: bool
    array_task_id: int | None

    @property
    def is_restart(self) -> bool:
        return self.restart_count > 0


def slurm_job_info(environ: Mapping[str, str] | None = None) -> SlurmJobInfo:
    """Read SLURM_JOB_ID, SLURM_RESTART_COUNT (0 on the first run), SLURM_JOB_REQUEUE, SLURM_ARRAY_TASK_ID."""
    environ = os.environ if environ is None else environ

    def optional_int(name: str) -> int | None:
        value = environ.get(name)
        if value is None or value == "":
            return None
        if not value.isdigit():
            raise ValueError(f"{name}={value!r} is not a non-negative integer")
        return int(value)

    return SlurmJobInfo(
        job_id=optional_int("SLURM_JOB_ID"),
        restart_count=optional_int("SLURM_RESTART_COUNT") or 0,
        requeue_allowed=environ.get("SLURM_JOB_REQUEUE", "0") == "1",
        array_task_id=optional_int("SLURM_ARRAY_TASK_ID"),
    )
