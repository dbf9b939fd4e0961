"""Start-up layout checks before any process group: a layout the backend refuses, one the GPU cannot hold,
an unsupported package version -> one line naming what to change, exit 2; `parallel=auto` re-plans per stage."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch.distributed as dist

from launch.planner.estimate import GPU, GPUS
from train.__main__ import main
from train.config.compose import load_config, stage_configs
from train.pipeline import EXIT_CONFIG, record_layout, start_up_layouts
from train.preflight import PreflightError, check_layouts, check_memory, check_packages


def _start(capsys, *overrides: str) -> str:
    """`python -m train ...` in this process; the one line it printed (stderr), after exit 2."""
    assert main(["stage=s1", "stage.seq_len=256", *overrides]) == EXIT_CONFIG
    assert not dist.is_initialized(), "the layout was refused after process-group work"
    err = capsys.readouterr().err.strip()
    assert err.startswith("longvl: ") and "\n" not in err and "Traceback" not in err
    return err


@pytest.mark.parametrize("overrides, fragment", [
    (["model=tiny_moe", "backend.zero_stage=3"], "backend.zero_stage=3 with an MoE model"),
    (["model=tiny_moe", "backend=megatron", "parallel.ep=3"], "parallel.expert_tp*ep=1*3 must divide"),
    (["model=tiny", "backend=deepspeed", "parallel.tp=2"], "world size 1 is not divisible"),
    (["model=tiny_moe", "backend=deepspeed", "parallel.ep=3"], "not divisible by parallel.ep=3"),
    (["model=tiny", "backend=deepspeed", "parallel.cp_layout=document"], "parallel.cp_layout=document: DeepSpeed"),
    (["model=tiny", "parallel.cp_layout=ring"], "parallel.cp_layout='ring' is not one of auto, sequence, document"),
    (["model=tiny", "parallel.cp_comm_type=a2a+p2p"], "parallel.cp_comm_type='a2a+p2p' is not one of"),
])
def test_refused_layouts_are_one_line_and_exit_2(capsys, overrides, fragment):
    assert fragment in _start(capsys, *overrides)


def test_backend_rules_run_at_start_up_for_a_world_the_planner_knows():
    cfg = load_config(["model=tiny", "backend=megatron", "parallel.tp=8", "stage.global_batch_size=8"])
    with pytest.raises(PreflightError, match="parallel.tp=8 must divide model.text.num_attention_heads=4"):
        check_layouts([cfg], 8)


def test_te_a2a_context_parallel_needs_heads_divisible_by_cp():
    cfg = load_config(["model=tiny", "backend=megatron", "parallel.cp=4", "parallel.cp_comm_type=a2a",
                       "stage.global_batch_size=2"])
    with pytest.raises(PreflightError, match="cp_comm_type=a2a scatters each TP rank's 4 query / 2 key-value "
                                             "heads over cp=4"):
        check_layouts([cfg], 8)
    cfg.parallel.cp_comm_type = "p2p"
    check_layouts([cfg], 8)


def test_a_layout_the_gpu_cannot_hold():
    cfg = load_config(["model=qwen3vl_8b", "backend=megatron", "stage=s3"])
    with pytest.raises(PreflightError) as err:
        check_memory(cfg, 32, GPUS["h100"])  # 262K tokens, no CP, no recompute
    assert "needs" in str(err.value) and "h100 has 71.7 GiB usable" in str(err.value)
    assert "backend.activation_checkpointing=true" in str(err.value) and "\n" not in str(err.value)
    fitting = load_config(["model=tiny", "backend=megatron", "stage.seq_len=512"])
    check_memory(fitting, 1, GPU("small", 2 ** 30, 1e12))


def test_unsupported_package_versions_are_named():
    cfg = load_config(["backend=megatron"])
    versions = {"megatron-core": "0.16.1", "transformer-engine": None, "flash-attn": None}
    check_packages(cfg, versions.get)
    with pytest.raises(PreflightError, match="megatron-core 0.18.0 is installed; longvl supports "
                                             "megatron-core>=0.16.1,<0.17"):
        check_packages(cfg, {**versions, "megatron-core": "0.18.0"}.get)
    with pytest.raises(PreflightError, match="transformer-engine 1.9"):
        check_packages(cfg, {**versions, "transformer-engine": "1.9"}.get)
    with pytest.raises(PreflightError, match="backend=megatron needs megatron-core"):
        check_packages(cfg, {**versions, "megatron-core": None}.get)


def test_parallel_auto_replans_each_stage_for_the_jobs_gpus(capsys, tmp_path):
    """One pipeline command: the planner picks each stage's layout for 16 pretend H100s; the 8K stages run
    without model parallelism, the 262K stage gets model-parallel ranks and activation checkpointing."""
    configs = stage_configs(["pipeline=qwen3vl", "model=qwen3vl_2b", "backend=megatron", "parallel=auto",
                             "parallel.auto_gpu=h100", f"run_dir={tmp_path}"])
    chosen = start_up_layouts(configs, SimpleNamespace(world_size=16, rank=0, local_rank=0))
    by_stage = {cfg.stage.name: cfg.parallel for cfg in chosen}
    model_parallel = {name: p.tp * p.pp * p.cp for name, p in by_stage.items()}
    assert model_parallel["s1"] == 1 and model_parallel["s3"] > 1 and chosen[-1].backend.activation_checkpointing
    assert not any(p.auto for p in by_stage.values())
    printed = capsys.readouterr().out
    recorded = record_layout(chosen[-1]).read_text()  # <run_dir>/s3/layout.yaml: what the stage runs
    assert f"tp: {by_stage['s3'].tp}" in recorded and "activation_checkpointing: true" in recorded
    assert printed.count("parallel=auto chose megatron") == 4 and "for 16 x h100" in printed
    with pytest.raises(Exception, match="parallel=auto needs a CUDA device to plan for, or parallel.auto_gpu"):
        start_up_layouts(stage_configs(["model=tiny", "parallel=auto"]),
                         SimpleNamespace(world_size=1, rank=0, local_rank=0))


def test_supported_versions_are_the_ones_pyproject_pins():
    import re
    import tomllib
    from pathlib import Path

    from train.preflight import SUPPORTED_PACKAGES

    project = tomllib.loads((Path(__file__).resolve().parents[2] / "pyproject.toml").read_text())["project"]
    pins = {}
    for spec in [*project["dependencies"], *project["optional-dependencies"]["gpu"]]:
        match = re.match(r"([A-Za-z0-9_-]+)(?:\[\w+\])?>=([\d.]+),<([\d.]+)", spec)
        if match:
            pins[match.group(1)] = (match.group(2), match.group(3))
    for package, (low, high) in SUPPORTED_PACKAGES.items():
        assert pins[package] == (low, high), package


def test_check_layouts_estimates_memory_on_the_given_gpu():
    configs = stage_configs(["pipeline=qwen3vl_8b"])  # its layouts are planned for 64 H100s
    check_layouts(configs, 64, GPUS["h100"])
    with pytest.raises(PreflightError, match="stage s1: .* needs 64.7 GiB per GPU .* h100-40gb has 36.0 GiB usable"):
        check_layouts(configs, 64, GPU("h100-40gb", 40 * 2 ** 30, 989e12))
