"""Stage handoff across layouts through dist_checkpointing, on the Qwen3-VL MegatronBackend (2 ranks,
programs/megatron_reshard.py, ~30 s): saved at TP=2 + sequence parallel, loaded at TP=1 (DP=2) and at PP=2.
  - the full load (model + fully reshardable optimizer state) gives the saved weights bitwise, saved again it
    gives every checkpoint tensor in model space bitwise (fp32 masters, Adam's moments), and its next
    step continues the saving run's (within 1e-5; a fresh optimizer would differ by far more),
  - the weights-only load exports bitwise the saved weights, gives the logits of the same layout handed
    those weights natively (bitwise) and of the saving TP=2 model (<= 1e-6, reduction order), and its next
    step equals that native handoff's step (fresh optimizer on the loaded weights).
A change of expert-parallel size too (the tiny MoE model): saved at EP=2, fully loaded at EP=1 (DP=2; megatron
then has one optimizer instead of a dense + expert chain), and that run's save at EP=2 again: weights,
fp32 masters and moments bitwise in model space, the next step within 1e-5.
"""
from __future__ import annotations

import pytest

from test_megatron_backend import run_program

LAYOUTS = ("tp1", "pp2")


@pytest.fixture(scope="module")
def reshard_run(tmp_path_factory):
    return run_program("megatron_reshard.py", str(tmp_path_factory.mktemp("megatron_reshard")))


def _context(proc) -> str:
    return proc.stdout[-4000:] + proc.stderr[-4000:]


@pytest.mark.dist
@pytest.mark.slow
@pytest.mark.parametrize("layout", LAYOUTS)
def test_tp2_checkpoint_weights_load_in_other_layout(reshard_run, layout):
    lines = [line for line in reshard_run.stdout.splitlines() if line.startswith(f"[{layout}]")]
    print("\n".join(lines))
    assert not [line for line in reshard_run.stdout.splitlines() if f"FAIL {layout}" in line], _context(reshard_run)
    loaded = [line for line in lines if "weights-only load" in line]
    assert loaded and "max weight diff 0;" in loaded[0] and "vs native load 0," in loaded[0], _context(reshard_run)
    full = [line for line in lines if "full load: weights diff 0," in line]
    assert full and "next step vs tp2's next step" in full[0], _context(reshard_run)
    assert " 0 unequal" in full[0] and " 0 exp_avg_sq" not in full[0], _context(reshard_run)


@pytest.mark.dist
@pytest.mark.slow
def test_ep2_checkpoint_resumes_at_ep1_and_back(reshard_run):
    lines = [line for line in reshard_run.stdout.splitlines() if line.startswith("[ep1]")]
    print("\n".join(lines))
    assert not [line for line in reshard_run.stdout.splitlines() if "FAIL ep" in line], _context(reshard_run)
    assert lines and "full load: weights diff 0," in lines[0], _context(reshard_run)
    assert "re-save at ep2: weights diff 0," in lines[0], _context(reshard_run)
    assert lines[0].count(" 0 unequal") == 2 and " 0 exp_avg_sq" not in lines[0], _context(reshard_run)


@pytest.mark.dist
@pytest.mark.slow
def test_reshard_program_passes_on_every_rank(reshard_run):
    assert reshard_run.returncode == 0 and "ALL OK" in reshard_run.stdout, _context(reshard_run)
