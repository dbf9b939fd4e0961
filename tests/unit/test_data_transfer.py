"""data.transfer: a batch leaving a loader worker carries its small tensors inside the message (no
shared-memory descriptor handshake per tensor) and its large ones through shared memory, unchanged."""
from __future__ import annotations

from dataclasses import fields
from multiprocessing.reduction import ForkingPickler

import pytest
import torch

from data.batch import PackedBatch
from data.transfer import BY_VALUE_BYTES, ByValue

SHARED_MEMORY_REBUILDERS = (b"rebuild_storage_fd", b"rebuild_storage_filename")


def _batch(pixel_rows: int) -> PackedBatch:
    n = 64
    return PackedBatch(
        input_ids=torch.arange(n), position_ids=torch.arange(n).expand(3, n),  # a non-contiguous view
        cu_seqlens=torch.tensor([0, 40, n], dtype=torch.int32), labels=torch.arange(n) - 1,
        loss_weights=torch.rand(n), source_ids=torch.zeros(n, dtype=torch.long),
        pixel_values=torch.randint(0, 255, (pixel_rows, 1536), dtype=torch.uint8),
        image_grid_thw=torch.tensor([[1, 2, pixel_rows // 2]]),
        pixel_values_videos=torch.randn(4, 8).to(torch.bfloat16), video_grid_thw=torch.empty(0, 3, dtype=torch.long),
        doc_keys=["a/0", "b/1"], num_pad=24)


def _shared(data: bytes) -> bool:
    return any(name in data for name in SHARED_MEMORY_REBUILDERS)


def _assert_same(got: PackedBatch, want: PackedBatch) -> None:
    for f in fields(want):
        x, y = getattr(got, f.name), getattr(want, f.name)
        if torch.is_tensor(y):
            assert x.dtype == y.dtype and x.shape == y.shape and torch.equal(x, y), f.name
        else:
            assert x == y, f.name


def test_small_tensors_travel_by_value_and_arrive_unchanged():
    batch = _batch(pixel_rows=8)
    assert _shared(bytes(ForkingPickler.dumps(batch)))  # what torch does with a plain batch
    data = bytes(ForkingPickler.dumps(ByValue(batch)))
    assert not _shared(data)
    got = ForkingPickler.loads(data)
    assert isinstance(got, PackedBatch)
    _assert_same(got, batch)
    got.input_ids += 1  # writable, and not the sender's memory
    assert not torch.equal(got.input_ids, batch.input_ids)


@pytest.mark.parametrize("limit", [BY_VALUE_BYTES, 4096])
def test_tensors_over_the_limit_keep_shared_memory(limit):
    batch = _batch(pixel_rows=BY_VALUE_BYTES // 1536 + 2)  # just over 1 MiB of pixels
    data = bytes(ForkingPickler.dumps(ByValue(batch, by_value_bytes=limit)))
    assert _shared(data)
    assert len(data) < (BY_VALUE_BYTES if limit == BY_VALUE_BYTES else 4096 * 4)
    _assert_same(ForkingPickler.loads(data), batch)
