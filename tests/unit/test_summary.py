"""Parameter counts of the native model (meta device) against transformers' own model with the same shapes."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from train.models.hf import model_config_to_hf
from train.models.summary import build_meta_model, count_parameters, resolve_model_config, summarize

transformers = pytest.importorskip("transformers")

REPO = Path(__file__).resolve().parents[2]
MODEL_NAMES = sorted(p.stem for p in (REPO / "configs" / "model").glob("*.yaml"))


def hf_meta_model(cfg) -> torch.nn.Module:
    config = model_config_to_hf(cfg)
    kind = "Qwen3VLMoe" if cfg.text.is_moe else "Qwen3VL"
    kwargs = {k: v for k, v in config.items() if k not in ("architectures", "model_type")}
    with torch.device("meta"):
        return getattr(transformers, f"{kind}ForConditionalGeneration")(getattr(transformers, f"{kind}Config")(**kwargs))


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_native_total_matches_transformers(name):
    cfg = resolve_model_config(name)
    native_total, native_active = count_parameters(build_meta_model(cfg), cfg)
    hf_total = sum(p.numel() for p in hf_meta_model(cfg).parameters())
    assert abs(native_total - hf_total) <= 0.005 * hf_total, (native_total, hf_total)
    assert (native_active == native_total) == (not cfg.text.is_moe)


def test_active_counts_top_k_of_the_routed_experts():
    cfg = resolve_model_config("tiny_moe")
    total, active = count_parameters(build_meta_model(cfg), cfg)
    t = cfg.text
    moe_layers = sum(t.is_moe_layer(i) for i in range(t.num_hidden_layers))
    per_expert = 3 * t.hidden_size * t.moe_intermediate_size  # gate, up, down
    idle_experts = t.num_experts - t.num_experts_per_tok
    assert total - active == moe_layers * idle_experts * per_expert


def test_published_sizes():
    """The family's advertised sizes (billions): 2B, 4B, 8B, 32B, 30B with 3B active, 235B with 22B active."""
    sizes = {}
    for name in ("qwen3vl_2b", "qwen3vl_4b", "qwen3vl_8b", "qwen3vl_32b", "qwen3vl_30b_a3b", "qwen3vl_235b_a22b"):
        cfg = resolve_model_config(name)
        total, active = count_parameters(build_meta_model(cfg), cfg)
        sizes[name] = (round(total / 1e9, 1), round(active / 1e9, 1))
    assert sizes == {"qwen3vl_2b": (2.1, 2.1), "qwen3vl_4b": (4.4, 4.4), "qwen3vl_8b": (8.8, 8.8),
                     "qwen3vl_32b": (33.4, 33.4), "qwen3vl_30b_a3b": (31.1, 3.9),
                     "qwen3vl_235b_a22b": (235.7, 22.8)}


def test_cli_prints_counts():
    done = subprocess.run([sys.executable, "-m", "train.models.summary", "model=tiny_moe"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"model=tiny_moe {summarize(resolve_model_config('tiny_moe'))}"
    unknown = subprocess.run([sys.executable, "-m", "train.models.summary", "model=nope"], cwd=REPO,
                             capture_output=True, text=True, timeout=120)
    assert unknown.returncode != 0 and "options:" in unknown.stderr and "tiny_moe" in unknown.stderr
