"""slurm/pretrain.sbatch and submit_pipeline.sh with the REAL trainer on the real local SLURM cluster.

Two srun tasks (2 ranks, gloo, DeepSpeed, tiny model) train a short s1 stage on the demo corpus. The job
command is tests/e2e/programs/train_observed.py: `python -m train` plus, per rank, the keys of the
documents its loader handed to the trainer (the trainer itself records no document keys) and a sleep per
step, so a signal lands mid-stage. One uninterrupted job is the reference for:
- USR1 from `scancel --batch` (what SLURM sends before the time limit) and real preemption by a job on the
  `high` partition: the ranks checkpoint, the batch shell requeues the job, the restart resumes and ends
  with per-step losses identical to the reference and exactly the reference's documents, none twice;
- a requeue onto fewer tasks (2 -> 1, held while pending and shrunk, as a job requeued onto fewer nodes): the
  1-task restart reshards the DeepSpeed ZeRO state, ends with per-step losses within 1e-4 of the reference's
  (another reduction order) and has read exactly the reference's documents, none twice;
- the pipeline chain: submit_pipeline.sh with pipeline=demo runs s0 -> s1 as two dependent jobs, each
  `pipeline.only=<stage>` (the pipeline's per-stage config, the previous stage's final/ as init_from).
"""
from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import replace
import subprocess
import sys
from pathlib import Path

import pytest

from slurm_cluster_lib import REPO, Cluster, wait_for

SBATCH = str(REPO / "slurm" / "pretrain.sbatch")
OBSERVED = REPO / "tests" / "e2e" / "programs" / "train_observed.py"
STEPS = 12
STAGE = ["stage=s1", "model=tiny", "stage.seq_len=256", "stage.global_batch_size=2", f"stage.max_steps={STEPS}",
         "stage.save_every=4", "optim.warmup_steps=2", "backend.precision=fp32", "logging=quiet",
         "data.num_workers=0"]
# A fresh machine JIT-builds DeepSpeed's shm extension in the first 2-rank job (~30-100 s); the reference
# job comes first and absorbs that.
FIRST_JOB_TIMEOUT = 600
JOB_TIMEOUT = 300


def trainer_env() -> dict[str, str]:
    """What the job's ranks need, exported by sbatch (it passes the submitting environment on)."""
    return {"PYTHONPATH": str(REPO), "DS_ACCELERATOR": "cpu", "WANDB_MODE": "offline",
            "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions")),
            "LONGVL_SIGNAL_REPEAT_S": "2"}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("slurm-corpus") / "demo_data"
    subprocess.run([sys.executable, "-m", "data.synth", "--out", str(root), "--scale", "0.3",
                    "--shards-per-set", "2"], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                   check=True, capture_output=True, timeout=300)
    return root


def submit_stage(cluster: Cluster, corpus: Path, run_dir: Path, *sbatch_args: str, step_sleep: float = 0.0) -> int:
    env = {**trainer_env(), "LONGVL_CMD": f"{sys.executable} {OBSERVED} --step-sleep {step_sleep}"}
    return cluster.sbatch("-n2", f"--output={run_dir}/slurm.out", *sbatch_args, SBATCH, *STAGE,
                          f"data_root={corpus}", f"run_dir={run_dir}", extra_env=env)


def slurm_out(run_dir: Path) -> str:
    path = run_dir / "slurm.out"
    return path.read_text() if path.exists() else ""


def losses(run_dir: Path, stage: str = "s1") -> list[tuple[int, float, float, float]]:
    rows = [json.loads(line) for line in (run_dir / stage / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"], r["grad_norm"], r["lr"]) for r in rows]


def docs_by_batch(run_dir: Path, rank: int) -> dict[int, list[str]]:
    taken: dict[int, list[str]] = {}
    for line in (run_dir / "s1" / f"docs_rank{rank}.jsonl").read_text().splitlines():
        record = json.loads(line)
        assert record["batch"] not in taken, f"rank {rank} took batch {record['batch']} twice"
        taken[record["batch"]] = record["doc_keys"]
    return taken


def batches_taken(run_dir: Path) -> int:
    path = run_dir / "s1" / "docs_rank0.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


def summary(run_dir: Path, stage: str = "s1") -> dict:
    return json.loads((run_dir / stage / "summary.json").read_text())


@pytest.fixture(scope="module")
def reference(slurm_cluster: Cluster, corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """(a) one uninterrupted 2-task job: the reference of the interrupted ones."""
    run_dir = tmp_path_factory.mktemp("slurm-reference")
    job = submit_stage(slurm_cluster, corpus, run_dir)
    info = slurm_cluster.wait_job(job, timeout=FIRST_JOB_TIMEOUT)
    assert (info["JobState"], info["Restarts"]) == ("COMPLETED", "0"), slurm_out(run_dir)[-3000:]
    return run_dir


def assert_resumed_like_reference(run_dir: Path, reference: Path) -> None:
    out = slurm_out(run_dir)
    resumed_from = summary(run_dir)["resumed_from"]
    assert 0 < resumed_from < STEPS, f"the restart resumed from step {resumed_from}:\n{out[-3000:]}"
    assert f"stopped by signal after step {resumed_from}" in out, out[-3000:]
    assert "requeueing" in out.replace("not requeueing", "")
    assert losses(run_dir) == losses(reference), "per-step loss, grad norm and LR equal the uninterrupted job's"
    mine = {rank: docs_by_batch(run_dir, rank) for rank in (0, 1)}
    assert mine == {rank: docs_by_batch(reference, rank) for rank in (0, 1)}, "the same documents, in order"
    keys = [key for rank in (0, 1) for batch in mine[rank].values() for key in batch]
    assert len(keys) == len(set(keys)), "no document was trained on twice"


@pytest.mark.slurm
@pytest.mark.slow
def test_two_task_job_trains_the_stage(reference: Path) -> None:
    assert [step for step, *_ in losses(reference)] == list(range(1, STEPS + 1))
    assert summary(reference)["resumed_from"] == 0
    assert (reference / "s1" / "final" / "model.safetensors").is_file() and (reference / "hf").is_dir()
    assert "requeueing" not in slurm_out(reference)
    assert [len(docs_by_batch(reference, rank)) for rank in (0, 1)] == [STEPS, STEPS]  # 1 batch/rank/step


@pytest.mark.slurm
@pytest.mark.slow
def test_usr1_checkpoints_requeues_and_resumes_like_uninterrupted(slurm_cluster: Cluster, corpus: Path,
                                                                  reference: Path, tmp_path: Path) -> None:
    job = submit_stage(slurm_cluster, corpus, tmp_path, step_sleep=0.5)
    wait_for(lambda: batches_taken(tmp_path) >= 3, JOB_TIMEOUT, "the job to take 3 batches",
             lambda: slurm_out(tmp_path)[-2000:])
    slurm_cluster.run("scancel", "--batch", "--signal=USR1", str(job))
    info = slurm_cluster.wait_job(job, timeout=JOB_TIMEOUT)
    assert (info["JobState"], info["Restarts"]) == ("COMPLETED", "1"), slurm_out(tmp_path)[-3000:]
    assert_resumed_like_reference(tmp_path, reference)


@pytest.mark.slurm
@pytest.mark.slow
def test_preemption_by_high_partition_resumes_like_uninterrupted(slurm_cluster: Cluster, corpus: Path,
                                                                 reference: Path, tmp_path: Path) -> None:
    # -n2 takes both CPUs of the node: the high-partition job can only run by preempting this one.
    job = submit_stage(slurm_cluster, corpus, tmp_path, "--partition=debug", step_sleep=0.5)
    wait_for(lambda: batches_taken(tmp_path) >= 3, JOB_TIMEOUT, "the job to take 3 batches",
             lambda: slurm_out(tmp_path)[-2000:])
    urgent = slurm_cluster.sbatch("--partition=high", "-n1", f"--output={tmp_path}/urgent.out",
                                  "--wrap", "echo urgent ran")
    assert slurm_cluster.wait_job(urgent, timeout=JOB_TIMEOUT)["JobState"] == "COMPLETED"
    info = slurm_cluster.wait_job(job, timeout=JOB_TIMEOUT)
    assert (info["JobState"], info["Restarts"]) == ("COMPLETED", "1"), slurm_out(tmp_path)[-3000:]
    assert "USR1 received" in slurm_out(tmp_path)
    assert_resumed_like_reference(tmp_path, reference)


def all_doc_keys(run_dir: Path) -> list[str]:
    """Every document key any rank took, over every attempt of the job."""
    return [key for path in sorted((run_dir / "s1").glob("docs_rank*.jsonl"))
            for line in path.read_text().splitlines() for key in json.loads(line)["doc_keys"]]


@pytest.mark.slurm
@pytest.mark.slow
def test_requeue_on_fewer_tasks_resumes_exactly_once(slurm_cluster: Cluster, corpus: Path, reference: Path,
                                                     tmp_path: Path) -> None:
    job = submit_stage(slurm_cluster, corpus, tmp_path, step_sleep=0.5)
    wait_for(lambda: batches_taken(tmp_path) >= 3, JOB_TIMEOUT, "the job to take 3 batches",
             lambda: slurm_out(tmp_path)[-2000:])
    slurm_cluster.run("scancel", "--batch", "--signal=USR1", str(job))
    # The batch shell checkpoints and requeues; the requeued job waits PENDING (cred_expire) before it
    # restarts: hold it there and shrink it to one task, as a requeue onto fewer nodes would.
    wait_for(lambda: slurm_cluster.job(job)["JobState"] == "PENDING", JOB_TIMEOUT, "the job to be requeued",
             lambda: slurm_out(tmp_path)[-2000:])
    slurm_cluster.run("scontrol", "hold", str(job))
    slurm_cluster.run("scontrol", "update", f"JobId={job}", "NumTasks=1", "NumCPUs=1")
    slurm_cluster.run("scontrol", "release", str(job))
    info = slurm_cluster.wait_job(job, timeout=JOB_TIMEOUT)
    out = slurm_out(tmp_path)
    assert (info["JobState"], info["Restarts"], info["NumTasks"]) == ("COMPLETED", "1", "1"), out[-3000:]
    resumed_from = summary(tmp_path)["resumed_from"]
    assert 0 < resumed_from < STEPS and f"stopped by signal after step {resumed_from}" in out, out[-3000:]
    got, want = losses(tmp_path), losses(reference)
    assert [row[0] for row in got] == list(range(1, STEPS + 1))
    for (_, loss, _, lr), (_, ref_loss, _, ref_lr) in zip(got, want):
        assert abs(loss - ref_loss) <= 1e-4 * abs(ref_loss) and lr == ref_lr, (got, want)
    taken = [len((tmp_path / "s1" / f"docs_rank{rank}.jsonl").read_text().splitlines()) for rank in (0, 1)]
    assert taken == [resumed_from + 2 * (STEPS - resumed_from), resumed_from], "1 batch/rank/step, then 2 on 1"
    keys = all_doc_keys(tmp_path)
    assert len(keys) == len(set(keys)), "no document was trained on twice"
    assert Counter(keys) == Counter(all_doc_keys(reference)), "exactly the uninterrupted job's documents"


@pytest.mark.slurm
@pytest.mark.slow
def test_pipeline_chain_runs_each_stage_with_its_pipeline_config(slurm_cluster: Cluster, corpus: Path,
                                                                 tmp_path: Path) -> None:
    """(d) s0 -> s1 of the demo pipeline as two chained jobs of the real trainer (`python -m train`)."""
    from train.config.compose import stage_configs
    from train.optim import learning_rate

    overrides = ["pipeline=demo", "model=tiny", f"data_root={corpus}", "stage.max_steps=3", "stage.seq_len=256",
                 "logging=quiet", "data.num_workers=0"]
    env = {**trainer_env(), "LONGVL_STAGES": "s0 s1", "LONGVL_SBATCH_ARGS": "-n2",
           "LONGVL_CMD": f"{sys.executable} -m train"}
    out = slurm_cluster.run("env", *(f"{k}={v}" for k, v in env.items()),
                            str(REPO / "slurm" / "submit_pipeline.sh"), str(tmp_path), *overrides)
    jobs = {stage: int(job) for stage, job in (line.split() for line in out.splitlines())}
    slurm_cluster.submitted.extend(jobs.values())
    assert list(jobs) == ["s0", "s1"]
    for stage, job in jobs.items():
        info = slurm_cluster.wait_job(job, timeout=FIRST_JOB_TIMEOUT if stage == "s0" else JOB_TIMEOUT)
        log = tmp_path / f"slurm-longvl-{stage}-{job}.out"
        assert info["JobState"] == "COMPLETED", log.read_text()[-3000:] if log.exists() else info
    s0, s1 = summary(tmp_path, "s0"), summary(tmp_path, "s1")
    assert s0["init_from"] == "" and s1["init_from"] == str(tmp_path / "s0" / "final")
    # Each job trained its stage as the demo pipeline defines it (its own LR and warmup), which a plain
    # `stage=s1` job would not: the LRs logged per step are the composed pipeline stage's schedule.
    for stage in ("s0", "s1"):
        cfg = stage_configs([*overrides, f"run_dir={tmp_path}", f"pipeline.only={stage}"])[0]
        expected = [learning_rate(step, cfg.optim, 3) for step in range(3)]
        assert [lr for *_, lr in losses(tmp_path, stage)] == pytest.approx(expected, rel=1e-6)
    plain = stage_configs(["stage=s1", *overrides[1:], f"run_dir={tmp_path}"])[0]
    assert plain.optim.lr != cfg.optim.lr, "the check above tells the pipeline's s1 from the plain one"
    assert not (tmp_path / "hf").exists(), "the HF export belongs to the pipeline's last stage (s3)"


# ---- pipeline.only without SLURM (composition only: fast) -----------------------------------------------

def test_pipeline_only_composes_that_stage_with_the_previous_final(tmp_path: Path) -> None:
    from train.config.compose import stage_configs

    common = ["pipeline=demo", f"run_dir={tmp_path}"]
    whole = stage_configs(common)
    only = stage_configs([*common, "pipeline.only=s2"])
    assert len(only) == 1
    assert only[0].stage.init_from == str(tmp_path / "s1" / "final")  # run_pipeline's handoff, made here
    assert replace(only[0].stage, init_from=None) == whole[2].stage  # the whole pipeline sets it only when run
    assert (only[0].optim, only[0].data, only[0].model) == (whole[2].optim, whole[2].data, whole[2].model)
    first = stage_configs([*common, "pipeline.only=s0", "stage.init_from=/weights"])[0]
    assert first.stage.init_from == "/weights", "the first stage keeps the user's init_from, as in the pipeline"


@pytest.mark.parametrize("overrides, message", [
    (["pipeline=demo", "pipeline.only=s9"], "pipeline.only=s9 is not a stage of pipeline=demo (stages: s0, s1"),
    (["pipeline.only=s1"], "pipeline.only=s1 needs a pipeline"),
])
def test_pipeline_only_refuses_what_it_cannot_select(overrides: list[str], message: str) -> None:
    from train.config.compose import stage_configs
    from train.config.model import ConfigError

    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        stage_configs(overrides)
