"""launch.plan: the published 235B layout fits, small clusters and long sequences are refused with reasons."""
from __future__ import annotations

import copy
import functools

import pytest

from launch.plan import PlanArgs, candidates, evaluate, main, propose
from launch.planner.estimate import GIB, GPUS, Layout, check_layout, memory
from launch.planner.model_stats import model_stats
from launch.planner.stages import balanced_stage_split, split_options, stage_state_bytes
from train.backends.megatron.layout import stage_layer_counts, suggest_stage_split
from train.config.compose import load_config
from train.config.model import ConfigError

H100 = GPUS["h100"]


@functools.lru_cache(maxsize=None)
def _setup(stage: str, model: str = "qwen3vl_235b_a22b"):
    cfg = load_config([f"model={model}", f"stage={stage}"])
    return cfg, model_stats(cfg.model)


def _megatron(tp, pp, cp, ep, world, recompute=True, layers=94) -> Layout:
    split = suggest_stage_split(layers, pp)
    first, last = (None, None) if len(set(split)) == 1 else (split[0], split[-1])  # 94 / 8: 11, 12 x 6, 11
    return Layout("megatron", tp, pp, cp, ep, world // (tp * pp * cp), 1, recompute, 1, first, last)


def test_published_235b_layout_fits_on_256_h100():
    cfg, stats = _setup("s1")
    plan = evaluate(cfg, stats, _megatron(2, 8, 1, 32, 256), H100, 0.4)
    assert plan.fits, plan.reason
    # The same layout without activation checkpointing does not: 8 micro-batches of 8K tokens in flight.
    no_recompute = evaluate(cfg, stats, _megatron(2, 8, 1, 32, 256, recompute=False), H100, 0.4)
    assert not no_recompute.fits and no_recompute.reason.startswith("memory")


def test_model_inventory_matches_the_published_sizes():
    _, stats = _setup("s1")
    assert 235e9 < stats.total < 236.5e9  # "235B"
    assert 21e9 < stats.active_llm_params() < 23e9  # "A22B"


def test_235b_on_8_gpus_without_model_parallelism_is_refused_for_memory():
    cfg, stats = _setup("s1")
    plan = evaluate(cfg, stats, _megatron(1, 1, 1, 1, 8), H100, 0.4)
    assert not plan.fits and plan.reason.startswith("memory:")
    # bf16 weights alone: 2 bytes x 235.7B parameters on one GPU
    assert plan.memory.weights == pytest.approx(2 * stats.total, rel=1e-6)


def test_s3_at_262k_needs_context_parallelism():
    cfg, stats = _setup("s3")
    args = PlanArgs(256, H100, 0.4, [])
    best = propose(cfg, stats, args, [("megatron", 1)])
    assert best is not None and best.fits and best.layout.cp > 1
    cp1 = [evaluate(cfg, stats, layout, H100, 0.4) for layout in candidates(cfg, 256, [("megatron", 1)])
           if layout.cp == 1]
    valid = [p for p in cp1 if not p.fits and p.memory is not None]
    assert valid, "some cp=1 layouts must be valid (and then refused for memory)"
    assert not any(p.fits for p in cp1)
    assert all(p.reason.startswith("memory") for p in valid)


@pytest.mark.parametrize("layout, reason", [
    (Layout("megatron", 8, 1, 1, 1, 32, 1, True), "parallel.tp=8 must divide model.text.num_attention_heads=64 "
                                                  "and num_key_value_heads=4"),
    (Layout("megatron", 2, 1, 1, 3, 128, 1, True), "parallel.expert_tp*ep=1*3 must divide the tp*cp*dp=2*1*128"),
    (Layout("deepspeed", 2, 1, 1, 1, 128, 1, True), "no tensor/pipeline"),
])
def test_invalid_layouts_are_refused_with_one_line_reason(layout, reason):
    cfg, stats = _setup("s1")
    plan = evaluate(cfg, stats, layout, H100, 0.4)
    assert not plan.fits and reason in plan.reason and "\n" not in plan.reason


def test_world_not_divisible_by_model_parallel_is_refused():
    cfg, _ = _setup("s1")
    with pytest.raises(ConfigError, match="world size 256 is not divisible by parallel.tp \\* parallel.pp \\* parallel.cp = 2\\*3\\*1"):
        check_layout(Layout("megatron", 2, 3, 1, 1, 42, 1, True), cfg, 256)


def test_tp_must_divide_attention_heads():
    cfg, stats = _setup("s1", "qwen3vl_2b")
    cfg = copy.deepcopy(cfg)
    cfg.model.text.num_attention_heads, cfg.model.text.num_key_value_heads = 12, 4
    plan = evaluate(cfg, stats, _megatron(8, 1, 1, 1, 8), H100, 0.4)
    assert "parallel.tp=8 must divide model.text.num_attention_heads=12" in plan.reason


def test_zero_stages_shard_what_they_promise():
    cfg, stats = _setup("s1", "qwen3vl_8b")
    by_zero = {z: memory(cfg, stats, Layout("deepspeed", 1, 1, 1, 1, 64, z, True)) for z in (0, 1, 2, 3)}
    p = stats.total
    assert by_zero[0].optimizer == pytest.approx(12 * p) and by_zero[0].grads == pytest.approx(2 * p)
    assert by_zero[1].optimizer == pytest.approx(12 * p / 64) and by_zero[1].grads == pytest.approx(2 * p)
    assert by_zero[2].grads == pytest.approx(2 * p / 64) and by_zero[2].weights == pytest.approx(2 * p)
    assert by_zero[3].weights == pytest.approx(2 * p / 64)


def test_frozen_stage_keeps_no_optimizer_state_for_frozen_groups():
    cfg, stats = _setup("s0", "qwen3vl_8b")  # S0 trains only the mergers
    mem = memory(cfg, stats, Layout("megatron", 1, 1, 1, 1, 8, 0, True))
    assert mem.optimizer == pytest.approx(12 * stats.merger_params)
    assert mem.grads == pytest.approx(4 * stats.merger_params)


def test_stage_layers_split_every_layer_once():
    assert suggest_stage_split(94, 8) == [11, 12, 12, 12, 12, 12, 12, 11]
    assert stage_layer_counts(94, 8, 11, 11) == [11, 12, 12, 12, 12, 12, 12, 11]
    assert sum(suggest_stage_split(94, 16)) == 94 and stage_layer_counts(4, 1) == [4]


def test_pipeline_stages_are_balanced_by_state_bytes():
    """The first stage carries the ViT + embedding, the last the head (a tied copy): 2B at TP=2 x PP=2 gets
    10 / 18 layers, no split has a lighter heaviest stage, and the even 14 / 14 is >= 15% heavier."""
    cfg, stats = _setup("s1", "qwen3vl_2b")
    layout = balanced_stage_split(cfg, stats, Layout("megatron", 2, 2, 1, 1, 1, 0, False), activations=False)
    assert (layout.first, layout.last) == (10, 18)
    heaviest = {f: max(stage_state_bytes(cfg, stats, layout, [f, 28 - f])) for f in range(3, 28)}
    assert heaviest[10] == min(heaviest.values())
    assert heaviest[14] > 1.15 * heaviest[10]
    for first, last in split_options(94, 8):  # the end stages never hold more than a middle one
        counts = stage_layer_counts(94, 8, first, last)
        assert sum(counts) == 94 and max(first, last) <= counts[1]


@pytest.mark.parametrize("recompute", [False, True])
def test_pipeline_stages_are_balanced_by_what_a_training_stage_holds(recompute):
    """With activations (1F1B: stage s holds pp - s micro-batches in flight, the first also the ViT's, the
    last the logits) the split minimises the planner's own worst-stage memory over every split megatron
    accepts with the 3 DeepStack layers on the first stage, which gets fewer layers than the state alone
    would give it."""
    cfg, stats = _setup("s1", "qwen3vl_8b")
    base = Layout("megatron", 2, 4, 1, 1, 8, 1, recompute)
    layout = balanced_stage_split(cfg, stats, base)
    worst = {split: memory(cfg, stats, Layout(**{**base.__dict__, "first": split[0], "last": split[1]})).total
             for split in split_options(36, 4, min_first=3)}
    assert worst[(layout.first, layout.last)] == pytest.approx(min(worst.values()), rel=1e-9)
    state_only = balanced_stage_split(cfg, stats, base, activations=False)
    assert layout.first < (state_only.first or 9), (layout, state_only)
    assert memory(cfg, stats, layout).total < memory(cfg, stats, state_only).total


def test_cli_prints_requested_and_proposed_layouts(capsys):
    status = main(["model=qwen3vl_2b", "stage=s1", "gpus=8", "gpu=h200", "backend=megatron", "parallel.tp=2"])
    out = capsys.readouterr().out
    assert status == 0
    assert "requested megatron distopt tp=2 pp=1 cp=1 ep=1 dp=4" in out and "proposed " in out
    assert "assumed MFU of 40%" in out and f"{GPUS['h200'].memory_bytes / GIB:.1f} GiB" in out


def test_cli_bad_input_is_one_line(capsys):
    assert main(["model=qwen3vl_2b", "gpus=8", "gpu=a100"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "gpu=a100" in err
