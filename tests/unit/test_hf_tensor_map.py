"""The per-tensor HF <-> native map: every layout read whole or as a slice equals the native tensor's slice."""
from __future__ import annotations

import pytest
import torch

from train.models.hf import (PER_EXPERT, PER_EXPERT_GLU, RENAME, TRANSPOSED_EXPERTS, hf_name, hf_names_to_write,
                             hf_read_plan, hf_to_native_state_dict, native_to_hf_state_dict)
from train.models.native_io import EMBED, LM_HEAD, CheckpointError
from train.models.qwen3vl.model import Qwen3VLModel
from model_fixtures import tiny_dense_config, tiny_moe_config

GATE_UP = "language_model.layers.1.mlp.experts.gate_up_proj"
DOWN = "language_model.layers.1.mlp.experts.down_proj"


def moe_native():
    cfg = tiny_moe_config()
    torch.manual_seed(0)
    return cfg, {k: v.clone() for k, v in Qwen3VLModel(cfg).state_dict().items()}


def per_expert_hf(cfg, native):
    """The native experts written one tensor per expert and projection."""
    hf = native_to_hf_state_dict(cfg, native)
    inter = cfg.text.moe_intermediate_size
    for key in [k for k in hf if k.endswith(".mlp.experts.gate_up_proj")]:
        prefix = key.removesuffix(".gate_up_proj")
        gate_up, down = hf.pop(key), hf.pop(prefix + ".down_proj")
        for e in range(cfg.text.num_experts):
            hf[f"{prefix}.{e}.gate_proj.weight"] = gate_up[e, :inter].clone()
            hf[f"{prefix}.{e}.up_proj.weight"] = gate_up[e, inter:].clone()
            hf[f"{prefix}.{e}.down_proj.weight"] = down[e].clone()
    return hf


def transposed_hf(cfg, native):
    return {k: v.transpose(1, 2).contiguous() if ".mlp.experts." in k else v
            for k, v in native_to_hf_state_dict(cfg, native).items()}


@pytest.mark.parametrize("make_hf,layouts", [(native_to_hf_state_dict, (RENAME, RENAME)),
                                             (transposed_hf, (TRANSPOSED_EXPERTS, TRANSPOSED_EXPERTS)),
                                             (per_expert_hf, (PER_EXPERT_GLU, PER_EXPERT))],
                         ids=["transformers5", "transformers4", "per_expert"])
def test_every_layout_reads_whole_and_sliced(make_hf, layouts):
    cfg, native = moe_native()
    hf = make_hf(cfg, native)
    legacy = make_hf is transposed_hf  # the tiny gate_up_proj is square in its last two dims: ambiguous
    plan = hf_read_plan(cfg, {k: v.shape for k, v in hf.items()}, legacy_expert_layout=legacy)
    assert (plan[GATE_UP].layout, plan[DOWN].layout) == layouts
    assert set(plan) == set(native)
    back = hf_to_native_state_dict(cfg, hf, legacy_expert_layout=legacy)
    for key, tensor in native.items():
        assert plan[key].shape == tuple(tensor.shape) and torch.equal(back[key], tensor), key
    reads = []
    opened = lambda name: reads.append(name) or hf[name]  # noqa: E731
    inter = cfg.text.moe_intermediate_size
    index = (slice(1, 3), slice(inter - 8, inter + 8), slice(5, 20))  # two experts, straddling gate and up
    assert torch.equal(plan[GATE_UP].read(opened, index), native[GATE_UP][index])
    assert torch.equal(plan[DOWN].read(opened, index[:2]), native[DOWN][index[:2]])
    if layouts[1] == PER_EXPERT:  # only the experts in the slice were opened
        assert {int(n.split(".")[-3]) for n in reads} == {1, 2}


def test_tied_head_reads_the_embedding_and_is_not_written():
    cfg, native = moe_native()
    assert cfg.text.tie_word_embeddings
    assert hf_names_to_write(cfg, LM_HEAD) is None and hf_names_to_write(cfg, EMBED) == hf_name(EMBED)
    hf = native_to_hf_state_dict(cfg, native)
    assert LM_HEAD not in hf
    plan = hf_read_plan(cfg, {k: v.shape for k, v in hf.items()})
    assert plan[LM_HEAD].hf_names == (hf_name(EMBED),)
    back = hf_to_native_state_dict(cfg, hf)
    assert back[LM_HEAD] is back[EMBED]


def test_untied_model_without_head_and_foreign_names_are_refused():
    cfg = tiny_dense_config()
    assert not cfg.text.tie_word_embeddings
    with pytest.raises(CheckpointError, match="tie_word_embeddings is false but 'lm_head.weight' is missing"):
        hf_read_plan(cfg, {hf_name(EMBED): (8, 4)}, source="dir")
    with pytest.raises(CheckpointError, match="dir: tensor 'encoder.w' is neither"):
        hf_read_plan(cfg, {"encoder.w": (2,)}, source="dir")


def test_per_expert_with_a_missing_expert_is_refused():
    cfg, native = moe_native()
    hf = per_expert_hf(cfg, native)
    del hf["model.language_model.layers.1.mlp.experts.2.up_proj.weight"]
    with pytest.raises(CheckpointError, match=r"layers\.1\.mlp\.experts hold experts \[0, 1, 3\]"):
        hf_read_plan(cfg, {k: v.shape for k, v in hf.items()}, source="dir")
