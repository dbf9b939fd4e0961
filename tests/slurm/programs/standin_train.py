"""Stand-in for `python -m train`: uses launch/ the way the trainer will, with a toy state instead of a model.

Each step all_reduces (rank + 1 + step) over the ranks and folds the sum into one float, so the value after
step n depends on every earlier step exactly once: a skipped, repeated or mis-resumed step changes it.
Rank 0 logs one JSON line per step to <run_dir>/steps.jsonl and saves <run_dir>/ckpt/step_NNNNNN atomically
(temp dir, fsync, rename, then the `latest` pointer by os.replace) every --save-every steps and on a stop
signal. A start resumes from `latest`. On SIGUSR1/SIGTERM all ranks stop after the same step, save, ask for
the requeue (rank 0) and exit 0, as `python -m train` does when preempted.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import signal
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))  # the repo root, for `launch`
from launch.env import detect_env, init_distributed, shutdown_distributed  # noqa: E402
from launch.signals import PreemptionHandler, request_requeue, slurm_job_info  # noqa: E402


def fold(value: float, reduced: float) -> float:
    return value * 0.5 + reduced


def reference_values(world_size: int, steps: int) -> list[float]:
    """The per-step values of an uninterrupted run, in closed form (sum over ranks of rank + 1 + step)."""
    value, values = 0.0, []
    for step in range(1, steps + 1):
        value = fold(value, world_size * (world_size + 1) / 2 + world_size * step)
        values.append(value)
    return values


def load_latest(ckpt_dir: Path) -> tuple[int, float]:
    pointer = ckpt_dir / "latest"
    if not pointer.exists():
        return 0, 0.0
    state = torch.load(ckpt_dir / pointer.read_text().strip() / "state.pt")
    return state["step"], state["value"]


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)  # a test program: a leaked fd on a failed fsync does not matter
    os.fsync(fd)
    os.close(fd)


def save_atomic(ckpt_dir: Path, step: int, value: float, slow_save_s: float) -> None:
    """Write into a temp dir, fsync, rename; only then move `latest`. A kill at any point leaves the
    previous checkpoint and `latest` as they were."""
    name = f"step_{step:06d}"
    tmp = ckpt_dir / f"{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    buffer = io.BytesIO()
    torch.save({"step": step, "value": value}, buffer)
    data = buffer.getvalue()
    with open(tmp / "state.pt", "wb") as out:
        out.write(data[: len(data) // 2])
        out.flush()
        time.sleep(slow_save_s)  # lets a fault test kill the writer with half a file on disk
        out.write(data[len(data) // 2:])
        out.flush()
        os.fsync(out.fileno())
    shutil.rmtree(ckpt_dir / name, ignore_errors=True)
    os.rename(tmp, ckpt_dir / name)
    (ckpt_dir / "latest.tmp").write_text(name)
    _fsync_path(ckpt_dir / "latest.tmp")
    os.replace(ckpt_dir / "latest.tmp", ckpt_dir / "latest")
    _fsync_path(ckpt_dir)


def log(run_dir: Path, record: dict) -> None:
    with open(run_dir / "steps.jsonl", "a") as out:
        out.write(json.dumps(record) + "\n")


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Hydra-style `run_dir=/x steps=20` overrides, as pretrain.sbatch passes them (or `--run-dir /x`)."""
    flags = []
    for arg in argv:
        name, equals, value = arg.partition("=")
        flags += [f"--{name.replace('_', '-')}", value] if equals and not arg.startswith("-") else [arg]
    parser = argparse.ArgumentParser()
    parser.add_argument("--run-dir", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--save-every", type=int, default=5)
    parser.add_argument("--step-sleep", type=float, default=0.0)
    parser.add_argument("--slow-save", type=float, default=0.0)
    parser.add_argument("--check-every", type=int, default=1)
    parser.add_argument("--stage", default="")
    # The stage handoff, as submit_pipeline.sh passes it: start from the previous stage's final value.
    parser.add_argument("--stage.init-from", dest="init_from", type=Path, default=None)
    # "RANK:STEP": that rank sends itself SIGUSR1 after STEP, to test that the other ranks stop with it.
    parser.add_argument("--self-signal", default="")
    # Seconds to stay alive after the last step (as the trainer does while it writes final/ and hf/).
    parser.add_argument("--linger-s", type=float, default=0.0)
    return parser.parse_args(flags)


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    env = detect_env()
    init_distributed(env, timeout_s=60)
    handler = PreemptionHandler(check_every=args.check_every).install()
    run_dir = args.run_dir
    ckpt_dir = run_dir / args.stage / "ckpt" if args.stage else run_dir / "ckpt"
    (run_dir / "pids").mkdir(parents=True, exist_ok=True)
    (run_dir / "pids" / f"rank{env.rank}").write_text(str(os.getpid()))
    step, value = load_latest(ckpt_dir)
    if step == 0 and args.init_from is not None:
        value = torch.load(args.init_from / "state.pt")["value"]
    job = slurm_job_info()
    if env.is_main:
        log(run_dir, {"event": "start", "step": step, "world": env.world_size, "launcher": env.launcher,
                      "restart": job.restart_count, "stage": args.stage, "start_value": value})
    while step < args.steps:
        time.sleep(args.step_sleep)
        step += 1
        reduced = torch.tensor([float(env.rank + 1 + step)], dtype=torch.float64)
        dist.all_reduce(reduced)
        value = fold(value, reduced.item())
        if env.is_main:
            log(run_dir, {"step": step, "value": value, "stage": args.stage})
        if args.self_signal == f"{env.rank}:{step}":
            os.kill(os.getpid(), signal.SIGUSR1)
        stop = handler.should_stop(step)
        if env.is_main and (stop or step % args.save_every == 0 or step == args.steps):
            save_atomic(ckpt_dir, step, value, args.slow_save)
        if stop and step < args.steps:  # as the trainer: a signal after the last step just lets it finish
            if env.is_main:
                log(run_dir, {"event": "stop", "step": step, "signal": handler.received, "stage": args.stage})
                request_requeue()
            break
    (run_dir / "pids" / f"rank{env.rank}.final_step").write_text(str(step))
    if env.is_main and step == args.steps:
        if args.stage:  # the handoff the next stage starts from (the trainer writes <stage>/final)
            shutil.copytree(ckpt_dir / f"step_{step:06d}", ckpt_dir.parent / "final.tmp", dirs_exist_ok=True)
            os.replace(ckpt_dir.parent / "final.tmp", ckpt_dir.parent / "final")
        log(run_dir, {"event": "complete", "step": step, "stage": args.stage})
    time.sleep(args.linger_s if step == args.steps else 0.0)
    shutdown_distributed(0)  # also when stopped by a signal, as `python -m train` does


if __name__ == "__main__":
    main(sys.argv[1:])
