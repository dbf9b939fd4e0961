"""Exact resume inside a stage on backend=megatron, through the real trainer on 2 ranks (torchrun, gloo,
DP=2 + distributed optimizer: dp_reshardable optimizer shards, each rank's own loader state and RNG).

A straight 4-step run checkpoints at steps 2 and 4. Its stage dir cut back to what a run killed right after
the step-2 checkpoint leaves (no step_000004, final/ or summary.json; `latest` = step_000002) resumes with
the same command: metrics.jsonl (loss, grad norm, lr per step) and final/ are bitwise those of the straight
run. Two torchrun launches (~30 s unloaded); the preemption signal path itself is backend-independent and
tested on DeepSpeed in test_resume.py.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from conftest import QUICK, run
from test_megatron_pipeline import _weights, assert_bitwise_equal
from test_resume import _history

pytestmark = [pytest.mark.dist, pytest.mark.slow]


def _ok(result) -> None:
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]


def killed_after(stage: Path, step: int, copy: Path) -> None:
    """Copy of a finished stage dir as a run killed right after its step-`step` checkpoint leaves it."""
    keep = f"step_{step:06d}"
    shutil.copytree(stage, copy, ignore=lambda d, names: [n for n in names if n in ("final", "summary.json") or
                                                           (n.startswith("step_") and n != keep)])
    (copy / "checkpoints" / "latest").write_text(keep + "\n")


def test_megatron_resume_equals_straight_run(demo_corpus: Path, tmp_path: Path) -> None:
    steps = 4
    common = ["stage=s1", "backend=megatron", "model=tiny", f"data_root={demo_corpus}", *QUICK,
              f"stage.max_steps={steps}", "stage.save_every=2"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    _ok(run([*common, f"run_dir={straight}"], ranks=2))
    saved = straight / "s1" / "checkpoints" / "step_000002"
    assert (saved / "megatron" / "metadata.json").is_file()  # the dist_checkpointing save
    owned = json.loads((saved / "meta.json").read_text())["files"]  # each rank hashed and fsynced its own
    assert [sorted(n for n in files if n.endswith(".distcp")) for files in owned] == \
        [sorted(f"megatron/{p.name}" for p in (saved / "megatron").glob(f"__{r}_*.distcp")) for r in (0, 1)]
    assert "megatron/metadata.json" in owned[0] and "rank_00001.json" in owned[1]

    killed_after(straight / "s1", 2, resumed / "s1")
    _ok(run([*common, f"run_dir={resumed}"], ranks=2))  # the same command again resumes

    a, b = _history(straight), _history(resumed)
    assert [r["step"] for r in b] == list(range(1, steps + 1))
    assert [(r["loss"], r["grad_norm"], r["lr"]) for r in a] == [(r["loss"], r["grad_norm"], r["lr"]) for r in b]
    assert len({r["loss"] for r in a}) == steps  # the steps really differ (distinct batches)
    assert_bitwise_equal(_weights(resumed / "s1" / "final"), _weights(straight / "s1" / "final"),
                         "final/ of the resumed run vs the straight run")
    assert json.loads((resumed / "s1" / "summary.json").read_text())["resumed_from"] == 2
