"""Tensor parallelism of the reference vision tower (train/models/qwen3vl/vision.py) over megatron's TP group,
as Megatron-Bridge runs Qwen3-VL's ViT: in every ViT block the fused qkv and fc1 are column-parallel and proj
and fc2 row-parallel; in the 2x2 merger and the DeepStack mergers fc1 is column- and fc2 row-parallel. The
patch embedding, position table, LayerNorms and row-parallel biases stay replicated (small). No sequence
parallelism inside the ViT: every TP rank runs all patches, so the output is the same on every TP rank.

The ViT math stays the reference's: `parallelize_vision` only swaps the reference modules' nn.Linear layers
for `ColumnParallel` / `RowParallel` (same parameter names, this rank's slice of the weight) and gives the
attention its local head count. Their autograd collectives are megatron's: a column layer's input goes
through copy_to_tensor_model_parallel_region (backward: all-reduce of the input gradient), a row layer's
partial output through reduce_from_tensor_model_parallel_region (forward all-reduce, backward identity).

The fused qkv rows are (q, k, v) x heads: a rank holds its heads of each of q, k and v, [q_r; k_r; v_r],
so the reference's view(n, 3, heads, head_dim) works with the local head count. `vision_split(name)` is the
one table of which native vision tensor is split how; the weight map (weights.py), the dist-checkpoint
sharding (`vision_sharded_state_dict`) and the planner's accounting (launch/planner/model_stats.py) read it.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

COLUMN, ROW, QKV = "column", "row", "qkv"  # split kinds; QKV: column-parallel per head of each of q, k, v
_COLUMN_MODULES = ("attn.qkv", "mlp.linear_fc1", "linear_fc1")
_ROW_MODULES = ("attn.proj", "mlp.linear_fc2", "linear_fc2")


def _linear_kind(module: str) -> str | None:
    """COLUMN / ROW / QKV for a vision module name relative to the tower (`blocks.3.attn.qkv`), else None."""
    if module.startswith("patch_embed."):
        return None
    if module.endswith(".attn.qkv"):
        return QKV
    if module.endswith(_COLUMN_MODULES):
        return COLUMN
    if module.endswith(_ROW_MODULES):
        return ROW
    return None


def vision_split(name: str) -> tuple[str, int] | None:
    """How native vision tensor `name` (`visual.blocks.0.attn.qkv.weight`) is cut over TP: (kind, dim), or
    None when it is replicated (row-parallel biases, norms, patch embedding, position table)."""
    if not name.startswith("visual."):
        return None
    module, _, leaf = name[len("visual."):].rpartition(".")
    kind = _linear_kind(module)
    if kind is None or (kind == ROW and leaf == "bias"):
        return None
    return kind, 1 if kind == ROW else 0


def qkv_rows(total: int, size: int, rank: int) -> list[slice]:
    """Rows of the fused [q; k; v] (`total` rows) that TP rank `rank` of `size` holds: its heads of each."""
    third = total // 3
    piece = third // size
    return [slice(part * third + rank * piece, part * third + (rank + 1) * piece) for part in range(3)]


def merge_qkv_pieces(pieces: list[torch.Tensor]) -> torch.Tensor:
    """The TP ranks' [q_r; k_r; v_r] pieces (rank order) -> the full [q; k; v]."""
    parts = [piece.chunk(3, dim=0) for piece in pieces]
    return torch.cat([torch.cat([p[i] for p in parts]) for i in range(3)])


class _SplitLinear(nn.Module):
    """One rank's slice of a linear layer, under nn.Linear's parameter names."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight)
        self.bias = None if bias is None else nn.Parameter(bias)


class ColumnParallel(_SplitLinear):
    """y_r = x W_r^T + b_r: this rank's output features (no gather: the next layer is row-parallel, or the
    attention runs on the local heads)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from megatron.core import tensor_parallel

        return F.linear(tensor_parallel.copy_to_tensor_model_parallel_region(x), self.weight, self.bias)


class RowParallel(_SplitLinear):
    """y = sum_r x_r W_r^T + b: the partial products are all-reduced over TP before the (replicated) bias."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from megatron.core import tensor_parallel

        out = tensor_parallel.reduce_from_tensor_model_parallel_region(F.linear(x, self.weight))
        return out if self.bias is None else out + self.bias


def _split_linear(linear: nn.Linear, kind: str, size: int) -> nn.Module:
    """A parallel layer holding one rank's (uninitialised) slice of `linear`; megatron's TP attributes set
    (the optimizer's grad norm and DDP read them)."""
    from megatron.core.tensor_parallel import set_tensor_model_parallel_attributes

    out_features, in_features = linear.weight.shape
    like = dict(device=linear.weight.device, dtype=linear.weight.dtype)
    has_bias = linear.bias is not None
    if kind == ROW:
        layer = RowParallel(torch.empty(out_features, in_features // size, **like),
                            torch.empty(out_features, **like) if has_bias else None)
        set_tensor_model_parallel_attributes(layer.weight, True, 1, 1)
        return layer
    layer = ColumnParallel(torch.empty(out_features // size, in_features, **like),
                           torch.empty(out_features // size, **like) if has_bias else None)
    for param in layer.parameters():
        set_tensor_model_parallel_attributes(param, True, 0, 1)
    return layer


def check_vision_tp(vision_cfg: Any, size: int) -> list[str]:
    """Problems splitting this vision config over `size` TP ranks (empty: none)."""
    merged = vision_cfg.hidden_size * vision_cfg.spatial_merge_size ** 2
    dims = {"num_heads": vision_cfg.num_heads, "intermediate_size": vision_cfg.intermediate_size,
            "hidden_size * spatial_merge_size^2": merged}
    return [f"parallel.tp={size} must divide model.vision.{key}={value} (the ViT is tensor-parallel)"
            for key, value in dims.items() if value % size]


def parallelize_vision(tower: nn.Module, size: int) -> nn.Module:
    """Swap the tower's linear layers for their TP-parallel form in place (size 1: unchanged); parameters
    of the swapped layers are fresh and uninitialised (the caller fills them from a weight source)."""
    if size == 1:
        return tower
    problems = check_vision_tp(tower.cfg, size)
    if problems:
        raise ValueError("; ".join(problems))
    for name, module in list(tower.named_modules()):
        kind = _linear_kind(name)
        if kind is None or not isinstance(module, nn.Linear):
            continue
        parent_name, _, leaf = name.rpartition(".")
        setattr(tower.get_submodule(parent_name), leaf, _split_linear(module, ROW if kind == ROW else COLUMN, size))
    for block in tower.blocks:
        block.attn.num_heads //= size
    return tower


def vision_sharded_state_dict(tower: nn.Module, prefix: str, sharded_offsets: tuple = (),
                              metadata: dict | None = None) -> dict:
    """The tower's dist-checkpoint entries under global (layout-independent) shapes: split tensors as TP
    shards, the fused qkv as three shards per rank (its q, k and v heads, at their places in the full
    [q; k; v]), everything else replicated over TP."""
    from megatron.core import parallel_state as mpu
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory
    from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

    state = tower.state_dict(prefix="", keep_vars=True)
    axis_map = {}
    for key in state:
        split = vision_split("visual." + key)
        if split is not None:
            axis_map[key] = split[1]
    dp_cp = (metadata or {}).get("dp_cp_group") or mpu.get_data_parallel_group(with_context_parallel=True)
    out = make_sharded_tensors_for_checkpoint(state, prefix, axis_map, sharded_offsets,
                                              tp_group=mpu.get_tensor_model_parallel_group(), dp_cp_group=dp_cp)
    rank, size = mpu.get_tensor_model_parallel_rank(), mpu.get_tensor_model_parallel_world_size()
    prepend = len(sharded_offsets)
    for key in state:
        split = vision_split("visual." + key)
        if split is None or split[0] != QKV:
            continue
        original = out[prefix + key]

        def build(sh_key, tensor, replica_id, flattened_range=None):
            # Part p of rank r sits at chunk p * size + r of the full tensor cut in 3 * size row blocks.
            return [ShardedTensor.from_rank_offsets(sh_key, part, *sharded_offsets,
                                                    (prepend, index * size + rank, 3 * size),
                                                    replica_id=replica_id, prepend_axis_num=prepend)
                    for index, part in enumerate(tensor.chunk(3, dim=0))]

        out[prefix + key] = ShardedTensorFactory(original.key, original.data, build,
                                                 lambda parts: torch.cat(parts), original.replica_id)
    return out
