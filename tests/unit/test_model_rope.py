"""Rotary tables and ViT position interpolation at real Qwen3-VL sizes (head_dim 128, mrope [24,20,20],
48x48 position table) equal transformers' own functions; the tiny parity models only cover small sizes."""
from __future__ import annotations

import torch
from transformers import Qwen3VLTextConfig, Qwen3VLVisionConfig
from transformers.models.qwen3_vl.modeling_qwen3_vl import (Qwen3VLTextRotaryEmbedding,
                                                            Qwen3VLVisionRotaryEmbedding)
from transformers.vision_utils import get_vision_interpolation_indices_and_weights, get_vision_position_ids

from train.models.qwen3vl.rope import interleaved_mrope_axis, mrope_cos_sin, vision_rope_cos_sin
from train.models.qwen3vl.vision import patch_hw_positions, position_interpolation


def test_interleaved_axis_layout_of_the_real_model():
    axis = interleaved_mrope_axis([24, 20, 20], 64)
    assert axis[:6].tolist() == [0, 1, 2, 0, 1, 2]
    assert (axis[1:60:3] == 1).all() and (axis[2:60:3] == 2).all()
    assert axis[60:].tolist() == [0, 0, 0, 0]  # the last T frequencies are not shared
    assert (axis == 0).sum() == 24 and (axis == 1).sum() == 20 and (axis == 2).sum() == 20


def test_text_mrope_equals_transformers():
    cfg = Qwen3VLTextConfig(head_dim=128, rope_parameters=dict(rope_type="default", rope_theta=5e6,
                                                               mrope_section=[24, 20, 20], mrope_interleaved=True))
    hf = Qwen3VLTextRotaryEmbedding(cfg)
    positions = torch.randint(0, 50_000, (3, 300))
    ref_cos, ref_sin = hf(torch.zeros(1, dtype=torch.float32), positions[:, None, :])
    cos, sin = mrope_cos_sin(positions, 128, 5e6, [24, 20, 20], torch.float32)
    assert torch.allclose(cos, ref_cos[0], atol=1e-5) and torch.allclose(sin, ref_sin[0], atol=1e-5)


def test_vision_rope_and_position_interpolation_equal_transformers():
    grid = torch.tensor([[1, 6, 10], [2, 34, 52], [1, 96, 64]])
    side, merge = 48, 2
    ref_idx, ref_w = get_vision_interpolation_indices_and_weights(grid, num_grid_per_side=side, mode="bilinear",
                                                                  align_corners=True, spatial_merge_size=merge)
    idx, w = position_interpolation(grid, side, merge)
    table = torch.randn(side * side, 8, dtype=torch.float64)
    # Compare the interpolated embeddings (tap order may differ, the weighted sums must not).
    ours = (table[idx] * w[..., None].double()).sum(1)
    theirs = (table[ref_idx] * ref_w[..., None].double()).sum(1)
    assert torch.allclose(ours, theirs, atol=1e-6)

    hw = patch_hw_positions(grid, merge)
    assert torch.equal(hw, get_vision_position_ids(grid, merge))
    hf_rope = Qwen3VLVisionRotaryEmbedding(Qwen3VLVisionConfig(hidden_size=1152, num_heads=16))
    ref_cos, ref_sin = hf_rope(torch.zeros(1), hw)
    cos, sin = vision_rope_cos_sin(hw, 1152 // 16)
    assert torch.allclose(cos, ref_cos, atol=1e-6) and torch.allclose(sin, ref_sin, atol=1e-6)
