"""Weight sources over model directories on disk: native `final/` dirs and transformers (HF) dirs.

Both are safetensors files (`model.safetensors`, or shards named by `model.safetensors.index.json`). Opening
a directory reads only the headers and checks them up front (every shard the index names exists, no file is
shorter than its header says, the index and the headers agree), so a bad checkpoint fails with one line
naming the file and the tensor before any training step. A read then fetches only the bytes of the rows it
needs with positioned reads (no mmap: touched pages of a mapped file would stay in the process' memory),
in blocks, so reading a slice costs the slice plus one block.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch

from train.config.model import ModelConfig
from train.models.native_io import (EMBED, INDEX_FILE, LM_HEAD, NATIVE_CONFIG_FILE, SINGLE_FILE, CheckpointError,
                                    load_model_config_yaml)
from train.models.streaming_writer import SAFETENSORS_DTYPES
from train.models.hf import RENAME
from train.models.weight_source import Index, WeightSource, flat_range_by_rows, full_index, sliced_shape

READ_BLOCK_BYTES = 64 << 20  # rows are read in blocks of about this size



class StoredTensor:
    """One tensor of a safetensors file: `stored[index]` reads only the rows the index covers, `read_into`
    reads them straight into a caller's tensor."""

    def __init__(self, path: Path, name: str, dtype: torch.dtype, shape: tuple[int, ...], offset: int) -> None:
        self.path, self.name, self.dtype, self.shape, self.offset = path, name, dtype, shape, offset

    def __getitem__(self, index: Index | None) -> torch.Tensor:
        index = full_index(index, self.shape)
        out = torch.empty(sliced_shape(index), dtype=self.dtype)
        self.read_into(out, index)
        return out

    @torch.no_grad()
    def read_into(self, out: torch.Tensor, index: Index | None = None) -> None:
        """`self[index]` into `out` (its shape, any dtype). Whole rows into a contiguous `out` are one flat
        range (read_flat_into); a slice of the trailing dimensions goes through one block of rows at a time."""
        index = full_index(index, self.shape)
        if tuple(out.shape) != sliced_shape(index):
            raise ValueError(f"{self.path}: tensor {self.name!r}[{index}] has shape {list(sliced_shape(index))}, "
                             f"the destination {list(out.shape)}")
        if out.numel() == 0:
            return
        row = math.prod(self.shape[1:]) if self.shape else 1
        first = index[0].start if self.shape else 0
        if out.is_contiguous() and all(s.stop - s.start == d for s, d in zip(index[1:], self.shape[1:])):
            self.read_flat_into(first * row, out.view(-1))
            return
        rows = index[0]
        per_block = max(1, READ_BLOCK_BYTES // (row * self.dtype.itemsize))
        for start in range(rows.start, rows.stop, per_block):
            stop = min(rows.stop, start + per_block)
            block = torch.empty((stop - start) * row, dtype=self.dtype)
            self.read_flat_into(start * row, block)
            block = block.view(stop - start, *self.shape[1:])[(slice(None), *index[1:])]
            out[start - rows.start: stop - rows.start].copy_(block)

    @torch.no_grad()
    def read_flat_into(self, start: int, out: torch.Tensor) -> None:
        """Elements [start, start + out.numel()) of the flattened tensor into the 1-D `out`: positioned
        reads straight into out's memory when it is contiguous on the CPU in the stored dtype, else through
        one block (READ_BLOCK_BYTES) converted into it."""
        count = out.numel()
        if start < 0 or start + count > math.prod(self.shape):
            raise ValueError(f"{self.path}: tensor {self.name!r} has {math.prod(self.shape)} elements, asked for "
                             f"[{start}, {start + count})")
        direct = out.dtype == self.dtype and out.is_contiguous() and out.device.type == "cpu"
        per_block = max(1, READ_BLOCK_BYTES // self.dtype.itemsize)
        with open(self.path, "rb") as f:
            for done in range(0, count, per_block):
                size = min(per_block, count - done)
                target = out[done: done + size] if direct else torch.empty(size, dtype=self.dtype)
                self._pread(f.fileno(), start + done, target)
                if not direct:
                    out[done: done + size].copy_(target)

    def _pread(self, fd: int, element: int, target: torch.Tensor) -> None:
        """Fill the contiguous 1-D CPU tensor `target` with the stored elements from `element` on."""
        view = memoryview(target.view(torch.uint8).numpy()).cast("B")
        position, filled = self.offset + element * self.dtype.itemsize, 0
        while filled < len(view):
            got = os.preadv(fd, [view[filled:]], position + filled)
            if got == 0:
                raise CheckpointError(f"{self.path}: tensor {self.name!r} is cut short (file truncated)")
            filled += got


def read_header(path: Path) -> dict[str, StoredTensor]:
    """The tensors of one safetensors file from its header; CheckpointError (naming the file and, when it
    is one tensor's data that is missing, the tensor) for an unreadable header or a truncated file."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            length = int.from_bytes(f.read(8), "little")
            if length <= 0 or 8 + length > size:
                raise CheckpointError(f"{path}: not a safetensors file or truncated (header of {length} bytes, "
                                      f"file of {size})")
            header = json.loads(f.read(length))
    except (OSError, ValueError) as exc:
        if isinstance(exc, CheckpointError):
            raise
        raise CheckpointError(f"{path}: unreadable safetensors header ({exc})") from None
    tensors = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        dtype = SAFETENSORS_DTYPES.get(meta.get("dtype"))
        if dtype is None:
            raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype {meta.get('dtype')!r}")
        begin, end = meta["data_offsets"]
        shape = tuple(int(d) for d in meta["shape"])
        if end - begin != math.prod(shape) * dtype.itemsize:
            raise CheckpointError(f"{path}: tensor {name!r}: {end - begin} bytes for shape {list(shape)}")
        if 8 + length + end > size:
            raise CheckpointError(f"{path}: truncated: tensor {name!r} needs bytes up to {8 + length + end}, "
                                  f"the file has {size}")
        tensors[name] = StoredTensor(path, name, dtype, shape, 8 + length + begin)
    return tensors


def read_directory(directory: Path) -> dict[str, StoredTensor]:
    """Every stored tensor of a model directory (single file or index + shards), headers checked."""
    index_path, single = directory / INDEX_FILE, directory / SINGLE_FILE
    if not index_path.is_file():
        if not single.is_file():
            raise CheckpointError(f"{directory}: neither {SINGLE_FILE} nor {INDEX_FILE} found")
        return read_header(single)
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{index_path}: not a safetensors index with a 'weight_map' ({exc})") from None
    stored: dict[str, StoredTensor] = {}
    for shard in sorted(set(weight_map.values())):
        holding = sorted(k for k, v in weight_map.items() if v == shard)
        if not (directory / shard).is_file():
            raise CheckpointError(f"{index_path}: shard {shard!r} (holding {holding[0]!r}) does not exist")
        tensors = read_header(directory / shard)
        absent = [k for k in holding if k not in tensors]
        if absent:
            raise CheckpointError(f"{index_path}: maps {absent[0]!r} to {shard!r}, which does not contain it")
        stored.update({k: tensors[k] for k in holding})
    return stored


class SafetensorsSource:
    """A native model directory (`final/`, `train.convert hf-to-native`): native names, stored layouts."""

    def __init__(self, directory: str | Path, tied: bool) -> None:
        self.directory = Path(directory)
        self.stored = read_directory(self.directory)
        if tied and LM_HEAD not in self.stored and EMBED in self.stored:
            self.stored[LM_HEAD] = self.stored[EMBED]

    def names(self) -> set[str]:
        return set(self.stored)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.stored[name].shape

    def dtype(self, name: str) -> torch.dtype:
        return self.stored[name].dtype

    def read(self, name: str, index: Index | None = None) -> torch.Tensor:
        return self.stored[name][index]

    def read_into(self, name: str, out: torch.Tensor, index: Index | None = None) -> None:
        self.stored[name].read_into(out, index)

    def read_flat_into(self, name: str, start: int, out: torch.Tensor) -> None:
        self.stored[name].read_flat_into(start, out)

    def location(self, name: str) -> str:
        return str(self.stored[name].path)


class HFSource:
    """A transformers directory, read through the per-tensor HF -> native map of train/models/hf.py
    (renames, transformers-4 transposed experts, per-expert tensors), a slice at a time."""

    def __init__(self, directory: str | Path, cfg: ModelConfig, legacy_expert_layout: bool) -> None:
        from train.models.hf import hf_read_plan

        self.directory = Path(directory)
        self.stored = read_directory(self.directory)
        shapes = {name: tensor.shape for name, tensor in self.stored.items()}
        self.plan = hf_read_plan(cfg, shapes, str(self.directory), legacy_expert_layout)

    def names(self) -> set[str]:
        return set(self.plan)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.plan[name].shape)

    def dtype(self, name: str) -> torch.dtype:
        return self.stored[self.plan[name].hf_names[0]].dtype

    def read(self, name: str, index: Index | None = None) -> torch.Tensor:
        return self.plan[name].read(self.stored.__getitem__, index)

    def read_into(self, name: str, out: torch.Tensor, index: Index | None = None) -> None:
        """Renamed tensors straight from the file; re-laid-out experts through their slice."""
        stored = self._renamed(name)
        if stored is not None:
            stored.read_into(out, index)
        else:
            out.copy_(self.read(name, index))

    def read_flat_into(self, name: str, start: int, out: torch.Tensor) -> None:
        stored = self._renamed(name)
        if stored is not None:
            stored.read_flat_into(start, out)
        else:
            flat_range_by_rows(self, name, start, out)

    def _renamed(self, name: str) -> StoredTensor | None:
        """The stored tensor `name` is (same layout, another name), None for the expert re-layouts."""
        plan = self.plan[name]
        return self.stored[plan.hf_names[0]] if plan.layout == RENAME else None

    def location(self, name: str) -> str:
        return str(self.stored[self.plan[name].hf_names[0]].path)


def open_model_dir(path: str | Path) -> tuple[ModelConfig, WeightSource]:
    """(config, weight source) of a native (model_config.yaml) or HF (config.json) model directory; only
    headers are read."""
    from train.models.hf import HF_CONFIG_FILE, read_hf_config, written_by_transformers_4

    path = Path(path)
    if (path / NATIVE_CONFIG_FILE).is_file():
        cfg = load_model_config_yaml(path / NATIVE_CONFIG_FILE)
        return cfg, SafetensorsSource(path, cfg.text.tie_word_embeddings)
    if (path / HF_CONFIG_FILE).is_file():
        cfg, config = read_hf_config(path)
        return cfg, HFSource(path, cfg, written_by_transformers_4(config))
    raise CheckpointError(f"{path}: neither a native model dir ({NATIVE_CONFIG_FILE}) nor an HF one "
                          f"({HF_CONFIG_FILE})")
