"""MegatronBackend on 2 CPU ranks (torchrun, gloo) against the one-process reference training loop
(Qwen3VLModel + torch AdamW + train/loss.py, the DeepSpeed parity tests' batches: text-only and image
sequences, one image straddling the CP boundary). One torchrun runs every layout (programs/
megatron_backend.py, ~15 s); each test checks its layout's line: 3 losses within 1e-5 relative, exported
parameters within 1e-5, pre-clip grad norms within 1e-5 (checks the gradient scaling: DDP sums, no
rescale).
  dp: DP=2 + distributed optimizer; also dist_checkpointing save/load -> the redone step is bitwise equal
      (loss and weights), and a NaN loss weight on one rank skips the step without touching the weights
  tp: TP=2 + sequence parallel (vocab-parallel embedding / lm_head, tensor-parallel ViT and mergers,
      DeepStack scattered with the sequence)
  cp: CP=2 load-balanced split after the vision merge, ContextParallelAttention on packed documents
  cp_doc: CP=2 split per document (Transformer Engine's THD layout: documents padded to multiples of 4, THD
      packed params, megatron's THD rotary code) on ContextParallelAttention; the backend asks the loader
      for that padding
  ep: EP=2 MoE (megatron all-to-all dispatcher, the reference's pooled load-balancing loss); its model has
      a dense layer among the MoE ones (mlp_only_layers), and resumes bitwise like dp
  pp: PP=2 1F1B over 4 micro-batches (DeepStack on the first stage)
  pp_joined, cp_doc_joined: pp and cp_doc with stage.micro_batch_size=2 (the trainer joins each pair of packed
      sequences into one micro-batch of twice the length): the same losses, norms and weights
  pp_moe: PP=2 MoE with megatron's per-layer load-balancing loss (each stage adds its layers' share)
  vpp: PP=2 x 2 virtual stages (interleaved 1F1B over 4 micro-batches, one-layer chunks: rank 0 holds layers 0
      and 2); resumes bitwise, and its checkpoint loads fully (model + optimizer) into PP=2 without virtual
      stages (bitwise weights, the same next step) and that one's back into VPP=2 (bitwise weights, the same
      eval loss of one micro-batch, which VPP runs padded to pp micro-batches)
  vpp_moe: the same with MoE layers and the per-layer aux loss summed over a rank's chunks
  tp_ep: TP=2 + sequence parallel with EP=2 over the TP ranks (expert TP 1: the published 235B fold); the
      aux loss sees every TP rank's routed rows
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
MODES = ["dp", "tp", "cp", "cp_doc", "ep", "pp", "pp_moe", "tp_ep", "vpp", "vpp_moe", "pp_joined", "cp_doc_joined"]


def run_program(name: str, *args: str, timeout: int = 400) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": f"{REPO}:{os.path.join(REPO, 'tests', 'unit')}", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(HERE, "programs", name), *args]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env)


@pytest.fixture(scope="module")
def backend_run(tmp_path_factory) -> subprocess.CompletedProcess:
    return run_program("megatron_backend.py", str(tmp_path_factory.mktemp("megatron_ckpt")), *MODES)


def _context(proc: subprocess.CompletedProcess) -> str:
    return proc.stdout[-4000:] + proc.stderr[-4000:]


@pytest.mark.dist
@pytest.mark.parametrize("mode", MODES)
def test_layout_matches_one_process(backend_run, mode):
    lines = [line for line in backend_run.stdout.splitlines() if line.startswith(f"[{mode}]")]
    print("\n".join(lines))
    failures = [line for line in backend_run.stdout.splitlines() if "FAIL" in line and mode in line]
    assert not failures, _context(backend_run)
    summary = [line for line in lines if "max rel loss diff" in line]
    assert summary, _context(backend_run)
    loss_diff = float(summary[0].split("max rel loss diff ")[1].split()[0])
    param_diff = float(summary[0].split("max param diff ")[1].split()[0])
    assert loss_diff <= 1e-5 and param_diff <= 1e-5, summary[0]


@pytest.mark.dist
@pytest.mark.parametrize("mode", ["dp", "ep", "vpp"])
def test_resume_is_bitwise(backend_run, mode):
    out = backend_run.stdout
    assert backend_run.returncode == 0 and "ALL OK" in out, _context(backend_run)
    resume = [line for line in out.splitlines() if line.startswith(f"[{mode}] resume")]
    assert resume, _context(backend_run)
    got, want = resume[0].split("loss ")[1].split(" vs uninterrupted ")
    assert float(got) == float(want)


@pytest.mark.dist
def test_nan_step_is_skipped(backend_run):
    assert "[dp] NaN step skipped=True grad_norm=nan" in backend_run.stdout, _context(backend_run)


@pytest.mark.dist
def test_virtual_pipeline_checkpoint_loads_without_virtual_stages_and_back(backend_run):
    out = backend_run.stdout.splitlines()
    lines = [line for line in out if line.startswith("[vpp] cross-layout")]
    assert lines and lines[0].endswith("weights bitwise both ways"), _context(backend_run)
    assert float(lines[0].split("(rel ")[1].split(")")[0]) <= 1e-6, lines[0]
    assert not [line for line in out if "FAIL" in line and "vpp" in line], _context(backend_run)
    evals = [line for line in out if line.startswith("[vpp] eval of one micro-batch")]
    assert evals and float(evals[0].split("(rel ")[1].split(")")[0]) <= 1e-6, _context(backend_run)
