"""The megatron fast path's choices (TE spec, THD attention, grouped GEMM + permute fusion, DDP overlap)
given "TE importable + CUDA" or not, with the availability injected; PackedSeqParams from a PackedBatch;
TE parameter names in the weight map. The CUDA path itself runs in tests/gpu."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("megatron.core")

from data.batch import PackedBatch  # noqa: E402
from train.backends.megatron.fast_path import (LOCAL_PATH, choose_path, config_options, ddp_options,  # noqa: E402
                                               document_multiple, packed_seq_params)
from train.backends.megatron.model import decoder_layer_spec  # noqa: E402
from train.backends.megatron.weights import rule_for  # noqa: E402
from train.config.compose import load_config  # noqa: E402
from train.fast_path import choose  # noqa: E402

CUDA, CPU = torch.device("cuda", 0), torch.device("cpu")


def _never_asked() -> bool:
    raise AssertionError("TE availability must not be probed off CUDA")


def test_cpu_takes_the_local_path_without_probing_te():
    assert choose_path(CPU, cp=1, distributed_optimizer=True, te_available=_never_asked) == LOCAL_PATH


def test_cuda_with_te_takes_every_fast_option():
    path = choose_path(CUDA, cp=1, distributed_optimizer=True, te_available=lambda: True)
    assert path.transformer_engine and path.thd_attention and path.grouped_gemm and path.permute_fusion
    assert ddp_options(path) == {"overlap_grad_reduce": True, "overlap_param_gather": True}
    assert config_options(path, is_moe=True) == {"moe_grouped_gemm": True, "moe_permute_fusion": True}
    assert config_options(path, is_moe=False) == {}
    assert "transformer-engine spec, TE attention, THD packed, grouped GEMM" in path.describe()


def test_cuda_without_te_keeps_local_layers_but_overlaps_communication():
    path = choose_path(CUDA, cp=1, distributed_optimizer=False, te_available=lambda: False)
    assert not (path.transformer_engine or path.thd_attention or path.grouped_gemm or path.permute_fusion)
    assert ddp_options(path) == {"overlap_grad_reduce": True, "overlap_param_gather": False}  # no dist. optimizer


def test_context_parallel_on_te_splits_per_document_for_te_attention():
    path = choose_path(CUDA, cp=2, distributed_optimizer=True, te_available=lambda: True)
    assert path.transformer_engine and path.thd_attention and path.document_split
    assert document_multiple(path, 2) == 4
    assert "TE attention, THD packed, context parallel per document" in path.describe()


def test_whole_sequence_split_keeps_the_packed_cp_attention_on_te():
    path = choose_path(CUDA, cp=2, distributed_optimizer=True, te_available=lambda: True, cp_layout="sequence")
    assert path.transformer_engine and not path.thd_attention and not path.document_split
    assert document_multiple(path, 2) == 1 and "ContextParallelAttention" in path.describe()


def test_per_document_split_runs_on_the_local_attention_too():
    path = choose_path(CPU, cp=2, distributed_optimizer=True, te_available=_never_asked, cp_layout="document")
    assert path.document_split and not path.thd_attention and document_multiple(path, 2) == 4
    assert choose_path(CPU, cp=1, distributed_optimizer=True, cp_layout="document") == LOCAL_PATH  # no CP
    assert choose_path(CPU, cp=2, distributed_optimizer=True) == LOCAL_PATH  # auto: whole sequence off TE
    cu = torch.tensor([0, 8, 20, 32])
    params = packed_seq_params(cu, path)  # THD, the padded boundaries for TE's and megatron's THD code
    assert params.qkv_format == "thd" and params.cu_seqlens_q_padded.tolist() == [0, 8, 20, 32]
    assert params.max_seqlen_q == 12


def _recording_builders(calls: list):
    def te(**kwargs):
        calls.append(("te", kwargs))
        return "te spec"

    def local(**kwargs):
        calls.append(("local", kwargs))
        return "local spec"
    return te, local


def test_layer_spec_follows_the_path():
    model = load_config(["model=tiny_moe"]).model  # layer 0 dense, layers 1.. MoE
    calls: list = []
    te_path = choose_path(CUDA, cp=1, distributed_optimizer=True, te_available=lambda: True)
    assert decoder_layer_spec(model, 1, te_path, _recording_builders(calls)) == "te spec"
    assert calls[-1] == ("te", {"num_experts": 8, "moe_grouped_gemm": True, "qk_layernorm": True})
    assert decoder_layer_spec(model, 0, LOCAL_PATH, _recording_builders(calls)) == "local spec"
    assert calls[-1] == ("local", {"num_experts": None, "moe_grouped_gemm": False, "qk_layernorm": True,
                                   "normalization": "RMSNorm"})


def test_packed_seq_params_from_a_packed_batch():
    n = 10
    batch = PackedBatch(input_ids=torch.arange(n), position_ids=torch.arange(n).expand(3, n).clone(),
                        cu_seqlens=torch.tensor([0, 3, 9, 10]), labels=torch.arange(n),
                        loss_weights=torch.ones(n), source_ids=torch.zeros(n, dtype=torch.long))
    thd = packed_seq_params(batch.cu_seqlens, choose_path(CUDA, 1, True, lambda: True))
    assert thd.qkv_format == "thd" and thd.cu_seqlens_q.dtype == torch.int32
    assert thd.cu_seqlens_q.tolist() == thd.cu_seqlens_kv.tolist() == [0, 3, 9, 10]
    assert thd.max_seqlen_q == thd.max_seqlen_kv == 6  # the longest document
    local = packed_seq_params(batch.cu_seqlens, LOCAL_PATH)
    assert local.qkv_format == "sbhd" and local.cu_seqlens_q.tolist() == [0, 3, 9, 10]


def test_te_parameter_names_map_to_the_native_weights():
    model = load_config(["model=tiny_moe"]).model
    assert rule_for("decoder.layers.0.self_attention.linear_qkv.layer_norm_weight", model).natives == (
        "language_model.layers.0.input_layernorm.weight",)
    assert rule_for("decoder.layers.0.mlp.linear_fc1.layer_norm_weight", model).natives == (
        "language_model.layers.0.post_attention_layernorm.weight",)
    grouped = rule_for("decoder.layers.1.mlp.experts.linear_fc1.weight3", model, expert_offset=4)
    per_expert = rule_for("decoder.layers.1.mlp.experts.local_experts.3.linear_fc1.weight", model, expert_offset=4)
    assert grouped == per_expert and grouped.expert == 7 and grouped.kind == "expert_glu"
    assert rule_for("decoder.layers.1.mlp.experts.linear_fc2.weight0", model).kind == "expert"


def test_start_up_line_names_megatrons_choice():
    cfg = load_config(["backend=megatron"])
    assert choose(cfg, CPU)["megatron"] == LOCAL_PATH.describe()
    interleaved = load_config(["backend=megatron", "parallel.pp=2", "parallel.vpp=2"])
    assert choose(interleaved, CPU)["megatron"] == LOCAL_PATH.describe() + ", interleaved 1F1B (vpp=2, unbatched p2p)"
    assert "megatron" not in choose(load_config(["backend=deepspeed"]), CPU)
