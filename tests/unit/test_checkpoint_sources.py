"""Streaming weight sources over model directories: native final/ dirs and transformers dirs (sharded, dense
and MoE), slice reads, and the three bad inputs refused in one line naming the file and the tensor."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from model_fixtures import LargestAllocation, build_hf_model, tiny_dense_config, tiny_moe_config
from train.checkpoint import read_model_dir
from train.models.checkpoint_sources import open_model_dir
from train.models.hf import load_hf_checkpoint
from train.models.materialize import fill_native, materialize
from train.models.native_io import EMBED, CheckpointError, save_native_checkpoint
from train.models.qwen3vl import Qwen3VLModel
from train.models.weight_source import RandomInit, check_source_fits, flat_range_into, read_into

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def hf_moe_dir(tmp_path_factory) -> Path:
    """A sharded transformers directory of a random tiny MoE model (save_pretrained, index + shards)."""
    path = tmp_path_factory.mktemp("hf") / "moe"
    build_hf_model(tiny_moe_config(), seed=1).save_pretrained(path, max_shard_size="100KB")
    assert (path / "model.safetensors.index.json").is_file()
    return path


def test_hf_dir_streams_the_same_tensors_as_a_whole_load(hf_moe_dir):
    cfg, source = open_model_dir(hf_moe_dir)
    _, whole = load_hf_checkpoint(hf_moe_dir)
    assert source.names() == set(whole)
    for name, tensor in whole.items():
        assert torch.equal(source.read(name), tensor), name
    experts = "language_model.layers.1.mlp.experts.gate_up_proj"
    index = (slice(1, 3), slice(5, 40), slice(8, 24))
    assert torch.equal(source.read(experts, index), whole[experts][index])
    # One rank's build: a meta model filled from the directory equals transformers' weights.
    with torch.device("meta"):
        model = Qwen3VLModel(cfg)
    materialize(model)
    fill_native(model, read_model_dir(hf_moe_dir, cfg))
    assert all(torch.equal(model.state_dict()[k], whole[k]) for k in whole)


def test_native_sharded_dir_reads_slices(tmp_path):
    cfg = tiny_dense_config()
    state = {k: RandomInit(cfg, 2).read(k) for k in RandomInit(cfg, 2).names()}
    save_native_checkpoint(tmp_path / "n", cfg, state, max_shard_size="256KB")
    loaded_cfg, source = open_model_dir(tmp_path / "n")
    check_source_fits(source, cfg, "n")
    assert source.names() == set(state)  # the tied lm_head restored from the embedding
    for name, tensor in state.items():
        assert torch.equal(source.read(name), tensor), name
    name = "language_model.layers.0.self_attn.o_proj.weight"
    assert torch.equal(source.read(name, (slice(None), slice(32, 96))), state[name][:, 32:96])


def _native_dir(path: Path, cfg) -> Path:
    state = {k: RandomInit(cfg, 0).read(k) for k in RandomInit(cfg, 0).names()}
    save_native_checkpoint(path, cfg, state, max_shard_size="256KB")
    return path


def test_reads_go_straight_into_the_destination(tmp_path, hf_moe_dir, monkeypatch):
    monkeypatch.setattr("train.models.checkpoint_sources.READ_BLOCK_BYTES", 4096)  # many blocks at toy size
    cfg = tiny_dense_config()
    _, source = open_model_dir(_native_dir(tmp_path / "n", cfg))
    want = RandomInit(cfg, 0)
    name = "language_model.embed_tokens.weight"
    full = want.read(name)
    flat, out, full_out = full.reshape(-1), torch.full((full.numel(),), float("nan")), torch.empty_like(full)
    cuts = [0, 5, full.numel() // 3 + 7, full.numel()]  # uneven ZeRO-3-like partitions
    with LargestAllocation() as probe:
        for a, b in zip(cuts, cuts[1:]):
            flat_range_into(source, name, a, out[a:b])
        read_into(source, name, full_out)
    assert torch.equal(out, flat) and torch.equal(full_out, full)
    assert probe.largest == 0  # stored dtype into contiguous memory: no buffer at all
    index = (slice(3, 90), slice(8, 40))  # a column slice (a TP piece) and a dtype conversion
    cols, half = torch.empty(87, 32), torch.empty(full.shape, dtype=torch.bfloat16)
    with LargestAllocation() as probe:
        read_into(source, name, cols, index)
        read_into(source, name, half)
    assert torch.equal(cols, full[index]) and torch.equal(half, full.to(torch.bfloat16))
    assert 0 < probe.largest <= 4096 // 4  # one block in between (fp32 stored)
    with pytest.raises(ValueError, match=f"{name}: the weight source gives shape \\[87, 32\\], the model holds"):
        read_into(source, name, torch.empty(87, 31), index)
    hf_cfg, hf = open_model_dir(hf_moe_dir)  # renamed HF tensors read directly, re-laid-out experts by slice
    _, whole = load_hf_checkpoint(hf_moe_dir)
    for name in (EMBED, "language_model.layers.1.mlp.experts.gate_up_proj"):
        out = torch.empty(whole[name].numel(), dtype=whole[name].dtype)
        flat_range_into(hf, name, 0, out[:11])
        flat_range_into(hf, name, 11, out[11:])
        assert torch.equal(out, whole[name].reshape(-1)), name


def test_checkpoint_of_another_model_is_refused_naming_file_and_tensor(tmp_path):
    directory = _native_dir(tmp_path / "other", tiny_dense_config(intermediate_size=96))
    _, source = open_model_dir(directory)
    with pytest.raises(CheckpointError, match=r"model-\d+-of-\d+\.safetensors: tensor "
                                              r"'language_model.layers.0.mlp.gate_proj.weight' has shape \[96, 64\], "
                                              r"the model config expects \[128, 64\]"):
        check_source_fits(source, tiny_dense_config(), "init")


def test_missing_shard_is_refused_naming_the_index_shard_and_tensor(tmp_path):
    directory = _native_dir(tmp_path / "n", tiny_dense_config())
    index = json.loads((directory / "model.safetensors.index.json").read_text())
    name, shard = sorted(index["weight_map"].items())[0]
    (directory / shard).unlink()
    with pytest.raises(CheckpointError, match=rf"model.safetensors.index.json: shard '{shard}' \(holding "):
        open_model_dir(directory)


def test_truncated_file_is_refused_naming_the_file_and_tensor(tmp_path):
    directory = _native_dir(tmp_path / "n", tiny_dense_config())
    shard = sorted(directory.glob("model-*.safetensors"))[-1]
    data = shard.read_bytes()
    shard.write_bytes(data[:-100])
    with pytest.raises(CheckpointError, match=rf"{shard.name}: truncated: tensor '.+' needs bytes up to "
                                              rf"{len(data)}, the file has {len(data) - 100}"):
        open_model_dir(directory)
