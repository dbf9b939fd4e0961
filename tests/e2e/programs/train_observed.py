"""`python -m train` that also records what it consumed, with optional fault injection, for the launch and
resilience tests (torchrun and SLURM).

    python train_observed.py [--step-sleep S] [--slow-save-step K --slow-save-s S]
                             [--disk-fault full|readonly --disk-fault-after-step K] HYDRA_OVERRIDES...

Always: every rank appends one JSON line per training batch it takes to <run_dir>/<stage>/docs_rank<R>.jsonl,
{"batch": n, "doc_keys": [...]} where n is the loader's own consumed-batch counter (restored from the
checkpoint on resume, so it numbers batches across restarts); and writes its pid to <run_dir>/pids/rank<R>.
The trainer records no document keys itself (metrics.jsonl has losses, the checkpoint has only the loader's
cursors), so this is how a test sees that a resumed run reads exactly the documents an uninterrupted run
reads, none twice.
--step-sleep S: sleep S s before each optimizer step (the tiny model steps in ~0.2 s; a signal test needs
    time to hit the middle of a stage). Changes no number.
--slow-save-step K --slow-save-s S: after the backend's writer thread wrote its files for the checkpoint of
    step K (still in the temp dir, before meta.json, the rename and `latest`), touch <run_dir>/pids/saving_K
    and sleep S s on that thread, so a test can kill the job in the middle of that asynchronous save while
    the steps go on.
--disk-fault full|readonly --disk-fault-after-step K: right after the checkpoint of step K is complete,
    rank 0 breaks the file system mounted at <run_dir>/<stage>/checkpoints (a tmpfs the test mounted): `full`
    writes <checkpoints>/filler until ENOSPC, `readonly` remounts it read-only. The next save must fail.
Everything else is the real pipeline: real config, loader, DeepSpeed backend, checkpoints, signal handling.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

from data.batch import PackedBatch
from train.config.compose import stage_configs
from train.config.model import ConfigError
from train.pipeline import EXIT_CONFIG, build_stage_backend, run_pipeline
from train.trainer import StageRuntime, build_stage_loader


def rank() -> int:
    # Known before the process group exists: torchrun sets RANK, an srun task SLURM_PROCID (with a step id).
    if "RANK" in os.environ:
        return int(os.environ["RANK"])
    return int(os.environ.get("SLURM_PROCID", 0)) if "SLURM_STEP_ID" in os.environ else 0


class RecordingLoader:
    """The stage's loader, unchanged, writing the doc keys of every batch the trainer takes."""

    def __init__(self, loader: Any, log_path: Path) -> None:
        self.loader, self.log_path = loader, log_path

    def state_dict(self) -> dict:
        return self.loader.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.loader.load_state_dict(state)

    def stats(self) -> dict:
        return self.loader.stats()

    def __iter__(self) -> Iterator[PackedBatch]:
        for batch in self.loader:
            with open(self.log_path, "a") as out:
                out.write(json.dumps({"batch": self.loader.batches_yielded, "doc_keys": batch.doc_keys}) + "\n")
            yield batch


def break_disk(mount_point: Path, fault: str) -> None:
    if fault == "readonly":
        subprocess.run(["mount", "-o", "remount,ro", str(mount_point)], check=True)
        return
    with open(mount_point / "filler", "wb", buffering=0) as out:  # unbuffered: ENOSPC surfaces at once
        for chunk in (1 << 20, 4096, 1):  # big chunks first, then top up the last bytes
            try:
                while True:
                    out.write(b"\0" * chunk)
            except OSError:  # ENOSPC: this chunk size no longer fits
                continue


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--step-sleep", type=float, default=0.0)
    parser.add_argument("--slow-save-step", type=int, default=0)
    parser.add_argument("--slow-save-s", type=float, default=0.0)
    parser.add_argument("--disk-fault", choices=("full", "readonly"), default=None)
    parser.add_argument("--disk-fault-after-step", type=int, default=0)
    args, overrides = parser.parse_known_args()
    try:
        configs = stage_configs(overrides)
    except ConfigError as err:
        print(f"longvl: config error: {err}", file=sys.stderr)
        return EXIT_CONFIG
    me = rank()
    pids = Path(configs[0].run_dir) / "pids"
    pids.mkdir(parents=True, exist_ok=True)
    (pids / f"rank{me}").write_text(str(os.getpid()))

    def backend(cfg, weights):
        built = build_stage_backend(cfg, weights)
        checkpoints = Path(cfg.run_dir) / cfg.stage.name / "checkpoints"
        if args.slow_save_step:
            snapshot = built.save_async

            def slow_save_async(path: Path):
                pending = snapshot(path)
                if Path(path).name == f".step_{args.slow_save_step:06d}.tmp":
                    write = pending.write

                    def slow_write():  # on the checkpoint writer thread: the steps go on meanwhile
                        written = write()
                        (pids / f"saving_{args.slow_save_step}").write_text(str(os.getpid()))
                        time.sleep(args.slow_save_s)
                        return written

                    pending.write = slow_write
                return pending

            built.save_async = slow_save_async
        if args.step_sleep:
            plain_step = built.train_step

            def slow_step(micro):
                time.sleep(args.step_sleep)
                return plain_step(micro)

            built.train_step = slow_step
        if args.disk_fault and me == 0:
            step, calls = built.train_step, [0]

            def step_then_break_disk(micro):
                # With stage.async_save=false (as the test runs it), step k+1 starts only after step k's
                # checkpoint (and `latest`) was written completely.
                if calls[0] == args.disk_fault_after_step:
                    break_disk(checkpoints, args.disk_fault)
                calls[0] += 1
                return step(micro)

            built.train_step = step_then_break_disk
        return built

    def loader(cfg, info, seed):
        built = build_stage_loader(cfg, info, seed)
        if seed != cfg.data.seed:  # the held-out eval loader uses another seed: not training data
            return built
        stage_root = Path(cfg.run_dir) / cfg.stage.name
        stage_root.mkdir(parents=True, exist_ok=True)
        return RecordingLoader(built, stage_root / f"docs_rank{me}.jsonl")

    return run_pipeline(configs, StageRuntime(build_backend=backend, build_loader=loader))


if __name__ == "__main__":
    sys.exit(main())
