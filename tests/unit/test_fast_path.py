"""The CUDA fast path's selection logic, checked on CPU: the attention kernel per device / dtype / package, the
flash-attn varlen call's arguments against per-segment SDPA, the DeepSpeed config on a pretend-CUDA device,
and the start-up line that reports all of it."""
from __future__ import annotations

import math

import pytest
import torch

import train.backends.deepspeed.config as ds_config
import train.models.qwen3vl.attention as attention
from train.config.schema import TrainConfig
from train.fast_path import describe, register

CUDA, CPU = torch.device("cuda", 0), torch.device("cpu")


EVERYTHING = attention.KernelSupport(flash_attn=True, torch_varlen=True, flash_capable_gpu=True)


@pytest.mark.parametrize("device, dtype, support, kernel", [
    (CUDA, torch.bfloat16, EVERYTHING, attention.FLASH_VARLEN),
    (CUDA, torch.float16, EVERYTHING, attention.FLASH_VARLEN),
    (CUDA, torch.float32, EVERYTHING, attention.SDPA_PER_SEGMENT),  # no fp32 flash kernels
    (CUDA, torch.bfloat16, attention.KernelSupport(False, True, True), attention.TORCH_VARLEN),  # no flash-attn
    (CUDA, torch.bfloat16, attention.KernelSupport(False, False, True), attention.SDPA_PER_SEGMENT),
    (CUDA, torch.bfloat16, attention.KernelSupport(True, True, False), attention.SDPA_PER_SEGMENT),  # pre-Ampere
    (CPU, torch.bfloat16, EVERYTHING, attention.SDPA_PER_SEGMENT),
])
def test_attention_kernel_per_device_dtype_and_package(device, dtype, support, kernel):
    assert attention.attention_kernel(device, dtype, support) == kernel


def test_kernel_support_on_this_machine():
    cpu = attention.KernelSupport.detect(CPU)
    assert cpu.flash_capable_gpu is False
    assert cpu.torch_varlen == (attention.varlen_attn is not None)


def _varlen_stand_in(calls):
    """flash_attn_varlen_func's contract written as masked attention, recording what it was given."""
    def kernel(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p, softmax_scale, causal):
        calls.append(dict(cu_q=cu_q, cu_k=cu_k, max_q=max_q, max_k=max_k, dropout_p=dropout_p, causal=causal))
        n, hq, d = q.shape
        k, v = (t.repeat_interleave(hq // t.shape[1], dim=1) for t in (k, v))
        doc = torch.repeat_interleave(torch.arange(len(cu_q) - 1), (cu_q[1:] - cu_q[:-1]).long())
        allowed = doc[:, None] == doc[None, :]
        if causal:
            allowed &= torch.ones(n, n, dtype=torch.bool).tril()
        scores = torch.einsum("ihd,jhd->hij", q, k) / math.sqrt(d)
        return torch.einsum("hij,jhd->ihd", scores.masked_fill(~allowed, float("-inf")).softmax(-1), v)
    return kernel


@pytest.mark.parametrize("causal", [True, False])
def test_flash_varlen_arguments_match_per_segment_sdpa(causal):
    torch.manual_seed(0)
    cu = torch.tensor([0, 7, 8, 21, 40], dtype=torch.int64)  # int64 as a caller might hand it
    q, k, v = torch.randn(40, 4, 8), torch.randn(40, 2, 8), torch.randn(40, 2, 8)
    calls: list[dict] = []
    segments = attention.segments_of(cu, q.device)
    out = attention.flash_varlen(q, k, v, segments, causal, _varlen_stand_in(calls))
    (call,) = calls
    assert call["cu_q"].dtype == torch.int32 and call["cu_q"] is call["cu_k"]
    assert call["cu_q"].tolist() == cu.tolist() and call["max_q"] == call["max_k"] == 19
    assert call["dropout_p"] == 0.0 and call["causal"] is causal
    reference = attention.PackedAttention()(q, k, v, cu, causal)  # SDPA per segment on CPU
    assert torch.allclose(out, reference, atol=1e-5)


def _torch_varlen_stand_in(calls):
    """torch.nn.attention.varlen.varlen_attn's contract (window (-1, 0) = causal, GQA only when asked)."""
    flash_contract = _varlen_stand_in([])

    def kernel(q, k, v, cu_q, cu_k, max_q, max_k, *, window_size, enable_gqa):
        calls.append(dict(cu_q=cu_q, cu_k=cu_k, max_q=max_q, window_size=window_size, enable_gqa=enable_gqa))
        assert enable_gqa or q.shape[1] == k.shape[1]
        return flash_contract(q, k, v, cu_q, cu_k, max_q, max_k, 0.0, None, window_size == (-1, 0))
    return kernel


@pytest.mark.parametrize("causal", [True, False])
def test_torch_varlen_arguments_match_per_segment_sdpa(causal):
    torch.manual_seed(1)
    cu = torch.tensor([0, 3, 17, 30], dtype=torch.int32)
    q, k, v = torch.randn(30, 4, 8), torch.randn(30, 2, 8), torch.randn(30, 2, 8)
    calls: list[dict] = []
    out = attention.torch_varlen(q, k, v, attention.segments_of(cu, CPU), causal, _torch_varlen_stand_in(calls))
    (call,) = calls
    assert call["cu_q"].dtype == torch.int32 and call["cu_q"] is call["cu_k"] and call["max_q"] == 14
    assert call["window_size"] == ((-1, 0) if causal else (-1, -1)) and call["enable_gqa"] is True
    assert torch.allclose(out, attention.PackedAttention()(q, k, v, cu, causal), atol=1e-5)


def test_segments_are_computed_once_per_cu_seqlens_tensor():
    cu = torch.tensor([0, 3, 10], dtype=torch.int32)
    first = attention.segments_of(cu, CPU)
    assert attention.segments_of(cu, CPU) is first  # the next layer reuses it: no second host read
    assert first.lengths == [3, 7] and first.max_len == 7
    cu[1] = 5  # edited in place: recomputed
    assert attention.segments_of(cu, CPU).lengths == [5, 5]
    equal_copy = cu.clone()
    assert attention.segments_of(equal_copy, CPU) is not attention.segments_of(cu, CPU)


def _cfg(backend="deepspeed", zero=1, precision="bf16", hidden=None) -> TrainConfig:
    cfg = TrainConfig()
    cfg.backend.name, cfg.backend.zero_stage, cfg.backend.precision = backend, zero, precision
    if hidden is not None:
        cfg.model.text.hidden_size = hidden
    return cfg


@pytest.mark.parametrize("zero", [1, 2])
def test_deepspeed_overlaps_gradient_reduction_on_cuda_only(zero):
    cuda = ds_config.deepspeed_config(_cfg(zero=zero, hidden=4096), 1, 8, CUDA)["zero_optimization"]
    assert cuda["overlap_comm"] is True
    assert cuda["reduce_bucket_size"] == cuda["allgather_bucket_size"] == 4096 ** 2  # not DeepSpeed's 5e8
    cpu = ds_config.deepspeed_config(_cfg(zero=zero), 1, 8, CPU)["zero_optimization"]
    assert cpu["overlap_comm"] is False and "reduce_bucket_size" not in cpu


def test_deepspeed_zero3_prefetches_and_keeps_small_params_resident_on_cuda():
    zero = ds_config.deepspeed_config(_cfg(zero=3, hidden=4096), 1, 8, CUDA)["zero_optimization"]
    assert zero["overlap_comm"] is True
    assert zero["stage3_prefetch_bucket_size"] == int(0.9 * 4096 ** 2)
    assert zero["stage3_param_persistence_threshold"] == 40960
    cpu = ds_config.deepspeed_config(_cfg(zero=3, hidden=4096), 1, 8, CPU)["zero_optimization"]
    assert cpu["stage3_prefetch_bucket_size"] == 0 and cpu["stage3_param_persistence_threshold"] == 0


@pytest.mark.parametrize("builds, params, name", [
    (True, {"torch_adam": False}, "DeepSpeed FusedAdam"),
    (False, {"torch_adam": True, "fused": True}, "torch fused AdamW"),
])
def test_fused_adam_on_cuda_torch_adam_on_cpu(monkeypatch, builds, params, name):
    monkeypatch.setattr(ds_config, "_deepspeed_fused_adam_builds", lambda: builds)
    cuda_params = ds_config.deepspeed_config(_cfg(), 1, 8, CUDA)["optimizer"]["params"]
    assert {k: cuda_params[k] for k in params} == params and ds_config.describe_adam(cuda_params) == name
    cpu_params = ds_config.deepspeed_config(_cfg(), 1, 8, CPU)["optimizer"]["params"]
    assert cpu_params["torch_adam"] is True and "fused" not in cpu_params


def test_startup_line_reports_each_component(monkeypatch):
    monkeypatch.setattr(ds_config, "_deepspeed_fused_adam_builds", lambda: True)
    monkeypatch.setattr(attention, "_support_of", lambda device: EVERYTHING)
    line = describe(_cfg(zero=2), CUDA)
    assert line.startswith("run path on cuda:0 (backend=deepspeed, bf16): ")
    assert "attention=flash-attn varlen (text + ViT)" in line
    assert "deepspeed=ZeRO-2 overlap_comm, DeepSpeed FusedAdam" in line
    cpu = describe(_cfg(backend="megatron", precision="fp32"), CPU)
    assert "attention=torch SDPA per segment (ViT)" in cpu and "deepspeed=" not in cpu
    assert "megatron=local spec" in cpu and "megatron=" not in line  # registered without building a backend


def test_one_chooser_per_component():
    with pytest.raises(ValueError, match="two choosers registered for 'attention'"):
        register("attention")(lambda cfg, device: "other")


@pytest.mark.parametrize("zero", [1, 2, 3])
def test_deepspeed_accepts_the_cuda_zero_keys(zero):
    """DeepSpeed's own schema (it refuses unknown keys) reads every key the CUDA config sets."""
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    keys = ds_config.deepspeed_config(_cfg(zero=zero, hidden=1024), 1, 8, CUDA)["zero_optimization"]
    parsed = DeepSpeedZeroConfig(**keys)
    assert parsed.overlap_comm is True and parsed.reduce_bucket_size == 1024 ** 2
    if zero == 3:
        assert (parsed.prefetch_bucket_size, parsed.param_persistence_threshold) == (int(0.9 * 1024 ** 2), 10240)
