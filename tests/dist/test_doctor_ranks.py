"""The doctor's multi-rank check, the code path it runs over NCCL on GPUs, here over gloo: one training step
of the megatron backend on 2 spawned ranks equals the same step on 1 rank (fp32, 1e-4 relative)."""
from __future__ import annotations

import pytest

import train.doctor as doctor

pytestmark = [pytest.mark.dist, pytest.mark.slow]


def test_two_rank_step_equals_one_rank_over_gloo():
    check = doctor.check_ranks("megatron", "cpu")
    assert check.status == "ok", check.detail
    assert check.name == "megatron: 2-rank step over gloo vs 1 rank (fp32)"
