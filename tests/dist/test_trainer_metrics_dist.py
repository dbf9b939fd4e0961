"""Step metrics that must be global: the packing efficiency each rank logs is that of the whole global batch,
not of its own micro-batches. Run by pytest through torchrun (2 ranks, gloo); the same file is the program."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))


@pytest.mark.dist
def test_packing_efficiency_is_global():
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=240,
                          env={**os.environ, "PYTHONPATH": f"{REPO}:{HERE}/programs", "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0 and "ALL OK" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]


def _batch(seq_len: int, num_pad: int):
    import torch

    from data.batch import PackedBatch

    ids = torch.zeros(seq_len, dtype=torch.long)
    sources = torch.zeros(seq_len, dtype=torch.long)
    sources[seq_len - num_pad:] = -1
    return PackedBatch(input_ids=ids, position_ids=torch.zeros(3, seq_len, dtype=torch.long),
                       cu_seqlens=torch.tensor([0, seq_len], dtype=torch.int32), labels=ids,
                       loss_weights=torch.ones(seq_len), source_ids=sources, num_pad=num_pad)


def main() -> None:
    from rank_harness import finish, start

    from train.trainer import packing_efficiency

    rank = start()
    # rank 0: 2 x 100 tokens, 10 + 30 padding; rank 1: 2 x 100 tokens, 0 + 0 padding -> 360 / 400 filled.
    mine = [_batch(100, 10), _batch(100, 30)] if rank == 0 else [_batch(100, 0), _batch(100, 0)]
    got = packing_efficiency(mine)
    finish([] if got == 0.9 else [f"packing efficiency {got}, the global batch's is 0.9"])


if __name__ == "__main__":
    main()
