"""Process start: turn the launcher's environment into one `DistEnv`, then into torch.distributed.

Three launchers are recognised, in this order:
- torchrun (or any launcher that sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT). This also
  covers "one srun task per node running torchrun": torchrun's variables win over SLURM's.
- a SLURM step started by srun (SLURM_STEP_ID, SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID, ...): one task per
  GPU. MASTER_ADDR is the first host of the step's nodelist (parsed here, so no `scontrol` is needed) and
  MASTER_PORT is derived from SLURM_JOB_ID, so two jobs on one node never share a port.
- nothing of the above: a single process, world size 1.
An inconsistent environment raises `LaunchEnvError` with one line naming the variable and its value.
"""
from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass
from datetime import timedelta
from typing import Mapping, NoReturn

import torch
import torch.distributed as dist

TORCHRUN_RANK_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
TORCHRUN_ADDR_VARS = ("MASTER_ADDR", "MASTER_PORT")
# Below Linux's ephemeral range (32768-60999) so a derived port never collides with an outgoing connection.
JOB_PORT_BASE = 20000
JOB_PORT_SPAN = 10000


class LaunchEnvError(RuntimeError):
    """The launcher's environment is missing a variable or contradicts itself."""


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str
    master_port: int
    backend: str
    device: str
    launcher: str  # "torchrun", "slurm" or "single"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def device_local_rank(self) -> int:
        """The LOCAL_RANK to export for libraries that take it as this rank's CUDA device index (DeepSpeed's
        engine and ZeRO-3 do): the GPU index, which is 0 for a task bound to one GPU whatever its local rank;
        the local rank on CPU."""
        return int(self.device.split(":")[1]) if self.device.startswith("cuda:") else self.local_rank


def parse_nodelist(nodelist: str) -> list[str]:
    """Expand a SLURM hostlist such as `node[01-03,07],gpu5` or `r[1-2]-n[1,3]` into host names, in order."""
    hosts: list[str] = []
    for pattern in _split_top_level(nodelist):
        hosts.extend(_expand_host(pattern, nodelist))
    if not hosts:
        raise LaunchEnvError(f"nodelist {nodelist!r} names no host")
    return hosts


def _split_top_level(text: str) -> list[str]:
    """Split on commas that are outside brackets (commas inside brackets separate ranges)."""
    parts, depth, start = [], 0, 0
    for i, char in enumerate(text):
        depth += {"[": 1, "]": -1}.get(char, 0)
        if depth not in (0, 1):
            raise LaunchEnvError(f"nodelist {text!r} has unbalanced brackets")
        if char == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    if depth != 0:
        raise LaunchEnvError(f"nodelist {text!r} has unbalanced brackets")
    parts.append(text[start:])
    return [p.strip() for p in parts if p.strip()]


def _expand_host(pattern: str, whole: str) -> list[str]:
    match = re.search(r"\[([^\]]*)\]", pattern)
    if match is None:
        return [pattern]
    prefix, suffix = pattern[: match.start()], pattern[match.end():]
    names = []
    for item in match.group(1).split(","):
        for number in _expand_range(item.strip(), whole):
            names.extend(_expand_host(prefix + number + suffix, whole))
    return names


def _expand_range(item: str, whole: str) -> list[str]:
    """`01-03` -> 01, 02, 03 (zero padding kept from the lower bound, as SLURM does); `7` -> 7."""
    match = re.fullmatch(r"(\d+)(?:-(\d+))?", item)
    if match is None:
        raise LaunchEnvError(f"nodelist {whole!r} has a bad range {item!r}")
    low_text, high_text = match.group(1), match.group(2) or match.group(1)
    low, high = int(low_text), int(high_text)
    if high < low:
        raise LaunchEnvError(f"nodelist {whole!r} has a descending range {item!r}")
    return [str(n).zfill(len(low_text)) for n in range(low, high + 1)]


def parse_tasks_per_node(spec: str) -> list[int]:
    """Expand SLURM's compressed task counts, e.g. `2(x3),1` -> [2, 2, 2, 1]."""
    counts: list[int] = []
    for item in spec.split(","):
        match = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", item)
        if match is None:
            raise LaunchEnvError(f"SLURM tasks-per-node {spec!r} has a bad item {item!r}")
        counts.extend([int(match.group(1))] * int(match.group(2) or 1))
    return counts


def master_port_for_job(job_id: int) -> int:
    """A port in [20000, 30000) that is fixed for a job (so a requeued job uses it again)."""
    return JOB_PORT_BASE + job_id % JOB_PORT_SPAN


def _int_var(environ: Mapping[str, str], name: str) -> int:
    value = environ.get(name)
    if value is None:
        raise LaunchEnvError(f"{name} is not set")
    try:
        return int(value)
    except ValueError:
        raise LaunchEnvError(f"{name}={value!r} is not an integer") from None


def _check_rank(rank_name: str, rank: int, size_name: str, size: int) -> None:
    if size < 1:
        raise LaunchEnvError(f"{size_name}={size} must be at least 1")
    if not 0 <= rank < size:
        raise LaunchEnvError(f"{rank_name}={rank} is outside [0, {size_name}={size})")


def _backend_and_device(local_rank: int, gpus: int, environ: Mapping[str, str]) -> tuple[str, str]:
    """NCCL on this rank's GPU when GPUs are visible, gloo on the CPU otherwise. A rank that sees exactly one
    GPU uses it whatever its local rank (SLURM's --gpus-per-task / per-task CUDA_VISIBLE_DEVICES binding);
    with several, local rank i takes GPU i."""
    if gpus == 0:
        return "gloo", "cpu"
    if gpus == 1:
        return "nccl", "cuda:0"
    if local_rank >= gpus:
        visible = environ.get("CUDA_VISIBLE_DEVICES", "<unset>")
        raise LaunchEnvError(f"local rank {local_rank} has no GPU: {gpus} visible (CUDA_VISIBLE_DEVICES={visible}); "
                             f"start at most {gpus} ranks per node")
    return "nccl", f"cuda:{local_rank}"


def omp_threads(environ: Mapping[str, str], local_world_size: int, affinity: int, cores: int) -> int | None:
    """OMP threads per rank when the launcher set none (torchrun does, srun does not): SLURM_CPUS_PER_TASK,
    else the cores this process may run on, divided among the node's ranks unless srun already bound the
    task to its own subset. None: OMP_NUM_THREADS is set, leave it."""
    if "OMP_NUM_THREADS" in environ:
        return None
    if environ.get("SLURM_CPUS_PER_TASK", "").isdigit():
        return max(1, int(environ["SLURM_CPUS_PER_TASK"]))
    shared = affinity >= cores
    return max(1, affinity // local_world_size if shared else affinity)


def _from_torchrun(environ: Mapping[str, str], gpus: int) -> DistEnv:
    missing = [n for n in TORCHRUN_RANK_VARS + TORCHRUN_ADDR_VARS if n not in environ]
    if missing:
        present = [n for n in TORCHRUN_RANK_VARS if n in environ]
        raise LaunchEnvError(
            f"torchrun variables half set: {', '.join(present)} set but {', '.join(missing)} missing")
    rank, world = _int_var(environ, "RANK"), _int_var(environ, "WORLD_SIZE")
    local_rank = _int_var(environ, "LOCAL_RANK")
    # Launchers other than torchrun may omit LOCAL_WORLD_SIZE; then all ranks are taken to share one node.
    local_world = _int_var(environ, "LOCAL_WORLD_SIZE") if "LOCAL_WORLD_SIZE" in environ else world
    _check_rank("RANK", rank, "WORLD_SIZE", world)
    _check_rank("LOCAL_RANK", local_rank, "LOCAL_WORLD_SIZE", local_world)
    if local_world > world:
        raise LaunchEnvError(f"LOCAL_WORLD_SIZE={local_world} exceeds WORLD_SIZE={world}")
    port = _int_var(environ, "MASTER_PORT")
    backend, device = _backend_and_device(local_rank, gpus, environ)
    return DistEnv(rank, world, local_rank, local_world, environ["MASTER_ADDR"], port, backend, device, "torchrun")


def _slurm_layout(environ: Mapping[str, str], world: int) -> tuple[list[str], list[int]]:
    """The step's hosts and tasks per host (step variables first: a step may use part of the job)."""
    nodelist_name = "SLURM_STEP_NODELIST" if "SLURM_STEP_NODELIST" in environ else "SLURM_JOB_NODELIST"
    tasks_name = "SLURM_STEP_TASKS_PER_NODE" if "SLURM_STEP_TASKS_PER_NODE" in environ else "SLURM_TASKS_PER_NODE"
    hosts = parse_nodelist(environ.get(nodelist_name) or "")
    tasks_spec = environ.get(tasks_name) or str(world)
    per_node = parse_tasks_per_node(tasks_spec)
    if sum(per_node) != world:
        raise LaunchEnvError(f"SLURM_NTASKS={world} does not match {tasks_name}={tasks_spec!r}")
    if len(per_node) != len(hosts):
        raise LaunchEnvError(f"{tasks_name}={tasks_spec!r} does not fit {nodelist_name} ({len(hosts)} hosts)")
    return hosts, per_node


def _from_slurm(environ: Mapping[str, str], gpus: int) -> DistEnv:
    rank, world = _int_var(environ, "SLURM_PROCID"), _int_var(environ, "SLURM_NTASKS")
    local_rank, node_id = _int_var(environ, "SLURM_LOCALID"), _int_var(environ, "SLURM_NODEID")
    _check_rank("SLURM_PROCID", rank, "SLURM_NTASKS", world)
    hosts, per_node = _slurm_layout(environ, world)
    _check_rank("SLURM_NODEID", node_id, "number of hosts in the nodelist", len(hosts))
    _check_rank("SLURM_LOCALID", local_rank, "tasks on this node", per_node[node_id])
    # An explicit MASTER_ADDR/MASTER_PORT (exported by the batch script) wins over the derived ones.
    addr = environ.get("MASTER_ADDR") or hosts[0]
    if "MASTER_PORT" in environ:
        port = _int_var(environ, "MASTER_PORT")
    else:
        port = master_port_for_job(_int_var(environ, "SLURM_JOB_ID"))
    backend, device = _backend_and_device(local_rank, gpus, environ)
    return DistEnv(rank, world, local_rank, per_node[node_id], addr, port, backend, device, "slurm")


def detect_env(environ: Mapping[str, str] | None = None, cuda: bool | None = None,
               visible_gpus: int | None = None) -> DistEnv:
    """Read the launcher's variables (default: os.environ) into a DistEnv; see the module docstring.
    `cuda` / `visible_gpus` default to what torch sees."""
    environ = os.environ if environ is None else environ
    cuda = torch.cuda.is_available() if cuda is None else cuda
    gpus = (torch.cuda.device_count() if visible_gpus is None else visible_gpus) if cuda else 0
    if any(name in environ for name in TORCHRUN_RANK_VARS):
        return _from_torchrun(environ, gpus)
    # SLURM_STEP_ID tells an srun task from the batch shell, which also carries SLURM_PROCID=0 and the job's
    # SLURM_NTASKS: a program started directly from the batch script is one process, not rank 0 of many.
    if "SLURM_PROCID" in environ and "SLURM_STEP_ID" in environ:
        return _from_slurm(environ, gpus)
    backend, device = _backend_and_device(0, gpus, environ)
    return DistEnv(0, 1, 0, 1, "127.0.0.1", 0, backend, device, "single")


def init_distributed(env: DistEnv, timeout_s: float = 300.0) -> None:
    """Start the process group of `env`. A single process gets a one-rank group too (an in-memory store,
    no port), so code can call collectives whatever the launcher."""
    if dist.is_initialized():
        raise LaunchEnvError("torch.distributed is already initialised")
    if env.device.startswith("cuda"):
        torch.cuda.set_device(torch.device(env.device))
    if env.launcher == "slurm":
        _set_omp_threads(env)
    timeout = timedelta(seconds=timeout_s)
    if env.world_size == 1:
        dist.init_process_group(env.backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
        return
    dist.init_process_group(
        env.backend,
        init_method=f"tcp://{env.master_addr}:{env.master_port}",
        rank=env.rank,
        world_size=env.world_size,
        timeout=timeout,
    )


def _set_omp_threads(env: DistEnv) -> None:
    """Under srun, give each rank its share of the cores as torchrun would (torch's default is every core
    per rank: local_world_size x oversubscription)."""
    threads = omp_threads(os.environ, env.local_world_size, len(os.sched_getaffinity(0)), os.cpu_count() or 1)
    if threads is not None:
        set_cpu_threads(threads)


def set_cpu_threads(threads: int) -> None:
    """A config's `cpu_threads` for this process (and, through OMP_NUM_THREADS, processes it starts); 0 leaves
    the launcher's choice. Set per stage, before the stage builds its model."""
    if threads > 0:
        os.environ["OMP_NUM_THREADS"] = str(threads)
        torch.set_num_threads(threads)


def shutdown_distributed(exit_code: int = 0) -> NoReturn:
    """End a rank: barrier, destroy the group, flush, os._exit. Ending any other way aborts sporadically
    at interpreter exit ("terminate called without an active exception"); see notes/cpu-backends.md."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(exit_code)
