"""Full native state dicts in and out of a DeepSpeed-wrapped model, independent of the layout.

ZeRO-3 partitions every parameter: they are gathered (export) or gathered-modified-repartitioned (import)
with deepspeed.zero.GatheredParameters, one parameter at a time for exports. Expert-parallel slices are
all-gathered along dim 0 (export) or sliced (import). ZeRO 0-2 keep whole parameters on every rank.
Exported tensors are the module's weights in its dtype (with bf16 training: the bf16 compute weights).
"""
from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Iterator

import torch
import torch.distributed as dist

from train.models.qwen3vl import Qwen3VLModel

if TYPE_CHECKING:
    from train.backends.deepspeed.experts import ExpertParallelism


def _gathered(params: list[torch.nn.Parameter], zero3: bool, modifier_rank: int | None):
    if not zero3:
        return contextlib.nullcontext()
    from deepspeed.runtime.zero.partition_parameters import GatheredParameters

    return GatheredParameters(params, modifier_rank=modifier_rank)


@torch.no_grad()
def iter_native(model: Qwen3VLModel, zero3: bool, experts: "ExpertParallelism | None",
                writer_rank: int = 0) -> Iterator[tuple[str, torch.Tensor]]:
    """(native name, full tensor) one parameter at a time on `writer_rank` (nothing elsewhere), in the
    module's dtype; a tied `lm_head.weight` comes once, as the embedding. Collective: every rank iterates.

    Under ZeRO-3 each parameter is gathered alone (GatheredParameters on one parameter), expert slices are
    all-gathered over the expert-parallel group; the yielded tensor is only valid until the next step of
    the iteration (the writer copies it out). Every step is a collective, so no rank waits longer than one
    parameter's gather + write (long exports stay within the process-group timeout)."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    for name, param in model.named_parameters():
        with _gathered([param], zero3, None):
            value = param.detach()
            if experts is not None and experts.is_expert_param(name):
                value = experts.gather(value)
            if rank == writer_rank:
                yield name, value
    if dist.is_initialized():
        dist.barrier()  # the last parameter's write is done before anyone goes on


@torch.no_grad()
def import_state_dict(model: Qwen3VLModel, state: dict[str, torch.Tensor], zero3: bool,
                      experts: "ExpertParallelism | None") -> None:
    """Copy a full native state dict into the (possibly partitioned / expert-sliced) model. Every rank
    passes the same dict. Raises KeyError naming missing or unexpected keys."""
    own = model.state_dict(keep_vars=True)
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        raise KeyError(f"state dict does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    # Under ZeRO-3 rank 0's values are broadcast and re-partitioned when the context exits.
    with _gathered(list(model.parameters()), zero3, 0):
        if not zero3 or dist.get_rank() == 0:
            for name, tensor in own.items():
                value = state[name]
                if experts is not None and experts.is_expert_param(name):
                    value = experts.local_slice(value)
                tensor.copy_(value.to(dtype=tensor.dtype, device=tensor.device))
