"""Elastic resume through the real trainer, on both backends: a stage checkpointed on 2 ranks (DP=2)
resumes on 1 rank, and that run's checkpoint on 2 ranks again.

Megatron: the distributed optimizer's state is saved fully reshardable (model space) and dist_checkpointing
reshards model and optimizer into the new DP size. DeepSpeed (ZeRO-3 here; ZeRO 1-3 in
tests/dist/test_deepspeed_reshard.py): the load goes through DeepSpeed's universal checkpoint. The data
streams move between ranks (data/loader.py). With a
global batch of 2 and one stream per rank at the start, the 1-rank run takes the same two streams' batches
in the same order, so every step's loss equals the uninterrupted 2-rank run's within 1e-4 (only the
reduction order differs), and the documents read over the three runs are exactly those of the uninterrupted
run: none twice, none skipped. Three torchrun launches plus the reference.
"""
from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import pytest

from conftest import QUICK, run
from test_resume import _history

pytestmark = [pytest.mark.dist, pytest.mark.slow]

OBSERVED = str(Path(__file__).parent / "programs" / "train_observed.py")
STEPS = 6


def _ok(result) -> None:
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]


def cut_after(stage: Path, step: int, copy: Path) -> None:
    """The stage dir as a run stopped right after its step-`step` checkpoint leaves it (no later checkpoint,
    final/, summary or document log)."""
    keep = f"step_{step:06d}"
    drop = ("final", "summary.json")
    shutil.copytree(stage, copy, ignore=lambda d, names: [n for n in names if n in drop or n.startswith("docs_rank")
                                                           or (n.startswith("step_") and n != keep)])
    (copy / "checkpoints" / "latest").write_text(keep + "\n")


def taken(stage: Path, rank: int, batches: int | None = None) -> list[str]:
    """Doc keys of the first `batches` batches one rank took (all when None)."""
    path = stage / f"docs_rank{rank}.jsonl"
    rows = [json.loads(line)["doc_keys"] for line in path.read_text().splitlines()] if path.exists() else []
    return [key for row in rows[:batches] for key in row]


@pytest.mark.parametrize("backend", [["backend=megatron"], ["backend=deepspeed", "backend.zero_stage=3"]],
                         ids=["megatron", "deepspeed-zero3"])
def test_two_ranks_to_one_to_two(backend: list[str], demo_corpus: Path, tmp_path: Path) -> None:
    common = [OBSERVED, "stage=s1", *backend, "model=tiny", f"data_root={demo_corpus}", *QUICK,
              f"stage.max_steps={STEPS}", "stage.save_every=2", "stage.keep_last=3"]
    straight, one, two = tmp_path / "straight", tmp_path / "one", tmp_path / "two"
    _ok(run([*common, f"run_dir={straight}"], ranks=2))

    cut_after(straight / "s1", 2, one / "s1")
    _ok(run([*common, f"run_dir={one}"], ranks=1))  # 2 -> 1 rank
    cut_after(one / "s1", 4, two / "s1")
    _ok(run([*common, f"run_dir={two}"], ranks=2))  # 1 -> 2 ranks

    want, got = _history(straight), _history(two)
    assert [r["step"] for r in got] == list(range(1, STEPS + 1))
    for a, b in zip(want, got):
        assert abs(b["loss"] - a["loss"]) <= 1e-4 * abs(a["loss"]), (a, b)
        assert b["lr"] == a["lr"]
    assert len({r["loss"] for r in want}) == STEPS  # distinct batches: a wrong batch would show
    assert json.loads((two / "s1" / "summary.json").read_text())["resumed_from"] == 4

    # 1 micro-batch per rank and step on 2 ranks, 2 per step on 1 rank.
    read = Counter(taken(straight / "s1", 0, 2) + taken(straight / "s1", 1, 2) + taken(one / "s1", 0, 4)
                   + taken(two / "s1", 0) + taken(two / "s1", 1))
    assert read == Counter(taken(straight / "s1", 0) + taken(straight / "s1", 1)), "the uninterrupted run's docs"
    assert len(read) > 0
