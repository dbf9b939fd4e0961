"""Sharded safetensors written tensor by tensor: any order, headers planned up front, readable by safetensors."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from train.models.native_io import read_safetensors_dir
from train.models.streaming_writer import INDEX_FILE, StreamingSafetensorsWriter, TensorSpec


def specs_and_tensors():
    gen = torch.Generator().manual_seed(0)
    tensors = {f"layer.{i}.weight": torch.randn(10, 10, generator=gen) for i in range(5)}
    tensors["steps"] = torch.arange(7, dtype=torch.int64)
    specs = {k: TensorSpec(tuple(v.shape), torch.bfloat16 if v.is_floating_point() else v.dtype)
             for k, v in tensors.items()}
    return specs, tensors


def test_out_of_order_writes_give_shards_safetensors_reads(tmp_path):
    specs, tensors = specs_and_tensors()
    writer = StreamingSafetensorsWriter(tmp_path, specs, max_shard_bytes=450)  # 200-byte bf16 tensors: 2/shard
    for name in reversed(list(tensors)):
        writer.write(name, tensors[name])
    files = writer.finish()
    assert files == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)] + [INDEX_FILE]
    index = json.loads((tmp_path / INDEX_FILE).read_text())
    assert index["metadata"]["total_size"] == 5 * 200 + 56
    assert index["weight_map"]["layer.0.weight"] == files[0] and index["weight_map"]["steps"] == files[2]
    back = read_safetensors_dir(tmp_path)
    for name, tensor in tensors.items():
        assert back[name].dtype == specs[name].dtype
        assert torch.equal(back[name], tensor.to(specs[name].dtype)), name
    assert set(load_file(tmp_path / files[0])) == {"layer.0.weight", "layer.1.weight"}


def test_missing_unplanned_and_misshaped_tensors_are_refused(tmp_path):
    specs, tensors = specs_and_tensors()
    writer = StreamingSafetensorsWriter(tmp_path, specs, max_shard_bytes=10**6)
    with pytest.raises(KeyError, match="'ghost' is not among the tensors planned"):
        writer.write("ghost", torch.zeros(1))
    with pytest.raises(ValueError, match=r"'layer.0.weight' has shape \[10, 9\], planned \[10, 10\]"):
        writer.write("layer.0.weight", torch.zeros(10, 9))
    writer.write("layer.0.weight", tensors["layer.0.weight"])
    with pytest.raises(KeyError, match="written twice"):
        writer.write("layer.0.weight", tensors["layer.0.weight"])
    with pytest.raises(KeyError, match="5 planned tensor.s. never written, first 'layer.1.weight'"):
        writer.finish()
