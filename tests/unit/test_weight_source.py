"""The random initialisation as a weight source: layout-independent values, slice reads, the reference init."""
from __future__ import annotations

import math

import pytest
import torch

from model_fixtures import LargestAllocation, tiny_dense_config, tiny_moe_config
from train.models.materialize import materialize
from train.models.qwen3vl import Qwen3VLModel
from train.models.weight_source import (BLOCK_ELEMENTS, RandomInit, StateDictSource, check_source_fits,
                                        flat_range_into)
from train.models.native_io import CheckpointError


def test_random_init_distributions_and_tied_head():
    cfg = tiny_moe_config()
    source = RandomInit(cfg, seed=3)
    assert source.names() == set(Qwen3VLModel(cfg).state_dict())
    experts = source.read("language_model.layers.1.mlp.experts.gate_up_proj")
    assert abs(float(experts.std()) - 0.02) < 0.002 and abs(float(experts.mean())) < 0.002
    assert torch.equal(source.read("language_model.norm.weight"), torch.ones(cfg.text.hidden_size))
    assert torch.equal(source.read("visual.blocks.0.norm1.bias"), torch.zeros(cfg.vision.hidden_size))
    assert torch.equal(source.read("visual.blocks.0.norm1.weight"), torch.ones(cfg.vision.hidden_size))
    assert not source.read("language_model.layers.1.mlp.gate.weight").eq(0).any()  # the router: random
    assert torch.equal(source.read("lm_head.weight"), source.read("language_model.embed_tokens.weight"))
    assert torch.equal(RandomInit(cfg, 3).read("visual.pos_embed.weight"), source.read("visual.pos_embed.weight"))
    assert not torch.equal(RandomInit(cfg, 4).read("visual.pos_embed.weight"), source.read("visual.pos_embed.weight"))


@pytest.mark.parametrize("name, index", [
    ("language_model.embed_tokens.weight", (slice(100, 190), slice(3, 40))),
    ("language_model.layers.1.mlp.experts.down_proj", (slice(1, 3), slice(None), slice(8, 16))),
    ("language_model.layers.0.self_attn.o_proj.weight", (slice(None), slice(64, 128))),
    ("visual.blocks.0.attn.qkv.bias", (slice(10, 20),)),
])
def test_any_slice_equals_the_slice_of_the_whole_tensor(name, index, monkeypatch):
    monkeypatch.setattr("train.models.weight_source.BLOCK_ELEMENTS", 500)  # many blocks even at toy size
    source = RandomInit(tiny_moe_config(), seed=11)
    full = source.read(name)
    assert torch.equal(source.read(name, index), full[index])
    flat = full.reshape(-1)
    cuts = [0, 7, flat.numel() // 2 + 3, flat.numel()]  # uneven ZeRO-3-like partitions
    out = torch.full_like(flat, float("nan"))
    for a, b in zip(cuts, cuts[1:]):
        flat_range_into(source, name, a, out[a:b])
    assert torch.equal(out, flat)


def test_a_slice_costs_one_block_plus_the_slice():
    cfg = tiny_dense_config(vocab_size=40960, hidden_size=64)  # embedding: 2.6M elements = 2.5 blocks
    source = RandomInit(cfg, seed=0)
    name = "language_model.embed_tokens.weight"
    full = math.prod(source.shape(name))
    with LargestAllocation() as probe:
        part = source.read(name, (slice(20000, 20480),))
    assert part.shape == (480, 64)
    assert probe.largest <= BLOCK_ELEMENTS + part.numel() < full // 2


def test_reference_model_init_is_the_random_source():
    cfg = tiny_moe_config()
    with torch.device("meta"):
        model = Qwen3VLModel(cfg)
    materialize(model)
    model.init_weights(seed=5)
    want = RandomInit(cfg, 5)
    state = model.state_dict()
    assert all(torch.equal(state[name], want.read(name)) for name in state)
    torch.manual_seed(1)
    a = Qwen3VLModel(cfg).state_dict()
    torch.manual_seed(1)
    b = Qwen3VLModel(cfg).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)  # seeded by torch's RNG when no seed is given


def test_source_of_another_model_is_refused_in_one_line():
    small, other = tiny_dense_config(), tiny_dense_config(intermediate_size=96)
    with pytest.raises(CheckpointError, match=r"init: tensor 'language_model.layers.0.mlp.gate_proj.weight' has "
                                              r"shape \[96, 64\], the model config expects \[128, 64\]"):
        check_source_fits(RandomInit(other, 0), small, "init")
    state = dict(Qwen3VLModel(small).state_dict())
    del state["visual.merger.norm.bias"]
    with pytest.raises(CheckpointError, match="missing tensor 'visual.merger.norm.bias'"):
        check_source_fits(StateDictSource(state), small, "init")
