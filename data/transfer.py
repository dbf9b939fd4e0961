"""How a packed batch crosses from a loader worker process to the trainer process.

torch's DataLoader sends every tensor a worker returns through shared memory: one file descriptor per tensor
storage, each handed over on its own socket connection with an authentication handshake. A packed batch
holds 6-10 tensors, most of a few KiB, so on small models the handshakes cost more than the batch: 18-26% of
a needle-miniature training step was spent receiving batches (profiled with cProfile; bench/step_overhead.py
measures the transfer alone). `ByValue` makes the batch pickle its small tensors as bytes inside the one
message that carries it; tensors of at least `by_value_bytes` (the pixels of a long video) keep the
shared-memory path, where copying them through the pipe would cost more than the handshake.
"""
from __future__ import annotations

from dataclasses import fields
from typing import Any

import torch

from data.batch import PackedBatch

BY_VALUE_BYTES = 1 << 20  # below 1 MiB a copy through the worker's pipe is cheaper than a descriptor handshake


class ByValue:
    """A PackedBatch on its way out of a worker: pickles tensors under `by_value_bytes` by value."""

    def __init__(self, batch: PackedBatch, by_value_bytes: int = BY_VALUE_BYTES) -> None:
        self.batch, self.by_value_bytes = batch, by_value_bytes

    def __reduce__(self) -> tuple[Any, tuple[dict[str, Any]]]:
        parts = {}
        for f in fields(self.batch):
            value = getattr(self.batch, f.name)
            small = torch.is_tensor(value) and value.numel() * value.element_size() < self.by_value_bytes
            parts[f.name] = _TensorBytes.of(value) if small else value
        return _rebuild_batch, (parts,)


class _TensorBytes:
    """A tensor's dtype, shape and raw bytes (pickled as ordinary bytes, never through shared memory)."""

    def __init__(self, dtype: torch.dtype, shape: tuple[int, ...], raw: bytes) -> None:
        self.dtype, self.shape, self.raw = dtype, shape, raw

    @classmethod
    def of(cls, tensor: torch.Tensor) -> "_TensorBytes":
        flat = tensor.detach().contiguous().reshape(-1)
        return cls(tensor.dtype, tuple(tensor.shape), flat.view(torch.uint8).numpy().tobytes())

    def tensor(self) -> torch.Tensor:
        if not self.raw:
            return torch.empty(self.shape, dtype=self.dtype)
        return torch.frombuffer(bytearray(self.raw), dtype=self.dtype).reshape(self.shape)


def _rebuild_batch(parts: dict[str, Any]) -> PackedBatch:
    return PackedBatch(**{k: v.tensor() if isinstance(v, _TensorBytes) else v for k, v in parts.items()})
