"""slurm/pretrain.sbatch and submit_pipeline.sh on a real local SLURM cluster, with the stand-in trainer.

The stand-in's per-step value folds in every earlier step, so "values equal the closed-form uninterrupted
run and every step is logged exactly once" proves: the resume point was the stop step's checkpoint, no step
was skipped or repeated, and both ranks stopped after the same step (else the all_reduce would hang or
differ).
"""
from __future__ import annotations

import signal
import sys
from pathlib import Path

import pytest

from slurm_cluster_lib import REPO, STANDIN, Cluster, logged_steps, read_log, standin_cmd, wait_for

sys.path.insert(0, str(STANDIN.parent))
from standin_train import reference_values  # noqa: E402

pytestmark = pytest.mark.slurm

SBATCH = str(REPO / "slurm" / "pretrain.sbatch")
STEPS = 20


# Launch modes of pretrain.sbatch: sbatch options and environment for 2 ranks on the one node.
MODES = {
    "task": (("-n2",), {}),
    "torchrun": (("-N1", "--ntasks-per-node=1", "--cpus-per-task=2"),
                 {"LONGVL_LAUNCH_MODE": "torchrun", "LONGVL_NPROC_PER_NODE": "2",
                  "LONGVL_TORCHRUN": f"{sys.executable} -m torch.distributed.run"}),
}


def submit_standin(cluster: Cluster, run_dir: Path, *sbatch_args: str, mode: str = "task",
                   step_sleep: float = 0.0) -> int:
    mode_args, mode_env = MODES[mode]
    return cluster.sbatch(
        *mode_args, f"--output={run_dir}/slurm.out", *sbatch_args, SBATCH,
        f"run_dir={run_dir}", f"steps={STEPS}", "save_every=4", f"step_sleep={step_sleep}",
        extra_env={"LONGVL_CMD": standin_cmd(), "LONGVL_SIGNAL_REPEAT_S": "1", **mode_env},
    )


def assert_matches_uninterrupted_run(run_dir: Path, steps: int = STEPS) -> None:
    records = read_log(run_dir)
    assert logged_steps(run_dir) == list(range(1, steps + 1)), "every step exactly once, in order"
    values = [r["value"] for r in records if "value" in r]
    assert values == reference_values(2, steps)
    assert records[-1] == {"event": "complete", "step": steps, "stage": ""}


def assert_stopped_and_resumed(run_dir: Path, launcher: str = "slurm") -> None:
    events = [r for r in read_log(run_dir) if "event" in r]
    kinds = [e["event"] for e in events]
    assert kinds == ["start", "stop", "start", "complete"], (kinds, (run_dir / "slurm.out").read_text())
    first, stop, again = events[:3]
    assert (first["restart"], again["restart"]) == (0, 1)
    assert stop["signal"] == signal.SIGUSR1 and 0 < stop["step"] < STEPS
    assert again["step"] == stop["step"], "the restart resumes from the checkpoint taken at the stop step"
    assert (first["launcher"], again["launcher"], first["world"]) == (launcher, launcher, 2)


def test_two_task_job_runs_to_completion(slurm_cluster: Cluster, tmp_path: Path) -> None:
    job = submit_standin(slurm_cluster, tmp_path)
    info = slurm_cluster.wait_job(job, timeout=60)
    assert (info["JobState"], info["Restarts"]) == ("COMPLETED", "0"), (tmp_path / "slurm.out").read_text()
    assert_matches_uninterrupted_run(tmp_path)
    assert "requeueing" not in (tmp_path / "slurm.out").read_text()


def _srun_started(run_dir: Path) -> bool:
    out = run_dir / "slurm.out"
    return out.exists() and "starting:" in out.read_text()


@pytest.mark.parametrize("mode, when", [("task", "mid-run"), ("torchrun", "mid-run"), ("task", "at-start")])
def test_usr1_checkpoints_requeues_and_resumes_exactly(slurm_cluster: Cluster, tmp_path: Path, mode: str,
                                                       when: str) -> None:
    """scancel --batch --signal=USR1 is what SLURM sends before the time limit (--signal=B:USR1@grace).
    "at-start": the signal comes while the ranks still import, before their handler exists; they must
    neither die of it nor miss it (the batch shell repeats it)."""
    job = submit_standin(slurm_cluster, tmp_path, mode=mode, step_sleep=0.25)
    if when == "mid-run":
        wait_for(lambda: len(logged_steps(tmp_path)) >= 3, 60, "the job to log 3 steps")
    else:
        wait_for(lambda: _srun_started(tmp_path), 60, "the batch shell to start srun")
        assert not logged_steps(tmp_path), "the signal must come before the first step"
    slurm_cluster.run("scancel", "--batch", "--signal=USR1", str(job))
    info = slurm_cluster.wait_job(job, timeout=90)
    assert (info["JobState"], info["Restarts"]) == ("COMPLETED", "1"), (tmp_path / "slurm.out").read_text()
    assert_stopped_and_resumed(tmp_path, launcher="slurm" if mode == "task" else "torchrun")
    assert_matches_uninterrupted_run(tmp_path)


def test_preemption_by_high_priority_partition_resumes_exactly(slurm_cluster: Cluster, tmp_path: Path) -> None:
    # -n2 on the 2-CPU node takes every core, so the high-partition job can only run by preempting it.
    job = submit_standin(slurm_cluster, tmp_path, "--partition=debug", step_sleep=0.25)
    wait_for(lambda: len(logged_steps(tmp_path)) >= 3, 60, "the job to log 3 steps")
    urgent = slurm_cluster.sbatch("--partition=high", "-n1", f"--output={tmp_path}/urgent.out",
                                  "--wrap", "echo urgent ran")
    urgent_info = slurm_cluster.wait_job(urgent, timeout=90)
    assert urgent_info["JobState"] == "COMPLETED"
    info = slurm_cluster.wait_job(job, timeout=90)
    assert (info["JobState"], info["Restarts"]) == ("COMPLETED", "1"), (tmp_path / "slurm.out").read_text()
    assert "USR1 received" in (tmp_path / "slurm.out").read_text()
    assert_stopped_and_resumed(tmp_path)
    assert_matches_uninterrupted_run(tmp_path)


def _submit_pipeline(cluster: Cluster, run_dir: Path, stages: str, cmd: str) -> dict[str, int]:
    env = {"LONGVL_STAGES": stages, "LONGVL_SBATCH_ARGS": "-n2", "LONGVL_CMD": cmd}
    out = cluster.run("env", *(f"{k}={v}" for k, v in env.items()),
                      str(REPO / "slurm" / "submit_pipeline.sh"), str(run_dir), "steps=4", "save_every=2")
    jobs = {stage: int(job) for stage, job in (line.split() for line in out.splitlines())}
    cluster.submitted.extend(jobs.values())
    return jobs


def test_pipeline_chains_stages_in_one_run_dir(slurm_cluster: Cluster, tmp_path: Path) -> None:
    jobs = _submit_pipeline(slurm_cluster, tmp_path, "s0 s1", standin_cmd())
    assert list(jobs) == ["s0", "s1"]
    assert slurm_cluster.job(jobs["s1"])["Dependency"] in (f"afterok:{jobs['s0']}(unfulfilled)", "(null)")
    for job in jobs.values():
        assert slurm_cluster.wait_job(job, timeout=60)["JobState"] == "COMPLETED"
    events = [r for r in read_log(tmp_path) if "event" in r]
    assert [(e["stage"], e["event"]) for e in events] == [("s0", "start"), ("s0", "complete"),
                                                          ("s1", "start"), ("s1", "complete")]
    s0_values = [r["value"] for r in read_log(tmp_path) if r.get("stage") == "s0" and "value" in r]
    assert events[0]["start_value"] == 0.0
    assert events[2]["start_value"] == s0_values[-1], "s1 starts from s0's final state (stage.init_from)"
    assert (tmp_path / "s1" / "final").is_dir()


def test_pipeline_failed_stage_cancels_the_rest(slurm_cluster: Cluster, tmp_path: Path) -> None:
    jobs = _submit_pipeline(slurm_cluster, tmp_path, "s0 s1", "false")
    assert slurm_cluster.wait_job(jobs["s0"], timeout=60)["JobState"] == "FAILED"
    later = slurm_cluster.wait_job(jobs["s1"], timeout=30)
    assert later["JobState"] == "CANCELLED" and later["StartTime"] in ("Unknown", "None", later["EndTime"])


FAIL_ON_USR1 = """
import signal, sys, time
signal.signal(signal.SIGUSR1, lambda *_: sys.exit(1))
print("ready", flush=True)
time.sleep(60)
"""


@pytest.mark.parametrize("case", ["step_fails_after_signal", "max_restarts_reached"])
def test_usr1_does_not_requeue_a_failed_step_or_past_the_restart_cap(slurm_cluster: Cluster, tmp_path: Path,
                                                                      case: str) -> None:
    """Requeueing a step that crashes on the signal, or forever, would loop on a bug: the job ends FAILED."""
    if case == "step_fails_after_signal":
        (tmp_path / "fail_on_usr1.py").write_text(FAIL_ON_USR1)
        env = {"LONGVL_CMD": f"{sys.executable} {tmp_path / 'fail_on_usr1.py'}"}
        job = slurm_cluster.sbatch("-n1", f"--output={tmp_path}/slurm.out", SBATCH, extra_env=env)
        out_file = tmp_path / "slurm.out"
        wait_for(lambda: out_file.exists() and "ready" in out_file.read_text(), 60, "the program to start")
    else:
        env = {"LONGVL_CMD": standin_cmd(), "LONGVL_MAX_RESTARTS": "0"}
        job = slurm_cluster.sbatch("-n2", f"--output={tmp_path}/slurm.out", SBATCH, f"run_dir={tmp_path}",
                                   "steps=200", "step_sleep=0.1", extra_env=env)
        wait_for(lambda: len(logged_steps(tmp_path)) >= 2, 60, "the job to log 2 steps")
    slurm_cluster.run("scancel", "--batch", "--signal=USR1", str(job))
    info = slurm_cluster.wait_job(job, timeout=60)
    out = (tmp_path / "slurm.out").read_text()
    assert (info["JobState"], info["Restarts"]) == ("FAILED", "0"), out
    assert "not requeueing" in out and "requeueing\n" not in out.replace("not requeueing", "")


def test_usr1_after_the_last_step_does_not_requeue(slurm_cluster: Cluster, tmp_path: Path) -> None:
    """The trainer asks for a requeue only when it stopped with steps left: a signal while it writes its
    final outputs ends the job COMPLETED instead of rerunning a finished run."""
    job = slurm_cluster.sbatch("-n2", f"--output={tmp_path}/slurm.out", SBATCH, f"run_dir={tmp_path}", "steps=3",
                               "linger_s=20", extra_env={"LONGVL_CMD": standin_cmd()})
    wait_for(lambda: any(r.get("event") == "complete" for r in read_log(tmp_path)), 60, "the last step")
    slurm_cluster.run("scancel", "--batch", "--signal=USR1", str(job))
    info = slurm_cluster.wait_job(job, timeout=60)
    out = (tmp_path / "slurm.out").read_text()
    assert (info["JobState"], info["Restarts"]) == ("COMPLETED", "0"), out
    assert "not requeueing: the run finished" in out
