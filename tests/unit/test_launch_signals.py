"""launch.signals: signals only set a flag; should_stop polls it; SLURM job info for resume and logging."""
from __future__ import annotations

import os
import signal

import pytest

from launch.signals import PreemptionHandler, slurm_job_info


@pytest.fixture
def handler():
    installed = PreemptionHandler(check_every=1).install()
    yield installed
    installed.uninstall()


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM])
def test_signal_sets_flag_and_process_keeps_running(handler: PreemptionHandler, sig: signal.Signals) -> None:
    assert not handler.should_stop(0)
    os.kill(os.getpid(), sig)  # the default action of both would end this test process
    assert handler.received == sig
    assert handler.should_stop(1)


def test_stop_is_only_decided_on_check_steps() -> None:
    handler = PreemptionHandler(check_every=4).install()
    try:
        os.kill(os.getpid(), signal.SIGUSR1)
        assert handler.signalled
        assert [handler.should_stop(step) for step in (1, 2, 3)] == [False, False, False]
        assert handler.should_stop(4)
        assert handler.should_stop(5), "an agreed stop stays agreed on the steps between checks"
    finally:
        handler.uninstall()


def test_uninstall_restores_previous_handlers() -> None:
    seen = []
    previous = signal.signal(signal.SIGUSR1, lambda signum, frame: seen.append(signum))
    try:
        handler = PreemptionHandler().install()
        handler.uninstall()
        os.kill(os.getpid(), signal.SIGUSR1)
        assert seen == [signal.SIGUSR1] and not handler.signalled
    finally:
        signal.signal(signal.SIGUSR1, previous)


def test_check_every_must_be_positive() -> None:
    with pytest.raises(ValueError, match="check_every=0"):
        PreemptionHandler(check_every=0)


def test_slurm_job_info_first_run_and_restart() -> None:
    first = slurm_job_info({"SLURM_JOB_ID": "17", "SLURM_JOB_REQUEUE": "1"})
    assert (first.job_id, first.restart_count, first.requeue_allowed, first.is_restart) == (17, 0, True, False)
    again = slurm_job_info({"SLURM_JOB_ID": "17", "SLURM_RESTART_COUNT": "2"})
    assert (again.restart_count, again.is_restart, again.requeue_allowed) == (2, True, False)
    outside = slurm_job_info({})
    assert (outside.job_id, outside.restart_count, outside.array_task_id) == (None, 0, None)


def test_slurm_job_info_rejects_garbage() -> None:
    with pytest.raises(ValueError, match="SLURM_RESTART_COUNT='x'"):
        slurm_job_info({"SLURM_RESTART_COUNT": "x"})
