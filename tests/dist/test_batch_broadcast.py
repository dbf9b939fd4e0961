"""2 ranks as one model-parallel group (TP=2 of one DP slot): only rank 0 decodes, rank 1 receives the same
batches a plain loader yields, both hold the same loader state, and a resume from it continues exactly.
Then the same 2 ranks as a DP group: the vision-balanced exchange keeps every micro-batch exactly once and
evens the ViT cost. Run by pytest through torchrun; the same file is the torchrun program."""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
UNIT = os.path.join(REPO, "tests", "unit")
PROGRAMS = os.path.join(HERE, "programs")
SEQ = 384


@pytest.mark.dist
def test_one_rank_decodes_peers_get_the_same_batches_and_vision_is_balanced(tmp_path):
    sys.path.insert(0, UNIT)
    from data_stream_fixtures import write_text_shards

    write_text_shards(str(tmp_path), "web", 4, 30)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__,
           str(tmp_path)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=240,
                          env={**os.environ, "PYTHONPATH": f"{REPO}:{UNIT}:{PROGRAMS}", "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0 and "ALL OK" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]


def _digest(batch) -> str:
    h = hashlib.sha1()
    for t in (batch.input_ids, batch.position_ids, batch.labels, batch.loss_weights, batch.cu_seqlens,
              batch.pixel_values, batch.pixel_values_videos):
        if t is not None:
            h.update(t.numpy().tobytes())
    return h.hexdigest()


def _broadcast_loader(root: str, failures: list[str]) -> None:
    import itertools

    import torch.distributed as dist

    from data.loader import StreamingLoader
    from data_stream_fixtures import byte_encode, text_config
    from train.parallel.batch_broadcast import GroupLoader, rank_groups

    rank = dist.get_rank()
    decoded = [0]

    def counting_encode(sample, key, source):
        decoded[0] += 1
        return byte_encode(sample, key, source)

    def build():
        cfg = text_config(root, {"web": 1.0}, num_workers=0)
        return StreamingLoader(cfg, counting_encode, SEQ) if rank == 0 else None

    group, ranks = rank_groups(0)  # one slot: both ranks
    first = GroupLoader(build(), group, ranks)
    head = [_digest(b) for b in itertools.islice(iter(first), 4)]
    state = first.state_dict()
    second = GroupLoader(build(), group, ranks)
    second.load_state_dict(state)
    tail = [_digest(b) for b in itertools.islice(iter(second), 4)]
    if (decoded[0] > 0) != (rank == 0):
        failures.append(f"rank {rank} decoded {decoded[0]} samples (only the loading rank should)")
    states: list = [None, None]
    dist.all_gather_object(states, state)
    if states[0] != states[1]:
        failures.append("the ranks of the group hold different loader states")
    reference = StreamingLoader(text_config(root, {"web": 1.0}, num_workers=0), byte_encode, SEQ)
    want = [_digest(b) for b in itertools.islice(iter(reference), 8)]
    if head + tail != want:
        failures.append(f"rank {rank}: broadcast batches (with a resume after 4) differ from a plain loader's")


def _balanced_exchange(failures: list[str]) -> None:
    import torch.distributed as dist

    import common
    from train.models.native_io import load_model_config_yaml
    from train.parallel.batch_broadcast import slot_groups
    from train.parallel.vision_balance import balance_micro_batches, max_over_mean, vit_cost

    rank = dist.get_rank()
    cfg = load_model_config_yaml(os.path.join(REPO, "configs", "model", "tiny.yaml"))
    mix = common.Mix(text=1, caption=0, interleaved=0, video=0) if rank else common.Mix()
    micro = [b for b, _ in common.pack(common.document_stream(cfg, 384, seed=rank, mix=mix), 512, 4)]
    _, mp_ranks, dp_group = slot_groups(rank)  # each rank its own slot: the DP group is both ranks
    if mp_ranks != [rank]:
        failures.append(f"rank {rank}: slot {mp_ranks}, expected only itself")
    before = [(_digest(b), vit_cost(b, 32)) for b in micro]
    after_batches = balance_micro_batches(micro, 32, dp_group)
    after = [(_digest(b), vit_cost(b, 32)) for b in after_batches]
    gathered: list = [None, None]
    dist.all_gather_object(gathered, (before, after))
    if rank == 0:
        every_before = sorted(x for b, _ in gathered for x in b)
        every_after = sorted(x for _, a in gathered for x in a)
        if every_before != every_after or any(len(a) != 4 for _, a in gathered):
            failures.append("the exchange lost, duplicated or altered a micro-batch")
        today = max_over_mean([sum(c for _, c in b) for b, _ in gathered])
        balanced = max_over_mean([sum(c for _, c in a) for _, a in gathered])
        if not balanced < today:
            failures.append(f"ViT cost max/mean {today:.3f} -> {balanced:.3f}: not balanced")


def main(root: str) -> None:
    import rank_harness

    sys.path.insert(0, os.path.join(REPO, "bench"))
    rank_harness.start()
    failures: list[str] = []
    _broadcast_loader(root, failures)
    _balanced_exchange(failures)
    rank_harness.finish(failures)


if __name__ == "__main__":
    main(sys.argv[1])
