"""Backends built from a sharded transformers directory on 2 ranks (megatron TP=2 and EP=2, DeepSpeed ZeRO-3):
each rank reads only its slices and allocates only its shard (element counts; ZeRO-3: no tensor larger than
its largest partition while building); the weights right after construction equal transformers' bitwise.
One torchrun (programs/load_hf_dir.py)."""
from __future__ import annotations

import pytest

from test_megatron_backend import _context, run_program

pytestmark = pytest.mark.dist


def test_backends_build_from_a_sharded_hf_dir(tmp_path):
    proc = run_program("load_hf_dir.py", str(tmp_path))
    print("\n".join(line for line in proc.stdout.splitlines() if line.startswith("[")))
    assert proc.returncode == 0 and "ALL OK" in proc.stdout, _context(proc)
    assert proc.stdout.count(" 0 differ") == 3, _context(proc)
