"""Rotary position embeddings: interleaved MRoPE for the LLM and axial 2-D RoPE for the ViT.

Both return (cos, sin) of shape [N, head_dim] in the "rotate half" layout (the frequency vector is
concatenated with itself), so one `apply_rotary` serves both. Inverse frequencies are recomputed on every
call instead of living in buffers: they are a few dozen floats, and this keeps the model free of
non-persistent buffers that would be garbage after building on the meta device and `to_empty`.
"""
from __future__ import annotations

import torch

# Qwen3-VL's ViT uses theta 10000 for its 2-D RoPE (transformers' Qwen3VLVisionConfig default); no released
# checkpoint changes it, so it is not a config field.
VISION_ROPE_THETA = 10000.0


def inverse_frequencies(dim: int, theta: float, device: torch.device | None = None) -> torch.Tensor:
    """Standard RoPE inverse frequencies 1 / theta^(2i/dim), i < dim/2, in fp32."""
    exponent = torch.arange(0, dim, 2, dtype=torch.float32, device=device) / dim
    return 1.0 / (theta ** exponent)


def interleaved_mrope_axis(mrope_section: list[int], num_freqs: int) -> torch.Tensor:
    """For each rotary frequency, the axis (0=t, 1=h, 2=w) whose position drives it.

    Qwen3-VL interleaves the axes T,H,W,T,H,W,... instead of giving each axis a contiguous block (Qwen2-VL):
    frequency j with j % 3 == 1 and j < 3 * section[1] follows h, j % 3 == 2 and j < 3 * section[2] follows
    w, every other frequency follows t.
    """
    axis = torch.zeros(num_freqs, dtype=torch.long)
    for ax in (1, 2):
        axis[ax:min(3 * mrope_section[ax], num_freqs):3] = ax
    return axis


def mrope_angles(
    position_ids: torch.Tensor, head_dim: int, theta: float, mrope_section: list[int]
) -> torch.Tensor:
    """Rotary angles [L, head_dim] (fp32, rotate-half layout) for 3-D position ids [3, L] with interleaved
    MRoPE. Separate from mrope_cos_sin because megatron's rotary code takes the angles and applies cos/sin
    itself (train/backends/megatron/model.py)."""
    device = position_ids.device
    inv_freq = inverse_frequencies(head_dim, theta, device)
    axis = interleaved_mrope_axis(mrope_section, inv_freq.numel()).to(device)
    # Pick, per frequency, the position of its axis: [L, head_dim/2].
    positions = position_ids.float().gather(0, axis[:, None].expand(-1, position_ids.shape[1])).T
    freqs = positions * inv_freq
    return torch.cat([freqs, freqs], dim=-1)


def mrope_cos_sin(
    position_ids: torch.Tensor, head_dim: int, theta: float, mrope_section: list[int], dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [L, head_dim] for 3-D position ids [3, L] with interleaved MRoPE."""
    emb = mrope_angles(position_ids, head_dim, theta, mrope_section)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def vision_rope_cos_sin(hw_positions: torch.Tensor, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [N, head_dim] (fp32) for patch (row, col) positions [N, 2]: half the frequencies follow the
    row, half the column, each set with head_dim/4 frequencies."""
    inv_freq = inverse_frequencies(head_dim // 2, VISION_ROPE_THETA, hw_positions.device)
    freqs = hw_positions.float()[..., None] * inv_freq  # [N, 2, head_dim/4]
    freqs = freqs.flatten(1)  # row frequencies then column frequencies
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), emb.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat([-second, first], dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [N, heads, head_dim] by cos/sin [N, head_dim] (broadcast over heads)."""
    cos, sin = cos[:, None, :], sin[:, None, :]
    return x * cos + rotate_half(x) * sin
