"""The stage handoff is layout-independent: final/ written by 2 ranks under ZeRO-3 starts a 1-rank stage,
and that stage's final/ starts a 2-rank ZeRO-3 stage again, with every tensor that does not train arriving
bitwise intact. Each hop is a real `python -m train` (torchrun for 2 ranks); S0 freezes all but the mergers,
so everything except the mergers must come out of a hop exactly as it went in."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from train.freeze import param_group

pytestmark = [pytest.mark.dist, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[2]
QUICK = ["stage.seq_len=256", "stage.global_batch_size=2", "stage.max_steps=2", "optim.warmup_steps=1",
         "backend.precision=fp32", "logging=quiet", "data.num_workers=0"]


def _train(args: list[str], ranks: int) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
    env.update(DS_ACCELERATOR="cpu", WANDB_MODE="offline", PYTHONPATH=str(REPO),
               TORCH_EXTENSIONS_DIR=str(REPO / ".cache" / "torch_extensions"))
    launcher = [sys.executable]
    if ranks > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"]
    result = subprocess.run([*launcher, "-m", "train", *args], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]


def _final(run_dir: Path, stage: str) -> dict[str, torch.Tensor]:
    return load_file(run_dir / stage / "final" / "model.safetensors")


def _assert_frozen_equal(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> None:
    assert before.keys() == after.keys()
    frozen = [k for k in before if param_group(k) != "merger"]
    differing = [k for k in frozen if not torch.equal(before[k], after[k])]
    assert not differing, f"{len(differing)} tensors changed in the handoff, e.g. {differing[:3]}"
    assert any(not torch.equal(before[k], after[k]) for k in before if param_group(k) == "merger")


def test_handoff_zero3_two_ranks_to_one_and_back(tmp_path: Path) -> None:
    from data.synth import make_corpus

    corpus = tmp_path / "corpus"
    make_corpus(corpus, scale=0.2, shards_per_set=2)
    common = [f"data_root={corpus}", *QUICK]
    first, second, third = tmp_path / "zero3_2ranks", tmp_path / "zero1_1rank", tmp_path / "zero3_again"
    _train(["stage=s1", "backend.zero_stage=3", f"run_dir={first}", *common], ranks=2)
    _train(["stage=s0", "backend.zero_stage=1", f"stage.init_from={first / 's1' / 'final'}", f"run_dir={second}",
            *common], ranks=1)
    _assert_frozen_equal(_final(first, "s1"), _final(second, "s0"))
    _train(["stage=s0", "backend.zero_stage=3", f"stage.init_from={second / 's0' / 'final'}", f"run_dir={third}",
            *common], ranks=2)
    _assert_frozen_equal(_final(second, "s0"), _final(third, "s0"))
