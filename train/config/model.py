"""Model configuration schema: the shapes of a Qwen3-VL model (vision tower, mergers, LLM, MoE).

Field names follow transformers' Qwen3VLConfig where one exists, so HF import/export is a rename, not a
translation. Validation raises `ConfigError` naming the offending key before anything is built.
"""
from __future__ import annotations

from dataclasses import dataclass, field


class ConfigError(ValueError):
    """A configuration value is invalid. The message names the key (dotted path) and the value."""


@dataclass
class VisionConfig:
    depth: int = 27
    hidden_size: int = 1152
    intermediate_size: int = 4304
    num_heads: int = 16
    in_channels: int = 3
    patch_size: int = 16
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    # Learned position table: num_position_embeddings = side**2 (48x48 for SigLIP-2), bilinearly
    # interpolated to each image's patch grid.
    num_position_embeddings: int = 2304
    deepstack_visual_indexes: list[int] = field(default_factory=lambda: [8, 16, 24])
    hidden_act: str = "gelu_pytorch_tanh"
    layer_norm_eps: float = 1e-6
    # Input normalisation the tower was trained with (HF preprocessor_config.json); the patch embedding
    # applies it to uint8 pixels (data.encode.image.pixel_dtype=uint8) and must match data.encode.image.
    image_mean: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    image_std: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])

    def validate(self, prefix: str = "model.vision") -> None:
        _positive(self, prefix, "depth", "hidden_size", "intermediate_size", "num_heads", "patch_size",
                  "temporal_patch_size", "spatial_merge_size", "num_position_embeddings")
        if self.hidden_size % self.num_heads:
            raise ConfigError(f"{prefix}.hidden_size={self.hidden_size} is not divisible by "
                              f"{prefix}.num_heads={self.num_heads}")
        side = round(self.num_position_embeddings ** 0.5)
        if side * side != self.num_position_embeddings:
            raise ConfigError(f"{prefix}.num_position_embeddings={self.num_position_embeddings} is not a square")
        for i, idx in enumerate(self.deepstack_visual_indexes):
            if not 0 <= idx < self.depth:
                raise ConfigError(f"{prefix}.deepstack_visual_indexes[{i}]={idx} is outside the ViT depth "
                                  f"{prefix}.depth={self.depth}")
        for key in ("image_mean", "image_std"):
            if len(getattr(self, key)) != self.in_channels:
                raise ConfigError(f"{prefix}.{key}={getattr(self, key)} must have {prefix}.in_channels="
                                  f"{self.in_channels} values")
        if not all(v > 0 for v in self.image_std):
            raise ConfigError(f"{prefix}.image_std={self.image_std} must be > 0")


@dataclass
class TextConfig:
    vocab_size: int = 151936
    hidden_size: int = 4096
    intermediate_size: int = 12288
    num_hidden_layers: int = 36
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    head_dim: int = 128
    rms_norm_eps: float = 1e-6
    rope_theta: float = 5_000_000.0
    # Rotary frequency pairs given to the t/h/w axes; interleaved T,H,W,T,H,W,... (Qwen3-VL), not contiguous.
    mrope_section: list[int] = field(default_factory=lambda: [24, 20, 20])
    # False: an ablation of Qwen3-VL's positions (docs/eval.md): plain 1-D RoPE, every token (text or vision)
    # rotated by its index in its document, on all three MRoPE axes. Reference model / DeepSpeed CP=1 only.
    mrope: bool = True
    max_position_embeddings: int = 262144
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    hidden_act: str = "silu"
    # Mixture of experts: num_experts == 0 means a dense model.
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    decoder_sparse_step: int = 1
    mlp_only_layers: list[int] = field(default_factory=list)
    norm_topk_prob: bool = True
    router_aux_loss_coef: float = 0.001

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    def is_moe_layer(self, layer_idx: int) -> bool:
        """Same rule as transformers' Qwen3-VL-MoE: sparse every `decoder_sparse_step` layers, minus mlp_only."""
        return (self.is_moe and layer_idx not in self.mlp_only_layers
                and (layer_idx + 1) % self.decoder_sparse_step == 0)

    def validate(self, prefix: str = "model.text") -> None:
        _positive(self, prefix, "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                  "num_attention_heads", "num_key_value_heads", "head_dim", "rope_theta")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(f"{prefix}.num_attention_heads={self.num_attention_heads} is not divisible by "
                              f"{prefix}.num_key_value_heads={self.num_key_value_heads}")
        if self.head_dim % 2:
            raise ConfigError(f"{prefix}.head_dim={self.head_dim} must be even for rotary embeddings")
        if sum(self.mrope_section) != self.head_dim // 2:
            raise ConfigError(f"{prefix}.mrope_section={list(self.mrope_section)} sums to "
                              f"{sum(self.mrope_section)}, expected head_dim/2={self.head_dim // 2}")
        if self.is_moe:
            _positive(self, prefix, "num_experts_per_tok", "moe_intermediate_size", "decoder_sparse_step")
            if self.num_experts_per_tok > self.num_experts:
                raise ConfigError(f"{prefix}.num_experts_per_tok={self.num_experts_per_tok} exceeds "
                                  f"{prefix}.num_experts={self.num_experts}")


@dataclass
class ModelConfig:
    name: str = "qwen3vl_8b"
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    # Special token ids. Defaults are Qwen3-VL's; the tiny demo models use the ids the project's sentencepiece
    # tokenizer reserves (data/tokenizer). Training checks that tokenizer and model agree before starting.
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653

    def validate(self, prefix: str = "model") -> None:
        self.vision.validate(f"{prefix}.vision")
        self.text.validate(f"{prefix}.text")
        if len(self.vision.deepstack_visual_indexes) > self.text.num_hidden_layers:
            raise ConfigError(f"{prefix}.vision.deepstack_visual_indexes has "
                              f"{len(self.vision.deepstack_visual_indexes)} entries but the LLM has only "
                              f"{prefix}.text.num_hidden_layers={self.text.num_hidden_layers} layers")
        for key in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id"):
            value = getattr(self, key)
            if not 0 <= value < self.text.vocab_size:
                raise ConfigError(f"{prefix}.{key}={value} is outside the vocabulary "
                                  f"({prefix}.text.vocab_size={self.text.vocab_size})")


def _positive(obj: object, prefix: str, *keys: str) -> None:
    for key in keys:
        value = getattr(obj, key)
        if not value > 0:
            raise ConfigError(f"{prefix}.{key}={value} must be > 0")
