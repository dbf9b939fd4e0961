"""train/doctor.py, CPU variant: the report, the checks it runs without a GPU, and that each check fails on a
wrong result (a check that cannot fail proves nothing on the cluster)."""
from __future__ import annotations

import dataclasses

import pytest
import torch

import train.doctor as doctor
from train.models.qwen3vl.attention import PackedAttention


def test_cpu_variant_reports_and_passes(capsys):
    assert doctor.main([]) == 0
    out = capsys.readouterr().out
    for expected in ("devices:", "cpu: ", "versions:", "torch: ", "deepspeed: ", "megatron-core: ", "flash-attn: ",
                     "transformer-engine: ", "CUDA (torch build): ", "run path on cpu (backend=deepspeed",
                     "run path on cpu (backend=megatron", "checks on cpu:",
                     "[  ok] model forward+backward on cpu bfloat16 vs fp32 CPU",
                     "[skip] flash-attn varlen vs per-segment SDPA: no GPU",
                     "[skip] torch varlen_attn vs per-segment SDPA: no GPU",
                     "[skip] Transformer Engine THD attention vs per-segment SDPA: no GPU",
                     "[skip] 2-rank step per backend: no GPU"):
        assert expected in out, expected


def test_a_failed_check_makes_the_exit_status_1(monkeypatch, capsys):
    monkeypatch.setattr(doctor, "run_checks", lambda device, ranks_on_cpu: [doctor.Check("x", "FAIL", "broken")])
    assert doctor.main([]) == 1
    assert "[FAIL] x: broken" in capsys.readouterr().out
    assert doctor.main(["--no-checks"]) == 0


def test_model_check_fails_when_the_device_computes_something_else(monkeypatch):
    def shifted(batch, device):  # a device path that loses the positions (as a wrong .to() would)
        return dataclasses.replace(batch, position_ids=torch.zeros_like(batch.position_ids))
    monkeypatch.setattr(doctor, "move_batch", shifted)
    check = doctor.check_model(torch.device("cpu"), torch.float32)
    assert check.status == "FAIL", check.detail


def test_attention_comparison_passes_bf16_sdpa_and_fails_a_non_causal_kernel():
    cpu = torch.device("cpu")
    good = doctor.compare_attention("bf16 SDPA", lambda q, k, v, cu: PackedAttention()(q, k, v, cu, True), cpu)
    assert good.status == "ok", good.detail
    bad = doctor.compare_attention("non-causal", lambda q, k, v, cu: PackedAttention()(q, k, v, cu, False), cpu)
    assert bad.status == "FAIL", bad.detail


@pytest.mark.parametrize("found, warned", [
    ({"megatron-core": "0.16.1"}, []),
    ({"megatron-core": "0.17.0"}, ["megatron-core"]),
    ({"transformer-engine": "2.12.0", "flash-attn": "2.8.3"}, ["transformer-engine"]),
    ({"flash-attn": "not installed"}, []),
])
def test_version_warnings_name_packages_outside_the_supported_releases(found, warned):
    assert [line.split()[0] for line in doctor.version_warnings(found)] == warned


def test_the_doctor_batch_packs_text_and_an_image():
    cfg = doctor.doctor_config("deepspeed").model
    batch = doctor.doctor_batch(cfg)
    assert batch.seq_len == doctor.SEQ_LEN and batch.image_grid_thw.tolist() == [[1, 4, 4]]
    assert len(batch.cu_seqlens) == 5  # three documents and the padding segment
