"""Parallel layout validation for megatron's groups: sizes vs world size, one-line errors naming them."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from train.backends.megatron.parallel_state import ParallelLayoutError, ParallelSizes, config_kwargs, resolve_sizes


def test_dp_is_derived_from_the_world_size():
    assert resolve_sizes(ParallelSizes(tp=2, pp=2), 8) == ParallelSizes(tp=2, pp=2, cp=1, ep=1, dp=2)
    assert resolve_sizes(SimpleNamespace(tp=1, pp=1, cp=2, ep=4, dp=0), 8).dp == 4
    assert config_kwargs(ParallelSizes(tp=2, pp=1, cp=1, ep=1, dp=1))["tensor_model_parallel_size"] == 2


@pytest.mark.parametrize("sizes, world, fragment", [
    (ParallelSizes(tp=3), 8, "world size 8 is not divisible by tp*pp*cp=3"),
    (ParallelSizes(tp=2, dp=2), 8, "tp*pp*cp*dp=4 != world size 8"),
    (ParallelSizes(tp=2, ep=3), 8, "ep=3 must divide dp*cp=4"),
    (ParallelSizes(tp=0), 2, "parallel sizes must be positive"),
])
def test_bad_layouts_fail_with_one_line_naming_the_sizes(sizes, world, fragment):
    with pytest.raises(ParallelLayoutError) as err:
        resolve_sizes(sizes, world)
    message = str(err.value)
    assert fragment in message and "\n" not in message
    assert f"tp={sizes.tp}" in message
