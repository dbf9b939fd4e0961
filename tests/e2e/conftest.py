"""Shared pieces of the end-to-end tests: one small demo corpus per session, and `python -m train` runs in
subprocesses (every run gets a fresh interpreter, as on a cluster: DeepSpeed keeps global state)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
# Small and quick: 512-token sequences, 2 per step, fp32, no wandb/progress bar, data loading in-process.
QUICK = ["stage.seq_len=512", "stage.global_batch_size=2", "optim.warmup_steps=2", "backend.precision=fp32",
         "logging=quiet", "data.num_workers=0"]


def train_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(DS_ACCELERATOR="cpu", WANDB_MODE="offline", PYTHONPATH=str(REPO),
               TORCH_EXTENSIONS_DIR=str(REPO / ".cache" / "torch_extensions"))
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)  # a single-process run must not inherit a launcher's variables
    return env


FAULTS = str(Path(__file__).parent / "programs" / "train_with_faults.py")


def run(args: list[str], timeout: float = 600, ranks: int = 1) -> subprocess.CompletedProcess:
    """`python -m train ARGS`, or `python PROGRAM.py ARGS` when args[0] is a .py file; torchrun when ranks > 1."""
    target = args if args[0].endswith(".py") else ["-m", "train", *args]
    launcher = [sys.executable]
    if ranks > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"]
    return subprocess.run([*launcher, *target], cwd=REPO, env=train_env(), capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="session")
def demo_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from data.synth import make_corpus

    root = tmp_path_factory.mktemp("corpus") / "demo_data"
    make_corpus(root, scale=0.3, shards_per_set=2)
    return root
