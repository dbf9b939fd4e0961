"""A megatron-core dist checkpoint (what train/backends/megatron/checkpoint.py saves) read as native tensors,
one at a time, on one process: `train.convert megatron-to-hf` streams it into an HF directory.

megatron-core 0.16 saves with its torch_dist backend: torch.distributed.checkpoint files (`__R_I.distcp`,
`.metadata`) holding every ShardedTensor under its global key and global shape, whatever the saving layout:
  - TP shards are assembled (fused qkv in megatron's grouped layout, SwiGLU fc1 as [gate; up]);
  - decoder layers: `decoder.layers.<name>` with a leading axis over the global layers (homogeneous
    blocks), or `decoder.layers.<global index>.<name>` (non-homogeneous ones);
  - experts: `...mlp.experts.experts.<name>` with an axis over the global experts after the layer axis
    (or `...experts.experts.<global expert>.<name>` with singleton local shards);
  - a layer spec's sharded_state_dict_keys_map renames some keys (the local spec stores its norms as
    `self_attention.linear_qkv.layer_norm_weight` / `mlp.linear_fc1.layer_norm_weight`, like TE).
Each piece is read alone (a one-chunk load plan over the requested slice), turned into native tensors by
the weight map's rules (weights.py), and a layer's experts are stacked into one tensor: the memory bound is
the largest native tensor, as for a live export.
"""
from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint import load as dcp_load
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorStorageMetadata
from torch.distributed.checkpoint.planner import LoadPlan
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

from train.backends.megatron.weights import Rule, add_native, rule_for
from train.config.model import ModelConfig
from train.models.native_io import LM_HEAD, CheckpointError, expected_native_shapes

_LAYERS = "decoder.layers."
_INDEXED = re.compile(r"^(\d+)\.(.+)$")
_EXPERTS = re.compile(r"^mlp\.experts\.experts\.(?:(\d+)\.)?(linear_fc[12]\.weight)$")


@dataclass(frozen=True)
class Piece:
    """One megatron parameter of the unsharded model: where it lies in the checkpoint and its rule."""

    key: str
    index: tuple[int, ...]  # leading (layer, expert) axes of the stored tensor this piece is at
    rule: Rule


class _SliceLoadPlanner(DefaultLoadPlanner):
    """Loads one chunk (offsets, sizes) of one stored tensor into a tensor of exactly that chunk's shape."""

    def __init__(self, key: str, chunk: ChunkStorageMetadata):
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
        self.key, self.chunk = key, chunk

    def create_local_plan(self) -> LoadPlan:
        metadata = self.metadata.state_dict_metadata[self.key]
        return LoadPlan(create_read_items_for_chunk_list(self.key, metadata, [self.chunk]))

    def lookup_tensor(self, index: MetadataIndex) -> torch.Tensor:
        return self.state_dict[index.fqn]  # the plain tensor is the chunk (read items are relative to it)


class MegatronDistCheckpoint:
    """The model part of a megatron dist checkpoint directory (the one holding `.metadata`), for `cfg`."""

    def __init__(self, directory: str | Path, cfg: ModelConfig):
        self.directory, self.cfg = Path(directory), cfg
        if not (self.directory / ".metadata").is_file():
            raise CheckpointError(f"{self.directory}: no .metadata (not a megatron torch_dist checkpoint dir)")
        self.reader = FileSystemReader(str(self.directory))
        self.stored = {k: v for k, v in self.reader.read_metadata().state_dict_metadata.items()
                       if isinstance(v, TensorStorageMetadata)}
        self.units = self._plan()

    def _plan(self) -> list[list[Piece]]:
        from train.backends.megatron.model import decoder_layer_spec

        units: dict[tuple[str, ...], list[Piece]] = {}
        key_maps = {}
        for key, meta in self.stored.items():
            for name, index in self._megatron_names(key, tuple(meta.size), key_maps, decoder_layer_spec):
                try:
                    rule = rule_for(name, self.cfg)
                except KeyError:
                    raise CheckpointError(f"{self.directory}: tensor {key!r} ({name}) is not part of the "
                                          f"model {self.cfg.name!r}") from None
                if not (rule.natives == (LM_HEAD,) and self.cfg.text.tie_word_embeddings):
                    units.setdefault(rule.natives, []).append(Piece(key, index, rule))
        have = {native for natives in units for native in natives}
        for native, shape in expected_native_shapes(self.cfg).items():
            if native not in have and not (native == LM_HEAD and self.cfg.text.tie_word_embeddings):
                raise CheckpointError(f"{self.directory}: no tensor for {native!r} (shape {list(shape)}): a "
                                      f"checkpoint of another model?")
        return list(units.values())

    def _megatron_names(self, key: str, size: tuple[int, ...], key_maps: dict,
                        layer_spec) -> Iterator[tuple[str, tuple[int, ...]]]:
        """(megatron parameter name of the unsharded model, leading index) for every piece of `key`."""
        if not key.startswith(_LAYERS):
            if key.endswith("._extra_state") or "._extra_state/" in key:
                return
            yield key, ()
            return
        rest = key[len(_LAYERS):]
        indexed = _INDEXED.match(rest)
        layers = [int(indexed.group(1))] if indexed else list(range(size[0]))
        local = indexed.group(2) if indexed else rest
        for layer in layers:
            if layer not in key_maps:
                key_maps[layer] = dict(layer_spec(self.cfg, layer).submodules.sharded_state_dict_keys_map or {})
            lead = () if indexed else (layer,)
            expert = _EXPERTS.match(local)
            if expert is not None:
                experts = [int(expert.group(1))] if expert.group(1) else list(range(size[len(lead)]))
                for e in experts:
                    name = f"{_LAYERS}{layer}.mlp.experts.local_experts.{e}.{expert.group(2)}"
                    yield name, lead + (() if expert.group(1) else (e,))
                continue
            yield f"{_LAYERS}{layer}.{_unmap(local, key_maps[layer])}", lead

    def dtype(self) -> torch.dtype:
        """The stored floating dtype (megatron saves every parameter in the model's params_dtype)."""
        return next(m.properties.dtype for m in self.stored.values() if m.properties.dtype.is_floating_point)

    def read(self, piece: Piece) -> torch.Tensor:
        """The unsharded megatron tensor of one piece (only its slice of the stored tensor is read)."""
        meta = self.stored[piece.key]
        size = tuple(meta.size)
        lead = len(piece.index)
        chunk = ChunkStorageMetadata(offsets=torch.Size(piece.index + (0,) * (len(size) - lead)),
                                     sizes=torch.Size((1,) * lead + size[lead:]))
        out = torch.empty(tuple(chunk.sizes), dtype=meta.properties.dtype)
        with warnings.catch_warnings():  # "torch.distributed is disabled ...": one process is the intent
            warnings.simplefilter("ignore", UserWarning)
            dcp_load({piece.key: out}, storage_reader=self.reader, planner=_SliceLoadPlanner(piece.key, chunk),
                     no_dist=True)
        return out.reshape(size[lead:])

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(native name, full tensor), one native unit at a time (a layer's experts stacked)."""
        for unit in self.units:
            natives: dict[str, torch.Tensor] = {}
            for piece in unit:
                add_native(natives, piece.rule, self.read(piece), self.cfg)
            yield from natives.items()


def _unmap(local: str, key_map: dict[str, str]) -> str:
    """The module's own name of a layer-local checkpoint name (inverse of sharded_state_dict_keys_map)."""
    for own, stored in key_map.items():
        if local.startswith(stored):
            return own + local[len(stored):]
    return local
