"""bench/scale_memory.py at CI size: the tiny model, made and saved sharded by transformers, built + loaded
through each backend's construction (megatron TP=2, DeepSpeed ZeRO-3 DP=2: 2 gloo ranks each), exported to
HF tensor by tensor; the exports equal the checkpoint bitwise and load with transformers (the bench's own
checks; memory bounds only apply at 2B size, measured by the bench itself)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))


@pytest.mark.dist
@pytest.mark.slow
def test_tiny_build_load_export_round_trip():
    env = {**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    proc = subprocess.run([sys.executable, os.path.join(REPO, "bench", "scale_memory.py"), "--model", "tiny",
                           "--layouts", "megatron_tp2,deepspeed_z3_dp2", "--no-write"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    print(proc.stdout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for layout in ("megatron_tp2", "deepspeed_z3_dp2"):
        assert f"RESULT scale_export_tensors_differing_{layout} 0" in proc.stdout
