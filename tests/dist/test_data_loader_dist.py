"""2 data-parallel ranks x 2 loader workers read one epoch: every sample exactly once (shards dealt to slots,
and striding inside shards when a data set has fewer shards than slots); tensor-parallel peers (same
dp_rank) get identical batches. Run by pytest through torchrun; the same file is the torchrun program."""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
UNIT = os.path.join(REPO, "tests", "unit")
SEQ = 384


@pytest.mark.dist
def test_two_ranks_read_every_sample_once_and_tp_peers_agree(tmp_path):
    sys.path.insert(0, UNIT)
    from data_stream_fixtures import write_text_shards

    write_text_shards(str(tmp_path), "many", 5, 23)  # >= 4 slots: whole shards per slot
    write_text_shards(str(tmp_path), "few", 3, 17)  # < 4 slots: slots share shards sample by sample
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__,
           str(tmp_path)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=240,
                          env={**os.environ, "PYTHONPATH": f"{REPO}:{UNIT}", "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0 and "ALL OK" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]


def _documents(batch) -> list[tuple[int, str]]:
    starts = batch.cu_seqlens[:-1].long()
    return list(zip(batch.source_ids[starts].tolist(), batch.doc_keys))


def _digest(batch) -> str:
    h = hashlib.sha1()
    for t in (batch.input_ids, batch.position_ids, batch.labels, batch.loss_weights, batch.cu_seqlens):
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def main(root: str) -> None:
    import torch.distributed as dist

    from data.loader import StreamingLoader
    from data.shards import iter_samples, list_shards
    from data_stream_fixtures import byte_encode, text_config

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    failures = []
    cfg = text_config(root, {"many": 1.0, "few": 1.0}, num_workers=2, max_epochs=1)
    loader = StreamingLoader(cfg, byte_encode, SEQ, dp_rank=rank, dp_size=world)
    mine = [doc for batch in loader for doc in _documents(batch)]
    everyone: list = [None] * world
    dist.all_gather_object(everyone, mine)
    if rank == 0:
        seen = [doc for docs in everyone for doc in docs]
        expected = [(source, f"{os.path.basename(path)[:-4]}/{sample['__key__']}")
                    for source, d in enumerate(cfg.datasets) for path in list_shards(d)
                    for _, sample in iter_samples(path)]
        if len(seen) != len(set(seen)):
            failures.append(f"{len(seen) - len(set(seen))} documents seen twice")
        if set(seen) != set(expected):
            missed, extra = sorted(set(expected) - set(seen)), sorted(set(seen) - set(expected))
            failures.append(f"missed {len(missed)} {missed[:3]}, extra {len(extra)} {extra[:3]}")
        if not all(everyone):
            failures.append("a rank read nothing")
    # Two tensor-parallel peers of data-parallel rank 0: the loader sees dp_rank/dp_size, not the global rank.
    peer = StreamingLoader(text_config(root, {"many": 1.0, "few": 1.0}, num_workers=2), byte_encode, SEQ,
                           dp_rank=0, dp_size=1)
    digests = []
    for i, batch in enumerate(peer):
        digests.append(_digest(batch))
        if i == 11:
            break
    gathered: list = [None] * world
    dist.all_gather_object(gathered, digests)
    if rank == 0 and gathered[0] != gathered[1]:
        failures.append("tensor-parallel peers received different batches")
    for failure in failures:
        print(f"FAIL {failure}", flush=True)
    if rank == 0 and not failures:
        print("ALL OK", flush=True)
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(1 if failures else 0)


if __name__ == "__main__":
    main(sys.argv[1])
