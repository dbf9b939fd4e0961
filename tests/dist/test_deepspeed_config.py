"""The DeepSpeed backend refuses bad layouts with one line naming the key, before building anything
(no process group needed), and builds the DeepSpeed config the backend relies on."""
from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "unit"))
from model_fixtures import tiny_dense_config, tiny_moe_config  # noqa: E402
from train.backends.deepspeed.config import check_layout, deepspeed_config  # noqa: E402
from train.config.model import ConfigError  # noqa: E402
from train.config.schema import TrainConfig  # noqa: E402


def _cfg(moe=False, **parallel) -> TrainConfig:
    cfg = TrainConfig()
    cfg.model = tiny_moe_config() if moe else tiny_dense_config()
    cfg.stage.seq_len, cfg.stage.global_batch_size = 64, 4
    for key, value in parallel.items():
        setattr(cfg.parallel, key, value)
    return cfg


@pytest.mark.parametrize("change, world, key", [
    (dict(moe=True, zero_stage=3), 2, "backend.zero_stage=3"),
    (dict(cp=3), 4, "parallel.cp=3"),
    (dict(ep=3, moe=True), 3, "num_experts=4 is not divisible by parallel.ep=3"),
    (dict(ep=2), 2, "parallel.ep=2 but the model is dense"),
    (dict(tp=2), 2, "parallel.tp=2"),
    (dict(cp=8), 8, "num_attention_heads=4 is not divisible by parallel.cp=8"),
    (dict(), 3, "stage.global_batch_size=4"),
])
def test_bad_layouts_fail_naming_the_key(change, world, key):
    zero_stage = change.pop("zero_stage", 1)
    cfg = _cfg(**change)
    cfg.backend.zero_stage = zero_stage
    with pytest.raises(ConfigError) as err:
        check_layout(cfg, world)
    assert key in str(err.value) and "\n" not in str(err.value)


def test_zero3_moe_error_names_both_keys():
    cfg = _cfg(moe=True)
    cfg.backend.zero_stage = 3
    with pytest.raises(ConfigError, match=r"backend.zero_stage=3.*model.text.num_experts=4"):
        check_layout(cfg, 2)


def test_grad_accumulation_and_deepspeed_config():
    cfg = _cfg(cp=2)
    cfg.backend.precision, cfg.backend.zero_stage, cfg.optim.grad_clip = "bf16", 2, 0.7
    accum = check_layout(cfg, 4)  # dp = 4 / cp 2 = 2 -> 4 sequences / 2 = 2 micro-batches per rank
    assert accum == 2
    ds = deepspeed_config(cfg, accum, 4)
    assert ds["train_batch_size"] == 8 and ds["gradient_accumulation_steps"] == 2
    assert ds["optimizer"]["params"]["torch_adam"] is True and ds["gradient_clipping"] == 0.7
    assert ds["bf16"]["enabled"] and ds["zero_optimization"]["stage"] == 2
