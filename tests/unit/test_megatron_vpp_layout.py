"""Virtual pipeline stages (parallel.vpp, megatron-core's interleaved 1F1B): the layer placement of
train/backends/megatron/layout.py equals megatron-core's own (get_transformer_layer_offset /
get_num_layers_to_build per pipeline rank and vp_stage, uneven first/last stages included), and bad
combinations are one line naming the key."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from train.backends.megatron.layout import ParallelLayoutError, ParallelSizes, check_config, stage_layers
from train.config.compose import load_config

FOUR_LAYERS = ["model=tiny", "backend=megatron", "model.text.num_hidden_layers=4",
               "model.vision.deepstack_visual_indexes=[0]"]

PLACEMENTS = [(8, 2, None, None, 2), (12, 3, None, None, 2), (16, 4, None, None, 4), (10, 2, 4, None, 2),
              (10, 2, None, 4, 2),
              (16, 3, 4, None, 2), (16, 3, None, 4, 2), (94, 8, 10, 12, 2), (8, 2, None, None, None)]


@pytest.mark.parametrize("layers, pp, first, last, vpp", PLACEMENTS)
def test_chunk_layers_are_megatrons(layers, pp, first, last, vpp):
    from megatron.core.transformer.transformer_block import get_num_layers_to_build
    from megatron.core.transformer.transformer_config import TransformerConfig
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    config = TransformerConfig(num_layers=layers, hidden_size=8, num_attention_heads=2,
                               pipeline_model_parallel_size=pp, virtual_pipeline_model_parallel_size=vpp,
                               num_layers_in_first_pipeline_stage=first, num_layers_in_last_pipeline_stage=last,
                               pipeline_dtype=torch.float32)
    placed = stage_layers(layers, pp, first, last, vpp)
    for rank, chunks in enumerate(placed):
        for v, chunk in enumerate(chunks):
            stage = v if vpp else None
            offset = get_transformer_layer_offset(config, vp_stage=stage, pp_rank=rank)
            count = get_num_layers_to_build(config, vp_stage=stage, pp_rank=rank)
            assert chunk == list(range(offset, offset + count)), (rank, v)
    # every layer exactly once, in model order chunk 0 of every stage, then chunk 1, ...
    order = [layer for v in range(vpp or 1) for chunks in placed for layer in chunks[v]]
    assert order == list(range(layers))


@pytest.mark.parametrize("overrides, world, fragment", [
    (["parallel.pp=2", "parallel.vpp=3"], 2,
     "parallel.vpp=3 must divide every pipeline stage's decoder layers [2, 2] (pp=2, first_stage_layers=None, "
     "last_stage_layers=None): no split"),
    (["parallel.pp=2", "parallel.vpp=2", "model.text.num_hidden_layers=6"], 2,
     "parallel.vpp=2 must divide every pipeline stage's decoder layers [3, 3] (pp=2, first_stage_layers=None, "
     "last_stage_layers=None): set parallel.first_stage_layers=2 and last_stage_layers=null"),
    (["parallel.pp=2", "parallel.vpp=2", "model.text.num_hidden_layers=5"], 2,
     "5 decoder layers do not split over pp=2 with first_stage_layers=None last_stage_layers=None: no split"),
    (["parallel.pp=1", "parallel.vpp=2"], 2, "parallel.vpp=2 needs pp > 1"),
    (["parallel.pp=2", "parallel.vpp=2", "parallel.first_stage_layers=2", "parallel.last_stage_layers=2"], 2,
     "parallel.vpp with pp=2 takes first_stage_layers or last_stage_layers, not both"),
    (["model.vision.deepstack_visual_indexes=[0,1]", "parallel.pp=2", "parallel.vpp=2"], 2,
     "first model chunk holds 1 decoder layers, fewer than the 2 DeepStack injections"),
    (["parallel.pp=2", "parallel.vpp=2", "stage.global_batch_size=3"], 2,
     "parallel.vpp needs the micro-batches per step (stage.global_batch_size=3 / dp=1 / stage.micro_batch_size=1 = 3) "
     "to be a multiple of pp=2"),
    # 4 sequences joined in pairs are 2 micro-batches: fine; joined in fours, 1: refused
    (["parallel.pp=2", "parallel.vpp=2", "stage.global_batch_size=4", "stage.micro_batch_size=4"], 2,
     "(stage.global_batch_size=4 / dp=1 / stage.micro_batch_size=4 = 1) to be a multiple of pp=2"),
])
def test_bad_virtual_stages_are_one_line(overrides, world, fragment):
    cfg = load_config([*FOUR_LAYERS, *overrides])
    with pytest.raises(ParallelLayoutError) as err:
        check_config(cfg, world)
    assert fragment in str(err.value) and "\n" not in str(err.value)


def test_tiny_pp2_vpp2_is_accepted():
    cfg = load_config([*FOUR_LAYERS, "parallel.pp=2", "parallel.vpp=2", "stage.global_batch_size=4"])
    sizes = check_config(cfg, 2)
    assert sizes == ParallelSizes(pp=2, dp=1, vpp=2) and "vpp=2" in sizes.describe()


def test_planner_counts_chunks_and_the_interleaved_warm_up():
    """Per-rank parameters: the layers of all the rank's chunks (a dense/MoE mix lands differently than
    without virtual stages); activations: stage 0 holds pp + (pp - 1)/vpp micro-batches, not pp."""
    from launch.plan import configured_layout
    from launch.planner.estimate import _activation_bytes, _in_flight, _stage_params, memory
    from launch.planner.model_stats import model_stats

    cfg = load_config([*FOUR_LAYERS, "parallel.pp=2", "parallel.vpp=2", "stage.global_batch_size=8",
                       "model.text.num_experts=4", "model.text.num_experts_per_tok=2",
                       "model.text.moe_intermediate_size=16", "model.text.decoder_sparse_step=2"])
    layout = configured_layout(cfg, 2)
    plain = replace(layout, vpp=None)
    assert layout.vpp == 2 and _in_flight(layout, 0, 8) == 2 + 1 / 2 and _in_flight(layout, 1, 8) == 3 / 2
    assert _activation_bytes(cfg, layout, 0, [0, 2], False) == pytest.approx(
        _activation_bytes(cfg, plain, 0, [0, 2], False) * 2.5 / 2)
    stats = model_stats(cfg.model)
    assert [cfg.model.text.is_moe_layer(i) for i in range(4)] == [False, True, False, True]
    # stage 1 holds layers 1 and 3 (both MoE) with vpp=2, layers 2 and 3 without
    moe_rank = _stage_params(stats, layout, 1, [1, 3], set(cfg.stage.trainable))
    assert moe_rank[("expert", True)] == 2 * _stage_params(stats, plain, 1, [2, 3], set(cfg.stage.trainable))[
        ("expert", True)]
    assert memory(cfg, stats, layout).stage in (0, 1)


def test_planner_bubble_shrinks_with_virtual_stages():
    from launch.plan import configured_layout
    from launch.planner.estimate import GPUS
    from launch.planner.flops import step_cost
    from launch.planner.model_stats import model_stats

    cfg = load_config([*FOUR_LAYERS, "parallel.pp=2", "parallel.vpp=2", "stage.global_batch_size=8"])
    layout, stats = configured_layout(cfg, 2), model_stats(cfg.model)
    interleaved = step_cost(cfg, stats, layout, GPUS["h100"], 0.4)
    plain = step_cost(cfg, stats, replace(layout, vpp=None), GPUS["h100"], 0.4)
    assert (plain.bubble, interleaved.bubble) == (1 / 8, 1 / 16)
    assert interleaved.seconds < plain.seconds
