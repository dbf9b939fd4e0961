"""Faults without SLURM, with the real trainer under torchrun (2 ranks, gloo, DeepSpeed, tiny model).

The program is tests/e2e/programs/train_observed.py: `python -m train` plus a log of the document keys each
rank's loader handed to the trainer, and fault hooks that live in the test program, not in train/.

- kill -9 of one rank mid-step: torchrun fails; the same command again resumes from the last complete
  checkpoint and ends with per-step losses identical to an uninterrupted run, reading the same documents;
- kill -9 of both ranks in the middle of an asynchronous checkpoint save (the writer thread sleeps after it
  wrote the files of the step-4 save, while step 5 trains): `latest` and the step-2 checkpoint are intact, the
  half-written temp dir is never used, and the restart resumes from step 2 with identical losses;
- a checkpoint dir that fills up (ENOSPC) or turns read-only mid-run (a real tmpfs): one-line error, exit 3,
  the earlier checkpoints and `latest` are kept and complete.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest

from conftest import QUICK, REPO, train_env

pytestmark = [pytest.mark.slow, pytest.mark.dist]

OBSERVED = str(Path(__file__).parent / "programs" / "train_observed.py")
STEPS = 10
# Every run of this file trains the same 2-rank stage; only the run dir and the faults differ.
STAGE = ["stage=s1", "model=tiny", *QUICK, "stage.seq_len=256", f"stage.max_steps={STEPS}",
         "stage.save_every=2", "stage.keep_last=3"]
FIRST_RUN_TIMEOUT = 600  # a fresh machine JIT-builds DeepSpeed's shm extension in the first 2-rank run
RUN_TIMEOUT = 300


def torchrun(corpus: Path, run_dir: Path, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", OBSERVED,
           *extra, *STAGE, f"data_root={corpus}", f"run_dir={run_dir}"]
    env = {k: v for k, v in train_env().items() if not k.startswith("SLURM_")}
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(proc: subprocess.Popen, timeout: float = RUN_TIMEOUT) -> tuple[int, str]:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        pytest.fail(f"torchrun did not end within {timeout} s:\n{out[-3000:]}")
    return proc.returncode, out


def wait_until(probe, timeout: float, what: str, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + timeout
    while not probe():
        if proc.poll() is not None:
            pytest.fail(f"torchrun ended ({proc.returncode}) before {what}:\n{proc.stdout.read()[-3000:]}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


def losses(run_dir: Path) -> list[tuple[int, float, float]]:
    """(step, loss, grad_norm) of metrics.jsonl (a resume truncates it to the checkpoint's step first)."""
    rows = [json.loads(line) for line in (run_dir / "s1" / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"], r["grad_norm"]) for r in rows]


def logged_step(run_dir: Path, step: int) -> bool:
    """metrics.jsonl has a complete row for `step` (the file may be mid-write)."""
    path = run_dir / "s1" / "metrics.jsonl"
    try:
        return path.exists() and any(s == step for s, _, _ in losses(run_dir))
    except ValueError:
        return False


def docs_by_batch(run_dir: Path, rank: int) -> dict[int, list[str]]:
    """Batch number -> doc keys for one rank; a batch taken again after a restart must repeat the keys."""
    taken: dict[int, list[str]] = {}
    for line in (run_dir / "s1" / f"docs_rank{rank}.jsonl").read_text().splitlines():
        record = json.loads(line)
        previous = taken.setdefault(record["batch"], record["doc_keys"])
        assert previous == record["doc_keys"], f"rank {rank} batch {record['batch']} differs when redone"
    return taken


def logged_batches(run_dir: Path, rank: int) -> int:
    path = run_dir / "s1" / f"docs_rank{rank}.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "s1" / "summary.json").read_text())


def latest(run_dir: Path) -> str:
    return (run_dir / "s1" / "checkpoints" / "latest").read_text().strip()


def published_step(run_dir: Path) -> int:
    """The step `latest` names, 0 before the first checkpoint is published."""
    try:
        return int(latest(run_dir).removeprefix("step_"))
    except (FileNotFoundError, ValueError):
        return 0


@pytest.fixture(scope="module")
def reference(demo_corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The uninterrupted run every fault run is compared with."""
    run_dir = tmp_path_factory.mktemp("reference")
    code, out = finish(torchrun(demo_corpus, run_dir), FIRST_RUN_TIMEOUT)
    assert code == 0, out[-3000:]
    assert [step for step, _, _ in losses(run_dir)] == list(range(1, STEPS + 1))
    assert len({loss for _, loss, _ in losses(run_dir)}) == STEPS, "distinct batches give distinct losses"
    keys = [k for rank in (0, 1) for batch in docs_by_batch(run_dir, rank).values() for k in batch]
    assert len(keys) == len(set(keys)), "the uninterrupted run itself reads no document twice"
    return run_dir


def assert_same_as_reference(run_dir: Path, reference: Path, resumed_from: int) -> None:
    assert losses(run_dir) == losses(reference), "per-step loss and grad norm equal the uninterrupted run's"
    for rank in (0, 1):
        assert docs_by_batch(run_dir, rank) == docs_by_batch(reference, rank), f"rank {rank} read other docs"
    assert summary(run_dir)["resumed_from"] == resumed_from


def test_kill_9_of_one_rank_then_restart_resumes_exactly(demo_corpus: Path, reference: Path,
                                                         tmp_path: Path) -> None:
    proc = torchrun(demo_corpus, tmp_path)
    # Saves are asynchronous: the step-4 checkpoint is published a step or two after step 4 (the writer runs
    # while step 5 trains), so wait for both before the kill, which then lands mid-step (5 or later).
    wait_until(lambda: logged_batches(tmp_path, 1) >= 5 and published_step(tmp_path) >= 4, RUN_TIMEOUT,
               "rank 1 to take its 5th batch and the step-4 checkpoint", proc)
    os.kill(int((tmp_path / "pids" / "rank1").read_text()), signal.SIGKILL)
    code, out = finish(proc)
    assert code != 0, "torchrun must report the killed rank"
    assert not (tmp_path / "s1" / "summary.json").exists(), "the kill came before the stage finished"
    resume_step = int(latest(tmp_path).removeprefix("step_"))
    assert 4 <= resume_step < STEPS and resume_step % 2 == 0
    code, out = finish(torchrun(demo_corpus, tmp_path))  # the same command again
    assert code == 0, out[-3000:]
    assert_same_as_reference(tmp_path, reference, resumed_from=resume_step)


def test_kill_during_checkpoint_save_keeps_previous_and_resumes(demo_corpus: Path, reference: Path,
                                                                tmp_path: Path) -> None:
    checkpoints = tmp_path / "s1" / "checkpoints"
    proc = torchrun(demo_corpus, tmp_path, "--slow-save-step", "4", "--slow-save-s", "120")
    wait_until(lambda: (tmp_path / "pids" / "saving_4").exists(), RUN_TIMEOUT, "the step-4 save", proc)
    # The save is asynchronous: step 5 trains while the step-4 files are being written (step 6's save waits).
    wait_until(lambda: logged_step(tmp_path, 5), RUN_TIMEOUT, "step 5 during the step-4 save", proc)
    # Both ranks, as when the node dies: killing only rank 0 would leave rank 1 asleep in the save, ignoring
    # torchrun's SIGTERM (the trainer turns it into a stop request), until torchrun's 30 s kill timeout.
    for rank in (0, 1):
        os.kill(int((tmp_path / "pids" / f"rank{rank}").read_text()), signal.SIGKILL)
    code, out = finish(proc)
    assert code != 0, out[-3000:]
    assert latest(tmp_path) == "step_000002" and (checkpoints / "step_000002" / "meta.json").is_file()
    owned = json.loads((checkpoints / "step_000002" / "meta.json").read_text())["files"]
    assert [sorted(n for n in files if "optim_states" in n) for files in owned] == \
        [[f"deepspeed/zero_pp_rank_{r}_mp_rank_00_optim_states.pt"] for r in (0, 1)]  # each rank its own
    assert not (checkpoints / "step_000004").exists()
    half = checkpoints / ".step_000004.tmp"
    assert any(half.rglob("*.pt")) and not (half / "meta.json").exists(), "killed after files, before meta"
    code, out = finish(torchrun(demo_corpus, tmp_path))
    assert code == 0, out[-3000:]
    assert_same_as_reference(tmp_path, reference, resumed_from=2)
    assert not half.exists(), "the leftover temp dir is cleared by the next save of that step"


@pytest.fixture
def tmpfs_checkpoints(tmp_path: Path) -> Iterator[Path]:
    """<tmp>/s1/checkpoints as its own 64 MB tmpfs, so a test can fill it or make it read-only."""
    mount_point = tmp_path / "s1" / "checkpoints"
    mount_point.mkdir(parents=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mount_point)],
                          capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], timeout=30)


@pytest.mark.parametrize("fault, cause", [("full", "no space left on"),
                                          ("readonly", "read-only file system")])
def test_full_or_readonly_checkpoint_dir_fails_in_one_line_and_keeps_checkpoints(
        demo_corpus: Path, tmp_path: Path, tmpfs_checkpoints: Path, fault: str, cause: str) -> None:
    # Synchronous saves: the fault lands between two complete saves (async write failures: test_checkpoint).
    code, out = finish(torchrun(demo_corpus, tmp_path, "--disk-fault", fault, "--disk-fault-after-step", "4",
                                "stage.async_save=false"))
    assert code != 0, out[-3000:]
    errors = [line for line in out.splitlines() if line.startswith("longvl:")]
    assert len(errors) == 1, out[-3000:]
    assert ".step_000006.tmp" in errors[0], errors[0]  # names the save that failed
    assert cause in errors[0].lower() and "latest checkpoint kept:" in errors[0] and "step_000004" in errors[0]
    # Every rank ends through the trainer's own exit 3 (torchrun then prints its ChildFailedError report):
    # a full disk fails every rank's write in backend.save; a read-only one fails first in the temp-dir
    # mkdir, which only rank 0 does, and save_checkpoint agrees on the failure across ranks.
    assert out.count("exitcode  : 3") == 2, out[-3000:]
    assert out.count("Traceback (most recent call last)") == 1, "torchrun's report only, none from a rank"
    assert latest(tmp_path) == "step_000004"
    for step in (2, 4):
        kept = tmpfs_checkpoints / f"step_{step:06d}"
        assert {p.name for p in kept.iterdir()} >= {"meta.json", "rank_00000.json", "rank_00001.json", "deepspeed"}
        assert json.loads((kept / "meta.json").read_text())["step"] == step
    assert not (tmp_path / "s1" / "summary.json").exists()
