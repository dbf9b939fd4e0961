"""Megatron layout rules (train/backends/megatron/layout.py): sizes vs world size as megatron-core folds
them (expert TP, expert-data-parallel), uneven pipeline stages, one-line errors naming what to change."""
from __future__ import annotations

import sys
from types import SimpleNamespace

import pytest

from train.backends.megatron.layout import (ParallelLayoutError, ParallelSizes, check_layout, resolve_sizes,
                                            stage_layer_counts, suggest_stage_split)
from train.config.compose import load_config


def test_dp_is_derived_from_the_world_size():
    assert resolve_sizes(ParallelSizes(tp=2, pp=2), 8) == ParallelSizes(tp=2, pp=2, cp=1, ep=1, dp=2)
    assert resolve_sizes(SimpleNamespace(tp=1, pp=1, cp=2, ep=4, dp=0), 8).dp == 4


def test_published_235b_layout_folds_experts_over_tp_and_dp():
    """TP2 PP8 EP32 on 256 GPUs: dp 16, experts over the 2 x 16 ranks of a stage, expert-data-parallel 1
    (megatron-core's own numbers, checked with a fake process group in notes/cpu-backends.md)."""
    cfg = load_config(["model=qwen3vl_235b_a22b", "backend=megatron", "parallel=qwen3vl_235b_h100"])
    sizes = resolve_sizes(cfg.parallel, 256)
    assert (sizes.dp, sizes.etp, sizes.expert_dp, sizes.first, sizes.last) == (16, 1, 1, 11, 11)
    # with expert TP = TP (megatron-core's default when unset), EP 32 no longer fits the stage
    with pytest.raises(ParallelLayoutError, match="expert_tp\\*ep=2\\*32 must divide the tp\\*cp\\*dp=2\\*1\\*16"):
        resolve_sizes(ParallelSizes(tp=2, pp=8, ep=32, etp=2), 256)


def test_torch_and_megatron_are_not_imported_by_the_rules():
    """Preflight and the planner run the rules before anything heavy: importing them must stay light."""
    heavy = [name for name in ("megatron.core", "deepspeed") if name in sys.modules]
    import train.backends.megatron.layout  # noqa: F401
    assert [name for name in ("megatron.core", "deepspeed") if name in sys.modules] == heavy


def test_uneven_pipeline_stages_as_megatron_places_them():
    assert stage_layer_counts(94, 8, 11, 11) == [11] + [12] * 6 + [11]
    assert stage_layer_counts(8, 4) == [2, 2, 2, 2]
    assert stage_layer_counts(7, 2, 3, None) == [3, 4]
    assert suggest_stage_split(94, 8) == [11] + [12] * 6 + [11]
    assert suggest_stage_split(5, 2) == [2, 3] and suggest_stage_split(3, 4) is None
    for layers in range(1, 40):
        for pp in range(1, layers + 1):
            split = suggest_stage_split(layers, pp)
            if split is not None:  # every suggestion is one megatron accepts
                assert stage_layer_counts(layers, pp, split[0] if pp > 1 else None,
                                          split[-1] if pp > 1 else None) == split


@pytest.mark.parametrize("sizes, world, fragment", [
    (ParallelSizes(tp=3), 8, "world size 8 is not divisible by parallel.tp*pp*cp=3*1*1=3"),
    (ParallelSizes(tp=2, dp=2), 8, "tp*pp*cp*dp=4 != world size 8"),
    (ParallelSizes(tp=2, ep=3), 8, "parallel.expert_tp*ep=1*3 must divide the tp*cp*dp=2*1*4 ranks"),
    (ParallelSizes(tp=0), 2, "parallel sizes must be positive"),
])
def test_bad_sizes_fail_with_one_line_naming_the_sizes(sizes, world, fragment):
    with pytest.raises(ParallelLayoutError) as err:
        resolve_sizes(sizes, world)
    message = str(err.value)
    assert fragment in message and "\n" not in message


def _model(*overrides: str):
    return load_config(["model=tiny_moe", "model.text.num_hidden_layers=8", *overrides]).model


@pytest.mark.parametrize("sizes, kwargs, fragment", [
    (ParallelSizes(tp=3, dp=1), {}, "parallel.tp=3 must divide model.text.num_attention_heads"),
    (ParallelSizes(pp=3, dp=1), {}, "set parallel.first_stage_layers="),
    (ParallelSizes(pp=2, dp=1, first=1, last=1), {}, "do not split over pp=2"),
    (ParallelSizes(pp=4, dp=1), {}, "holds 2 decoder layers, fewer than the 3 DeepStack injections"),
    (ParallelSizes(ep=3, dp=3), {}, "parallel.ep=3 must divide model.text.num_experts"),
    (ParallelSizes(pp=2, dp=1), {"aux_loss_form": "pooled"}, "backend.moe_aux_loss=per_layer"),
    (ParallelSizes(cp=2, dp=1), {"seq_len": 102}, "stage.seq_len=102 is not divisible by 2*cp=4"),
    (ParallelSizes(tp=2, dp=1), {"seq_len": 65, "sequence_parallel": True}, "sequence parallel splits"),
    (ParallelSizes(tp=2, dp=1), {"model": ("model.vision.intermediate_size=65",)},
     "parallel.tp=2 must divide model.vision.intermediate_size=65 (the ViT is tensor-parallel)"),
])
def test_model_rules_name_the_key_to_change(sizes, kwargs, fragment):
    model = _model(*kwargs.pop("model", ()))
    with pytest.raises(ParallelLayoutError) as err:
        check_layout(model, sizes, **kwargs)
    assert fragment in str(err.value) and "\n" not in str(err.value)


def test_per_layer_aux_loss_lets_moe_run_over_pipeline_stages():
    check_layout(_model(), ParallelSizes(pp=2, dp=1), aux_loss_form="per_layer")
    cfg = load_config(["model=tiny_moe", "model.text.num_hidden_layers=8", "backend=megatron", "parallel.pp=2"])
    assert cfg.moe_aux_loss_form() == "per_layer"
    assert load_config(["model=tiny_moe", "backend=megatron"]).moe_aux_loss_form() == "pooled"
