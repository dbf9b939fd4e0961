"""Weights in and out of a DeepSpeed-wrapped model, independent of the layout.

ZeRO-3 partitions every parameter. Export: gathered with deepspeed.zero.GatheredParameters, one parameter
at a time; expert-parallel slices all-gathered along dim 0. Load: each rank fills only what it holds from a
WeightSource (its ZeRO-3 partitions, its experts), reading only those slices. ZeRO 0-2 keep whole
parameters on every rank. Exported tensors are the module's weights in its dtype (with bf16 training: the
bf16 compute weights).
"""
from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Iterator

import torch
import torch.distributed as dist

from train.models.materialize import fill_native
from train.models.qwen3vl import Qwen3VLModel
from train.models.weight_source import WeightSource, flat_range_into, read_into

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


def load_weights(model: Qwen3VLModel, source: WeightSource, zero3: bool,
                 experts: "ExpertParallelism | None", only: set[str] | None = None) -> None:
    """Fill this rank's share of the model (of its parameters named in `only`: all by default) from `source`,
    reading only that share straight into it: under ZeRO-3 each parameter's own partition (a flat range of
    the tensor; no gather, no collective), with expert parallelism the rank's experts, otherwise (ZeRO 0-2
    replicate parameters by design) every tensor. Every rank calls it."""
    if not zero3 and only is None:
        fill_native(model, source, lambda name: experts.local_index(name) if experts is not None else None)
        return
    for name, param in model.named_parameters():
        if only is not None and name not in only:
            continue
        if not zero3:
            read_into(source, name, param.data, experts.local_index(name) if experts is not None else None)
            continue
        start, stop = partition_range(param)
        flat_range_into(source, name, start, param.ds_tensor.narrow(0, 0, stop - start))
        if param.numel() and getattr(param, "ds_persist", False):  # a persistent, already gathered copy
            read_into(source, name, param.data)


def partition_range(param: torch.Tensor) -> tuple[int, int]:
    """[start, stop) of the flattened full tensor that this rank's ZeRO-3 partition holds: DeepSpeed pads
    the flattened tensor to a multiple of the group size and gives rank r the r-th equal part
    (partition_parameters.py `_partition_param`); the padding (last ranks) holds no element."""
    size = param.ds_tensor.ds_numel
    start = dist.get_rank(param.ds_process_group) * size
    return start, max(start, min(start + size, param.ds_numel))
