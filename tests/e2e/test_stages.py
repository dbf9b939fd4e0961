"""Stages through the real pipeline: S0 freezing, the stage handoff, the shortened demo pipeline."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import FAULTS, QUICK, REPO, run
from train.config.compose import load_config
from train.freeze import param_group
from train.models.native_io import save_native_checkpoint
from train.models.qwen3vl.model import Qwen3VLModel

pytestmark = pytest.mark.slow


def _init_weights(directory: Path) -> dict[str, torch.Tensor]:
    """A random tiny model written as a native dir (the weights a stage starts from)."""
    cfg = load_config(["model=tiny"]).model
    torch.manual_seed(7)
    model = Qwen3VLModel(cfg)
    save_native_checkpoint(directory, cfg, model.state_dict())
    return load_file(directory / "model.safetensors")


def test_s0_trains_only_the_mergers(demo_corpus: Path, tmp_path: Path) -> None:
    initial = _init_weights(tmp_path / "init")
    result = run(["stage=s0", f"data_root={demo_corpus}", *QUICK, "stage.max_steps=3", "optim.lr=1e-2",
                  f"stage.init_from={tmp_path / 'init'}", f"run_dir={tmp_path / 'run'}"])
    assert result.returncode == 0, result.stderr[-3000:]
    final = load_file(tmp_path / "run" / "s0" / "final" / "model.safetensors")
    assert final.keys() == initial.keys()
    frozen = [k for k in final if param_group(k) != "merger"]
    mergers = [k for k in final if param_group(k) == "merger"]
    assert frozen and mergers
    changed_frozen = [k for k in frozen if not torch.equal(final[k], initial[k])]
    assert not changed_frozen, f"frozen tensors changed: {changed_frozen[:5]}"
    # The mergers learn. (Not every DeepStack merger: the tiny LLM has 3 layers, so the last DeepStack level
    # is added after the last layer, where it only reaches the logits of vision positions, which carry no
    # loss: its gradient is exactly zero. Real models inject at layers 0-2 of 28+.)
    assert all(not torch.equal(final[k], initial[k]) for k in mergers if k.startswith("visual.merger."))
    assert not torch.equal(final["visual.deepstack_merger_list.0.linear_fc1.bias"],
                           initial["visual.deepstack_merger_list.0.linear_fc1.bias"])


def test_shortened_demo_pipeline(demo_corpus: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "demo"
    result = run([FAULTS, "--max-steps", "2,12,2,2", "pipeline=demo", f"data_root={demo_corpus}",
                  f"run_dir={run_dir}", "logging=quiet", "logging.plot_loss=true", "data.num_workers=0"])
    assert result.returncode == 0, result.stderr[-3000:]
    table = result.stdout[result.stdout.index("stage  steps"):]
    assert [line.split()[0] for line in table.splitlines()[2:6]] == ["s0", "s1", "s2", "s3"]
    for stage in ("s0", "s1", "s2", "s3"):
        assert (run_dir / stage / "final" / "model_config.yaml").is_file()
        assert (run_dir / stage / "loss_curve.png").is_file()
        assert json.loads((run_dir / stage / "summary.json").read_text())["name"] == stage
    summaries = {s: json.loads((run_dir / s / "summary.json").read_text()) for s in ("s0", "s1", "s2", "s3")}
    assert summaries["s0"]["init_from"] == ""  # random start; every later stage starts from its predecessor
    for previous, stage in (("s0", "s1"), ("s1", "s2"), ("s2", "s3")):
        assert summaries[stage]["init_from"] == str(run_dir / previous / "final")
    assert summaries["s1"]["last_loss"] < summaries["s1"]["first_loss"]
    config = json.loads((run_dir / "hf" / "config.json").read_text())
    assert config["model_type"] == "qwen3_vl" and (run_dir / "hf" / "model.safetensors").is_file()
    assert re.search(r"final model \(HF format\): .*/hf", result.stdout)
    # A stage's final/ is a native model dir that the converter accepts; in hf/'s dtype (pipeline.hf_dtype,
    # bf16; final/ keeps fp32) it gives the same HF export.
    converted = run([str(REPO / "train" / "convert.py"), "native-to-hf", str(run_dir / "s3" / "final"),
                     str(tmp_path / "converted"), "--dtype", "bf16"])
    assert converted.returncode == 0, converted.stderr[-2000:]
    assert (tmp_path / "converted" / "model.safetensors").read_bytes() == \
        (run_dir / "hf" / "model.safetensors").read_bytes()
