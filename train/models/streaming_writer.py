"""Sharded safetensors written one tensor at a time, without holding the model.

The names, shapes and dtypes of everything to be written are known before any tensor exists (from the model
config), so the shard plan and every file's header are fixed up front: each file is created at its final
size with its header, and a tensor's bytes go straight to its offset (`os.pwrite`) whenever it arrives, in
any order. A shard is fsync-ed as soon as its last tensor is in, so the work is spread over the export (no
long flush at the end while other ranks wait). Files: `model.safetensors` when everything fits in one shard,
else `model-0000i-of-0000n.safetensors` + `model.safetensors.index.json` (transformers' layout).
"""
from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping

import torch

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
_HEADER_ALIGN = 8
# safetensors' dtype codes
_CODES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
          torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
          torch.bool: "BOOL"}
SAFETENSORS_DTYPES = {code: dtype for dtype, code in _CODES.items()}  # header code -> torch dtype


@dataclass(frozen=True)
class TensorSpec:
    """What will be written under one name."""

    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        numel = 1
        for size in self.shape:
            numel *= size
        return numel * torch.empty((), dtype=self.dtype).element_size()


def plan_shards(specs: Mapping[str, TensorSpec], max_bytes: int) -> list[list[str]]:
    """Greedy in the given order; a tensor larger than the limit gets a shard of its own."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, spec in specs.items():
        if shards[-1] and size + spec.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += spec.nbytes
    return shards


class _Shard:
    def __init__(self, path: Path, names: list[str], specs: Mapping[str, TensorSpec]):
        self.path, self.pending = path, set(names)
        header: dict = {"__metadata__": {"format": "pt"}}
        self.offsets: dict[str, int] = {}
        offset = 0
        for name in names:
            spec = specs[name]
            header[name] = {"dtype": _CODES[spec.dtype], "shape": list(spec.shape),
                            "data_offsets": [offset, offset + spec.nbytes]}
            self.offsets[name] = offset
            offset += spec.nbytes
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % _HEADER_ALIGN)
        self.data_start = 8 + len(encoded)
        with open(path, "wb") as f:
            f.write(struct.pack("<Q", len(encoded)) + encoded)
            f.truncate(self.data_start + offset)

    def write(self, name: str, data: torch.Tensor) -> None:
        raw = data.reshape(-1).view(torch.uint8).numpy()
        fd = os.open(self.path, os.O_WRONLY)
        try:
            position, view = self.data_start + self.offsets[name], memoryview(raw)
            while view.nbytes:  # pwrite may write less than asked (large buffers)
                written = os.pwrite(fd, view, position)
                view, position = view[written:], position + written
            self.pending.discard(name)
            if not self.pending:
                os.fsync(fd)
        finally:
            os.close(fd)


class StreamingSafetensorsWriter:
    """Write the tensors of `specs` (name -> TensorSpec, in file order) into `directory`, one at a time.

    `write(name, tensor)` casts floating tensors to the spec's dtype and checks the shape; `finish()` refuses
    a missing tensor, writes the index and returns the file names. Little-endian hosts (safetensors' order).
    """

    def __init__(self, directory: str | Path, specs: Mapping[str, TensorSpec], max_shard_bytes: int):
        self.directory, self.specs = Path(directory), dict(specs)
        shards = plan_shards(self.specs, max_shard_bytes)
        if len(shards) == 1:
            self.files = [SINGLE_FILE]
        else:
            self.files = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
        self.shard_of: dict[str, _Shard] = {}
        for file, names in zip(self.files, shards):
            shard = _Shard(self.directory / file, names, self.specs)
            self.shard_of.update({name: shard for name in names})
        self.written: set[str] = set()

    def write(self, name: str, tensor: torch.Tensor) -> None:
        spec = self.specs.get(name)
        if spec is None:
            raise KeyError(f"{self.directory}: {name!r} is not among the tensors planned for this export")
        if name in self.written:
            raise KeyError(f"{self.directory}: {name!r} written twice")
        if tuple(tensor.shape) != spec.shape:
            raise ValueError(f"{self.directory}: {name!r} has shape {list(tensor.shape)}, planned "
                             f"{list(spec.shape)}")
        if tensor.dtype != spec.dtype and (tensor.is_floating_point() or spec.dtype.is_floating_point):
            tensor = tensor.to(spec.dtype)
        self.shard_of[name].write(name, tensor.detach().cpu().contiguous())
        self.written.add(name)

    def finish(self) -> list[str]:
        missing = [name for name in self.specs if name not in self.written]
        if missing:
            raise KeyError(f"{self.directory}: {len(missing)} planned tensor(s) never written, first "
                           f"{missing[0]!r}")
        if len(self.files) == 1:
            return list(self.files)
        weight_map = {name: shard.path.name for name, shard in self.shard_of.items()}
        index = {"metadata": {"total_size": sum(s.nbytes for s in self.specs.values())},
                 "weight_map": dict(sorted(weight_map.items()))}
        path = self.directory / INDEX_FILE
        path.write_text(json.dumps(index, indent=2) + "\n")
        with open(path, "rb+") as f:
            os.fsync(f.fileno())
        return self.files + [INDEX_FILE]


def write_tensors(directory: str | Path, specs: Mapping[str, TensorSpec],
                  tensors: Iterable[tuple[str, torch.Tensor]], max_shard_bytes: int) -> list[str]:
    """Stream `tensors` (any order, each once) into the files planned for `specs`."""
    writer = StreamingSafetensorsWriter(directory, specs, max_shard_bytes)
    for name, tensor in tensors:
        writer.write(name, tensor)
    return writer.finish()
