"""Helpers for the tests on a real local SLURM cluster: the Cluster handle, polling, the stand-in's log."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest

REPO = Path(__file__).resolve().parents[2]
STANDIN = REPO / "tests" / "slurm" / "programs" / "standin_train.py"
FINAL_STATES = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")


@dataclass
class Cluster:
    state_dir: Path
    env: dict[str, str]
    submitted: list[int] = field(default_factory=list)

    def run(self, *args: str, timeout: float = 30) -> str:
        done = subprocess.run(args, env=self.env, capture_output=True, text=True, timeout=timeout)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} exited {done.returncode}: {done.stderr.strip()}")
        return done.stdout

    def sbatch(self, *args: str, extra_env: dict[str, str] | None = None) -> int:
        env = {**self.env, **(extra_env or {})}
        done = subprocess.run(("sbatch", "--parsable", *args), env=env, capture_output=True, text=True, timeout=30)
        if done.returncode != 0:
            raise RuntimeError(f"sbatch {' '.join(args)} exited {done.returncode}: {done.stderr.strip()}")
        job_id = int(done.stdout.strip().split(";")[0])
        self.submitted.append(job_id)
        return job_id

    def cancel_submitted(self) -> None:
        """Cancel what a test left running (it failed early), so the next test gets the node's CPUs."""
        if self.submitted:
            subprocess.run(["scancel", *map(str, self.submitted)], env=self.env, capture_output=True, timeout=30)
            self.submitted.clear()

    def job(self, job_id: int) -> dict[str, str]:
        """`scontrol show job -o` as a dict (JobState, Restarts, StartTime, ...); no accounting needed."""
        fields = {}
        for item in self.run("scontrol", "show", "job", "-o", str(job_id)).split():
            key, _, value = item.partition("=")
            fields.setdefault(key, value)
        return fields

    def wait_job(self, job_id: int, timeout: float = 90, states: tuple[str, ...] = FINAL_STATES) -> dict[str, str]:
        return wait_for(lambda: (info := self.job(job_id))["JobState"] in states and info,
                        timeout, f"job {job_id} to reach {states}", lambda: self.job(job_id))


def wait_for(probe: Callable[[], object], timeout: float, what: str,
             describe: Callable[[], object] = lambda: "") -> object:
    """Poll `probe` every 0.3 s until it returns something truthy; fail naming `what` after `timeout` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = probe()
        if result:
            return result
        time.sleep(0.3)
    pytest.fail(f"timed out after {timeout} s waiting for {what}; last: {describe()}")


def read_log(run_dir: Path) -> list[dict]:
    path = run_dir / "steps.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def logged_steps(run_dir: Path) -> list[int]:
    return [r["step"] for r in read_log(run_dir) if "value" in r]


def standin_cmd() -> str:
    return f"{sys.executable} {STANDIN}"


