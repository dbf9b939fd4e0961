"""The Qwen3-VL vision tower: SigLIP-2 style ViT, 2x2 patch merger and DeepStack mergers.

Input is transformers' layout: `pixel_values` [P, C*T*ps*ps], patches of all images/videos concatenated,
each item's patches in 2x2 merge-block order (the image processor emits them that way), and `grid_thw`
[items, 3] in patch units. Each frame attends only to itself (cu_seqlens per frame, non-causal), as in HF.
Parameter names match HF's Qwen3VLVisionModel (`patch_embed.proj`, `pos_embed`, `blocks.{i}.attn.qkv`,
`merger.linear_fc1`, `deepstack_merger_list.{j}.norm`, ...).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from data.vision import normalize_pixels
from train.config.model import VisionConfig
from train.models.qwen3vl.attention import PackedAttention
from train.models.qwen3vl.common import activation, maybe_checkpoint
from train.models.qwen3vl.rope import apply_rotary, vision_rope_cos_sin


def _grid_items(grid_thw: torch.Tensor) -> list[tuple[int, int, int]]:
    return [(int(t), int(h), int(w)) for t, h, w in grid_thw.tolist()]


def _merge_block_order(x: torch.Tensor, merge: int) -> torch.Tensor:
    """[h, w, ...] raster layout -> [h*w, ...] in 2x2 (merge x merge) block order, the pixel_values order."""
    h, w = x.shape[:2]
    x = x.reshape(h // merge, merge, w // merge, merge, *x.shape[2:])
    return x.transpose(1, 2).reshape(h * w, *x.shape[4:])


def patch_hw_positions(grid_thw: torch.Tensor, merge: int) -> torch.Tensor:
    """(row, col) of every patch [P, 2], in pixel_values order; frames of a video repeat the same grid."""
    out = []
    for t, h, w in _grid_items(grid_thw):
        rows = torch.arange(h)[:, None].expand(h, w)
        cols = torch.arange(w)[None, :].expand(h, w)
        out.append(_merge_block_order(torch.stack([rows, cols], dim=-1), merge).repeat(t, 1))
    return torch.cat(out).to(grid_thw.device)


def _axis_taps(size: int, side: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Bilinear taps (align_corners=True) from a `side`-long table onto `size` points: index and weight
    [size, 2]. Same arithmetic as HF (fp32 source coordinate, clamped taps, hat weights)."""
    src = torch.arange(size, dtype=torch.float32) * (side - 1) / max(size - 1, 1)
    floor = torch.floor(src)
    taps = floor.long()[:, None] + torch.arange(2)
    weights = (1 - (src[:, None] - taps.float()).abs()).clamp(min=0)
    return taps.clamp(0, side - 1), weights


def position_interpolation(grid_thw: torch.Tensor, side: int, merge: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices [P, 4] into the flattened side x side position table and bilinear weights [P, 4] that resample
    it to each item's grid, in pixel_values order."""
    indices, weights = [], []
    for t, h, w in _grid_items(grid_thw):
        row_idx, row_w = _axis_taps(h, side)
        col_idx, col_w = _axis_taps(w, side)
        idx = (row_idx[:, None, :, None] * side + col_idx[None, :, None, :]).reshape(h, w, 4)
        wt = (row_w[:, None, :, None] * col_w[None, :, None, :]).reshape(h, w, 4)
        indices.append(_merge_block_order(idx, merge).repeat(t, 1))
        weights.append(_merge_block_order(wt, merge).repeat(t, 1))
    return torch.cat(indices).to(grid_thw.device), torch.cat(weights).to(grid_thw.device)


def frame_cu_seqlens(grid_thw: torch.Tensor) -> torch.Tensor:
    """Attention segments of the ViT: one per frame (h*w patches), as HF does."""
    per_frame = torch.repeat_interleave(grid_thw[:, 1] * grid_thw[:, 2], grid_thw[:, 0])
    return F.pad(per_frame.cumsum(0, dtype=torch.int32), (1, 0))


class PatchEmbed(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        kernel = (cfg.temporal_patch_size, cfg.patch_size, cfg.patch_size)
        self.proj = nn.Conv3d(cfg.in_channels, cfg.hidden_size, kernel_size=kernel, stride=kernel, bias=True)
        self.image_mean, self.image_std = list(cfg.image_mean), list(cfg.image_std)

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """The tower's first op: uint8 pixels (the compact form the data workers send) are normalised here, on
        the device, by the data pipeline's own function (bit-identical fp32 to normalising in the worker);
        floating-point pixels are already normalised (fp32 data path, HF processor output)."""
        if pixels.is_floating_point():
            return pixels
        return normalize_pixels(pixels, self.image_mean, self.image_std)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        pixels = self.normalize(pixels)
        # A Conv3d whose kernel covers the whole patch is a matmul with the flattened kernel; F.linear skips
        # the conv machinery (and its im2col copy) and gives the same result.
        weight = self.proj.weight.flatten(1)
        return F.linear(pixels.to(weight.dtype), weight, self.proj.bias)


class VisionAttention(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.num_heads, self.head_dim = cfg.num_heads, cfg.hidden_size // cfg.num_heads
        self.qkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size, bias=True)
        self.proj = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=True)
        self.core_attention: nn.Module = PackedAttention()

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                cu_seqlens: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        q, k, v = self.qkv(x).view(n, 3, self.num_heads, self.head_dim).unbind(1)
        cos, sin = rope
        # Rotate in fp32 like HF, then back to the compute dtype.
        q = apply_rotary(q.float(), cos, sin).to(v.dtype)
        k = apply_rotary(k.float(), cos, sin).to(v.dtype)
        out = self.core_attention(q, k, v, cu_seqlens, False)
        return self.proj(out.reshape(n, -1))


class VisionMLP(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.linear_fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=True)
        self.linear_fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=True)
        self.act = activation(cfg.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_fc2(self.act(self.linear_fc1(x)))


class VisionBlock(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.attn = VisionAttention(cfg)
        self.mlp = VisionMLP(cfg)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                cu_seqlens: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), rope, cu_seqlens)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nn.Module):
    """Concatenates each 2x2 block of patches (consecutive in pixel_values order) and maps it to one LLM
    token with a 2-layer MLP. The main merger normalises patches before the concat; DeepStack mergers
    normalise the concatenated vector (post-shuffle norm)."""

    def __init__(self, cfg: VisionConfig, out_size: int, postshuffle_norm: bool) -> None:
        super().__init__()
        self.merged_size = cfg.hidden_size * cfg.spatial_merge_size ** 2
        self.postshuffle_norm = postshuffle_norm
        self.norm = nn.LayerNorm(self.merged_size if postshuffle_norm else cfg.hidden_size, eps=1e-6)
        self.linear_fc1 = nn.Linear(self.merged_size, self.merged_size, bias=True)
        self.linear_fc2 = nn.Linear(self.merged_size, out_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.postshuffle_norm:
            x = self.norm(x.reshape(-1, self.merged_size))
        else:
            x = self.norm(x).reshape(-1, self.merged_size)
        return self.linear_fc2(F.gelu(self.linear_fc1(x)))


class VisionTower(nn.Module):
    def __init__(self, cfg: VisionConfig, out_size: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.side = round(cfg.num_position_embeddings ** 0.5)
        self.patch_embed = PatchEmbed(cfg)
        self.pos_embed = nn.Embedding(cfg.num_position_embeddings, cfg.hidden_size)
        self.blocks = nn.ModuleList([VisionBlock(cfg) for _ in range(cfg.depth)])
        self.merger = PatchMerger(cfg, out_size, postshuffle_norm=False)
        self.deepstack_merger_list = nn.ModuleList(
            [PatchMerger(cfg, out_size, postshuffle_norm=True) for _ in cfg.deepstack_visual_indexes])
        self.checkpoint_blocks = False  # set by Qwen3VLModel.enable_activation_checkpointing

    def forward(self, pixels: torch.Tensor, grid_thw: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """-> (merged tokens [P/merge^2, out_size], DeepStack features: one such tensor per index)."""
        merge = self.cfg.spatial_merge_size
        x = self.patch_embed(pixels)
        interp_idx, interp_w = position_interpolation(grid_thw, self.side, merge)
        x = x + (self.pos_embed(interp_idx) * interp_w[..., None].to(x.dtype)).sum(1)
        rope = vision_rope_cos_sin(patch_hw_positions(grid_thw, merge), self.cfg.hidden_size // self.cfg.num_heads)
        cu_seqlens = frame_cu_seqlens(grid_thw)
        deepstack = []
        for i, block in enumerate(self.blocks):
            x = maybe_checkpoint(block, self.checkpoint_blocks, x, rope, cu_seqlens)
            if i in self.cfg.deepstack_visual_indexes:
                merger = self.deepstack_merger_list[self.cfg.deepstack_visual_indexes.index(i)]
                deepstack.append(merger(x))
        return self.merger(x), deepstack

