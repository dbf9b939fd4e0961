"""Streaming exports on 2 ranks (gloo) with a 2 s process-group timeout and a slowed writer: megatron PP=2,
megatron EP=2 MoE, DeepSpeed ZeRO-3 DP=2 write hf/ tensor by tensor, every rank kept in step (no rank waits
a whole export in one collective), and the files equal the loaded weights bitwise
(programs/streaming_export.py)."""
from __future__ import annotations

import pytest

from test_deepspeed_parity import PROGRAM as _PARITY_PROGRAM, run_program

PROGRAM = _PARITY_PROGRAM.replace("deepspeed_parity.py", "streaming_export.py")


@pytest.mark.dist
@pytest.mark.slow
def test_exports_stay_within_the_timeout_and_equal_the_loaded_weights(tmp_path):
    out = run_program(PROGRAM, str(tmp_path))
    lines = [line for line in out.splitlines() if line.startswith("[")]
    print("\n".join(lines))
    assert len([line for line in lines if "exported" in line]) == 3
