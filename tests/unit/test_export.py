"""train/export.py: model directories written from a tensor iterator (native and HF, cast, sharded) and read
back one tensor or slice at a time; bad directories refused in one line naming the file or tensor."""
from __future__ import annotations

import json

import pytest
import torch

from train.export import ModelDirReader, write_model_dir
from train.models.native_io import INDEX_FILE, CheckpointError
from train.models.qwen3vl.model import Qwen3VLModel
from model_fixtures import tiny_dense_config, tiny_moe_config


def model_state(cfg):
    torch.manual_seed(0)
    return {k: v.clone() for k, v in Qwen3VLModel(cfg).state_dict().items()}


@pytest.mark.parametrize("fmt", ["native", "hf"])
def test_streamed_directory_reads_back_whole_and_sliced(tmp_path, fmt):
    cfg = tiny_moe_config()  # tied head, fused experts
    state = model_state(cfg)
    write_model_dir(tmp_path / fmt, cfg, iter(state.items()), fmt=fmt, dtype=torch.bfloat16,
                    max_shard_size="100KB")
    assert (tmp_path / fmt / INDEX_FILE).is_file()
    reader = ModelDirReader(tmp_path / fmt)
    assert reader.names() == set(state)
    for name, tensor in state.items():
        assert reader.dtype(name) == torch.bfloat16 and reader.shape(name) == tuple(tensor.shape)
        assert torch.equal(reader.read(name), tensor.to(torch.bfloat16)), name
    experts = "language_model.layers.1.mlp.experts.gate_up_proj"
    index = (slice(1, 3), slice(10, 40))
    assert torch.equal(reader.read(experts, index), state[experts][index].to(torch.bfloat16))


def test_bad_directories_are_one_line(tmp_path):
    cfg = tiny_dense_config()
    write_model_dir(tmp_path / "m", cfg, iter(model_state(cfg).items()), fmt="hf", dtype=torch.float32,
                    max_shard_size="100KB")
    index = json.loads((tmp_path / "m" / INDEX_FILE).read_text())
    last = sorted(set(index["weight_map"].values()))[-1]
    data = (tmp_path / "m" / last).read_bytes()
    (tmp_path / "m" / last).write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=rf"{last}: unreadable safetensors file"):
        ModelDirReader(tmp_path / "m")
    (tmp_path / "m" / last).unlink()
    with pytest.raises(CheckpointError, match=rf"shard '{last}' \(holding '.+'\) does not exist"):
        ModelDirReader(tmp_path / "m")
    other = tiny_dense_config()
    other.text.intermediate_size = 96
    write_model_dir(tmp_path / "o", other, iter(model_state(other).items()), fmt="native", dtype=torch.float32)
    yaml = tmp_path / "o" / "model_config.yaml"
    yaml.write_text(yaml.read_text().replace("intermediate_size: 96", "intermediate_size: 128"))
    with pytest.raises(CheckpointError, match=r"'language_model.layers.0.mlp.gate_proj.weight' has shape "
                                              r"\[96, 64\], the model config expects \[128, 64\]"):
        ModelDirReader(tmp_path / "o")
