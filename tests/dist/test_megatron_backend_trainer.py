"""`python -m train ... backend=megatron` through the real trainer on 2 ranks (torchrun, gloo): a short S1
stage with DP=2 + distributed optimizer (checkpoints via dist_checkpointing, final native export), then an
S2 stage with TP=2 + sequence parallel initialised from S1's final weights (the layout-independent handoff
sharded into a different layout). Each run ~40 s."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from train.config.compose import load_config
from train.models.qwen3vl.model import Qwen3VLModel

REPO = Path(__file__).resolve().parents[2]
QUICK = ["backend=megatron", "model=tiny", "stage.seq_len=512", "stage.global_batch_size=2",
         "optim.warmup_steps=2", "backend.precision=fp32", "logging=quiet", "data.num_workers=0"]

pytestmark = [pytest.mark.dist, pytest.mark.slow]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    from data.synth import make_corpus

    root = tmp_path_factory.mktemp("corpus") / "demo_data"
    make_corpus(root, scale=0.3, shards_per_set=2)
    return root


def train(args: list[str]) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env.update(PYTHONPATH=str(REPO), WANDB_MODE="offline", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "train",
           *QUICK, *args]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def test_stage_then_handoff_into_tp2(corpus: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    s1 = train(["stage=s1", f"data_root={corpus}", "stage.max_steps=4", "stage.save_every=2",
                f"run_dir={run_dir}"])
    assert s1.returncode == 0, s1.stdout[-2000:] + s1.stderr[-3000:]
    summary = json.loads((run_dir / "s1" / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["skipped"] == 0
    assert summary["eval_end"] < summary["eval_start"]  # it learns
    assert (run_dir / "s1" / "checkpoints" / "step_000004" / "megatron").is_dir()
    final = load_file(run_dir / "s1" / "final" / "model.safetensors")
    native = Qwen3VLModel(load_config(["model=tiny"]).model).state_dict()
    # The native writer stores a tied lm_head once (under the embedding's name).
    assert set(native) - set(final) == {"lm_head.weight"} and set(final) <= set(native)
    assert all(final[k].shape == native[k].shape for k in final)

    s2 = train(["stage=s2", f"data_root={corpus}", "stage.max_steps=2", "stage.seq_len=512", "parallel.tp=2",
                "parallel.sequence_parallel=true", f"stage.init_from={run_dir / 's1' / 'final'}",
                f"run_dir={run_dir}"])
    assert s2.returncode == 0, s2.stdout[-2000:] + s2.stderr[-3000:]
    after = load_file(run_dir / "s2" / "final" / "model.safetensors")
    assert after.keys() == final.keys()
    # Started from S1's weights: after 2 small steps every tensor is still close to them.
    drift = max(float((after[k] - final[k]).abs().max()) for k in final)
    assert 0 < drift < 0.05, drift
