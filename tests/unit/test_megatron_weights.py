"""The native <-> megatron weight map (train/backends/megatron/weights.py) without megatron: layouts of the
fused QKV and SwiGLU tensors (and the ViT's fused qkv), TP shards that reassemble exactly, expert slices, and a whole-model round
trip native -> per-rank megatron shards (TP=2 x EP=2) -> native that is the identity."""
from __future__ import annotations

import pytest
import torch

from model_fixtures import tiny_moe_config
from train.backends.megatron.weights import (Rule, ShardCoords, add_native, full_megatron_tensor, fuse_qkv,
                                             local_state, rule_for, shard, split_qkv, unshard)
from train.models.qwen3vl import Qwen3VLModel
from train.models.weight_source import RandomInit, StateDictSource


def test_fused_qkv_is_grouped_query_layout():
    cfg = tiny_moe_config()  # 4 query heads, 2 KV groups, head_dim 32
    d, hidden = cfg.text.head_dim, cfg.text.hidden_size
    q, k, v = (torch.randn(n * d, hidden) for n in (4, 2, 2))
    fused = fuse_qkv(q, k, v, cfg)
    # Group 0 = query heads 0-1, key head 0, value head 0; then group 1.
    want = torch.cat([q[:2 * d], k[:d], v[:d], q[2 * d:], k[d:], v[d:]])
    assert torch.equal(fused, want)
    assert all(torch.equal(a, b) for a, b in zip(split_qkv(fused, cfg), (q, k, v)))


def test_glu_shards_hold_their_part_of_gate_and_up():
    rule = Rule(("gate", "up"), kind="glu", tp_dim=0)
    gate, up = torch.arange(8.0)[:, None], 100 + torch.arange(8.0)[:, None]
    full = torch.cat([gate, up])
    pieces = [shard(rule, full, r, 2) for r in range(2)]
    assert torch.equal(pieces[1], torch.cat([gate[4:], up[4:]]))
    assert torch.equal(unshard(rule, pieces), full)


@pytest.mark.parametrize("name, natives, kind, dim", [
    ("decoder.layers.1.self_attention.linear_qkv.weight",
     ("language_model.layers.3.self_attn.q_proj.weight", "language_model.layers.3.self_attn.k_proj.weight",
      "language_model.layers.3.self_attn.v_proj.weight"), "qkv", 0),
    ("decoder.layers.0.self_attention.linear_proj.weight", ("language_model.layers.2.self_attn.o_proj.weight",),
     "copy", 1),
    ("decoder.layers.0.pre_mlp_layernorm.weight", ("language_model.layers.2.post_attention_layernorm.weight",),
     "copy", None),
    ("decoder.layers.1.mlp.experts.local_experts.1.linear_fc2.weight",
     ("language_model.layers.3.mlp.experts.down_proj",), "expert", 1),
    ("embedding.word_embeddings.weight", ("language_model.embed_tokens.weight",), "copy", 0),
    ("visual.blocks.0.attn.qkv.weight", ("visual.blocks.0.attn.qkv.weight",), "vit_qkv", 0),
    ("visual.blocks.0.attn.proj.weight", ("visual.blocks.0.attn.proj.weight",), "copy", 1),
    ("visual.blocks.0.attn.proj.bias", ("visual.blocks.0.attn.proj.bias",), "copy", None),
    ("visual.deepstack_merger_list.1.linear_fc1.bias", ("visual.deepstack_merger_list.1.linear_fc1.bias",),
     "copy", 0),
    ("visual.merger.linear_fc2.weight", ("visual.merger.linear_fc2.weight",), "copy", 1),
    ("visual.merger.norm.weight", ("visual.merger.norm.weight",), "copy", None),
    ("visual.patch_embed.proj.weight", ("visual.patch_embed.proj.weight",), "copy", None),
])
def test_rules_name_native_tensors_with_stage_offsets(name, natives, kind, dim):
    rule = rule_for(name, tiny_moe_config(), layer_offset=2, expert_offset=2)
    assert (rule.natives, rule.kind, rule.tp_dim) == (natives, kind, dim)
    if kind == "expert":
        assert rule.expert == 3


def test_vision_qkv_shards_hold_their_heads_of_q_k_and_v():
    rule = rule_for("visual.blocks.0.attn.qkv.weight", tiny_moe_config())
    q, k, v = (base + torch.arange(8.0)[:, None] for base in (0, 100, 200))  # 4 heads of 2 rows each
    full = torch.cat([q, k, v])
    pieces = [shard(rule, full, r, 2) for r in range(2)]
    assert torch.equal(pieces[1], torch.cat([q[4:], k[4:], v[4:]]))
    assert torch.equal(unshard(rule, pieces), full)


def _megatron_names(cfg, coords: ShardCoords, layers: range, experts_per_rank: int) -> list[str]:
    names = ["embedding.word_embeddings.weight", "decoder.final_layernorm.weight"]
    names += [name for name in Qwen3VLModel(cfg).state_dict() if name.startswith("visual.")]
    for j, i in enumerate(layers):
        base = f"decoder.layers.{j}."
        names += [base + n for n in ("input_layernorm.weight", "pre_mlp_layernorm.weight",
                                     "self_attention.linear_qkv.weight", "self_attention.linear_proj.weight",
                                     "self_attention.q_layernorm.weight", "self_attention.k_layernorm.weight")]
        if cfg.text.is_moe_layer(i):
            names.append(base + "mlp.router.weight")
            names += [base + f"mlp.experts.local_experts.{e}.linear_fc{k}.weight"
                      for e in range(experts_per_rank) for k in (1, 2)]
        else:
            names += [base + "mlp.linear_fc1.weight", base + "mlp.linear_fc2.weight"]
    return names


def test_tp2_ep2_shards_round_trip_to_the_native_state_dict():
    cfg = tiny_moe_config()
    torch.manual_seed(0)
    state = {k: v for k, v in Qwen3VLModel(cfg).state_dict().items() if k.startswith(("language_model.", "visual."))}
    back = {}
    for ep_rank in range(2):
        per_tp = []
        for tp_rank in range(2):
            coords = ShardCoords(expert_offset=2 * ep_rank, tp_rank=tp_rank, tp_size=2, expert_tp_rank=tp_rank,
                                 expert_tp_size=2)
            names = _megatron_names(cfg, coords, range(cfg.text.num_hidden_layers), experts_per_rank=2)
            per_tp.append(local_state(names, StateDictSource(state), cfg, coords))
        full = {name: unshard(rule_for(name, cfg, 0, 2 * ep_rank), [p[name] for p in per_tp]) for name in per_tp[0]}
        for name, tensor in full.items():
            add_native(back, rule_for(name, cfg, 0, 2 * ep_rank), tensor, cfg)
    assert back.keys() == state.keys()
    assert all(torch.equal(back[k], state[k]) for k in state)


@pytest.mark.parametrize("tp, ep", [(2, 1), (2, 2), (1, 4)])
def test_random_init_pieces_read_by_slices_equal_the_pieces_of_the_full_tensors(tp, ep):
    """Layout independence: what a TP/EP rank reads from RandomInit slice by slice is exactly its piece of
    the TP=1 tensors (so every layout starts from the same weights)."""
    cfg = tiny_moe_config()
    source = RandomInit(cfg, seed=9)
    full_state = {name: source.read(name) for name in source.names()
                  if name.startswith(("language_model.", "visual."))}
    per_rank = cfg.text.num_experts // ep
    for ep_rank in range(ep):
        for tp_rank in range(tp):
            coords = ShardCoords(expert_offset=per_rank * ep_rank, tp_rank=tp_rank, tp_size=tp,
                                 expert_tp_rank=tp_rank, expert_tp_size=tp)
            names = _megatron_names(cfg, coords, range(cfg.text.num_hidden_layers), experts_per_rank=per_rank)
            got = local_state(names, source, cfg, coords)
            for name in names:
                rule = rule_for(name, cfg, 0, coords.expert_offset)
                want = shard(rule, full_megatron_tensor(rule, full_state, cfg), *coords.tp(rule))
                assert torch.equal(got[name], want), (name, tp_rank, ep_rank)
