"""train/export.py: model directories written from a tensor iterator (native and HF, cast, sharded, tied head
stored once) read back whole and sliced by the checkpoint sources (train/models/checkpoint_sources.py)."""
from __future__ import annotations

import json

import pytest
import torch

from train.export import write_model_dir
from train.models.checkpoint_sources import open_model_dir
from train.models.native_io import INDEX_FILE, LM_HEAD
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
    back_cfg, reader = open_model_dir(tmp_path / fmt)
    assert back_cfg.text == cfg.text and reader.names() == set(state)
    stored = json.loads((tmp_path / fmt / INDEX_FILE).read_text())["weight_map"]
    assert LM_HEAD not in stored and len(stored) == len(state) - 1  # the tied head is stored once
    for name, tensor in state.items():
        assert reader.dtype(name) == torch.bfloat16 and reader.shape(name) == tuple(tensor.shape)
        assert torch.equal(reader.read(name), tensor.to(torch.bfloat16)), name
    experts = "language_model.layers.1.mlp.experts.gate_up_proj"
    index = (slice(1, 3), slice(10, 40))
    assert torch.equal(reader.read(experts, index), state[experts][index].to(torch.bfloat16))
