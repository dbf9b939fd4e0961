"""data.vision: equal to transformers' Qwen2VLImageProcessorPil configured as Qwen3-VL; budgets; bad bytes."""
from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
from PIL import Image

from data.errors import BadSample
from data.video import VideoConfig, encode_mp4, process_video
from data.vision import ImageConfig, decode_image, image_tokens, normalize_pixels, process_image, smart_resize

CFG = ImageConfig(min_pixels=4 * 32 * 32, max_pixels=64 * 32 * 32)


def _random_image(rng: np.random.Generator, h: int, w: int, mode: str) -> Image.Image:
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    a = rng.integers(0, 256, (h, w, channels), dtype=np.uint8)
    return Image.fromarray(a[..., 0] if mode == "L" else a, mode)


@pytest.mark.parametrize("h,w,mode", [(50, 70, "RGB"), (300, 200, "RGBA"), (33, 500, "L"), (64, 64, "RGB"),
                                      (700, 900, "RGB")])
def test_equals_transformers_pil_processor(h, w, mode):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    hf = Qwen2VLImageProcessorPil(patch_size=16, temporal_patch_size=2, merge_size=2, image_mean=[0.5] * 3,
                                  image_std=[0.5] * 3, min_pixels=CFG.min_pixels, max_pixels=CFG.max_pixels)
    img = _random_image(np.random.default_rng(h * w), h, w, mode)
    want = hf(images=[img], return_tensors="pt")
    pixels, grid = process_image(img, CFG)
    assert torch.equal(grid, want["image_grid_thw"])
    assert pixels.shape == want["pixel_values"].shape
    assert pixels.dtype == torch.uint8  # compact; normalised by the model's first op
    normalised = normalize_pixels(pixels, CFG.image_mean, CFG.image_std)
    assert (normalised - want["pixel_values"]).abs().max().item() < 1e-6


def _todays_fp32_normalisation(pixels: torch.Tensor, cfg: ImageConfig) -> torch.Tensor:
    """The worker-side arithmetic before compact pixels (numpy, as transformers' processor): x/255 in
    float64, then float32, then (x - mean) / std in float32, per channel of the (C, T, ps, ps) patch rows."""
    x = (pixels.numpy().astype(np.float64) * (1 / 255)).astype(np.float32).reshape(len(pixels), 3, -1)
    mean = np.asarray(cfg.image_mean, dtype=np.float32)[:, None]
    std = np.asarray(cfg.image_std, dtype=np.float32)[:, None]
    return torch.from_numpy(((x - mean) / std).reshape(len(pixels), -1))


def test_uint8_pixels_normalised_by_the_model_equal_todays_fp32_pipeline_bitwise():
    """Images and video: the patch embedding's first op on uint8 = worker-side fp32 normalisation, max diff
    0.0, and the embedding output is the same for either input (non-default mean/std: channels matter)."""
    from train.config.model import VisionConfig
    from train.models.qwen3vl.vision import PatchEmbed

    mean, std = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
    cfg = ImageConfig(min_pixels=4 * 32 * 32, max_pixels=64 * 32 * 32, image_mean=mean, image_std=std)
    fp32 = ImageConfig(**{**cfg.__dict__, "pixel_dtype": "float32"})
    torch.manual_seed(0)
    embed = PatchEmbed(VisionConfig(hidden_size=32, image_mean=mean, image_std=std))
    img = _random_image(np.random.default_rng(7), 300, 200, "RGBA")
    frames = np.random.default_rng(8).integers(0, 256, (8, 64, 96, 3), dtype=np.uint8)
    video = encode_mp4(frames, fps=4)
    vcfg = VideoConfig(min_pixels=2 * 32 * 32, max_pixels=8 * 32 * 32)
    for compact, full in ((process_image(img, cfg)[0], process_image(img, fp32)[0]),
                          (process_video(video, vcfg, cfg, 64).pixel_values,
                           process_video(video, vcfg, fp32, 64).pixel_values)):
        assert compact.dtype == torch.uint8 and full.dtype == torch.float32
        assert compact.nbytes * 4 == full.nbytes
        on_device = embed.normalize(compact)
        assert (on_device - _todays_fp32_normalisation(compact, cfg)).abs().max().item() == 0.0
        assert torch.equal(on_device, full)
        assert torch.equal(embed(compact), embed(full))


def test_smart_resize_rules():
    for h, w in [(1, 1), (31, 1000), (480, 640), (4000, 3000), (1080, 1920)]:
        rh, rw = smart_resize(h, w, 32, CFG.min_pixels, CFG.max_pixels)
        assert rh % 32 == 0 and rw % 32 == 0
        assert CFG.min_pixels <= rh * rw <= CFG.max_pixels
        assert abs(math.log((rh / rw) / (h / w))) < 1.5  # aspect kept up to rounding to 32-pixel steps
    with pytest.raises(ValueError, match="aspect ratio"):
        smart_resize(10, 2500, 32, CFG.min_pixels, CFG.max_pixels)


def test_max_pixels_override_shrinks_but_not_below_min():
    img = _random_image(np.random.default_rng(0), 640, 640, "RGB")
    _, full = process_image(img, CFG)
    _, small = process_image(img, CFG, max_pixels=16 * 32 * 32)
    _, floor = process_image(img, CFG, max_pixels=1)
    assert image_tokens(full, 2) == 64 and image_tokens(small, 2) == 16
    assert image_tokens(floor, 2) == 4  # min_pixels wins over a budget below it


def test_patch_layout_is_channel_temporal_row_col():
    # A constant image with a distinct value per channel: each patch vector is (C, T, ps, ps).
    a = np.zeros((64, 64, 3), dtype=np.uint8)
    a[..., 0], a[..., 1], a[..., 2] = 0, 255, 51
    pixels, grid = process_image(Image.fromarray(a), ImageConfig(min_pixels=64 * 64, max_pixels=64 * 64,
                                                                  pixel_dtype="float32"))
    assert grid.tolist() == [[1, 4, 4]]
    per_channel = pixels.reshape(16, 3, 2 * 16 * 16)
    assert torch.allclose(per_channel[:, 0], torch.tensor(-1.0))
    assert torch.allclose(per_channel[:, 1], torch.tensor(1.0))
    assert torch.allclose(per_channel[:, 2], torch.tensor(51 / 255 * 2 - 1))


def test_decode_image_bad_bytes_name_the_member():
    buf = io.BytesIO()
    _random_image(np.random.default_rng(1), 64, 64, "RGB").save(buf, format="PNG")
    good = buf.getvalue()
    assert decode_image(good, "page1.png").size == (64, 64)
    with pytest.raises(BadSample, match="page1.png: undecodable image"):
        decode_image(good[: len(good) // 2], "page1.png")
    with pytest.raises(BadSample, match="jpg: undecodable image"):
        decode_image(b"<html>not an image</html>", "jpg")
