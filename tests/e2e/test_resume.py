"""Exact resume and the NaN-streak stop, through the real pipeline (config, loader, DeepSpeed, checkpoints)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from safetensors.torch import load_file

from conftest import FAULTS, QUICK, run

pytestmark = pytest.mark.slow


def _history(run_dir: Path, stage: str = "s1") -> list[dict]:
    return [json.loads(line) for line in (run_dir / stage / "metrics.jsonl").read_text().splitlines()]


def _ok(result) -> None:
    assert result.returncode == 0, result.stderr[-3000:]


def test_stop_and_resume_equals_straight_run(demo_corpus: Path, tmp_path: Path) -> None:
    steps = 6
    common = ["stage=s1", f"data_root={demo_corpus}", *QUICK, "data.num_workers=2", f"stage.max_steps={steps}",
              "stage.save_every=100"]
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    _ok(run([*common, f"run_dir={straight}"]))

    stopped = run([FAULTS, "--signal-after", str(steps // 2), *common, f"run_dir={interrupted}"])
    _ok(stopped)  # preemption: checkpoint, exit 0 (the SLURM script requeues)
    assert "stopped by signal after step 3" in stopped.stderr
    assert (interrupted / "s1" / "checkpoints" / "latest").read_text().strip() == "step_000003"
    assert not (interrupted / "s1" / "final").exists()
    _ok(run([*common, f"run_dir={interrupted}"]))  # the same command again resumes

    a, b = _history(straight), _history(interrupted)
    assert [r["step"] for r in b] == list(range(1, steps + 1))
    assert [(r["loss"], r["grad_norm"], r["lr"]) for r in a] == [(r["loss"], r["grad_norm"], r["lr"]) for r in b]
    assert len({r["loss"] for r in a}) == steps  # the steps really differ (distinct batches)
    final_a = load_file(straight / "s1" / "final" / "model.safetensors")
    final_b = load_file(interrupted / "s1" / "final" / "model.safetensors")
    assert final_a.keys() == final_b.keys()
    assert all(final_a[k].equal(final_b[k]) for k in final_a)
    assert json.loads((interrupted / "s1" / "summary.json").read_text())["resumed_from"] == 3


def test_nan_streak_stops_and_keeps_last_good_checkpoint(demo_corpus: Path, tmp_path: Path) -> None:
    common = ["stage=s1", f"data_root={demo_corpus}", *QUICK, "stage.max_steps=12", "stage.save_every=4",
              f"run_dir={tmp_path}"]
    stopped = run([FAULTS, "--nan-from", "11", *common])  # batch 11 = first micro-batch of step 6
    assert stopped.returncode == 3, stopped.stderr[-3000:]
    errors = [line for line in stopped.stderr.splitlines() if line.startswith("longvl:")]
    assert errors and "5 consecutive non-finite steps (up to step 10)" in errors[0], stopped.stderr[-2000:]
    history = _history(tmp_path)
    assert [r["skipped"] for r in history] == [False] * 5 + [True] * 5
    assert not any(math.isfinite(r["grad_norm"]) for r in history[5:])
    stage = tmp_path / "s1"
    assert (stage / "checkpoints" / "latest").read_text().strip() == "step_000004"
    assert not (stage / "final").exists() and not (stage / "summary.json").exists()
    # The kept checkpoint is good: without the fault the same command resumes from it and finishes.
    _ok(run(common))
    assert json.loads((stage / "summary.json").read_text())["resumed_from"] == 4
