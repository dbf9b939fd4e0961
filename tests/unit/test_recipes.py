"""The recipe pipelines per published model: every stage's layout (s3's 262K included) is one launch.plan
accepts on the GPU count the recipe is written for."""
from __future__ import annotations

import pytest

from launch.plan import configured_layout, evaluate
from launch.planner.estimate import GPUS
from launch.planner.model_stats import model_stats
from train.config.compose import CONFIG_DIR, stage_configs

RECIPES = sorted(p.stem for p in (CONFIG_DIR / "pipeline").glob("qwen3vl_*.yaml"))


def test_every_published_model_has_a_recipe():
    models = {p.stem for p in (CONFIG_DIR / "model").glob("qwen3vl_*.yaml")}
    assert set(RECIPES) == models


@pytest.mark.slow
@pytest.mark.parametrize("recipe", RECIPES)
def test_every_stage_layout_fits_by_the_planner(recipe):
    configs = stage_configs([f"pipeline={recipe}"])
    assert [c.stage.name for c in configs] == ["s0", "s1", "s2", "s3"]
    gpus = configs[0].pipeline.gpus
    stats = model_stats(configs[0].model)
    for cfg in configs:
        assert cfg.model.name == recipe and cfg.backend.name == "megatron"
        plan = evaluate(cfg, stats, configured_layout(cfg, gpus), GPUS["h100"], 0.4)
        assert plan.fits, f"{recipe} {cfg.stage.name}: {plan.reason}"
        assert plan.layout.world == gpus
    s3 = configs[-1]
    assert s3.stage.seq_len == 262144 and s3.backend.activation_checkpointing
    assert s3.parallel.tp * s3.parallel.cp > 1
