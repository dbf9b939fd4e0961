"""The training benchmarks' logic at toy sizes (no timing): the HF padded batch holds exactly the packed
documents, both training steps run and update weights, megatron's CP core through the adapter equals the
model's own packed attention at CP=1, and the long-context batch and largest-tensor tracker behave."""
from __future__ import annotations

import random
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH))

import common  # noqa: E402
import cp_memory  # noqa: E402
import long_context_262k  # noqa: E402
import train_throughput  # noqa: E402

from train.models.qwen3vl.attention import PackedAttention  # noqa: E402

CFG = cp_memory.tiny_config()


def test_hf_batch_pads_the_same_documents():
    batch, docs = common.pack(common.document_stream(CFG, 512, seed=4), 1024, 1)[0]
    inputs = train_throughput.hf_inputs(docs, CFG)
    assert inputs["input_ids"].shape == (len(docs), max(len(d) for d in docs))
    assert int(inputs["attention_mask"].sum()) == common.real_tokens(batch)
    for row, d in enumerate(docs):
        assert torch.equal(inputs["input_ids"][row, :len(d)], d.input_ids)
    assert torch.equal(inputs["mm_token_type_ids"] == 1, inputs["input_ids"] == CFG.image_token_id)
    if batch.pixel_values is not None:
        assert torch.equal(inputs["pixel_values"], batch.pixel_values)


def test_both_training_steps_run_and_change_the_weights():
    pytest.importorskip("transformers")
    native, hf = train_throughput.build_pair(CFG)
    for (name, a), (_, b) in zip(sorted(native.state_dict().items()),
                                 sorted((k.removeprefix("model."), v) for k, v in hf.state_dict().items())):
        assert torch.equal(a, b), name
    batch, docs = common.pack(common.document_stream(CFG, 256, seed=5), 512, 1)[0]
    before = native.lm_head.weight.detach().clone(), hf.lm_head.weight.detach().clone()
    module = train_throughput.LossModule(native)
    native_loss = train_throughput.native_step(module, train_throughput.adamw(native), batch)
    hf_loss = train_throughput.hf_step(hf, train_throughput.adamw(hf), train_throughput.hf_inputs(docs, CFG))
    assert torch.isfinite(torch.tensor([native_loss, hf_loss])).all()
    assert not torch.equal(before[0], native.lm_head.weight) and not torch.equal(before[1], hf.lm_head.weight)


def test_m100_config_has_about_100m_parameters():
    cfg = train_throughput.m100_config()
    with torch.device("meta"):
        model = train_throughput.Qwen3VLModel(cfg)
    assert 80e6 <= sum(p.numel() for p in model.parameters()) <= 130e6


def test_megatron_core_adapter_matches_packed_attention_at_cp1():
    pytest.importorskip("megatron.core")
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(40, h, 16, generator=gen) for h in (4, 2, 2))
    cu = torch.tensor([0, 7, 30, 40], dtype=torch.int32)
    out = cp_memory.MegatronCore(CFG, None)(q, k, v, cu, True)
    torch.testing.assert_close(out, PackedAttention()(q, k, v, cu, True), rtol=1e-5, atol=1e-5)


def test_long_batch_starts_with_the_video_and_fills_the_sequence():
    batch, video_len = long_context_262k.long_batch(CFG, 4096, 1024)
    assert batch.seq_len == 4096 and batch.doc_keys[0] == "long_video"
    assert int(batch.cu_seqlens[1]) == video_len and abs(video_len - 1024) < 300  # whole frame groups
    assert common.real_tokens(batch) > 0.95 * 4096


def test_largest_tensor_tracks_the_biggest_op_output():
    with long_context_262k.LargestTensor() as largest:
        torch.zeros(10, 10) + 1
        torch.ones(100, 50).sum()
    assert largest.bytes == 100 * 50 * 4 and largest.shape == (100, 50)



def test_step_overhead_bench_measures_both_ways_at_toy_size():
    import step_overhead

    cfg = step_overhead.load_model_config_yaml(common.ROOT / "configs" / "model" / "tiny.yaml")
    packed = [b for b, _ in common.pack(common.document_stream(cfg, 128, seed=1), 128, 4)]
    for by_value in (False, True):  # every batch arrives as a PackedBatch (asserted inside)
        assert step_overhead.transfer_ms(packed, 3, by_value) > 0
    rates = step_overhead.joining([packed[:2], packed[2:]], 2, reps=1)
    assert set(rates) == {1, 2} and all(r > 0 for r in rates.values())
