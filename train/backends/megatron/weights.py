"""Two-way weight map between native Qwen3-VL names (train/models/qwen3vl, = HF minus "model.") and the
megatron model of train/backends/megatron/model.py, including tensor- and expert-parallel shards.

Each megatron parameter has a `Rule`: which native tensors it is made of and how. The layouts that differ:
  linear_qkv   megatron fuses q/k/v per query group: for each of the ng groups, that group's
               np/ng query heads, then its key head, then its value head (rows). A TP shard is a contiguous
               block of whole groups, so sharding the fused tensor along dim 0 is exact.
  linear_fc1   SwiGLU gate and up stacked [gate; up]; a TP shard holds [gate_r; up_r] (each half split),
               not a contiguous block. The MoE experts' native gate_up_proj rows are the same [gate; up].
  experts      native stacks experts on dim 0 (experts.gate_up_proj [E, 2I, H], down_proj [E, H, I]);
               megatron holds `local_experts.{e}` for this EP rank's experts only.
  vision       same names as native; the ViT and mergers' linear layers are TP-split as
               train/backends/megatron/vision_tp.py `vision_split` says; the fused ViT qkv ("vit_qkv") holds
               the rank's heads of each of q, k and v, [q_r; k_r; v_r], not a contiguous block.
Everything else is a renamed tensor, split along its TP dim (row-parallel: 1, column/vocab-parallel: 0) or
replicated (norms, router, the rest of the vision tower).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.distributed as dist
from torch import nn

from train.config.model import ModelConfig
from train.device import comm_empty, on_group_device
from train.backends.megatron.vision_tp import QKV, merge_qkv_pieces, qkv_rows, vision_split
from train.models.materialize import fill
from train.models.weight_source import WeightSource

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
# local spec: one module per expert; TE spec with grouped GEMM (TEGroupedMLP): weight<e> per local expert
_EXPERT = re.compile(r"^mlp\.experts\.(?:local_experts\.(\d+)\.linear_fc([12])\.weight"
                     r"|linear_fc([12])\.weight(\d+))$")
# megatron layer-local name -> (native layer-local name, TP dim or None)
_LAYER_RENAMES = {
    "input_layernorm.weight": ("input_layernorm.weight", None),
    "pre_mlp_layernorm.weight": ("post_attention_layernorm.weight", None),
    "self_attention.q_layernorm.weight": ("self_attn.q_norm.weight", None),
    "self_attention.k_layernorm.weight": ("self_attn.k_norm.weight", None),
    "self_attention.linear_proj.weight": ("self_attn.o_proj.weight", 1),
    "self_attention.linear_proj.bias": ("self_attn.o_proj.bias", None),
    "mlp.linear_fc2.weight": ("mlp.down_proj.weight", 1),
    "mlp.router.weight": ("mlp.gate.weight", None),
    # Transformer Engine spec: the pre-attention / pre-MLP norms fused into the following linear layer
    "self_attention.linear_qkv.layer_norm_weight": ("input_layernorm.weight", None),
    "mlp.linear_fc1.layer_norm_weight": ("post_attention_layernorm.weight", None),
}


@dataclass(frozen=True)
class Rule:
    """How one megatron parameter is made of native tensors."""

    natives: tuple[str, ...]
    kind: str = "copy"  # copy | qkv (natives q, k, v) | glu (natives gate, up) | expert_glu | expert | vit_qkv
    tp_dim: int | None = None  # dim split over the (expert) tensor-parallel group; None: replicated
    expert: int | None = None  # global expert index (expert kinds)

    @property
    def is_expert(self) -> bool:
        return self.kind.startswith("expert")

    @property
    def is_glu(self) -> bool:
        return self.kind in ("glu", "expert_glu")


def rule_for(name: str, cfg: ModelConfig, layer_offset: int = 0, expert_offset: int = 0) -> Rule:
    """The rule of megatron parameter `name` (unwrapped model) on a stage whose first layer is global layer
    `layer_offset` and whose first local expert is global expert `expert_offset`."""
    if name.startswith("visual."):
        split = vision_split(name)
        if split is None:
            return Rule((name,))
        return Rule((name,), kind="vit_qkv" if split[0] == QKV else "copy", tp_dim=split[1])
    if name == "embedding.word_embeddings.weight":
        return Rule(("language_model.embed_tokens.weight",), tp_dim=0)
    if name == "output_layer.weight":
        return Rule(("lm_head.weight",), tp_dim=0)
    if name == "decoder.final_layernorm.weight":
        return Rule(("language_model.norm.weight",))
    match = _LAYER.match(name)
    if match is None:
        raise KeyError(f"megatron parameter {name!r} has no native counterpart")
    prefix = f"language_model.layers.{int(match.group(1)) + layer_offset}."
    local = match.group(2)
    if local in _LAYER_RENAMES:
        native, dim = _LAYER_RENAMES[local]
        return Rule((prefix + native,), tp_dim=dim)
    if local.startswith("self_attention.linear_qkv."):
        kind = local.rsplit(".", 1)[1]  # weight | bias
        return Rule(tuple(f"{prefix}self_attn.{p}_proj.{kind}" for p in "qkv"), kind="qkv", tp_dim=0)
    if local == "mlp.linear_fc1.weight":
        return Rule((prefix + "mlp.gate_proj.weight", prefix + "mlp.up_proj.weight"), kind="glu", tp_dim=0)
    expert = _EXPERT.match(local)
    if expert is not None:
        local_index, fc = (expert.group(1), expert.group(2)) if expert.group(1) is not None \
            else (expert.group(4), expert.group(3))
        index = int(local_index) + expert_offset
        if fc == "1":
            return Rule((prefix + "mlp.experts.gate_up_proj",), kind="expert_glu", tp_dim=0, expert=index)
        return Rule((prefix + "mlp.experts.down_proj",), kind="expert", tp_dim=1, expert=index)
    raise KeyError(f"megatron parameter {name!r} has no native counterpart")


# ------------------------------------------------------------------------------------ tensor layouts
def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cfg: ModelConfig,
             groups: int | None = None) -> torch.Tensor:
    """Native q/k/v projections (weights [heads*D, H] or biases [heads*D]) -> megatron's grouped layout.
    `groups`: how many query groups the rows hold (a TP shard: num_key_value_heads / tp)."""
    groups = groups or cfg.text.num_key_value_heads
    rest = q.shape[1:]
    parts = [t.reshape(groups, -1, *rest) for t in (q, k, v)]
    return torch.cat(parts, dim=1).reshape(-1, *rest)


def split_qkv(fused: torch.Tensor, cfg: ModelConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of fuse_qkv."""
    text = cfg.text
    groups, d = text.num_key_value_heads, text.head_dim
    per_group = text.num_attention_heads // groups * d
    rest = fused.shape[1:]
    q, k, v = fused.reshape(groups, per_group + 2 * d, *rest).split([per_group, d, d], dim=1)
    return q.reshape(-1, *rest), k.reshape(-1, *rest), v.reshape(-1, *rest)


def full_megatron_tensor(rule: Rule, state: dict[str, torch.Tensor], cfg: ModelConfig) -> torch.Tensor:
    """The unsharded megatron tensor of `rule` from a native state dict."""
    missing = [n for n in rule.natives if n not in state]
    if missing:
        raise KeyError(f"native state dict lacks {missing}")
    sources = [state[n] for n in rule.natives]
    if rule.kind == "qkv":
        return fuse_qkv(*sources, cfg)
    if rule.kind == "glu":
        return torch.cat(sources, dim=0)
    if rule.is_expert:
        return sources[0][rule.expert]
    return sources[0]


def shard(rule: Rule, full: torch.Tensor, rank: int, size: int) -> torch.Tensor:
    """This TP rank's slice of an unsharded megatron tensor."""
    if rule.tp_dim is None or size == 1:
        return full
    if rule.is_glu:  # [gate; up] -> [gate_r; up_r]
        return torch.cat([half.chunk(size, dim=0)[rank] for half in full.chunk(2, dim=0)], dim=0)
    if rule.kind == "vit_qkv":  # [q; k; v] -> [q_r; k_r; v_r]
        return torch.cat([full[rows] for rows in qkv_rows(full.shape[0], size, rank)])
    return full.chunk(size, dim=rule.tp_dim)[rank]


def unshard(rule: Rule, pieces: list[torch.Tensor]) -> torch.Tensor:
    """Inverse of shard: the TP ranks' slices (in rank order) -> the unsharded tensor."""
    if rule.tp_dim is None or len(pieces) == 1:
        return pieces[0]
    if rule.is_glu:
        halves = [p.chunk(2, dim=0) for p in pieces]
        return torch.cat([torch.cat([h[0] for h in halves]), torch.cat([h[1] for h in halves])], dim=0)
    if rule.kind == "vit_qkv":
        return merge_qkv_pieces(pieces)
    return torch.cat(pieces, dim=rule.tp_dim)


def native_tensors(rule: Rule, full: torch.Tensor, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Native name -> tensor for an unsharded megatron tensor (expert kinds: that expert's row, under the
    stacked tensor's name; `add_native` stacks them)."""
    if rule.kind == "qkv":
        return dict(zip(rule.natives, split_qkv(full, cfg)))
    if rule.kind == "glu":
        return dict(zip(rule.natives, full.chunk(2, dim=0)))
    return {rule.natives[0]: full}


# ------------------------------------------------------------------------------- whole models
@dataclass(frozen=True)
class ShardCoords:
    """Where this rank's parameters sit in the full model."""

    layer_offset: int = 0
    expert_offset: int = 0
    tp_rank: int = 0
    tp_size: int = 1
    expert_tp_rank: int = 0
    expert_tp_size: int = 1

    def tp(self, rule: Rule) -> tuple[int, int]:
        return (self.expert_tp_rank, self.expert_tp_size) if rule.is_expert else (self.tp_rank, self.tp_size)


def chunk_slice(length: int, size: int, rank: int) -> slice:
    """Rows of `rank`'s piece when `length` rows are cut in `size` pieces like torch.chunk."""
    piece = -(-length // size)
    return slice(min(length, rank * piece), min(length, (rank + 1) * piece))


def read_local(rule: Rule, source: WeightSource, cfg: ModelConfig, coords: ShardCoords) -> torch.Tensor:
    """This rank's megatron tensor of `rule`, assembled from only the native slices it is made of
    (equal to shard(rule, full_megatron_tensor(...)) without ever building the full tensor)."""
    rank, size = coords.tp(rule)
    if rule.tp_dim is None:
        size = 1
    text = cfg.text
    if rule.kind == "qkv":  # a TP shard is a contiguous block of whole query groups
        groups = chunk_slice(text.num_key_value_heads, size, rank)
        per_q = text.num_attention_heads // text.num_key_value_heads * text.head_dim
        d = text.head_dim
        q, k, v = (source.read(name, (slice(groups.start * rows, groups.stop * rows),))
                   for name, rows in zip(rule.natives, (per_q, d, d)))
        return fuse_qkv(q, k, v, cfg, groups=groups.stop - groups.start)
    if rule.kind == "glu":  # [gate_r; up_r]
        return torch.cat([source.read(name, (chunk_slice(source.shape(name)[0], size, rank),))
                          for name in rule.natives])
    name = rule.natives[0]
    shape = source.shape(name)
    if rule.kind == "vit_qkv":  # this rank's heads of each of q, k and v
        return torch.cat([source.read(name, (rows,)) for rows in qkv_rows(shape[0], size, rank)])
    if rule.kind == "expert_glu":  # rows [gate; up] of one expert, each half cut over expert-TP
        half = shape[1] // 2
        rows = chunk_slice(half, size, rank)
        expert = slice(rule.expert, rule.expert + 1)
        return torch.cat([source.read(name, (expert, slice(start + rows.start, start + rows.stop)))[0]
                          for start in (0, half)])
    if rule.is_expert:  # one expert's row of the stacked tensor, cut along its TP dim
        index = [slice(rule.expert, rule.expert + 1)] + [slice(None)] * (len(shape) - 1)
        index[rule.tp_dim + 1] = chunk_slice(shape[rule.tp_dim + 1], size, rank)
        return source.read(name, tuple(index))[0]
    index = [slice(None)] * len(shape)
    if rule.tp_dim is not None:
        index[rule.tp_dim] = chunk_slice(shape[rule.tp_dim], size, rank)
    return source.read(name, tuple(index))


def local_state(names: list[str], source: WeightSource, cfg: ModelConfig,
                coords: ShardCoords) -> dict[str, torch.Tensor]:
    """This rank's megatron tensors (by megatron name), read slice by slice from a native weight source."""
    return {name: read_local(rule_for(name, cfg, coords.layer_offset, coords.expert_offset), source, cfg, coords)
            for name in names}


def load_weights(model: nn.Module, source: WeightSource, cfg: ModelConfig, coords: ShardCoords) -> None:
    """Fill this rank's shard of `model` (the unwrapped megatron model) from a native weight source,
    reading only the slices it holds (peak: the shard plus the largest slice being converted)."""
    def reader(name: str):
        rule = rule_for(name, cfg, coords.layer_offset, coords.expert_offset)
        return lambda: read_local(rule, source, cfg, coords)
    # Largest first: a read's temporary slice then lands while few of the (lazily committed) parameters are
    # resident, so it does not add to the peak (the last stage's head slice, filled last in module order, did:
    # build peak 1.44 x shard at 2B TP2 x PP2).
    params = sorted(model.named_parameters(), key=lambda item: -item[1].numel())
    fill((name, param, reader(name)) for name, param in params)


def gather_tp(tensor: torch.Tensor, rule: Rule, size: int, group: dist.ProcessGroup | None) -> torch.Tensor:
    """All-gather one parameter's TP slices and unshard them (collective over `group`)."""
    if rule.tp_dim is None or size == 1:
        return tensor
    tensor = on_group_device(tensor, group).contiguous()
    # One buffer of the TP pieces stacked along dim 0: for a dim-0 split (the vocab-parallel embedding and
    # head, the largest tensors) it is already the full tensor, so no second full-size copy is made.
    gathered = tensor.new_empty((size * tensor.shape[0], *tensor.shape[1:]))
    dist.all_gather_into_tensor(gathered, tensor, group=group)
    if rule.tp_dim == 0 and not rule.is_glu and rule.kind != "vit_qkv":
        return gathered
    return unshard(rule, list(gathered.chunk(size)))


def add_tied_head(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Native state dicts of tied models carry the embedding under both names (like model.state_dict())."""
    if cfg.text.tie_word_embeddings and "language_model.embed_tokens.weight" in state:
        state["lm_head.weight"] = state["language_model.embed_tokens.weight"]
    return state


def shard_coords(model: nn.Module) -> ShardCoords:
    """This rank's coordinates from megatron's parallel state (the model's config and virtual pipeline stage
    give the layer offset)."""
    from megatron.core import parallel_state as mpu
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    config = model.config
    experts = config.num_moe_experts or 0
    return ShardCoords(
        layer_offset=get_transformer_layer_offset(config, vp_stage=getattr(model, "vp_stage", None)),
        expert_offset=mpu.get_expert_model_parallel_rank() * (experts // mpu.get_expert_model_parallel_world_size()),
        tp_rank=mpu.get_tensor_model_parallel_rank(), tp_size=mpu.get_tensor_model_parallel_world_size(),
        expert_tp_rank=mpu.get_expert_tensor_parallel_rank(),
        expert_tp_size=mpu.get_expert_tensor_parallel_world_size())


@dataclass(frozen=True)
class _Offer:
    """A megatron parameter (after the TP gather) that `rank` sends to the writer: its rule and full shape."""

    rank: int
    name: str
    rule: Rule
    shape: tuple[int, ...]
    dtype: torch.dtype


def _full_shape(param: torch.Tensor, rule: Rule, tp_size: int) -> tuple[int, ...]:
    shape = list(param.shape)
    if rule.tp_dim is not None:
        shape[rule.tp_dim] *= tp_size
    return tuple(shape)


def _units(offers: list[_Offer], cfg: ModelConfig) -> list[list[_Offer]]:
    """Offers grouped by the native tensors they make (all experts of a stacked tensor in one unit), in a
    deterministic order every rank computes alike. A tied `lm_head.weight` is not exported (not stored)."""
    units: dict[tuple[str, ...], dict[int | None, _Offer]] = {}
    for offer in offers:
        if cfg.text.tie_word_embeddings and offer.rule.natives == ("lm_head.weight",):
            continue
        units.setdefault(offer.rule.natives, {}).setdefault(offer.rule.expert, offer)
    return [list(by_expert.values()) for by_expert in units.values()]


@torch.no_grad()
def iter_native(model: nn.Module | list[nn.Module], cfg: ModelConfig,
                writer_rank: int = 0) -> Iterator[tuple[str, torch.Tensor]]:
    """(native name, full tensor) pairs of a TP/PP/EP-sharded megatron model (or this rank's list of virtual
    pipeline chunks), one native tensor at a time, on `writer_rank` (nothing elsewhere). Collective over the
    world: every rank iterates to the end.

    Each unit (the native tensors one megatron parameter makes; for experts, all of a layer's experts) is
    TP-gathered by the replica that owns it (data/context-parallel rank 0, expert-data-parallel rank 0 for
    experts), sent point to point by its TP rank 0, converted on the writer, yielded, and followed by a
    world barrier: no rank ever waits longer than one unit's gather + write, so long exports stay within
    the process-group timeout. The writer holds at most one unit (experts: one stacked tensor) at a time.
    """
    from megatron.core import parallel_state as mpu

    chunks = model if isinstance(model, list) else [model]
    coords, rank = shard_coords(chunks[0]), dist.get_rank()  # TP coordinates: the same for every chunk
    owner = {False: mpu.get_data_parallel_rank(with_context_parallel=True) == 0,
             True: mpu.get_expert_data_parallel_rank() == 0}
    groups = {False: (coords.tp_size, mpu.get_tensor_model_parallel_group()),
              True: (coords.expert_tp_size, mpu.get_expert_tensor_parallel_group())}
    params: dict[tuple, tuple[str, torch.Tensor, Rule]] = {}  # (natives, expert) -> this rank's parameter
    for chunk in chunks:
        offsets = shard_coords(chunk)
        for name, param in chunk.named_parameters():
            rule = rule_for(name, cfg, offsets.layer_offset, offsets.expert_offset)
            params[(rule.natives, rule.expert)] = (name, param, rule)
    mine = [_Offer(rank, name, rule, _full_shape(param, rule, coords.tp(rule)[1]), param.dtype)
            for name, param, rule in params.values() if owner[rule.is_expert] and coords.tp(rule)[0] == 0]
    everyone: list[list[_Offer]] = [[] for _ in range(dist.get_world_size())]
    dist.all_gather_object(everyone, mine)
    for unit in _units([offer for offers in everyone for offer in offers], cfg):
        natives: dict[str, torch.Tensor] = {}
        for offer in unit:
            full = None
            local = params.get((offer.rule.natives, offer.rule.expert))
            if local is not None and owner[offer.rule.is_expert]:  # this rank's TP group holds the piece
                size, group = groups[offer.rule.is_expert]
                full = gather_tp(local[1].detach(), offer.rule, size, group)
            if offer.rank != writer_rank and rank == offer.rank:
                dist.send(on_group_device(full), dst=writer_rank)
            elif offer.rank != writer_rank and rank == writer_rank:
                received = comm_empty(offer.shape, offer.dtype)
                dist.recv(received, src=offer.rank)
                full = received
            if rank == writer_rank:
                add_native(natives, offer.rule, full, cfg)
        yield from natives.items()
        dist.barrier()


def add_native(natives: dict[str, torch.Tensor], rule: Rule, full: torch.Tensor, cfg: ModelConfig) -> None:
    """Convert one full megatron tensor; expert rows go into their stacked native tensor (allocated once)."""
    for name, tensor in native_tensors(rule, full, cfg).items():
        tensor = tensor.cpu()
        if rule.expert is None:
            natives[name] = tensor
            continue
        if name not in natives:
            natives[name] = torch.empty((cfg.text.num_experts, *tensor.shape), dtype=tensor.dtype)
        natives[name][rule.expert] = tensor


def export_native(model: nn.Module | list[nn.Module], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """The full native state dict (fp32, CPU) on global rank 0, {} elsewhere (collective). Small models
    and tests only: it holds everything; exports stream `iter_native` instead."""
    state = {name: tensor.float().clone() for name, tensor in iter_native(model, cfg)}
    return add_tied_head(state, cfg) if state else state
