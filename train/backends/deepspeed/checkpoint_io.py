"""What a DeepSpeed save writes, and a host-memory snapshot of it for writing in the background.

DeepSpeed routes every file of `engine.save_checkpoint` through `engine.checkpoint_engine.save(state, path)`
(torch.save in its TorchCheckpointEngine). `RecordingEngine` wraps that engine: instead of writing, it keeps
the path and a host-memory copy of each state dict, so the training step can go on while a writer thread
serialises the copies (train/backends/snapshot.py), and the checkpoint manifest knows which rank wrote which
file. Every DeepSpeed save logic (which rank writes which ZeRO
partition, the MoE files, the client state) stays DeepSpeed's own.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from train.backends.snapshot import SnapshotBuffers


class RecordingEngine:
    """Wraps DeepSpeed's checkpoint engine; see the module docstring."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.pending: list[tuple[Path, Any]] = []  # (path, host copy) of the save in progress
        self.deferred: list[Callable[[], None]] = []  # other file writes of the save, run by the writer
        self.buffers = SnapshotBuffers()  # by file name: the same files every save

    def defer(self, write: Callable[[], None]) -> None:
        """A write DeepSpeed makes outside the engine (rank 0's recovery scripts): done by the writer too,
        so a full disk fails it there, where every rank agrees on failures, not inside DeepSpeed's
        collective save on one rank only (which would leave the others waiting in its barrier)."""
        self.deferred.append(write)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def save(self, state_dict: Any, path: str) -> None:
        self.pending.append((Path(path), self.buffers.copy(Path(path).name, state_dict)))

    def take_pending(self) -> tuple[list[tuple[Path, Any]], list[Callable[[], None]]]:
        pending, deferred, self.pending, self.deferred = self.pending, self.deferred, [], []
        return pending, deferred
