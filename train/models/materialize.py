"""Meta-device construction: build a module without memory, allocate only what this rank keeps, fill it.

The one construction path of every backend (README "Model construction"):
    with torch.device("meta"): build (the backend's own modules, already cut to this rank's shard)
    -> materialize(module, device)      allocate (uninitialised) only those parameters
    -> fill each parameter from a WeightSource (train/models/weight_source.py) with the slice it holds.
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import nn

from train.models.weight_source import Index, WeightSource, read_into


def materialize(module: nn.Module, device: torch.device | str = "cpu") -> None:
    """Replace every meta parameter / buffer of `module` by an uninitialised one on `device`.

    Unlike `nn.Module.to_empty`, a parameter keeps its Python attributes (megatron's
    `tensor_model_parallel`, `sequence_parallel`, `allreduce`, ...) and its requires_grad flag, and a
    parameter shared by two modules (tied embeddings) stays shared."""
    made: dict[int, torch.Tensor] = {}
    for sub in module.modules():
        for key, param in list(sub._parameters.items()):
            if param is None or param.device.type != "meta":
                continue
            if id(param) not in made:
                fresh = nn.Parameter(torch.empty_like(param, device=device), requires_grad=param.requires_grad)
                fresh.__dict__.update(param.__dict__)
                made[id(param)] = fresh
            sub._parameters[key] = made[id(param)]
        for key, buffer in list(sub._buffers.items()):
            if buffer is not None and buffer.device.type == "meta":
                sub._buffers[key] = torch.empty_like(buffer, device=device)


@torch.no_grad()
def fill(targets: Iterable[tuple[str, torch.Tensor, Callable[[], torch.Tensor]]]) -> None:
    """For each (what, tensor, read): copy read() into tensor, one at a time (shapes must match exactly)."""
    for what, tensor, read in targets:
        value = read()
        if tuple(value.shape) != tuple(tensor.shape):
            raise ValueError(f"{what}: the weight source gives shape {list(value.shape)}, the model holds "
                             f"{list(tensor.shape)}")
        tensor.copy_(value)


def fill_native(model: nn.Module, source: WeightSource,
                index_of: Callable[[str], Index | None] = lambda name: None) -> None:
    """Fill a module that uses native parameter names (the reference model, DeepSpeed's wrapped copy):
    `index_of(name)` is the slice of the full tensor this rank holds (None: all of it), read straight
    into the parameter (read_into: one block in between, never a second copy of the slice)."""
    for name, param in model.named_parameters():
        read_into(source, name, param.data, index_of(name))
