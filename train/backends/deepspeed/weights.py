"""Full native state dicts in and out of a DeepSpeed-wrapped model, independent of the layout.

ZeRO-3 partitions every parameter: they are gathered (export) or gathered-modified-repartitioned (import)
with deepspeed.zero.GatheredParameters. Expert-parallel slices are all-gathered along dim 0 (export) or
sliced (import). ZeRO 0-2 keep whole parameters on every rank. Exported tensors are fp32 copies of the
module's weights (with bf16 training: the bf16 compute weights, upcast).
"""
from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from train.models.qwen3vl import Qwen3VLModel

if TYPE_CHECKING:
    from train.backends.deepspeed.experts import ExpertParallelism


def _gathered(model: Qwen3VLModel, zero3: bool, modifier_rank: int | None):
    if not zero3:
        return contextlib.nullcontext()
    from deepspeed.runtime.zero.partition_parameters import GatheredParameters

    return GatheredParameters(list(model.parameters()), modifier_rank=modifier_rank)


def export_state_dict(model: Qwen3VLModel, zero3: bool, experts: "ExpertParallelism | None") -> dict[str, torch.Tensor]:
    """Every native key (tied weights under both names, like model.state_dict()) as fp32 CPU tensors."""
    out: dict[str, torch.Tensor] = {}
    with _gathered(model, zero3, None):
        for name, tensor in model.state_dict(keep_vars=True).items():
            value = tensor.detach()
            if experts is not None and experts.is_expert_param(name):
                value = experts.gather(value)
            out[name] = value.float().cpu().clone()
    return out


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
    with _gathered(model, zero3, 0):
        if not zero3 or dist.get_rank() == 0:
            for name, tensor in own.items():
                value = state[name]
                if experts is not None and experts.is_expert_param(name):
                    value = experts.local_slice(value)
                tensor.copy_(value.to(dtype=tensor.dtype, device=tensor.device))
