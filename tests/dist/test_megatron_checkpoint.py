"""megatron dist_checkpointing across layouts: a GPT saved on TP=2 loads into a TP=1 model with the same
logits (programs/megatron_checkpoint.py; the fresh TP=1 model is checked to differ before the load)."""
from __future__ import annotations

import pytest

from test_megatron_parallel import run_megatron_program


@pytest.mark.dist
def test_tp2_checkpoint_loads_on_tp1(tmp_path):
    proc = run_megatron_program("megatron_checkpoint.py", str(tmp_path / "ckpt"))
    print("\n".join(line for line in proc.stdout.splitlines() if "logits" in line))
    assert proc.returncode == 0 and "ALL OK" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]
