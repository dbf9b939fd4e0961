"""launch.env: every launcher's environment -> DistEnv, and one-line errors for inconsistent ones."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from launch.env import (LaunchEnvError, detect_env, master_port_for_job, omp_threads, parse_nodelist,
                        parse_tasks_per_node)

REPO = Path(__file__).resolve().parents[2]
TORCHRUN = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
            "MASTER_ADDR": "node01", "MASTER_PORT": "29500"}
SLURM_STEP = {"SLURM_JOB_ID": "4242", "SLURM_STEP_ID": "0", "SLURM_PROCID": "5", "SLURM_NTASKS": "6",
              "SLURM_LOCALID": "1", "SLURM_NODEID": "2", "SLURM_STEP_NODELIST": "gpu[07-08],cpu3",
              "SLURM_STEP_TASKS_PER_NODE": "2(x3)"}


@pytest.mark.parametrize("nodelist, hosts", [
    ("node[01-03,07],gpu5", ["node01", "node02", "node03", "node07", "gpu5"]),
    ("solo", ["solo"]),
    ("n[8-11]", ["n8", "n9", "n10", "n11"]),
    ("r[1-2]-n[1,3]", ["r1-n1", "r1-n3", "r2-n1", "r2-n3"]),
    ("a[098-100]", ["a098", "a099", "a100"]),
])
def test_parse_nodelist_expands_ranges_in_order(nodelist: str, hosts: list[str]) -> None:
    assert parse_nodelist(nodelist) == hosts


@pytest.mark.parametrize("bad", ["node[01-03", "node]1[", "node[3-1]", "node[a-b]", ""])
def test_parse_nodelist_rejects_malformed(bad: str) -> None:
    with pytest.raises(LaunchEnvError, match="nodelist"):
        parse_nodelist(bad)


def test_parse_tasks_per_node() -> None:
    assert parse_tasks_per_node("2(x3),1") == [2, 2, 2, 1]
    assert parse_tasks_per_node("8") == [8]
    with pytest.raises(LaunchEnvError, match="bad item"):
        parse_tasks_per_node("2(3)")


def test_master_port_is_fixed_per_job_and_below_ephemeral_range() -> None:
    ports = {master_port_for_job(job) for job in range(0, 100000, 7)}
    assert min(ports) >= 20000 and max(ports) < 30000
    assert master_port_for_job(123) == master_port_for_job(123) != master_port_for_job(124)


def test_no_launcher_is_a_single_process() -> None:
    env = detect_env({}, cuda=False)
    assert (env.rank, env.world_size, env.local_rank, env.local_world_size) == (0, 1, 0, 1)
    assert (env.backend, env.device, env.launcher) == ("gloo", "cpu", "single")


def test_torchrun_environment() -> None:
    env = detect_env(TORCHRUN, cuda=False)
    assert (env.rank, env.world_size, env.local_rank, env.local_world_size) == (3, 4, 1, 2)
    assert (env.master_addr, env.master_port, env.launcher) == ("node01", 29500, "torchrun")


def test_cuda_selects_nccl_and_the_local_device() -> None:
    env = detect_env(TORCHRUN, cuda=True, visible_gpus=8)
    assert (env.backend, env.device) == ("nccl", "cuda:1")


def test_a_rank_that_sees_one_gpu_uses_it() -> None:
    """SLURM --gpus-per-task=1: SLURM_LOCALID=1 but the task's only visible GPU is cuda:0."""
    env = detect_env(SLURM_STEP, cuda=True, visible_gpus=1)
    assert env.local_rank == 1 and (env.backend, env.device) == ("nccl", "cuda:0")
    assert env.device_local_rank == 0  # what DeepSpeed, reading LOCAL_RANK as a device index, must see
    assert detect_env(SLURM_STEP, cuda=True, visible_gpus=4).device_local_rank == 1
    assert detect_env(SLURM_STEP, cuda=False).device_local_rank == 1


def test_more_local_ranks_than_gpus_names_the_visible_devices() -> None:
    environ = {**TORCHRUN, "LOCAL_RANK": "2", "LOCAL_WORLD_SIZE": "4", "CUDA_VISIBLE_DEVICES": "5,6"}
    with pytest.raises(LaunchEnvError, match=r"local rank 2 has no GPU: 2 visible \(CUDA_VISIBLE_DEVICES=5,6\)"):
        detect_env(environ, cuda=True, visible_gpus=2)


@pytest.mark.parametrize("environ, local_world, affinity, cores, threads", [
    ({"OMP_NUM_THREADS": "3"}, 4, 64, 64, None),  # the user's choice stays
    ({"SLURM_CPUS_PER_TASK": "12"}, 8, 96, 96, 12),
    ({}, 8, 96, 96, 12),  # whole node visible: its cores shared by the node's ranks
    ({}, 8, 10, 96, 10),  # srun bound the task to 10 cores: all of them
    ({}, 8, 4, 4, 1),  # never 0
])
def test_omp_threads_per_rank_under_srun(environ, local_world, affinity, cores, threads) -> None:
    assert omp_threads(environ, local_world, affinity, cores) == threads


def test_torchrun_wins_inside_a_slurm_step() -> None:
    """Mode "one srun task per node running torchrun": the workers see both sets of variables."""
    env = detect_env({**SLURM_STEP, **TORCHRUN}, cuda=False)
    assert (env.launcher, env.rank, env.world_size) == ("torchrun", 3, 4)


def test_slurm_step_environment() -> None:
    env = detect_env(SLURM_STEP, cuda=False)
    assert (env.rank, env.world_size, env.local_rank, env.local_world_size) == (5, 6, 1, 2)
    assert (env.master_addr, env.master_port, env.launcher) == ("gpu07", master_port_for_job(4242), "slurm")


def test_slurm_explicit_master_wins() -> None:
    env = detect_env({**SLURM_STEP, "MASTER_ADDR": "head", "MASTER_PORT": "31000"}, cuda=False)
    assert (env.master_addr, env.master_port) == ("head", 31000)


def test_slurm_batch_shell_is_not_a_rank() -> None:
    """The batch script carries SLURM_PROCID=0 and the job's SLURM_NTASKS but no SLURM_STEP_ID."""
    batch = {k: v for k, v in SLURM_STEP.items() if k != "SLURM_STEP_ID"}
    assert detect_env(batch, cuda=False).launcher == "single"


@pytest.mark.parametrize("change, message", [
    ({"RANK": "4"}, r"RANK=4 is outside \[0, WORLD_SIZE=4\)"),
    ({"LOCAL_RANK": "2"}, r"LOCAL_RANK=2 is outside \[0, LOCAL_WORLD_SIZE=2\)"),
    ({"WORLD_SIZE": "0"}, "WORLD_SIZE=0 must be at least 1"),
    ({"LOCAL_WORLD_SIZE": "8", "LOCAL_RANK": "0"}, "LOCAL_WORLD_SIZE=8 exceeds WORLD_SIZE=4"),
    ({"MASTER_PORT": "http"}, "MASTER_PORT='http' is not an integer"),
])
def test_torchrun_inconsistencies(change: dict[str, str], message: str) -> None:
    with pytest.raises(LaunchEnvError, match=message):
        detect_env({**TORCHRUN, **change}, cuda=False)


def test_torchrun_half_set_names_what_is_missing() -> None:
    expected = "half set: RANK set but WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT missing"
    with pytest.raises(LaunchEnvError, match=expected):
        detect_env({"RANK": "0"}, cuda=False)


@pytest.mark.parametrize("change, message", [
    ({"SLURM_PROCID": "6"}, r"SLURM_PROCID=6 is outside \[0, SLURM_NTASKS=6\)"),
    ({"SLURM_NTASKS": "5", "SLURM_PROCID": "0"}, "SLURM_NTASKS=5 does not match SLURM_STEP_TASKS_PER_NODE='2\\(x3\\)'"),
    ({"SLURM_STEP_TASKS_PER_NODE": "3,3"}, "does not fit SLURM_STEP_NODELIST \\(3 hosts\\)"),
    ({"SLURM_NODEID": "3"}, r"SLURM_NODEID=3 is outside \[0, number of hosts in the nodelist=3\)"),
    ({"SLURM_LOCALID": "2"}, r"SLURM_LOCALID=2 is outside \[0, tasks on this node=2\)"),
    ({"SLURM_STEP_NODELIST": "gpu[07-"}, "unbalanced brackets"),
])
def test_slurm_inconsistencies(change: dict[str, str], message: str) -> None:
    with pytest.raises(LaunchEnvError, match=message):
        detect_env({**SLURM_STEP, **change}, cuda=False)


def test_slurm_without_job_id_or_port_says_so() -> None:
    step = {k: v for k, v in SLURM_STEP.items() if k != "SLURM_JOB_ID"}
    with pytest.raises(LaunchEnvError, match="SLURM_JOB_ID is not set"):
        detect_env(step, cuda=False)


def test_single_process_gets_a_working_one_rank_group_and_a_clean_exit() -> None:
    """No launcher: init_distributed needs no port; shutdown_distributed flushes and exits with the code."""
    program = (
        "import torch, torch.distributed as dist\n"
        "from launch.env import LaunchEnvError, detect_env, init_distributed, shutdown_distributed\n"
        "env = detect_env()\n"
        "init_distributed(env)\n"
        "t = torch.ones(1); dist.all_reduce(t)\n"
        "try:\n    init_distributed(env)\nexcept LaunchEnvError as e:\n    print('again:', e)\n"
        "print(env.launcher, dist.get_world_size(), t.item(), end='')\n"
        "shutdown_distributed(3)\n"
        "print('not reached')\n"
    )
    launcher_vars = ("SLURM_", "RANK", "WORLD_SIZE", "LOCAL_", "MASTER_")
    clean_env = {k: v for k, v in os.environ.items() if not k.startswith(launcher_vars)}
    done = subprocess.run([sys.executable, "-c", program], env=clean_env, cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 3, done.stderr
    assert done.stdout == "again: torch.distributed is already initialised\nsingle 1 1.0"
