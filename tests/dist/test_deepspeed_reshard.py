"""Elastic resume on DeepSpeed ZeRO-1/2/3 (programs/deepspeed_reshard.py, ~30 s per stage): a checkpoint
saved by 2 data-parallel ranks resumes on 1, and that run's checkpoint on 2 again (DeepSpeed's universal
checkpoint, train/backends/deepspeed/reshard.py). After each load the weights, the fp32 master weights, both
Adam moments (gathered per parameter, in model space) and the Adam step equal the saved ones bitwise; the
next step's loss equals the saving run's next loss within 1e-4 relative, and so do the weights after it
(another DP size only reorders the gradient sums). ZeRO-3 and MoE ZeRO-2 run with the merger frozen, MoE ZeRO-1
with the LLM (experts included) frozen: DeepSpeed's universal load restores only what its optimizer owns, the
backend puts the frozen weights back (train/backends/deepspeed/frozen.py; the backend is built with other
weights, so they are checked).

The MoE case slices the experts over every rank (parallel.ep = world size), so 2 -> 1 -> 2 ranks also changes
the expert-parallel size 2 -> 1 -> 2: the expert parameters' optimizer state is put together in model space
(train/backends/deepspeed/moe_universal.py) and compared as full stacked tensors of all experts (ZeRO-2; at
ZeRO-1, the same file format, the experts are frozen: weights from the expert files). One case runs 4 ranks
at EP2, where two ranks hold each expert slice (~32 s)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent
REPO = HERE.parent.parent
PROGRAM = HERE / "programs" / "deepspeed_reshard.py"


def _launch(ranks: int, stage: int, saved: Path, out: Path, step: int, *flags: str, refused: str = "") -> str:
    """Run the program (`flags`: its moe / frozen=GROUP / bf16); with `refused`, expect it to fail with that
    message instead."""
    out.mkdir()
    env = {**os.environ, "PYTHONPATH": f"{REPO}:{REPO / 'tests' / 'unit'}", "OMP_NUM_THREADS": "1",
           "DS_ACCELERATOR": "cpu"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}", str(PROGRAM),
           str(stage), str(saved), str(out), str(step), *flags]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    if refused:
        assert proc.returncode != 0 and refused in proc.stderr, proc.stdout[-4000:] + proc.stderr[-4000:]
        return proc.stderr
    assert proc.returncode == 0 and "ALL OK" in proc.stdout, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc.stdout


def _two_to_one_to_two(stage: int, tmp_path: Path, *flags: str) -> None:
    _launch(2, stage, tmp_path / "none", tmp_path / "two", 0, *flags)
    saved = {path: path.read_bytes() for path in (tmp_path / "two" / "ckpt").rglob("*.pt")}
    one = _launch(1, stage, tmp_path / "two", tmp_path / "one", 1, *flags)
    again = _launch(2, stage, tmp_path / "one", tmp_path / "again", 2, *flags)
    lines = [line for out in (one, again) for line in out.splitlines() if line.startswith("[stage")]
    print("\n".join(lines))
    assert any("world 1: loaded" in line for line in lines) and any("world 2: loaded" in line for line in lines)
    assert {path: path.read_bytes() for path in saved} == saved, "the conversion modified the saved checkpoint"
    assert not list(tmp_path.rglob(".*.universal")), "the universal copy outlives the load"


@pytest.mark.dist
@pytest.mark.slow
@pytest.mark.parametrize("stage,flags", [(1, []), (2, []), (3, ["frozen=merger"])])
def test_two_ranks_to_one_to_two(stage: int, flags: list[str], tmp_path: Path) -> None:
    _two_to_one_to_two(stage, tmp_path, *flags)


@pytest.mark.dist
@pytest.mark.slow
@pytest.mark.parametrize("stage,frozen", [(1, "llm"), (2, "merger")])
def test_moe_expert_parallel_two_ranks_to_one_to_two(stage: int, frozen: str, tmp_path: Path) -> None:
    _two_to_one_to_two(stage, tmp_path, "moe", f"frozen={frozen}")


@pytest.mark.dist
@pytest.mark.slow
@pytest.mark.parametrize("stage,flags", [(0, []), (0, ["bf16"]), (2, ["bf16"])])
def test_moe_resumes_bitwise_at_its_layout(stage: int, flags: list[str], tmp_path: Path) -> None:
    """Same layout, MoE EP2. ZeRO-0: DeepSpeed saves rank 0's optimizer state only (fp32: our AdamW's; bf16:
    its FP16_UnfusedOptimizer's fp32 masters too), so every rank's expert file holds its experts' masters and
    moments (rank 1 got rank 0's before); another layout is refused in one line. ZeRO-2 bf16: the fp32
    masters are DeepSpeed's own partitions, not refreshed from the bf16 weights (which rounded all of them)."""
    _launch(2, stage, tmp_path / "none", tmp_path / "two", 0, "moe", *flags)
    again = _launch(2, stage, tmp_path / "two", tmp_path / "again", 1, "moe", *flags)
    assert "world 2: loaded" in again
    if stage == 0 and not flags:
        _launch(1, 0, tmp_path / "two", tmp_path / "one", 1, "moe", refused="ZeRO-0 checkpoint of an MoE model")


@pytest.mark.dist
@pytest.mark.slow
def test_moe_expert_slices_held_by_two_ranks_each(tmp_path: Path) -> None:
    """4 ranks at EP2: each expert slice is held by an expert-data-parallel group of two ranks (0 and 2, 1
    and 3), over whose ZeRO-2 partitions moe_universal.py must join the slice's optimizer state (by slice,
    then by place in the group). 4 ranks -> 2 ranks (expert-DP 1) -> 4 ranks, bitwise as above."""
    _launch(4, 2, tmp_path / "none", tmp_path / "four", 0, "moe", "ep=2")
    two = _launch(2, 2, tmp_path / "four", tmp_path / "two", 1, "moe", "ep=2")
    again = _launch(4, 2, tmp_path / "two", tmp_path / "again", 2, "moe", "ep=2")
    assert "world 2: loaded" in two and "world 4: loaded" in again
