"""Tiny Qwen3-VL configs and inputs shared by tests (import as `from model_fixtures import ...`).

`tiny_dense_config()` / `tiny_moe_config()` give a ModelConfig small enough for CPU tests yet keeping every
structural feature (GQA, QK norm, DeepStack on 3 layers, interleaved MRoPE with all three axes, MoE with
an mlp_only layer); `hf_config_dict(cfg)` gives the equivalent transformers config (Qwen3VLConfig or
Qwen3VLMoeConfig kwargs) and `build_hf_model(cfg)` a random transformers model from it, EVERY parameter
random (`randomize_constant_parameters`: norm gains and biases too). The rest builds
token sequences and pixel tensors for images and videos by hand, in the HF layout.
"""
from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from train.config.model import ModelConfig, TextConfig, VisionConfig

IMAGE, VIDEO, VSTART, VEND = 250, 251, 252, 253  # special token ids of the tiny vocabulary


def tiny_dense_config(**text_overrides) -> ModelConfig:
    vision = VisionConfig(depth=3, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=16,
                          num_position_embeddings=64, deepstack_visual_indexes=[0, 1, 2])
    text_fields = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=32, rope_theta=10000.0,
                       mrope_section=[6, 5, 5], max_position_embeddings=4096)
    text = TextConfig(**{**text_fields, **text_overrides})
    return ModelConfig(name="tiny_dense", vision=vision, text=text, image_token_id=IMAGE, video_token_id=VIDEO,
                       vision_start_token_id=VSTART, vision_end_token_id=VEND)


def tiny_moe_config(**text_overrides) -> ModelConfig:
    moe = dict(num_hidden_layers=4, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
               decoder_sparse_step=1, mlp_only_layers=[0], tie_word_embeddings=True)
    moe.update(text_overrides)
    cfg = tiny_dense_config(**moe)
    cfg.name = "tiny_moe"
    return cfg


def hf_config_dict(cfg: ModelConfig) -> dict:
    """kwargs of transformers' Qwen3VLConfig (dense) or Qwen3VLMoeConfig (MoE) for the same model."""
    v, t = cfg.vision, cfg.text
    vision = dict(depth=v.depth, hidden_size=v.hidden_size, intermediate_size=v.intermediate_size,
                  num_heads=v.num_heads, in_channels=v.in_channels, patch_size=v.patch_size,
                  temporal_patch_size=v.temporal_patch_size, spatial_merge_size=v.spatial_merge_size,
                  out_hidden_size=t.hidden_size, num_position_embeddings=v.num_position_embeddings,
                  deepstack_visual_indexes=list(v.deepstack_visual_indexes), hidden_act=v.hidden_act)
    text = dict(vocab_size=t.vocab_size, hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
                num_hidden_layers=t.num_hidden_layers, num_attention_heads=t.num_attention_heads,
                num_key_value_heads=t.num_key_value_heads, head_dim=t.head_dim, rms_norm_eps=t.rms_norm_eps,
                max_position_embeddings=t.max_position_embeddings, attention_bias=t.attention_bias,
                hidden_act=t.hidden_act,
                rope_parameters=dict(rope_type="default", rope_theta=t.rope_theta,
                                     mrope_section=list(t.mrope_section), mrope_interleaved=True))
    if t.is_moe:
        text.update(num_experts=t.num_experts, num_experts_per_tok=t.num_experts_per_tok,
                    moe_intermediate_size=t.moe_intermediate_size, decoder_sparse_step=t.decoder_sparse_step,
                    mlp_only_layers=list(t.mlp_only_layers), router_aux_loss_coef=t.router_aux_loss_coef,
                    tie_word_embeddings=t.tie_word_embeddings)
    return dict(vision_config=vision, text_config=text, image_token_id=cfg.image_token_id,
                video_token_id=cfg.video_token_id, vision_start_token_id=cfg.vision_start_token_id,
                vision_end_token_id=cfg.vision_end_token_id, tie_word_embeddings=t.tie_word_embeddings)


def build_hf_model(cfg: ModelConfig, seed: int = 0) -> torch.nn.Module:
    """A random fp32 transformers Qwen3VL(Moe)ForConditionalGeneration with eager attention, in eval mode;
    every parameter random (norm gains and biases included)."""
    import transformers

    kind = "Qwen3VLMoe" if cfg.text.is_moe else "Qwen3VL"
    hf_cfg = getattr(transformers, f"{kind}Config")(**hf_config_dict(cfg))
    hf_cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = getattr(transformers, f"{kind}ForConditionalGeneration")(hf_cfg)
    return randomize_constant_parameters(model.float().eval(), seed)


@torch.no_grad()
def randomize_constant_parameters(model: torch.nn.Module, seed: int = 0, scale: float = 0.1) -> torch.nn.Module:
    """Make every parameter matter to a parity test: the ones initialised to a constant (norm gains = 1,
    biases = 0, under both transformers' and the project's init) get c + scale * N(0, 1) per element, so
    a model that ignores a norm gain or drops a bias no longer matches. Other parameters are left as they
    are (already random). Returns the model."""
    generator = torch.Generator().manual_seed(seed)
    for _, param in sorted(model.named_parameters()):
        flat = param.detach().reshape(-1)
        if flat.numel() and bool((flat == flat[0]).all()):
            param.copy_(flat[0] + scale * torch.randn(param.shape, generator=generator, dtype=param.dtype))
    return model


def random_pixels(grid_thw: list[list[int]], cfg: ModelConfig, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(pixel_values [P, C*T*ps*ps], grid_thw [items, 3]) with random values for the given patch grids."""
    v = cfg.vision
    grid = torch.tensor(grid_thw, dtype=torch.long)
    patches = int(grid.prod(-1).sum())
    gen = torch.Generator().manual_seed(seed)
    dim = v.in_channels * v.temporal_patch_size * v.patch_size ** 2
    return torch.randn(patches, dim, generator=gen), grid


def image_span(grid_thw: list[int], cfg: ModelConfig) -> list[int]:
    """vision_start + image_pad x (t*h*w/merge^2) + vision_end."""
    n = grid_thw[0] * grid_thw[1] * grid_thw[2] // cfg.vision.spatial_merge_size ** 2
    return [cfg.vision_start_token_id] + [cfg.image_token_id] * n + [cfg.vision_end_token_id]


def video_span(grid_thw: list[int], cfg: ModelConfig, timestamp_tokens) -> list[int]:
    """Per temporal patch: tokens of the text timestamp `<{t:.1f} seconds>`, then vision_start +
    video_pad x (h*w/merge^2) + vision_end. `timestamp_tokens(seconds) -> list[int]` tokenizes the stamp."""
    t, h, w = grid_thw
    per_frame = h * w // cfg.vision.spatial_merge_size ** 2
    fps, tps = 2.0, cfg.vision.temporal_patch_size
    out: list[int] = []
    for i in range(t):
        seconds = (i * tps + (i * tps + tps - 1)) / 2 / fps  # mean time of the patch's first and last frame
        out += timestamp_tokens(seconds)
        out += [cfg.vision_start_token_id] + [cfg.video_token_id] * per_frame + [cfg.vision_end_token_id]
    return out


def char_tokens(text: str) -> list[int]:
    """A stand-in tokenizer for timestamps in tests: one token per character (ids < 128)."""
    return [ord(c) % 128 for c in text]


def mm_token_type_ids(input_ids: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """transformers' modality ids: 0 text, 1 image, 2 video."""
    return (input_ids == cfg.image_token_id).long() + 2 * (input_ids == cfg.video_token_id).long()


class LargestAllocation(TorchDispatchMode):
    """Elements of the largest tensor an op allocated while active (views of an op's inputs and meta tensors,
    which hold no memory, not counted)."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in args if isinstance(t, torch.Tensor)}
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and not t.is_meta and t.untyped_storage().data_ptr() not in inputs:
                self.largest = max(self.largest, t.numel())
        return out
