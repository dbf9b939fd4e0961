"""The Qwen3 language model: GQA attention with per-head QK RMSNorm, SwiGLU MLP (or MoE), pre-norm layers.

Module and parameter names follow transformers' Qwen3VLTextModel (`layers.{i}.self_attn.q_proj`, ...), so
native names are HF names without the leading "model.".
"""
from __future__ import annotations

import torch
from torch import nn

from train.config.model import TextConfig
from train.models.qwen3vl.attention import LayerKV, PackedAttention
from train.models.qwen3vl.common import RMSNorm, activation
from train.models.qwen3vl.moe import SparseMoeBlock
from train.models.qwen3vl.rope import apply_rotary


class TextAttention(nn.Module):
    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = (cfg.num_attention_heads, cfg.num_key_value_heads,
                                                            cfg.head_dim)
        hidden, bias = cfg.hidden_size, cfg.attention_bias
        self.q_proj = nn.Linear(hidden, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, hidden, bias=bias)
        self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
        self.core_attention: nn.Module = PackedAttention()

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                cu_seqlens: torch.Tensor, cache: LayerKV | None = None) -> torch.Tensor:
        """`cache` (decoding only): x are the tokens after the cached ones, cu_seqlens is ignored."""
        n = x.shape[0]
        q = self.q_norm(self.q_proj(x).view(n, self.num_heads, self.head_dim))
        k = self.k_norm(self.k_proj(x).view(n, self.num_kv_heads, self.head_dim))
        v = self.v_proj(x).view(n, self.num_kv_heads, self.head_dim)
        cos, sin = rope
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        out = self.core_attention(q, k, v, cu_seqlens, True) if cache is None else cache.attend(q, k, v)
        return self.o_proj(out.reshape(n, self.num_heads * self.head_dim))


class TextMLP(nn.Module):
    """SwiGLU: down(act(gate(x)) * up(x))."""

    def __init__(self, hidden: int, intermediate: int, act: str) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)
        self.act = activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    """Pre-norm attention + MLP. Returns (hidden, router_logits or None) so MoE layers can report routing."""

    def __init__(self, cfg: TextConfig, layer_idx: int) -> None:
        super().__init__()
        self.self_attn = TextAttention(cfg)
        self.is_moe = cfg.is_moe_layer(layer_idx)
        self.mlp: nn.Module = (SparseMoeBlock(cfg) if self.is_moe
                               else TextMLP(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act))
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], cu_seqlens: torch.Tensor,
                cache: LayerKV | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        x = x + self.self_attn(self.input_layernorm(x), rope, cu_seqlens, cache)
        h = self.post_attention_layernorm(x)
        if self.is_moe:
            out, router_logits = self.mlp(h)
            return x + out, router_logits
        return x + self.mlp(h), None


class TextModel(nn.Module):
    """Token embedding, decoder layers and final norm (rotary tables are built by the caller, once per step)."""

    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList([DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
