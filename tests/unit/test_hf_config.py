"""ModelConfig <-> transformers config.json, and the configs/model/*.yaml files."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from train.config.model import ConfigError, ModelConfig
from train.models.hf import model_config_from_hf, model_config_to_hf
from train.models.native_io import load_model_config_yaml

transformers = pytest.importorskip("transformers")

MODEL_DIR = Path(__file__).resolve().parents[2] / "configs" / "model"
MODEL_FILES = sorted(MODEL_DIR.glob("*.yaml"))
REQUIRED_MODELS = {"tiny", "tiny_moe", "qwen3vl_2b", "qwen3vl_4b", "qwen3vl_8b", "qwen3vl_32b",
                   "qwen3vl_30b_a3b", "qwen3vl_235b_a22b"}


def hf_config_class(hf: dict):
    return transformers.Qwen3VLMoeConfig if hf["model_type"] == "qwen3_vl_moe" else transformers.Qwen3VLConfig


def test_every_required_model_file_exists():
    assert REQUIRED_MODELS <= {p.stem for p in MODEL_FILES}


@pytest.mark.parametrize("path", MODEL_FILES, ids=lambda p: p.stem)
def test_model_yaml_merges_into_schema_and_validates(path):
    text = path.read_text()
    assert text.startswith("# @package model")
    merged = OmegaConf.merge(OmegaConf.structured(ModelConfig), OmegaConf.load(path))
    cfg = OmegaConf.to_object(merged)
    cfg.validate()
    assert cfg.name == path.stem
    assert cfg.vision.depth > max(cfg.vision.deepstack_visual_indexes)


@pytest.mark.parametrize("name", sorted(REQUIRED_MODELS))
def test_model_option_composes_with_hydra(name):
    """`model=NAME` through the project's Hydra tree (the stage group is dropped: only the model is checked)."""
    from train.config.compose import compose_config

    composed = OmegaConf.to_object(compose_config([f"model={name}", "~stage"]).model)
    assert composed == load_model_config_yaml(MODEL_DIR / f"{name}.yaml")


def test_published_shapes():
    cfgs = {p.stem: load_model_config_yaml(p) for p in MODEL_FILES}
    shapes = {name: (c.text.num_hidden_layers, c.text.hidden_size, c.text.num_attention_heads,
                     c.text.num_key_value_heads, c.vision.depth, c.vision.hidden_size) for name, c in cfgs.items()}
    assert shapes["qwen3vl_2b"] == (28, 2048, 16, 8, 24, 1024)
    assert shapes["qwen3vl_4b"] == (36, 2560, 32, 8, 24, 1024)
    assert shapes["qwen3vl_8b"] == (36, 4096, 32, 8, 27, 1152)
    assert shapes["qwen3vl_32b"] == (64, 5120, 64, 8, 27, 1152)
    assert shapes["qwen3vl_30b_a3b"] == (48, 2048, 32, 4, 27, 1152)
    assert shapes["qwen3vl_235b_a22b"] == (94, 4096, 64, 4, 27, 1152)
    assert [n for n, c in cfgs.items() if c.text.tie_word_embeddings] == ["qwen3vl_2b", "qwen3vl_4b", "tiny"]
    tiny = cfgs["tiny"]
    assert (tiny.text.vocab_size, tiny.vision_start_token_id, tiny.vision_end_token_id, tiny.image_token_id,
            tiny.video_token_id) == (2048, 3, 4, 5, 6)


@pytest.mark.parametrize("path", MODEL_FILES, ids=lambda p: p.stem)
def test_round_trip_through_transformers_config(path):
    """ModelConfig -> config.json dict -> transformers config object -> its to_dict() -> the same ModelConfig."""
    cfg = load_model_config_yaml(path)
    hf = model_config_to_hf(cfg)
    hf_object = hf_config_class(hf)(**{k: v for k, v in hf.items() if k not in ("architectures", "model_type")})
    assert hf_object.text_config.hidden_size == cfg.text.hidden_size
    assert hf_object.vision_config.out_hidden_size == cfg.text.hidden_size
    assert hf_object.tie_word_embeddings == cfg.text.tie_word_embeddings
    if cfg.text.is_moe:
        assert hf_object.text_config.num_experts == cfg.text.num_experts
    assert model_config_from_hf(hf_object.to_dict(), name=cfg.name) == cfg


def legacy_moe_config() -> dict:
    """The transformers 4.57 spelling of the published Qwen3-VL-30B-A3B config.json (abridged)."""
    return {
        "architectures": ["Qwen3VLMoeForConditionalGeneration"], "model_type": "qwen3_vl_moe",
        "image_token_id": 151655, "video_token_id": 151656, "vision_start_token_id": 151652,
        "vision_end_token_id": 151653, "tie_word_embeddings": False, "transformers_version": "4.57.0.dev0",
        "text_config": {
            "vocab_size": 151936, "hidden_size": 2048, "intermediate_size": 6144, "num_hidden_layers": 48,
            "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128, "rms_norm_eps": 1e-6,
            "max_position_embeddings": 262144, "num_experts": 128, "num_experts_per_tok": 8,
            "moe_intermediate_size": 768, "decoder_sparse_step": 1, "mlp_only_layers": [], "rope_theta": 5000000,
            "rope_scaling": {"mrope_interleaved": True, "mrope_section": [24, 20, 20], "rope_type": "default"},
            "model_type": "qwen3_vl_moe_text", "tie_word_embeddings": False,
        },
        "vision_config": {
            "depth": 27, "hidden_size": 1152, "intermediate_size": 4304, "num_heads": 16, "patch_size": 16,
            "spatial_merge_size": 2, "temporal_patch_size": 2, "out_hidden_size": 2048,
            "num_position_embeddings": 2304, "deepstack_visual_indexes": [8, 16, 24],
            "hidden_act": "gelu_pytorch_tanh", "in_channels": 3, "model_type": "qwen3_vl_moe",
        },
    }


def test_transformers_4_spelling_reads_like_the_yaml():
    cfg = model_config_from_hf(legacy_moe_config(), name="qwen3vl_30b_a3b")
    assert cfg == load_model_config_yaml(MODEL_DIR / "qwen3vl_30b_a3b.yaml")


def broken(path: str, value=None, delete: bool = False) -> dict:
    config = legacy_moe_config()
    *parents, last = path.split(".")
    node = config
    for key in parents:
        node = node[key]
    if delete:
        del node[last]
    else:
        node[last] = value
    return config


@pytest.mark.parametrize("config, message", [
    (broken("text_config", delete=True), "required key 'text_config' is missing"),
    (broken("vision_config.depth", delete=True), "vision_config: required key 'depth' is missing"),
    (broken("image_token_id", delete=True), "required key 'image_token_id' is missing"),
    (broken("model_type", "qwen2_5_vl"), "model_type='qwen2_5_vl'"),
    (broken("text_config.rope_scaling.mrope_interleaved", False), "mrope_interleaved=false"),
    (broken("text_config.rope_scaling.rope_type", "yarn"), "rope_type='yarn' is not supported"),
    (broken("vision_config.out_hidden_size", 4096), "out_hidden_size=4096 differs"),
    (broken("text_config.num_experts", delete=True), "num_experts is missing"),
    (broken("text_config.num_attention_heads", 30), "num_attention_heads=30"),
])
def test_unsupported_or_incomplete_config_json_is_refused(config, message):
    with pytest.raises(ConfigError, match=message) as info:
        model_config_from_hf(config, source="/ckpt/config.json")
    assert str(info.value).startswith("/ckpt/config.json")
    assert "\n" not in str(info.value)


def test_export_refuses_what_transformers_cannot_express():
    cfg = load_model_config_yaml(MODEL_DIR / "tiny_moe.yaml")
    no_renorm = copy.deepcopy(cfg)
    no_renorm.text.norm_topk_prob = False
    with pytest.raises(ConfigError, match="norm_topk_prob"):
        model_config_to_hf(no_renorm)
    eps = copy.deepcopy(cfg)
    eps.vision.layer_norm_eps = 1e-5
    with pytest.raises(ConfigError, match="layer_norm_eps"):
        model_config_to_hf(eps)


def test_model_yaml_with_unknown_key_names_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text((MODEL_DIR / "tiny.yaml").read_text().replace("  head_dim: 16", "  head_dims: 16"))
    with pytest.raises(ConfigError, match=r"bad\.yaml.*head_dims"):
        load_model_config_yaml(path)


def test_exported_config_carries_the_transformers_4_rope_keys():
    """Readers pinned to transformers 4.x ignore rope_parameters and read rope_scaling + rope_theta."""
    cfg = load_model_config_yaml(MODEL_DIR / "qwen3vl_8b.yaml")
    hf = model_config_to_hf(cfg)
    del hf["text_config"]["rope_parameters"]
    assert model_config_from_hf(hf, name=cfg.name) == cfg
