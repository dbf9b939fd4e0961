"""Freezing by trainable group: the names Qwen3-VL's stages use, on the real model."""
from __future__ import annotations

import pytest
import torch

from model_fixtures import tiny_dense_config
from train.config.model import ConfigError
from train.freeze import apply_trainable, frozen_snapshot, param_group, strip_wrappers
from train.models.qwen3vl.model import Qwen3VLModel


@pytest.mark.parametrize("name, group", [
    ("visual.merger.linear_fc1.weight", "merger"),
    ("visual.deepstack_merger_list.2.norm.bias", "merger"),
    ("visual.blocks.0.attn.qkv.weight", "vision"),
    ("visual.patch_embed.proj.weight", "vision"),
    ("visual.pos_embed.weight", "vision"),
    ("language_model.layers.1.mlp.up_proj.weight", "llm"),
    ("language_model.embed_tokens.weight", "llm"),
    ("lm_head.weight", "llm"),
    ("module.visual.merger.norm.weight", "merger"),  # DDP / DeepSpeed wrapper
    ("_orig_mod.module.language_model.norm.weight", "llm"),  # compile over DDP
])
def test_param_group_by_name(name: str, group: str) -> None:
    assert param_group(name) == group


def test_unknown_parameter_and_group_are_refused() -> None:
    with pytest.raises(ConfigError, match="'extra.weight'"):
        param_group("extra.weight")
    with pytest.raises(ConfigError, match="'mergers'"):
        apply_trainable(Qwen3VLModel(tiny_dense_config()), ["mergers"])
    assert strip_wrappers("module.model.visual.x") == "visual.x"


def test_s0_trains_only_the_mergers() -> None:
    model = Qwen3VLModel(tiny_dense_config())
    counts = apply_trainable(model, ["merger"])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("visual.merger.", "visual.deepstack_merger_list.")) for n in trainable)
    assert any(n.startswith("visual.deepstack_merger_list.") for n in trainable)
    assert counts["vision_frozen"] > 0 and counts["llm_frozen"] > 0 and "llm_trainable" not in counts
    # A later stage unfreezes everything again.
    apply_trainable(model, ["vision", "merger", "llm"])
    assert all(p.requires_grad for p in model.parameters())


def test_frozen_snapshot_holds_only_frozen_groups() -> None:
    model = Qwen3VLModel(tiny_dense_config())
    snap = frozen_snapshot(model.state_dict(), ["merger"])
    assert snap and not any(k.startswith("visual.merger.") for k in snap)
    assert "language_model.embed_tokens.weight" in snap
    with torch.no_grad():
        model.language_model.embed_tokens.weight.add_(1)
    assert not torch.equal(snap["language_model.embed_tokens.weight"], model.language_model.embed_tokens.weight)
