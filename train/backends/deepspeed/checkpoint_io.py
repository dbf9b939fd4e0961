"""What a DeepSpeed save writes, and a host-memory snapshot of it for writing in the background.

DeepSpeed routes every file of `engine.save_checkpoint` through `engine.checkpoint_engine.save(state, path)`
(torch.save in its TorchCheckpointEngine). `RecordingEngine` wraps that engine: it records the paths this
rank writes (so the checkpoint manifest knows which rank owns which file) and, in snapshot mode, keeps a
detached copy of each state dict instead of writing it, so the training step can go on while a writer thread
serialises the copies (train/checkpoint.py). Every DeepSpeed save logic (which rank writes which ZeRO
partition, the MoE files, the client state) stays DeepSpeed's own.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch


def host_copy(value: Any) -> Any:
    """A deep copy of nested dicts/lists/tuples in which every tensor is a fresh host-memory tensor: later
    optimizer steps cannot change it."""
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


class RecordingEngine:
    """Wraps DeepSpeed's checkpoint engine; see the module docstring."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.snapshot = False
        self.written: list[Path] = []
        self.pending: list[tuple[Path, Any]] = []  # (path, host copy) captured in snapshot mode

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def begin(self, snapshot: bool) -> None:
        self.snapshot, self.written, self.pending = snapshot, [], []

    def save(self, state_dict: Any, path: str) -> None:
        if self.snapshot:
            self.pending.append((Path(path), host_copy(state_dict)))
        else:
            self.inner.save(state_dict, path)
        self.written.append(Path(path))

    def take_pending(self) -> list[tuple[Path, Any]]:
        pending, self.pending = self.pending, []
        return pending
