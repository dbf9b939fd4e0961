"""Asynchronous saves, the backend side: a save is split into a snapshot (now, on the training thread) and a
write (later, on a background thread) so the step loop goes on while the files are written.

`Backend.save_async(directory)` does everything a save needs from the live training state and from the
other ranks now (the collectives of the backend's save planning, host-memory copies of every tensor) and
returns a `PendingWrite`: `write()` serialises the copies into this rank's files (no collectives, safe on a
thread) and returns them (paths, or WrittenFile when it hashed and fsync'ed them as it wrote: save_hashed); `finalize()` runs on the training thread on every rank once every rank's
write is complete (collective: e.g. dist_checkpointing's global metadata). train/checkpoint.py drives it:
fsync and checksums of the written files, meta.json, the rename and `latest`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from train.checkpoint_files import WrittenFile


def host_copy(value: Any, reuse: Any = None) -> Any:
    """A deep copy of nested dicts/lists/tuples in which every tensor is a host-memory tensor (a D2H copy on
    GPU, a clone on CPU): later optimizer steps cannot change it. `reuse` is an earlier copy of the same
    structure: its tensors of the same shape, dtype and strides are overwritten instead of allocated again
    (see SnapshotBuffers)."""
    if isinstance(value, torch.Tensor):
        return _tensor_copy(value.detach(), reuse)
    if isinstance(value, dict):
        out = value.copy()  # keeps the mapping's type (OrderedDict, defaultdict)
        earlier = reuse if isinstance(reuse, dict) else {}
        for key, item in value.items():
            out[key] = host_copy(item, earlier.get(key))
        return out
    if isinstance(value, (list, tuple)) and not hasattr(value, "_fields"):
        earlier = reuse if isinstance(reuse, type(value)) and len(reuse) == len(value) else [None] * len(value)
        return type(value)(host_copy(v, r) for v, r in zip(value, earlier))
    return value


def _tensor_copy(tensor: torch.Tensor, reuse: Any) -> torch.Tensor:
    if (isinstance(reuse, torch.Tensor) and reuse.shape == tensor.shape and reuse.dtype == tensor.dtype
            and reuse.stride() == tensor.stride() and reuse.device.type == "cpu"):
        return reuse.copy_(tensor)
    if tensor.device.type == "cuda":  # pinned host memory: the D2H copy runs at full PCIe speed
        return torch.empty_like(tensor, device="cpu", pin_memory=True).copy_(tensor)
    return tensor.to("cpu", copy=True)


class SnapshotBuffers:
    """Host buffers kept from one save to the next, by a name that is stable across saves (a file name).

    A fresh snapshot allocates its whole size again, and on Linux the first write of every new page faults:
    on a 268 MiB state that is most of the snapshot's time, all of it on the training thread. Refilling the
    previous snapshot's tensors costs only the copy. The price is host memory equal to one snapshot, held
    between saves (torch DCP's and megatron's async saves keep such a cache too). Safe because a save starts
    only after the previous one is written (Checkpointer.save waits for it)."""

    def __init__(self) -> None:
        self._kept: dict[str, Any] = {}

    def copy(self, name: str, value: Any) -> Any:
        """host_copy(value), into the buffers the previous snapshot of `name` left."""
        out = host_copy(value, self._kept.get(name))
        self._kept[name] = out
        return out


def _nothing() -> None:
    return None


@dataclass
class PendingWrite:
    """The second half of a save; see the module docstring."""

    write: Callable[[], list[Path | WrittenFile]]
    finalize: Callable[[], None] = field(default=_nothing)

    def complete(self) -> list[Path | WrittenFile]:
        """Write and finalize at once (a synchronous save); returns the files this rank wrote."""
        written = self.write()
        self.finalize()
        return written
