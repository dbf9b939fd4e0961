"""Every shipped parallel layout with the models it is written for: the megatron backend builds the first,
a middle and the last rank's modules on the meta device (one process posing as each rank through torch's
fake process group) with the parameter counts launch.plan assumes; and the planner, preflight and the
backends accept and refuse the same layouts (they call the same rules)."""
from __future__ import annotations

import functools
import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from launch.plan import configured_layout, evaluate
from launch.planner.estimate import GPUS, _stage_params
from launch.planner.model_stats import model_stats
from train.backends.deepspeed.config import check_layout as deepspeed_rules
from train.backends.megatron.layout import check_config as megatron_rules
from train.backends.megatron.layout import stage_layers
from train.config.compose import CONFIG_DIR, load_config
from train.config.model import ConfigError

REPO = Path(__file__).resolve().parents[2]
PROGRAM = Path(__file__).parent / "programs" / "megatron_meta_build.py"
# configs/parallel/<file>: the models it is written for and the world size it is meant for.
WRITTEN_FOR = {
    "single": (("tiny", "tiny_moe"), 2),
    "cp2": (("tiny", "tiny_moe"), 4),
    "qwen3vl_235b_h100": (("qwen3vl_235b_a22b",), 256),
}
RESOLVED_AT_START_UP = {"auto"}  # parallel=auto: the planner picks a layout (tests/unit/test_preflight_layouts.py)
# Virtual pipeline stages (parallel.vpp) on top of shipped files: (model, parallel file, world, extra overrides).
# The MoE mix (every second layer sparse) puts MoE layers 1 and 3 on rank 1's two chunks (2 and 3 without).
VIRTUAL = [("qwen3vl_235b_a22b", "qwen3vl_235b_h100", 256,
            ("parallel.first_stage_layers=10", "parallel.last_stage_layers=12", "parallel.vpp=2")),
           ("tiny_moe", "single", 2, ("parallel.pp=2", "parallel.vpp=2", "model.text.num_hidden_layers=4",
                                      "model.text.decoder_sparse_step=2", "model.text.mlp_only_layers=[]",
                                      "model.vision.deepstack_visual_indexes=[0]"))]


@functools.lru_cache(maxsize=None)
def _stats(model: str, *model_overrides: str):
    return model_stats(load_config([f"model={model}", *model_overrides]).model)


def _overrides(model: str, parallel: str, *extra: str) -> list[str]:
    return [f"model={model}", "backend=megatron", f"parallel={parallel}", *extra]


def test_every_parallel_file_is_covered():
    shipped = {p.stem for p in (CONFIG_DIR / "parallel").glob("*.yaml")}
    assert shipped == set(WRITTEN_FOR) | RESOLVED_AT_START_UP


@pytest.mark.slow
def test_first_middle_last_ranks_build_on_meta_with_the_planners_parameter_counts():
    jobs = [{"overrides": _overrides(model, parallel), "world": world, "ranks": sorted({0, world // 2, world - 1})}
            for parallel, (models, world) in WRITTEN_FOR.items() for model in models]
    jobs += [{"overrides": _overrides(model, parallel, *extra), "world": world,
              "ranks": sorted({0, world // 2, world - 1})} for model, parallel, world, extra in VIRTUAL]
    out = subprocess.run([sys.executable, str(PROGRAM), json.dumps(jobs)], cwd=REPO, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    built = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert len(built) == sum(len(job["ranks"]) for job in jobs)
    stages_seen = set()
    for rank in built:
        cfg = load_config(rank["overrides"])
        layout = configured_layout(cfg, rank["world"])
        chunks = stage_layers(cfg.model.text.num_hidden_layers, layout.pp, layout.first, layout.last, layout.vpp)
        stage = rank["stage"]
        layers = [layer for chunk in chunks[stage] for layer in chunk]
        model_overrides = [o for o in rank["overrides"] if o.startswith("model.")]
        planned = sum(_stage_params(_stats(cfg.model.name, *model_overrides), layout, stage, layers,
                                    set(cfg.stage.trainable)).values())
        where = f"{cfg.model.name} {layout.describe()} rank {rank['rank']}"
        assert rank["meta"], where
        assert rank["layers"] == len(layers) and rank["chunk_layers"] == chunks[stage], where
        assert rank["params"] == pytest.approx(planned, rel=0.01), where
        stages_seen.add((cfg.model.name, stage))
    # the 235B layout's ranks 0 / 128 / 255 sit on the first, a middle and the last of its 8 stages
    assert {s for m, s in stages_seen if m == "qwen3vl_235b_a22b"} == {0, 4, 7}


def _refusal(rules, cfg, world: int) -> str:
    try:
        cfg.parallel.data_parallel_size(world)
        rules(cfg, world)
    except ConfigError as err:
        return str(err)
    return ""


@pytest.mark.slow
def test_planner_and_backends_agree_on_every_shipped_combination():
    """For every parallel file x model x backend (262K stage): the planner refuses a layout as invalid (not
    for memory) exactly when the backend's own rules (what its constructor and preflight run) refuse it."""
    models = sorted(p.stem for p in (CONFIG_DIR / "model").glob("*.yaml"))
    verdicts = []
    for parallel, (_, world) in WRITTEN_FOR.items():
        for model in models:
            composed = load_config([f"model={model}", "backend=megatron", f"parallel={parallel}", "stage=s3"])
            as_deepspeed = replace(composed, backend=replace(composed.backend, name="deepspeed", zero_stage=1))
            for cfg, rules in ((composed, megatron_rules), (as_deepspeed, deepspeed_rules)):
                plan = evaluate(cfg, _stats(model), configured_layout(cfg, world), GPUS["h200"], 0.4)
                planner_refuses = not plan.fits and plan.memory is None
                backend_refusal = _refusal(rules, cfg, world)
                where = (model, parallel, cfg.backend.name, plan.reason, backend_refusal)
                assert planner_refuses == bool(backend_refusal), where
                if backend_refusal:
                    assert plan.reason == backend_refusal, where
                verdicts.append(bool(backend_refusal))
    assert True in verdicts and False in verdicts  # both verdicts occur
