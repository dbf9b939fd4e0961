"""The Hydra config tree: every group composes, `--cfg job` prints it, and each bad value fails at start-up
with one line naming the key."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from train.config.compose import CONFIG_DIR, compose_config, load_config, stage_configs
from train.config.model import ConfigError
from train.config.schema import TrainConfig

ROOT = Path(__file__).resolve().parents[2]
GROUPS = ("model", "stage", "pipeline", "data", "backend", "parallel", "optim", "logging")


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))


def test_every_group_has_options() -> None:
    for group in GROUPS:
        assert _options(group), f"configs/{group}/ has no option"


@pytest.mark.parametrize("group", [g for g in GROUPS if g != "pipeline"])
def test_every_option_composes_and_validates(group: str) -> None:
    for option in _options(group):
        cfg = load_config([f"{group}={option}"])
        assert isinstance(cfg, TrainConfig)


def test_every_pipeline_expands_to_its_stages() -> None:
    for option in _options("pipeline"):
        configs = stage_configs([f"pipeline={option}"])
        listed = [entry.stage for entry in compose_config([f"pipeline={option}"]).pipeline.stages]
        assert listed and [c.stage.name for c in configs] == listed


def test_cfg_job_prints_the_composed_config() -> None:
    out = subprocess.run([sys.executable, "-m", "train", "--cfg", "job", "optim.lr=0.0123"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    printed = yaml.safe_load(out.stdout)
    assert set(GROUPS) <= set(printed)
    assert printed["optim"]["lr"] == 0.0123
    assert printed["model"]["text"]["num_attention_heads"] > 0


BAD_VALUES = [
    (["model=does_not_exist"], "model"),
    (["optim.lr=fast"], "optim.lr"),
    (["stage.seq_len=abc"], "stage.seq_len"),
    (["optim.lr=-0.001"], "optim.lr"),
    (["stage.seq_len=1000"], "stage.seq_len"),
    (["stage.global_batch_size=6", "stage.micro_batch_size=4"], "stage.micro_batch_size"),
    (["model.text.num_attention_heads=6", "model.text.num_key_value_heads=4"], "model.text.num_attention_heads"),
    (["model.vision.deepstack_visual_indexes=[0,99]"], "model.vision.deepstack_visual_indexes[1]"),
    (["model.text.mrope_section=[1,1,1]"], "model.text.mrope_section"),
    (["no_such_key=1"], "no_such_key"),
    (["cpu_threads=-1"], "cpu_threads"),
    (["pipeline.synth_corpus=nope"], "pipeline.synth_corpus"),
]


@pytest.mark.parametrize("overrides,key", BAD_VALUES, ids=[k for _, k in BAD_VALUES])
def test_bad_value_names_the_key_in_one_line(overrides: list[str], key: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(overrides)
    message = str(err.value)
    assert key in message, message
    assert "\n" not in message


def test_cli_reports_config_errors_as_one_line_before_any_work() -> None:
    out = subprocess.run([sys.executable, "-m", "train", "optim.lr=-1"], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 2
    lines = [ln for ln in out.stderr.splitlines() if ln.strip()]
    assert lines == [lines[0]] and "optim.lr=-1" in lines[0], out.stderr


def test_pipeline_rejects_a_stage_override() -> None:
    pipeline = _options("pipeline")[0]
    with pytest.raises(ConfigError, match="conflicts with pipeline"):
        stage_configs([f"pipeline={pipeline}", "stage=s1"])


def test_composed_config_does_not_depend_on_time_or_host() -> None:
    # Every rank composes its own config: two compositions must be identical.
    assert compose_config([]) == compose_config([])


def test_expert_parallel_spans_the_non_pipeline_ranks() -> None:
    from train.config.schema import ParallelConfig

    # Qwen3-VL-235B-A22B's published layout: TP2 PP8 EP32 on 256 GPUs leaves data parallel 16.
    assert ParallelConfig(tp=2, pp=8, ep=32).data_parallel_size(256) == 16
    with pytest.raises(ConfigError, match="world size 6 is not divisible"):
        ParallelConfig(tp=4).data_parallel_size(6)


def _user_configs(root: Path) -> Path:
    """A user's own config dir: a model, a data mix, a stage and a pipeline, none of them packaged."""
    files = {
        "model/my_model.yaml": "# @package model\ndefaults: [tiny]\nname: my_model\ntext: {num_hidden_layers: 4}\n",
        "data/my_mix.yaml": "# @package data\ndatasets:\n"
                            "  - {name: mine, shards: ['@${data_root}/mine.txt'], weight: 2.0}\n"
                            "  - {name: web, shards: ['pipe:cat ${data_root}/web/shard-{0..3}.tar']}\n",
        "stage/my_s1.yaml": "# @package _global_\nstage: {name: my_s1, seq_len: 1024, max_steps: 10}\n",
        "stage/my_s2.yaml": "# @package _global_\nstage: {name: my_s2, seq_len: 2048, max_steps: 5}\n",
        "pipeline/my_recipe.yaml": "# @package _global_\npipeline:\n  name: my_recipe\n"
                                   "  stages: [{stage: my_s1}, {stage: my_s2, overrides: [stage.max_steps=7]}]\n",
    }
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


def test_user_config_dir_options_resolve_with_the_same_checks(tmp_path: Path) -> None:
    user = _user_configs(tmp_path / "my_configs")
    cfg = load_config(["--config-dir", str(user), "stage=my_s1", "data=my_mix", "model=my_model"])
    assert (cfg.stage.name, cfg.stage.seq_len, cfg.model.text.num_hidden_layers) == ("my_s1", 1024, 4)
    assert cfg.model.text.hidden_size == 64  # the rest comes from the packaged tiny model it extends
    assert [(d.name, d.weight) for d in cfg.data.datasets] == [("mine", 2.0), ("web", 1.0)]
    stages = stage_configs([f"--config-dir={user}", "pipeline=my_recipe", "data=my_mix"])
    assert [(c.stage.name, c.stage.max_steps) for c in stages] == [("my_s1", 10), ("my_s2", 7)]
    assert all(c.data.datasets[0].name == "mine" for c in stages)

    (user / "stage" / "my_bad.yaml").write_text("# @package _global_\nstage: {name: b, seq_len: 100}\n")
    (user / "data" / "my_typo.yaml").write_text("# @package data\ndatasets: []\nmax_bad_fraktion: 0.1\n")
    for overrides, key in ((["stage=my_bad"], "stage.seq_len=100"), (["data=my_typo"], "max_bad_fraktion"),
                           (["stage=my_s9"], "my_s9")):
        with pytest.raises(ConfigError) as err:
            load_config(["--config-dir", str(user), *overrides])
        assert key in str(err.value) and "\n" not in str(err.value), err.value


def test_user_config_dir_mistakes_are_one_line(tmp_path: Path, capsys) -> None:
    from train.__main__ import main

    assert main(["--config-dir", str(tmp_path / "nope"), "stage=s1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"longvl: config error: --config-dir {tmp_path / 'nope'}: no such directory"
    user = _user_configs(tmp_path / "mine")
    (user / "stage" / "s1.yaml").write_text("# @package _global_\nstage: {seq_len: 64}\n")
    assert main(["--config-dir", str(user), "--cfg", "job"]) == 2
    assert "stage=s1 is a packaged option" in capsys.readouterr().err
    (user / "stage" / "s1.yaml").unlink()
    assert main(["--config-dir", str(user), "--help"]) == 0
    assert "my_s1" in capsys.readouterr().out
    assert main(["--config-dir", str(user), "stage=my_s2", "data=my_mix", "--cfg", "job"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["stage"]["name"] == "my_s2" and printed["data"]["datasets"][0]["name"] == "mine"


def test_submit_pipeline_passes_a_relative_config_dir_as_absolute(tmp_path: Path) -> None:
    """slurm/submit_pipeline.sh lists the stages from the repo and the jobs start elsewhere: a relative
    --config-dir must reach both as an absolute path (sbatch is a stand-in that records its arguments)."""
    _user_configs(tmp_path / "mine")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(f'#!/bin/sh\necho "$@" >> {tmp_path}/sbatch.log\necho 42\n')
    (bin_dir / "sbatch").chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{Path(sys.executable).parent}:{os.environ['PATH']}",
           "LONGVL_PYTHON": sys.executable}
    out = subprocess.run(["bash", str(ROOT / "slurm" / "submit_pipeline.sh"), str(tmp_path / "run"),
                          "--config-dir", "mine", "pipeline=my_recipe"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["my_s1", "42", "my_s2", "42"]
    jobs = (tmp_path / "sbatch.log").read_text().splitlines()
    assert len(jobs) == 2 and all(f"--config-dir {tmp_path / 'mine'} " in job for job in jobs)
