"""Safetensors directories (single file and sharded), atomic writes, native directories, clear load errors."""
from __future__ import annotations

import json

import pytest
import torch

from train.models.hf import load_hf_checkpoint, save_hf_checkpoint
from train.models.native_io import (INDEX_FILE, SINGLE_FILE, CheckpointError, atomic_directory,
                                    load_native_checkpoint, parse_size, read_safetensors_dir,
                                    save_native_checkpoint, write_safetensors_dir)
from train.models.qwen3vl.model import Qwen3VLModel
from model_fixtures import tiny_dense_config, tiny_moe_config


def tensors(n: int = 5, numel: int = 100) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {f"block.{i}.weight": torch.randn(numel, generator=gen) for i in range(n)}


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9
    assert parse_size("500MB") == 500 * 10**6
    assert parse_size("2KiB") == 2048
    assert parse_size(1234) == 1234
    with pytest.raises(ValueError, match="max_shard_size='lots'"):
        parse_size("lots")


def test_small_state_dict_is_one_file(tmp_path):
    sd = tensors()
    assert write_safetensors_dir(tmp_path, sd, "1MB") == [SINGLE_FILE]
    assert_same(read_safetensors_dir(tmp_path), sd)


def test_large_state_dict_is_sharded_with_an_index(tmp_path):
    sd = tensors(n=5, numel=100)  # 400 bytes each: two per 1000-byte shard
    files = write_safetensors_dir(tmp_path, sd, 1000)
    assert files[-1] == INDEX_FILE and len(files) == 4
    index = json.loads((tmp_path / INDEX_FILE).read_text())
    assert index["metadata"]["total_size"] == 2000
    assert set(index["weight_map"]) == set(sd)
    assert index["weight_map"]["block.0.weight"] == "model-00001-of-00003.safetensors"
    assert index["weight_map"]["block.4.weight"] == "model-00003-of-00003.safetensors"
    assert_same(read_safetensors_dir(tmp_path), sd)


def test_shared_storage_is_written_as_two_tensors(tmp_path):
    weight = torch.randn(4, 4)
    write_safetensors_dir(tmp_path, {"a": weight, "b": weight, "c": weight.t()})
    back = read_safetensors_dir(tmp_path)
    assert torch.equal(back["a"], weight) and torch.equal(back["b"], weight) and torch.equal(back["c"], weight.t())


def test_missing_shard_is_named(tmp_path):
    write_safetensors_dir(tmp_path, tensors(), 1000)
    (tmp_path / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"index\.json: shard 'model-00002-of-00003.safetensors' "
                                              r"\(holding 'block.2.weight'\) does not exist"):
        read_safetensors_dir(tmp_path)


def test_index_naming_a_key_its_shard_lacks(tmp_path):
    write_safetensors_dir(tmp_path, tensors(), 1000)
    index = json.loads((tmp_path / INDEX_FILE).read_text())
    index["weight_map"]["ghost.weight"] = "model-00001-of-00003.safetensors"
    (tmp_path / INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="'ghost.weight'.*does not contain it"):
        read_safetensors_dir(tmp_path)


def test_directory_without_weights(tmp_path):
    with pytest.raises(CheckpointError, match="neither model.safetensors nor"):
        read_safetensors_dir(tmp_path)


def test_atomic_directory_refuses_non_empty_destination_unless_forced(tmp_path):
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "old.txt").write_text("old")
    with pytest.raises(CheckpointError, match="exists and is not empty"):
        with atomic_directory(dst):
            pass
    with atomic_directory(dst, force=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in dst.iterdir()) == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temp or old directory left behind


def test_failed_write_leaves_no_directory(tmp_path):
    dst = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with atomic_directory(dst) as tmp:
            (tmp / "half.safetensors").write_text("partial")
            raise RuntimeError("disk full")
    assert list(tmp_path.iterdir()) == []


def native_state_dict(cfg) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return Qwen3VLModel(cfg).state_dict()


@pytest.mark.parametrize("make_cfg", [tiny_dense_config, tiny_moe_config], ids=["dense", "moe"])
@pytest.mark.parametrize("shard", ["5GB", "100KB"], ids=["single", "sharded"])
def test_native_and_hf_directories_round_trip(tmp_path, make_cfg, shard):
    cfg = make_cfg()
    sd = native_state_dict(cfg)
    save_native_checkpoint(tmp_path / "native", cfg, sd, max_shard_size=shard)
    save_hf_checkpoint(tmp_path / "hf", cfg, sd, max_shard_size=shard)
    sharded = shard == "100KB"
    for name in ("native", "hf"):
        assert (tmp_path / name / INDEX_FILE).is_file() == sharded
        assert (tmp_path / name / SINGLE_FILE).is_file() == (not sharded)
    for cfg_back, sd_back in (load_native_checkpoint(tmp_path / "native"), load_hf_checkpoint(tmp_path / "hf")):
        assert cfg_back.vision == cfg.vision and cfg_back.text == cfg.text
        assert_same(sd_back, sd)


def test_tied_lm_head_is_stored_once_and_comes_back_tied(tmp_path):
    cfg = tiny_moe_config()  # the MoE fixture ties its embeddings
    assert cfg.text.tie_word_embeddings
    save_native_checkpoint(tmp_path / "native", cfg, native_state_dict(cfg))
    stored = read_safetensors_dir(tmp_path / "native")
    assert "lm_head.weight" not in stored and "language_model.embed_tokens.weight" in stored
    _, sd = load_native_checkpoint(tmp_path / "native")
    assert sd["lm_head.weight"] is sd["language_model.embed_tokens.weight"]


def test_tied_config_with_a_different_lm_head_is_refused(tmp_path):
    cfg = tiny_moe_config()
    sd = dict(native_state_dict(cfg))
    sd["lm_head.weight"] = sd["lm_head.weight"] + 1
    with pytest.raises(CheckpointError, match="tie_word_embeddings is true but 'lm_head.weight' differs"):
        save_native_checkpoint(tmp_path / "native", cfg, sd)
    assert not (tmp_path / "native").exists()


def test_checkpoint_that_does_not_fit_its_config(tmp_path):
    cfg = tiny_dense_config()
    save_native_checkpoint(tmp_path / "native", cfg, native_state_dict(cfg))
    yaml = tmp_path / "native" / "model_config.yaml"
    yaml.write_text(yaml.read_text().replace("intermediate_size: 128", "intermediate_size: 96"))
    with pytest.raises(CheckpointError, match=r"'language_model.layers.0.mlp.gate_proj.weight' has shape "
                                              r"\[128, 64\], the model config expects \[96, 64\]"):
        load_native_checkpoint(tmp_path / "native")


def test_hf_directory_without_text_config(tmp_path):
    cfg = tiny_dense_config()
    save_hf_checkpoint(tmp_path / "hf", cfg, native_state_dict(cfg))
    config_path = tmp_path / "hf" / "config.json"
    config = json.loads(config_path.read_text())
    del config["text_config"]
    config_path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"config\.json: required key 'text_config' is missing"):
        load_hf_checkpoint(tmp_path / "hf")


def test_export_of_an_expert_parallel_shard_is_refused(tmp_path):
    """Known failure mode: exporting one expert-parallel rank's experts (E/2) instead of the gathered set."""
    cfg = tiny_moe_config()
    sd = dict(native_state_dict(cfg))
    key = "language_model.layers.1.mlp.experts.gate_up_proj"
    sd[key] = sd[key][: cfg.text.num_experts // 2]
    with pytest.raises(CheckpointError, match=rf"'{key}' has shape \[2, 64, 64\], the model config expects "
                                              r"\[4, 64, 64\]"):
        save_hf_checkpoint(tmp_path / "hf", cfg, sd)
    assert not (tmp_path / "hf").exists()
