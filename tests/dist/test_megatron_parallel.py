"""Megatron-core parallelisms on 2 CPU ranks (torchrun, gloo) against the same GPT trained on 1 process.

One torchrun runs every layout (programs/megatron_parallel.py; ~15 s in all, as the megatron import and the
process start are paid once); each test below checks its own layout's lines: step-0 grad norm and every
step's loss within 1e-5 relative, parameters after 3 steps within 1e-5.
  dp: DP=2, megatron DDP + distributed optimizer (finalize_model_grads reduces the grads)
  tp: TP=2 + sequence parallel (torch norms tagged sequence_parallel, grads all-reduced over TP)
  pp: PP=2, 1F1B over 2 micro-batches through get_forward_backward_func
  vpp: PP=2 x VPP=2 (4 layers, 2 model chunks per rank at megatron's layer offsets), the interleaved 1F1B
       schedule, one DDP per chunk and one optimizer over both
  cp: CP=2, ContextParallelAttention on packed sequences (documents cut by the load-balanced chunks)
  ep: EP=2, MoE GPT with the all-to-all token dispatcher
and ContextParallelAttention alone (GQA; packed whole-sequence split, batched, and THD split per document):
output and q/k/v grads within 1e-5 of one
process on the full sequence, i.e. the K/V gradients of every rank's queries reach the rank owning them.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
LABELS = {"dp": "dp2+distopt", "tp": "tp2+sp", "pp": "pp2 1f1b", "vpp": "pp2 vpp2 interleaved", "cp": "cp2 packed", "ep": "ep2 moe alltoall"}


def run_megatron_program(name: str, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(HERE, "programs", name), *args]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env)


@pytest.fixture(scope="module")
def parallel_run() -> subprocess.CompletedProcess:
    return run_megatron_program("megatron_parallel.py", *LABELS, "cp_attn")


@pytest.mark.dist
@pytest.mark.parametrize("mode", list(LABELS))
def test_layout_matches_one_process(parallel_run, mode):
    label = LABELS[mode]
    out = parallel_run.stdout
    context = out[-3000:] + parallel_run.stderr[-3000:]
    lines = [line for line in out.splitlines() if line.startswith(label)]
    print("\n".join(lines))
    assert not [line for line in out.splitlines() if f"FAIL {label}" in line], context
    assert any(line.startswith(f"{label} step-0 grad norm") for line in lines), context
    assert sum(bool(re.match(rf"{re.escape(label)} step-\d loss", line)) for line in lines) == 3, context
    diff = [float(line.rsplit(" ", 1)[1]) for line in lines if "max |param - reference|" in line]
    assert diff and diff[0] <= 1e-5, context


@pytest.mark.dist
def test_cp_attention_outputs_and_kv_grads_match_one_process(parallel_run):
    lines = [line for line in parallel_run.stdout.splitlines() if line.startswith("cp2 attention")]
    print("\n".join(lines))
    context = parallel_run.stdout[-3000:] + parallel_run.stderr[-3000:]
    assert len([line for line in lines if "max diff" in line]) == 3, context  # packed, b=2, thd per document
    assert "FAIL cp2 attention" not in parallel_run.stdout, context
