"""Asynchronous saves, the backend side: a save is split into a snapshot (now, on the training thread) and a
write (later, on a background thread) so the step loop goes on while the files are written.

`Backend.save_async(directory)` does everything a save needs from the live training state and from the
other ranks now (the collectives of the backend's save planning, host-memory copies of every tensor) and
returns a `PendingWrite`: `write()` serialises the copies into this rank's files (no collectives, safe on a
thread) and returns their paths; `finalize()` runs on the training thread on every rank once every rank's
write is complete (collective: e.g. dist_checkpointing's global metadata). train/checkpoint.py drives it:
fsync and checksums of the written files, meta.json, the rename and `latest`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch


def host_copy(value: Any) -> Any:
    """A deep copy of nested dicts/lists/tuples in which every tensor is a fresh host-memory tensor (a D2H copy
    on GPU, a clone on CPU): later optimizer steps cannot change it."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        out = value.copy()  # keeps the mapping's type (OrderedDict, defaultdict)
        for key, item in value.items():
            out[key] = host_copy(item)
        return out
    if isinstance(value, list):
        return [host_copy(v) for v in value]
    if isinstance(value, tuple) and not hasattr(value, "_fields"):
        return tuple(host_copy(v) for v in value)
    return value


def _nothing() -> None:
    return None


@dataclass
class PendingWrite:
    """The second half of a save; see the module docstring."""

    write: Callable[[], list[Path]]
    finalize: Callable[[], None] = field(default=_nothing)

    def complete(self) -> list[Path]:
        """Write and finalize at once (a synchronous save); returns the files this rank wrote."""
        written = self.write()
        self.finalize()
        return written
