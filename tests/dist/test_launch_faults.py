"""Faults without SLURM, under torchrun (2 ranks, gloo), with the stand-in trainer of tests/slurm/programs.

- one rank SIGUSR1'd: every rank stops after the same agreed step (the other rank was never signalled);
- kill -9 of one rank mid-run: torchrun fails; a restart resumes from the last complete checkpoint and
  ends with the values of an uninterrupted run;
- SIGKILL of the writer in the middle of a (slowed) checkpoint save: the previous checkpoint and `latest`
  are intact, the half-written one is never pointed at, and a restart resumes from the previous one.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

PROGRAMS = Path(__file__).resolve().parents[1] / "slurm" / "programs"
sys.path.insert(0, str(PROGRAMS))
from standin_train import reference_values  # noqa: E402

pytestmark = pytest.mark.dist
STANDIN = PROGRAMS / "standin_train.py"


def torchrun(run_dir: Path, *args: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(STANDIN), f"run_dir={run_dir}", *args]
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(proc: subprocess.Popen, timeout: float = 60) -> tuple[int, str]:
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "steps.jsonl").read_text().splitlines()]


def wait_until(probe, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not probe():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


def values_by_step(run_dir: Path) -> dict[int, float]:
    """The last value logged for each step (steps after the last checkpoint are done again on restart)."""
    return {r["step"]: r["value"] for r in records(run_dir) if "value" in r}


def latest_step(run_dir: Path) -> int:
    name = (run_dir / "ckpt" / "latest").read_text().strip()
    return torch.load(run_dir / "ckpt" / name / "state.pt")["step"]


def test_one_signalled_rank_stops_all_ranks_at_the_same_step(tmp_path: Path) -> None:
    code, out = finish(torchrun(tmp_path, "steps=20", "check_every=2", "self_signal=1:3"))
    assert code == 0, out
    stop = [r for r in records(tmp_path) if r.get("event") == "stop"]
    assert stop == [{"event": "stop", "step": 4, "signal": None, "stage": ""}], "rank 0 stops, unsignalled"
    finals = [(tmp_path / "pids" / f"rank{r}.final_step").read_text() for r in (0, 1)]
    assert finals == ["4", "4"]
    assert latest_step(tmp_path) == 4


def test_kill_9_of_one_rank_then_restart_resumes_from_last_checkpoint(tmp_path: Path) -> None:
    proc = torchrun(tmp_path, "steps=24", "save_every=4", "step_sleep=0.1")
    wait_until(lambda: len(values_by_step(tmp_path)) >= 10 if (tmp_path / "steps.jsonl").exists() else False,
               60, "10 logged steps")
    os.kill(int((tmp_path / "pids" / "rank1").read_text()), signal.SIGKILL)
    code, out = finish(proc)
    assert code != 0, "torchrun must report the killed rank"
    resume_from = latest_step(tmp_path)
    assert resume_from >= 8 and resume_from % 4 == 0
    code, out = finish(torchrun(tmp_path, "steps=24", "save_every=4"))
    assert code == 0, out
    starts = [r["step"] for r in records(tmp_path) if r.get("event") == "start"]
    assert starts == [0, resume_from]
    values = values_by_step(tmp_path)
    assert [values[s] for s in range(1, 25)] == reference_values(2, 24)


def test_kill_during_checkpoint_save_keeps_previous_checkpoint(tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"
    proc = torchrun(tmp_path, "steps=9", "save_every=3", "slow_save=1.0")
    wait_until(lambda: (ckpt / "step_000006.tmp" / "state.pt").exists(), 60, "the step 6 save to start")
    os.kill(int((tmp_path / "pids" / "rank0").read_text()), signal.SIGKILL)
    code, out = finish(proc)
    assert code != 0, out
    assert (ckpt / "latest").read_text() == "step_000003" and latest_step(tmp_path) == 3
    assert not (ckpt / "step_000006").exists()
    with pytest.raises(Exception):  # the killed save left half a file behind: proof the kill was mid-write
        torch.load(ckpt / "step_000006.tmp" / "state.pt")
    code, out = finish(torchrun(tmp_path, "steps=9", "save_every=3"))
    assert code == 0, out
    assert [r["step"] for r in records(tmp_path) if r.get("event") == "start"] == [0, 3]
    values = values_by_step(tmp_path)
    assert [values[s] for s in range(1, 10)] == reference_values(2, 9)
    assert (ckpt / "latest").read_text() == "step_000009" and not (ckpt / "step_000006.tmp").exists()
