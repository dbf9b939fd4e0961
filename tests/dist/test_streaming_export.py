"""Streaming exports on 2 ranks (gloo) with a 2 s process-group timeout and a slowed writer: megatron PP=2,
megatron EP=2 MoE, DeepSpeed ZeRO-3 DP=2 write hf/ tensor by tensor, every rank kept in step (no rank waits
a whole export in one collective), and the files equal the loaded weights bitwise
(programs/streaming_export.py). Then `train.convert megatron-to-hf` turns the megatron cases' 2-rank dist
checkpoints into HF directories on one process: bitwise the same tensors as the live exports."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from test_deepspeed_parity import PROGRAM as _PARITY_PROGRAM, REPO, run_program
from train.models.native_io import read_safetensors_dir

PROGRAM = _PARITY_PROGRAM.replace("deepspeed_parity.py", "streaming_export.py")


@pytest.mark.dist
@pytest.mark.slow
def test_exports_stay_within_the_timeout_and_equal_the_loaded_weights(tmp_path):
    out = run_program(PROGRAM, str(tmp_path))
    lines = [line for line in out.splitlines() if line.startswith("[")]
    print("\n".join(lines))
    assert len([line for line in lines if "exported" in line]) == 3
    for case in ("megatron_pp2", "megatron_ep2"):
        converted = tmp_path / f"{case}-converted"
        done = subprocess.run([sys.executable, "-m", "train.convert", "megatron-to-hf",
                               str(tmp_path / f"{case}-checkpoint" / "megatron"), str(converted),
                               "--model-config", str(tmp_path / f"{case}.yaml"), "--max-shard-size", "200KB"],
                              cwd=REPO, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        assert (converted / "model.safetensors.index.json").is_file()
        live, back = read_safetensors_dir(tmp_path / case), read_safetensors_dir(converted)
        assert live.keys() == back.keys(), case
        assert all(live[k].dtype == back[k].dtype and torch.equal(live[k], back[k]) for k in live), case

