"""AdamW parameter groups (decay rules, frozen parameters, tied weights) and the LR schedule."""
from __future__ import annotations

import math

import pytest
import torch

from model_fixtures import tiny_moe_config
from train.config.schema import OptimConfig
from train.models.qwen3vl import Qwen3VLModel
from train.optim import learning_rate, param_groups


def _names(model, params):
    ids = {id(p) for p in params}
    return {n for n, p in model.named_parameters(remove_duplicate=False) if id(p) in ids}


def test_param_groups_decay_rules_on_the_real_model():
    model = Qwen3VLModel(tiny_moe_config())  # tied embeddings, MoE experts, ViT conv patch embedding
    groups = {g["name"]: g for g in param_groups(model, OptimConfig(weight_decay=0.1))}
    decay, no_decay = _names(model, groups["decay"]["params"]), _names(model, groups["no_decay"]["params"])
    assert groups["decay"]["weight_decay"] == 0.1 and groups["no_decay"]["weight_decay"] == 0.0
    assert "language_model.layers.0.self_attn.q_proj.weight" in decay
    assert "language_model.layers.1.mlp.experts.gate_up_proj" in decay
    assert "visual.patch_embed.proj.weight" in decay  # a Conv3d, despite "embed" in its name
    assert "language_model.embed_tokens.weight" in no_decay and "lm_head.weight" in no_decay  # tied
    assert "language_model.norm.weight" in no_decay
    assert any(n.endswith("bias") for n in no_decay) and not any(n.endswith("bias") for n in decay)
    total = sum(len(g["params"]) for g in groups.values())
    assert total == len(list(model.parameters()))  # every parameter exactly once (tied weight once)


def test_param_groups_skip_frozen_parameters():
    model = Qwen3VLModel(tiny_moe_config())
    for p in model.visual.parameters():
        p.requires_grad_(False)
    params = [p for g in param_groups(model, OptimConfig()) for p in g["params"]]
    assert not {id(p) for p in model.visual.parameters()} & {id(p) for p in params}
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        param_groups(model, OptimConfig())


def test_warmup_then_cosine_to_min_lr():
    cfg = OptimConfig(lr=1.0, min_lr=0.1, warmup_steps=4, schedule="cosine")
    assert [learning_rate(s, cfg, 14) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert learning_rate(4, cfg, 14) == pytest.approx(1.0)
    assert learning_rate(9, cfg, 14) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert learning_rate(14, cfg, 14) == pytest.approx(0.1)
    assert learning_rate(100, cfg, 14) == pytest.approx(0.1)  # held at min_lr after the end


def test_linear_and_constant_schedules():
    linear = OptimConfig(lr=2.0, min_lr=0.0, warmup_steps=0, schedule="linear")
    assert [learning_rate(s, linear, 4) for s in range(5)] == [2.0, 1.5, 1.0, 0.5, 0.0]
    constant = OptimConfig(lr=2.0, min_lr=0.0, warmup_steps=2, schedule="constant")
    assert [learning_rate(s, constant, 4) for s in range(4)] == [1.0, 2.0, 2.0, 2.0]
    with pytest.raises(ValueError, match="step"):
        learning_rate(-1, linear, 4)


def test_schedule_drives_a_torch_optimizer():
    from train.optim import set_learning_rate
    model = torch.nn.Linear(3, 2)
    cfg = OptimConfig(lr=0.5, min_lr=0.05, warmup_steps=1, schedule="cosine")
    opt = torch.optim.AdamW(param_groups(model, cfg))
    set_learning_rate(opt, learning_rate(1, cfg, 3))
    assert all(g["lr"] == pytest.approx(0.5) for g in opt.param_groups)
