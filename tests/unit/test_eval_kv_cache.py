"""Decoding with a KV cache equals full recomputation: the same greedy tokens and logits within fp32
tolerance on a needle video prompt (vision tower once, then one token at a time), for MRoPE, the 1-D
position ablation and DeepStack off; the cache's chunked attention equals one full causal pass."""
from __future__ import annotations

import random

import pytest
import torch

from data.positions import document_position_ids
from data.video import VideoConfig
from data.vision import ImageConfig
from train.models.native_io import load_model_config_yaml
from train.eval.generate import greedy_decode
from train.eval.needle import NeedleVideo, SyntheticHaystack, place_needle, sample_clip, sampling_plan
from train.models.qwen3vl.attention import KVCache
from train.models.qwen3vl.model import Qwen3VLModel

ICFG = ImageConfig(min_pixels=1024, max_pixels=4096)
VCFG = VideoConfig(fps=1.0, max_frames=4096, min_pixels=1024, max_pixels=4096)


def _model(**text) -> Qwen3VLModel:
    cfg = load_model_config_yaml("configs/model/tiny.yaml")
    for key, value in text.items():
        if key == "deepstack":
            cfg.vision.deepstack_visual_indexes = value
        else:
            setattr(cfg.text, key, value)
    torch.manual_seed(0)
    return Qwen3VLModel(cfg).eval()


def _prompt(model: Qwen3VLModel, seconds: float = 12.0):
    haystack = SyntheticHaystack(seconds, 4.0, 64, seed=1)
    indices, h, w = sampling_plan(haystack, VCFG, ICFG, 256)
    needle = place_needle(haystack.total, 4.0, 0.5, indices, 1.0, random.Random(0))
    clip = sample_clip(NeedleVideo(haystack, needle), indices, h, w, ICFG)
    per_patch = int(clip.grid_thw[0, 1] * clip.grid_thw[0, 2]) // 4
    ids: list[int] = []
    for k, _ in enumerate(clip.timestamps):  # plain text tokens stand in for the timestamps
        ids += [20 + k % 10, 30] + [model.cfg.vision_start_token_id] + [model.cfg.video_token_id] * per_patch \
            + [model.cfg.vision_end_token_id]
    return ids + [40, 41, 42], clip


@pytest.mark.parametrize("text", [{}, {"mrope": False}, {"deepstack": []}], ids=["mrope", "1d", "no_deepstack"])
def test_cached_decoding_equals_full_recomputation(text):
    model = _model(**text)
    ids, clip = _prompt(model)
    cached, cached_logits = greedy_decode(model, ids, clip, 12, use_cache=True)
    full, full_logits = greedy_decode(model, ids, clip, 12, use_cache=False)
    assert cached == full and len(cached) == 12
    for a, b in zip(cached_logits, full_logits):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_cache_in_chunks_equals_one_causal_pass():
    """Prompt in three uneven chunks (the multi-token chunks after the first exercise the offset mask)."""
    model = _model()
    ids, clip = _prompt(model)
    input_ids = torch.tensor(ids)
    positions = document_position_ids(input_ids, None, clip.grid_thw, image_token_id=5, video_token_id=6,
                                      spatial_merge_size=2)
    with torch.no_grad():
        embeds, mask, deepstack = model.embed(input_ids, pixel_values_videos=clip.pixel_values,
                                              video_grid_thw=clip.grid_thw)
        full, _ = model.decode(embeds, positions, None, mask, deepstack)
        cache, parts, start = KVCache(model.cfg.text.num_hidden_layers), [], 0
        for end in (len(ids) // 3, len(ids) // 3 + 1, len(ids)):
            index = mask[:start].sum(), mask[:end].sum()  # the chunk's rows of the DeepStack features
            hidden, _ = model.decode(embeds[start:end], positions[:, start:end], None, mask[start:end],
                                     [d[index[0]:index[1]] for d in deepstack], cache=cache)
            parts.append(hidden)
            start = end
    assert cache.length == len(ids)
    torch.testing.assert_close(torch.cat(parts), full, rtol=1e-5, atol=1e-5)


def test_1d_positions_change_video_logits_only():
    """Text-only, MRoPE positions are already 1-D, so the ablation changes nothing; with a video it does."""
    mrope, flat = _model(), _model(mrope=False)
    flat.load_state_dict(mrope.state_dict())
    text = torch.arange(10, 40)
    with torch.no_grad():
        torch.testing.assert_close(flat(text).logits, mrope(text).logits)
        ids, clip = _prompt(mrope)
        video = dict(pixel_values_videos=clip.pixel_values, video_grid_thw=clip.grid_thw)
        a, b = mrope(torch.tensor(ids), **video).logits, flat(torch.tensor(ids), **video).logits
    assert (a - b).abs().max() > 1e-3


def test_1d_positions_refused_where_they_cannot_run(tmp_path):
    from train.config.compose import load_config
    from train.models.hf import model_config_to_hf
    from train.preflight import PreflightError, check_seq_len
    from train.config.model import ConfigError

    cfg = load_config(["model.text.mrope=false", "backend=megatron"])
    with pytest.raises(PreflightError, match="model.text.mrope=false"):
        check_seq_len(cfg)
    with pytest.raises(ConfigError, match="model.text.mrope=false"):
        model_config_to_hf(cfg.model)
