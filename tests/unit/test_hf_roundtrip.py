"""HF checkpoint (save_pretrained) -> native -> HF: bitwise identical, loadable by transformers, same logits."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from train.models.hf import load_hf_checkpoint, save_hf_checkpoint
from train.models.native_io import load_native_checkpoint, read_safetensors_dir
from train.models.qwen3vl.model import Qwen3VLModel
from model_fixtures import (build_hf_model, image_span, mm_token_type_ids, random_pixels, tiny_dense_config,
                            tiny_moe_config)

transformers = pytest.importorskip("transformers")

REPO = Path(__file__).resolve().parents[2]
CONFIGS = {"dense": tiny_dense_config, "moe": tiny_moe_config}
untied_moe = lambda: tiny_moe_config(tie_word_embeddings=False)  # noqa: E731
tied_dense = lambda: tiny_dense_config(tie_word_embeddings=True)  # noqa: E731
VARIANTS = {**CONFIGS, "moe_untied": untied_moe, "dense_tied": tied_dense}


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory) -> dict[str, Path]:
    """save_pretrained directories of random tiny HF models, one per variant (the MoE one sharded)."""
    root = tmp_path_factory.mktemp("hf")
    dirs = {}
    for name, make_cfg in VARIANTS.items():
        dirs[name] = root / name
        shard = "100KB" if name == "moe" else "5GB"
        build_hf_model(make_cfg(), seed=1).save_pretrained(dirs[name], max_shard_size=shard)
    return dirs


def assert_bitwise_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    for key in a:
        assert a[key].dtype == b[key].dtype and a[key].shape == b[key].shape, key
        assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_hf_native_hf_is_bitwise_identical_and_loads_in_transformers(tmp_path, hf_dirs, variant):
    src = hf_dirs[variant]
    cfg, native = load_hf_checkpoint(src)
    Qwen3VLModel(cfg).load_state_dict(native, strict=True)
    save_hf_checkpoint(tmp_path / "out", cfg, native, max_shard_size="100KB")
    assert_bitwise_equal(read_safetensors_dir(tmp_path / "out"), read_safetensors_dir(src))
    kind = "Qwen3VLMoe" if cfg.text.is_moe else "Qwen3VL"
    assert json.loads((tmp_path / "out" / "config.json").read_text())["architectures"] == [
        f"{kind}ForConditionalGeneration"]
    reloaded = getattr(transformers, f"{kind}ForConditionalGeneration").from_pretrained(tmp_path / "out")
    original = getattr(transformers, f"{kind}ForConditionalGeneration").from_pretrained(src)
    assert_bitwise_equal(reloaded.state_dict(), original.state_dict())
    assert reloaded.config.tie_word_embeddings == cfg.text.tie_word_embeddings


def test_transformers_4_expert_layout_is_transposed_on_import(tmp_path, hf_dirs):
    """Published Qwen3-VL-MoE weights (transformers 4.x) store experts as [E, H, 2I] / [E, I, H]."""
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    config = json.loads((hf_dirs["moe_untied"] / "config.json").read_text())
    config["transformers_version"] = "4.57.0.dev0"
    (legacy / "config.json").write_text(json.dumps(config))
    tensors = load_file(hf_dirs["moe_untied"] / "model.safetensors")
    old = {k: v.transpose(1, 2).contiguous() if ".mlp.experts." in k else v for k, v in tensors.items()}
    save_file(old, legacy / "model.safetensors", metadata={"format": "pt"})
    _, native = load_hf_checkpoint(legacy)
    _, current = load_hf_checkpoint(hf_dirs["moe_untied"])
    assert any(".mlp.experts." in k for k in native)
    assert_bitwise_equal(native, current)


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "train.convert", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=120)


def test_cli_round_trip_and_refusals(tmp_path, hf_dirs):
    src, native, back = hf_dirs["moe"], tmp_path / "native", tmp_path / "back"
    assert run_cli("hf-to-native", str(src), str(native)).returncode == 0
    assert sorted(p.name for p in native.iterdir())[-1] == "model_config.yaml"
    done = run_cli("native-to-hf", str(native), str(back), "--max-shard-size", "100KB")
    assert done.returncode == 0, done.stderr
    assert_bitwise_equal(read_safetensors_dir(back), read_safetensors_dir(src))
    refused = run_cli("hf-to-native", str(src), str(native))
    assert refused.returncode == 1
    assert refused.stderr.strip().splitlines() == [f"error: {native}: exists and is not empty "
                                                   f"(pass --force / force=True to replace it)"]
    assert run_cli("hf-to-native", str(src), str(native), "--force").returncode == 0
    missing = run_cli("native-to-hf", str(tmp_path / "nowhere"), str(tmp_path / "x"))
    assert missing.returncode == 1 and "nowhere: not a directory" in missing.stderr
    assert not (tmp_path / "x").exists()


def test_cli_casts_dtype(tmp_path, hf_dirs):
    assert run_cli("hf-to-native", str(hf_dirs["dense_tied"]), str(tmp_path / "n"), "--dtype", "bf16").returncode == 0
    cfg, sd = load_native_checkpoint(tmp_path / "n")
    assert {t.dtype for t in sd.values()} == {torch.bfloat16}
    assert sd["lm_head.weight"] is sd["language_model.embed_tokens.weight"]


def sequences(cfg) -> dict[str, dict]:
    """A text-only sequence and one with text, an image, text."""
    gen = torch.Generator().manual_seed(3)
    text = torch.randint(10, 200, (24,), generator=gen)
    grid = [1, 4, 6]
    pixels, grid_thw = random_pixels([grid], cfg, seed=4)
    ids = torch.cat([text[:7], torch.tensor(image_span(grid, cfg)), text[7:]])
    return {"text": {"input_ids": text[None]},
            "image": {"input_ids": ids[None], "pixel_values": pixels, "image_grid_thw": grid_thw}}


@pytest.mark.parametrize("variant", ["dense", "moe"])
def test_converted_native_model_matches_hf_logits(hf_dirs, variant):
    src = hf_dirs[variant]
    cfg, native_sd = load_hf_checkpoint(src)
    native = Qwen3VLModel(cfg).eval()
    native.load_state_dict(native_sd, strict=True)
    kind = "Qwen3VLMoe" if cfg.text.is_moe else "Qwen3VL"
    hf = getattr(transformers, f"{kind}ForConditionalGeneration").from_pretrained(
        src, dtype=torch.float32, attn_implementation="eager").eval()
    for name, inputs in sequences(cfg).items():
        with torch.no_grad():
            expected = hf(**inputs, mm_token_type_ids=mm_token_type_ids(inputs["input_ids"], cfg)).logits
            got = native(**inputs).logits
        diff = (got - expected).abs().max().item()
        print(f"{variant}/{name}: max |logits diff| = {diff:.2e}")
        assert got.shape == expected.shape and diff <= 1e-4, (name, diff)
