"""The DeepSpeed backend on 2 ranks (torchrun, gloo) against the one-process reference training loop:
ZeRO-1, ZeRO-3 (text-only micro-batches on one rank beside image micro-batches on the other), Ulysses
CP=2 (an image span straddling the ranks' shares), MoE EP=2 (ZeRO-2): first 3 losses within 1e-5
relative, exported parameters after 3 steps within 1e-5; bf16 ZeRO-2 at bf16 resolution. Also save/load
resume, a NaN step skipped, per-source losses. The checks live in programs/deepspeed_parity.py."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
PROGRAM = os.path.join(HERE, "programs", "deepspeed_parity.py")


def run_program(program: str, *args: str, timeout: int = 300) -> str:
    """torchrun 2 ranks; a hang (e.g. mismatched ZeRO-3 collectives) fails at `timeout`."""
    env = {**os.environ, "PYTHONPATH": f"{REPO}:{os.path.join(REPO, 'tests', 'unit')}", "OMP_NUM_THREADS": "1",
           "DS_ACCELERATOR": "cpu",
           "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", os.path.join(REPO, ".cache",
                                                                                     "torch_extensions"))}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", program, *args]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env)
    assert proc.returncode == 0 and "ALL OK" in proc.stdout, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc.stdout


@pytest.mark.dist
@pytest.mark.parametrize("mode", ["zero1", "zero3", "cp2", "ep2", "bf16"])
def test_matches_one_process(mode, tmp_path):
    out = run_program(PROGRAM, mode, str(tmp_path))
    print("\n".join(line for line in out.splitlines() if line.startswith(f"[{mode}]")))
