"""Where tensors live: the one place that knows the process group's device and this rank's compute device.

Rules the rest of the code follows (tests/unit/test_device.py enforces the first one by scanning the code):
- every tensor handed to a torch.distributed collective is built by `comm_tensor` / `comm_zeros` /
  `comm_empty`, or passed through `on_group_device` (activations, parameters, gradients: a no-op when
  already there). NCCL has no CPU tensors, gloo has no CUDA ones; which one a group uses is known only at
  run time.
- a batch moves to the compute device once, right where a backend receives it (`move_batch`): pinned host
  memory and a non-blocking copy on CUDA, so the copy overlaps the previous step's kernels.
"""
from __future__ import annotations

from dataclasses import fields
from typing import Any

import torch
import torch.distributed as dist

from data.batch import PackedBatch

CPU = torch.device("cpu")


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _cuda_current() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device())


def group_device(group: dist.ProcessGroup | None = None) -> torch.device:
    """The device a collective over `group` (None: the default group) needs its tensors on: the current CUDA
    device for NCCL (also for a mixed "cpu:gloo,cuda:nccl" group, where CUDA is the fast path), else the CPU
    (gloo, the fake test group). Without a process group: the compute device."""
    if not _distributed():
        return compute_device()
    backend = str(dist.get_backend(group)).lower()
    return _cuda_current() if "nccl" in backend else CPU


def compute_device() -> torch.device:
    """The device this rank computes on: the default process group's device when one exists (NCCL ranks
    compute on their GPU, gloo ranks on the CPU), else the current CUDA device if there is one, else CPU."""
    if _distributed():
        return group_device(None)
    return _cuda_current() if torch.cuda.is_available() else CPU


def comm_tensor(data: Any, dtype: torch.dtype | None = None,
                group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """A new tensor from Python data (numbers, lists) on `group`'s device, ready for a collective."""
    return torch.tensor(data, dtype=dtype, device=group_device(group))


def comm_zeros(shape: tuple[int, ...] | int, dtype: torch.dtype,
               group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """A zero tensor on `group`'s device, ready for a collective (or to accumulate into first)."""
    return torch.zeros(shape, dtype=dtype, device=group_device(group))


def comm_empty(shape: tuple[int, ...] | int, dtype: torch.dtype,
               group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """An uninitialised tensor on `group`'s device to receive into (recv, all_gather outputs)."""
    return torch.empty(shape, dtype=dtype, device=group_device(group))


def on_group_device(tensor: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """`tensor` (contiguous) on `group`'s device: a no-op for activations and parameters that already live
    there, one copy for host-side bookkeeping tensors. Autograd flows through the copy."""
    target = group_device(group)
    if tensor.device != target:
        tensor = tensor.to(target)
    return tensor.contiguous()


def move_batch(batch: PackedBatch, device: torch.device | str | None = None) -> PackedBatch:
    """`batch` on `device` (default: the compute device). On CUDA the host tensors are pinned first and
    copied non-blocking (the stream orders the copy before the kernels that read it); tensors already on
    the device are left alone, so moving a moved batch costs nothing."""
    target = torch.device(device) if device is not None else compute_device()
    if target.type == "cuda" and target.index is None:
        target = _cuda_current()
    if all(getattr(batch, f.name).device == target for f in fields(batch) if torch.is_tensor(getattr(batch, f.name))):
        return batch
    if target.type != "cuda":
        return batch.to(target)
    pinned: dict[str, Any] = {}
    for f in fields(batch):
        value = getattr(batch, f.name)
        if torch.is_tensor(value) and value.device.type == "cpu" and not value.is_pinned():
            value = value.pin_memory()
        pinned[f.name] = value
    return PackedBatch(**pinned).to(target, non_blocking=True)
