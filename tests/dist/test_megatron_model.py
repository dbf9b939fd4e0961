"""The megatron Qwen3-VL (megatron-core decoder + the reference vision tower, DeepStack, interleaved MRoPE)
on the same weights as the reference Qwen3VLModel, loaded through the native -> megatron weight map: logits
within 1e-6 (fp32; every parameter random, norm gains and biases too) for dense and MoE, on image, text-only and video sequences, single / TP=2 + sequence
parallel (the ViT and mergers tensor-parallel too) / CP=2 / CP=2 split per document (TE's THD layout, on the
local attention) / EP=2 (MoE); the exported native state dict equals the loaded one exactly (TP/EP shards
gathered back). One torchrun (programs/megatron_model.py, ~15 s)."""
from __future__ import annotations

import pytest

from test_megatron_backend import _context, run_program

CASES = ["dense single", "dense tp2+sp", "dense cp2", "dense cp2doc", "moe single", "moe tp2+sp", "moe cp2",
         "moe cp2doc", "moe ep2"]


@pytest.fixture(scope="module")
def model_run():
    return run_program("megatron_model.py")


@pytest.mark.dist
@pytest.mark.parametrize("case", CASES)
def test_logits_match_reference(model_run, case):
    lines = [line for line in model_run.stdout.splitlines() if line.startswith(f"[{case}]")]
    print("\n".join(lines))
    assert lines, _context(model_run)
    assert float(lines[0].rsplit(" ", 1)[1]) <= 1e-4, lines[0]
    assert not [line for line in model_run.stdout.splitlines() if "FAIL" in line and case in line], \
        _context(model_run)


@pytest.mark.dist
def test_program_passed(model_run):
    assert model_run.returncode == 0 and "ALL OK" in model_run.stdout, _context(model_run)
